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
    groups  q4g: f16 sinks and newest partial group, complete groups of 64 positions quantized

and its K and V rows are read by the kernels as `formats` (row formats, below). A new type over an
existing layout and row format is one `register(KVType(...))`; a new row format is one `RowFormat`
plus its branch in the kernels (and its torch codec in kv_quant.BLOCKS).

Row formats, per KV head and position (elements, bytes per block), d = head_dim:

    dense   (1, 2 or 4)    d * dtype size
    q8_0    (32, 2 + 32)   ggml block_q8_0: f16 d, 32 int8                x = d*q
    q4_0    (32, 2 + 16)   ggml block_q4_0: f16 d, 16 nibble bytes        x = d*(q-8)
    q4g_k   d/2 bytes of 4-bit codes per position + per channel f16 (scale, min) per 64 positions

Memory, per layer and KV head (`KVType.layout`): bytes(n_ctx) = fixed + rate * n_ctx, exact at every
n_ctx. For f32/f16/q8_0/q4_0 fixed = 0. For q4g fixed = the f16 sink and tail rows, (S + 64) * 2d,
less the rate of the positions that live only there (the sinks and those past the last whole group:
the rate is paid per complete group, so bytes step up every 64 positions). Hence "bits per value"
(`KVType.bits_per_value`) is a function of n_ctx, counting scales, sinks and tail rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .config import ModelConfig
from .errors import QkvggufError

N_SINK = 4  # q4g: leading positions kept in f16
GROUP = 64  # q4g: positions quantized together


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
]}
assert len({f.code for f in ROW_FORMATS.values()}) == len(ROW_FORMATS), "row format codes must differ"


# -- cache types -------------------------------------------------------------------------------------
def _all_rated(n_ctx: int) -> int:
    return 0


def q4g_unrated(n_ctx: int) -> int:
    """Of n_ctx positions, how many q4g holds only in its f16 rows: the sinks and the positions past
    the last whole group (the store has (n_ctx - S) // 64 groups)."""
    return n_ctx - GROUP * max(0, (n_ctx - N_SINK) // GROUP)


@dataclass(frozen=True)
class KVType:
    name: str
    row_bytes: Callable[[int], int]  # bytes per position and KV head for head_dim d (the rate)
    store: str  # layout: "dense", "blocks" or "groups" (kv_quant.STORES)
    formats: tuple[str, str]  # row formats of the K and the V store (ROW_FORMATS)
    dtype: str = ""  # dense stores: "float32" or "float16"
    llama_maths: bool = False  # llama.cpp's quantized-cache maths: Hadamard rotation, q as q8_0 for K
    head_dim_multiple: int = 1
    device_position: bool = True  # can decode at a device-side position (CUDA graphs); q4g cannot
    help: str = ""
    n_sink: int = N_SINK  # groups layout: leading positions kept in f16 (the ablation varies it)
    f16_rows: int = 0  # float16 rows allocated per layer and KV head whatever n_ctx (q4g: sinks + tail)
    unrated: Callable[[int], int] = _all_rated  # positions of n_ctx held only in those rows (no rate paid)

    def layout(self, n_ctx: int, d: int) -> tuple[int, int]:
        """(fixed, rate) bytes per layer and KV head: a store of n_ctx positions allocates exactly
        fixed + rate * n_ctx. fixed = the f16 rows less the rate of the positions only they hold, so it
        depends on n_ctx (mod 64 for q4g); at n_ctx 0 it is the f16 rows alone, an upper bound."""
        rate = self.row_bytes(d)
        return self.f16_rows * 2 * d - rate * self.unrated(n_ctx), rate

    def bits_per_value(self, n_ctx: int, d: int) -> float:
        """Bits stored per cached value at n_ctx positions: every byte allocated (scales, f16 sinks and
        tail rows) over the n_ctx * d values it holds; q4g's is above its rate's at short contexts."""
        if n_ctx < 1:
            raise ValueError(f"bits per value of a {self.name} cache needs n_ctx >= 1, got {n_ctx}")
        fixed, rate = self.layout(n_ctx, d)
        return (fixed + rate * n_ctx) * 8 / (n_ctx * d)


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
    KVType("q4g", lambda d: d // 2 + 2 * 2 * d // GROUP, "groups", ("q4g_k", "q4_0"),
           head_dim_multiple=32, device_position=False, f16_rows=N_SINK + GROUP, unrated=q4g_unrated,
           help="groups of 64 positions at 4.5 bits per value (K per channel, V as q4_0) plus the "
                "first 4 positions and the newest partial group in f16: at head_dim 64, 6.06 bits "
                "per value at 512 positions, 4.89 at 2048, 4.60 at 8192"),
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
    fixed + per_token * n_ctx. fixed is q4g's f16 sink and tail rows less the rate of the positions
    only they hold (0 for the other types); it varies with n_ctx mod 64, and at n_ctx 0 it is the
    f16 rows alone, which no n_ctx exceeds (see kv_max_ctx). Sliding-window layers whose ring is
    shorter than n_ctx (swa_rows) are all fixed: they allocate the same at any longer context."""
    d, n_kv = cfg.head_dim, cfg.n_head_kv
    n_local = sum(cfg.swa_layers) if cfg.sliding_window else 0
    rows = swa_rows(cfg, n_ctx, type_k, type_v)
    n_rated = cfg.n_layer - (n_local if rows < n_ctx else 0)
    (fk, rk), (fv, rv) = (cache_type(t, d).layout(n_ctx, d) for t in (type_k, type_v))
    fixed, rate = n_rated * n_kv * (fk + fv), n_rated * n_kv * (rk + rv)
    if rows < n_ctx:  # the rings: their whole size is fixed
        (fk, rk), (fv, rv) = (cache_type(t, d).layout(rows, d) for t in (type_k, type_v))
        fixed += n_local * n_kv * (fk + fv + (rk + rv) * rows)
    return fixed, rate


def kv_bytes_per_token(cfg: ModelConfig, type_k: str = "f16", type_v: str = "f16") -> int:
    """Bytes one more position costs on average across all layers, K and V: the rate, without q4g's
    fixed f16 rows (so n_ctx times it undercounts a q4g cache; use kv_cache_bytes for a total)."""
    return kv_layout_bytes(cfg, 0, type_k, type_v)[1]


def kv_cache_bytes(cfg: ModelConfig, n_ctx: int, type_k: str = "f16", type_v: str = "f16") -> int:
    """Exact bytes a KVCache of n_ctx positions allocates (tests check it against the stores)."""
    fixed, per_token = kv_layout_bytes(cfg, n_ctx, type_k, type_v)
    return fixed + per_token * n_ctx


def bits_per_value(type_name: str, n_ctx: int, head_dim: int) -> float:
    """Bits a cache of this type stores per value at n_ctx positions, everything allocated counted
    (block scales, q4g's f16 sinks and tail): q4g at head_dim 64 is 6.06 at 512, 4.60 at 8192."""
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
    the rate R, n = (room - F) // R always fits, and since at most f16_rows positions per store skip
    the rate, the answer is below n + max f16_rows + 1; bytes never fall as n_ctx grows, so bisect.
    """
    rows, rate = kv_layout_bytes(cfg, 0, type_k, type_v)
    if room < rows:
        return 0
    lo = (room - rows) // rate  # fits: rings make a cache smaller than the layout at n_ctx 0 says
    hi = lo + max(cache_type(t, cfg.head_dim).f16_rows for t in (type_k, type_v)) + 1
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
