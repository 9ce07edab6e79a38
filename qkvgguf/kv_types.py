"""KV cache types: one record per `--cache-type-k/v` name, and the exact byte accounting they imply.

Everything that depends on a cache type reads it here: the stores (runtime/kv_quant.py builds a
store from the record's `store` and `formats`), the cache (runtime/kv_cache.py: rotation and
q-through-Q8_0 from `llama_maths`, CUDA-graph decode from `device_position`), the kernels (the `FMT`
code and block bytes of each row format: runtime/kernels/attention.py and kv_write.py), the
planner, `inspect --vram` and the converter's `--fit` (the accounting below), and the CLI's help.
Nothing here imports torch, so the CLI's help and `inspect` read it for free; it is a table of
formats like qkvgguf/quants/, so it sits in the core beside it.

A type is stored as one of three layouts (`store`):

    dense   rows of d float32/float16 (`dtype`)
    blocks  ggml blocks along head_dim, one row of d/32 blocks per (layer, head, position)
    groups  q4g, q3g: S f16 sinks, complete groups of 64 positions quantized, and the newest partial
            group in `tail` rows (q8_0: 8.5 bits; the ablation's f16)

and its K and V rows are read by the kernels as `formats` (row formats, below). A new type over an
existing layout and row format is one `register(KVType(...))`; a new row format is one `RowFormat`
plus its branch in the kernels (and its torch codec in kv_quant.BLOCKS or kv_quant.CHANNELS).

Row formats, per KV head and position (elements, bytes per block), d = head_dim:

    dense   (1, 2 or 4)    d * dtype size
    q8_0    (32, 2 + 32)   ggml block_q8_0: f16 d, 32 int8                x = d*q
    q4_0    (32, 2 + 16)   ggml block_q4_0: f16 d, 16 nibble bytes        x = d*(q-8)
    q4g_k   d/2 bytes of 4-bit codes per position + per channel f16 (scale, min) per 64 positions
    q3g_k   3d/8 bytes of 3-bit codes per position + per channel f16 (scale, min) per 64 positions
    q4_64   (64, 2 + 32)   f16 s, 32 nibble bytes      x = s * (2q - 15) / 15       (16 levels)
    q3_64   (64, 2 + 24)   f16 s, 16 + 8 bytes (2-bit and 1-bit planes)  x = s * L3[q]  (8 levels:
                           Lloyd-Max for a Gaussian, scaled so the outer level is 1)

Memory, per layer and KV head and each of K and V (`KVType.layout`): bytes(n_ctx) = fixed + rate *
n_ctx, exact at every n_ctx. For f32/f16/q8_0/q4_0 fixed = 0. For the groups layout fixed = the S
f16 sink rows and the 64 tail rows, less the rate of the positions that live only there (the sinks
and those past the last whole group: the rate is paid per complete group, so bytes step up every 64
positions). Hence "bits per value" (`KVType.bits_per_value`) is a function of n_ctx, counting
scales, sinks and tail rows. K and V of one type may have different rates (`row_bytes_v`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .config import ModelConfig
from .errors import QkvggufError

N_SINK = 4  # q4g, q3g: leading positions kept in f16
GROUP = 64  # q4g, q3g: positions quantized together
# q3_64's 8 levels: Lloyd-Max quantizer of a unit Gaussian (+-0.2451, 0.7560, 1.3439, 2.1520) over
# its outer level, so x = s * L3[q] with s >= the row's largest magnitude chosen per row (kv_quant)
L3 = tuple(x / 2.1520 for x in (-2.1520, -1.3439, -0.7560, -0.2451, 0.2451, 0.7560, 1.3439, 2.1520))


# -- row formats: what a kernel reads (and kv_write writes) -----------------------------------------
@dataclass(frozen=True)
class RowFormat:
    name: str
    code: int  # the FMT constexpr of kernels/attention.py `_load_rows` and kernels/kv_write.py
    block: int = 1  # elements per block along head_dim (a head_dim must be a multiple)
    block_bytes: int = 0  # bytes per block (0: dense, the tensor's dtype)
    fused_write: bool = False  # kernels/kv_write.py quantizes and stores a row in one launch


ROW_FORMATS: dict[str, RowFormat] = {f.name: f for f in [
    RowFormat("dense", 0),
    RowFormat("q8_0", 1, 32, 2 + 32, fused_write=True),
    RowFormat("q4_0", 2, 32, 2 + 16, fused_write=True),
    RowFormat("q4g_k", 3, 32),  # per-channel codes over groups of positions (q4g's keys)
    RowFormat("q4_64", 4, 64, 2 + 32),  # one f16 scale per 64 values, 16 symmetric levels (q4g's values)
    RowFormat("q3_64", 5, 64, 2 + 24),  # one f16 scale per 64 values, 8 Lloyd-Max levels (q3g's values)
    RowFormat("q3g_k", 6, 64),  # per-channel 3-bit codes over groups of positions (q3g's keys)
]}
assert len({f.code for f in ROW_FORMATS.values()}) == len(ROW_FORMATS), "row format codes must differ"


# -- cache types -------------------------------------------------------------------------------------
def row_format_bytes(fmt: str, d: int) -> int:
    """Bytes of one position's row of d values in a block row format ("dense": float16)."""
    f = ROW_FORMATS[fmt]
    return 2 * d if not f.block_bytes else d // f.block * f.block_bytes


@dataclass(frozen=True)
class KVType:
    name: str
    row_bytes: Callable[[int], int]  # bytes per position and KV head for head_dim d (the rate; K's)
    store: str  # layout: "dense", "blocks" or "groups" (kv_quant.STORES)
    formats: tuple[str, str]  # row formats of the K and the V store (ROW_FORMATS)
    dtype: str = ""  # dense stores: "float32" or "float16"
    llama_maths: bool = False  # llama.cpp's quantized-cache maths: Hadamard rotation, q as q8_0 for K
    head_dim_multiple: int = 1
    device_position: bool = True  # can decode at a device-side position (CUDA graphs); groups cannot
    help: str = ""
    n_sink: int = N_SINK  # groups layout: leading positions kept in f16 (the ablation varies it)
    # groups layout: row format of the newest partial group of K and of V ("dense": f16; "": none,
    # the rows are quantized as they arrive, for per-token formats only)
    tails: tuple[str, str] = ("dense", "dense")
    tail_rows: tuple[int, int] = (GROUP, GROUP)  # positions per group of K and of V (the tail's length;
    # per-channel keys need GROUP, their scales cover 64 positions)
    row_bytes_v: Callable[[int], int] | None = None  # V's rate where it differs from K's
    rotate_v: bool = False  # V rotated by a Hadamard matrix before it is stored (as llama_maths does)

    def rate(self, d: int, kind: str = "k") -> int:
        """Bytes per position and KV head of the K (kind "k") or V ("v") store."""
        return self.row_bytes_v(d) if kind == "v" and self.row_bytes_v is not None else self.row_bytes(d)

    @property
    def held_rows(self) -> int:
        """Most positions a store holds outside its rate: the sinks and a tail of 64."""
        if self.store != "groups":
            return 0
        return self.n_sink + max(n if tail else 0 for n, tail in zip(self.tail_rows, self.tails))

    def unrated(self, n_ctx: int, kind: str = "k") -> int:
        """Of n_ctx positions, how many the K or V store holds only in its sink and tail rows (with
        a tail it has (n_ctx - S) // 64 groups; without, a row per position past the sinks); 0 for
        the other layouts."""
        if self.store != "groups":
            return 0
        if not self.tails[kind == "v"]:
            return min(n_ctx, self.n_sink)
        g = self.tail_rows[kind == "v"]
        return n_ctx - g * max(0, (n_ctx - self.n_sink) // g)

    def layout(self, n_ctx: int, d: int, kind: str = "k") -> tuple[int, int]:
        """(fixed, rate) bytes per layer and KV head of the K or V store: a store of n_ctx positions
        allocates exactly fixed + rate * n_ctx. fixed = the sink and tail rows less the rate of the
        positions only they hold, so it depends on n_ctx (mod 64 for groups); at n_ctx 0 it is those
        rows alone, an upper bound."""
        rate = self.rate(d, kind)
        if self.store != "groups":
            return 0, rate
        tail = self.tails[kind == "v"]
        rows = self.n_sink * 2 * d + (self.tail_rows[kind == "v"] * row_format_bytes(tail, d) if tail else 0)
        return rows - rate * self.unrated(n_ctx, kind), rate

    def bits_per_value(self, n_ctx: int, d: int) -> float:
        """Bits stored per cached value (K and V together) at n_ctx positions: every byte allocated
        (scales, sink and tail rows) over the 2 * n_ctx * d values; above the rate's at short contexts."""
        if n_ctx < 1:
            raise ValueError(f"bits per value of a {self.name} cache needs n_ctx >= 1, got {n_ctx}")
        total = sum(f + r * n_ctx for f, r in (self.layout(n_ctx, d, kind) for kind in ("k", "v")))
        return total * 8 / (2 * n_ctx * d)


KV_TYPES: dict[str, KVType] = {}


def register(t: KVType) -> KVType:
    for f in t.formats:
        if f not in ROW_FORMATS:
            raise ValueError(f"cache type {t.name}: unknown row format {f!r}")
    KV_TYPES[t.name] = t
    return t


for _t in [
    KVType("f32", lambda d: d * 4, "dense", ("dense", "dense"), dtype="float32", help="float32"),
    KVType("f16", lambda d: d * 2, "dense", ("dense", "dense"), dtype="float16", help="float16"),
    KVType("q8_0", lambda d: d // 32 * (2 + 32), "blocks", ("q8_0", "q8_0"), llama_maths=True,
           head_dim_multiple=32, help="ggml Q8_0 blocks, 8.5 bits per value"),
    KVType("q4_0", lambda d: d // 32 * (2 + 16), "blocks", ("q4_0", "q4_0"), llama_maths=True,
           head_dim_multiple=32, help="ggml Q4_0 blocks, 4.5 bits per value"),
    KVType("q4g", lambda d: d // 2 + 2 * 2 * d // GROUP, "groups", ("q4g_k", "q4_64"),
           row_bytes_v=lambda d: d // 64 * (2 + 32), rotate_v=True, tails=("q8_0", "q8_0"), tail_rows=(GROUP, 16),
           head_dim_multiple=64, device_position=False,
           help="4-bit: K per channel over groups of 64 positions, V rotated in rows of 16 levels, the "
                "first 4 positions in f16, the newest 64 keys and 16 values in q8_0: at head_dim 64, "
                "4.82 bits per value at 512 positions, 4.49 at 2048, 4.40 at 8192"),
    KVType("q3g", lambda d: 3 * d // 8 + 2 * 2 * d // GROUP, "groups", ("q3g_k", "q3_64"),
           row_bytes_v=lambda d: d // 64 * (2 + 24), rotate_v=True, tails=("q8_0", "q8_0"), tail_rows=(GROUP, 16),
           n_sink=2, head_dim_multiple=64, device_position=False,
           help="3-bit: K per channel over groups of 64 positions, V rotated in rows of 8 Lloyd-Max "
                "levels, the first 2 positions in f16, the newest 64 keys and 16 values in q8_0: at "
                "head_dim 64, 3.83 bits per value at 512 positions, 3.49 at 2048, 3.40 at 8192"),
]:
    register(_t)


def cache_type(name: str, head_dim: int | None = None) -> KVType:
    """The KVType called `name`; QkvggufError (one line) for an unknown name or a head_dim it cannot hold."""
    if name not in KV_TYPES:
        raise QkvggufError(f"cache type '{name}' is not supported (valid: {', '.join(KV_TYPES)})")
    t = KV_TYPES[name]
    if head_dim is not None and head_dim % t.head_dim_multiple:
        raise QkvggufError(f"cache type '{name}' needs head_dim a multiple of {t.head_dim_multiple}, "
                           f"the model has {head_dim}")
    return t


# -- accounting ------------------------------------------------------------------------------------
SWA_SLACK = 256  # a sliding-window layer keeps window + SWA_SLACK positions (a ring): SWA_SLACK + 1
#                 queries attend at once (a longer batch is split), as llama.cpp keeps n_swa + n_ubatch


def swa_rows(cfg: ModelConfig, n_ctx: int, type_k: str = "f16", type_v: str = "f16", slack: int = SWA_SLACK) -> int:
    """Positions the store of each sliding-window (local) layer holds: window + slack as a ring,
    or n_ctx when that is no more, or when a cache type's layout is positional (q4g's groups).
    (slack other than SWA_SLACK: tests that make a tiny model's ring wrap.)"""
    if not cfg.sliding_window or any(cache_type(t).store == "groups" for t in (type_k, type_v)):
        return n_ctx
    return min(n_ctx, cfg.sliding_window + max(slack, 0))


def kv_layout_bytes(cfg: ModelConfig, n_ctx: int, type_k: str = "f16", type_v: str = "f16") -> tuple[int, int]:
    """(fixed, per_token) across all layers, K and V: a cache of n_ctx positions allocates exactly
    fixed + per_token * n_ctx. fixed is q4g's/q3g's sink and tail rows less the rate of the positions
    only they hold (0 for the other types); it varies with n_ctx mod 64 (16 for V), and at n_ctx 0 it is the
    sink and tail rows alone, which no n_ctx exceeds (see kv_max_ctx). Sliding-window layers whose ring is
    shorter than n_ctx (swa_rows) are all fixed: they allocate the same at any longer context."""
    d, n_kv = cfg.head_dim, cfg.n_head_kv
    n_local = sum(cfg.swa_layers) if cfg.sliding_window else 0
    rows = swa_rows(cfg, n_ctx, type_k, type_v)
    n_rated = cfg.n_layer - (n_local if rows < n_ctx else 0)
    kinds = ((type_k, "k"), (type_v, "v"))
    (fk, rk), (fv, rv) = (cache_type(t, d).layout(n_ctx, d, kind) for t, kind in kinds)
    fixed, rate = n_rated * n_kv * (fk + fv), n_rated * n_kv * (rk + rv)
    if rows < n_ctx:  # the rings: their whole size is fixed
        (fk, rk), (fv, rv) = (cache_type(t, d).layout(rows, d, kind) for t, kind in kinds)
        fixed += n_local * n_kv * (fk + fv + (rk + rv) * rows)
    return fixed, rate


def kv_bytes_per_token(cfg: ModelConfig, type_k: str = "f16", type_v: str = "f16") -> int:
    """Bytes one more position costs on average across all layers, K and V: the rate, without q4g's
    fixed sink and tail rows (so n_ctx times it undercounts a q4g/q3g cache; use kv_cache_bytes for a total)."""
    return kv_layout_bytes(cfg, 0, type_k, type_v)[1]


def kv_cache_bytes(cfg: ModelConfig, n_ctx: int, type_k: str = "f16", type_v: str = "f16") -> int:
    """Exact bytes a KVCache of n_ctx positions allocates (tests check it against the stores)."""
    fixed, per_token = kv_layout_bytes(cfg, n_ctx, type_k, type_v)
    return fixed + per_token * n_ctx


def bits_per_value(type_name: str, n_ctx: int, head_dim: int) -> float:
    """Bits a cache of this type stores per value at n_ctx positions, everything allocated counted
    (block scales, sinks and tails): at head_dim 64 q4g is 4.82 at 512 and 4.49 at 2048, q3g 3.83 and 3.49."""
    return cache_type(type_name, head_dim).bits_per_value(n_ctx, head_dim)


def kv_bits_per_value(cfg: ModelConfig, n_ctx: int, type_k: str = "f16", type_v: str = "f16") -> float:
    """kv_cache_bytes * 8 over the values held, 2 * n_head_kv * head_dim * (positions each layer
    keeps: n_ctx, or a sliding-window layer's ring) for K and V."""
    if n_ctx < 1:
        raise ValueError(f"bits per value of a KV cache needs n_ctx >= 1, got {n_ctx}")
    n_local = sum(cfg.swa_layers) if cfg.sliding_window else 0
    rows = (cfg.n_layer - n_local) * n_ctx + n_local * swa_rows(cfg, n_ctx, type_k, type_v)
    return kv_cache_bytes(cfg, n_ctx, type_k, type_v) * 8 / (2 * cfg.n_head_kv * cfg.head_dim * rows)


def kv_max_ctx(cfg: ModelConfig, room: int, type_k: str = "f16", type_v: str = "f16") -> int:
    """The largest n_ctx whose cache fits in `room` bytes (0 when none does).

    Solved from the layout, not by dividing by the rate: with the f16 rows F (fixed at n_ctx 0) and
    the rate R, n = (room - F) // R always fits, and since at most held_rows positions per store skip
    the rate, the answer is below n + max held_rows + 1; bytes never fall as n_ctx grows, so bisect.
    """
    rows, rate = kv_layout_bytes(cfg, 0, type_k, type_v)
    if room < rows:
        return 0
    lo = (room - rows) // rate  # fits: rings make a cache smaller than the layout at n_ctx 0 says
    hi = lo + max(cache_type(t, cfg.head_dim).held_rows for t in (type_k, type_v)) + 1
    while kv_cache_bytes(cfg, hi, type_k, type_v) <= room:  # with rings, longer contexts may fit
        lo, hi = hi, 2 * hi
        if hi > 1 << 40:  # only rings (every layer local): any context fits
            return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if kv_cache_bytes(cfg, mid, type_k, type_v) <= room:
            lo = mid
        else:
            hi = mid
    return lo


def cache_types_help() -> str:
    """The names for a CLI's help text: 'f32, f16, q8_0, q4_0, q4g'."""
    return ", ".join(KV_TYPES)
