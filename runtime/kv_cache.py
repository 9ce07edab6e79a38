"""KV cache: keys and values of every past position, per layer, in one of the cache types.

The model calls only `attend(layer, q, k, v)` (store the new keys/values, attend over everything
stored), `advance(n)`, `reset(pos)`, `pos` and `n_ctx`. K and V each live in a store of their own
type (runtime/kv_quant.py: f32, f16, q8_0, q4_0, q4g; llama.cpp's `--cache-type-k/v` names), so K
and V may differ. Attention always runs over the stored form. Two paths, chosen by the backend:

- "torch" (the reference): read the needed positions back as float32, call `ops.attention`;
- "triton": new rows are quantized and stored by one kernel (kernels/kv_write.py, q8_0/q4_0) and
  the flash kernels (kernels/attention.py) read the stores in place through `Store.operand`,
  dequantizing blocks in registers; no float copy of the cache is made.

Both see identical inputs (the rotation and the q8_0 query below happen before either).

q8_0 and q4_0 follow llama.cpp's maths for a quantized cache (llama-graph.cpp `build_attn`,
llama-kv-cache.cpp, ggml-cpu `flash_attn_ext`), the reason its q4_0 loses much less than a plain
simulation of the format:

    if K is quantized (and head_dim % 64 == 0): q, k <- q H_k, k H_k   (after rope)
    if V is quantized (and head_dim % 64 == 0): v <- v H_v;  out <- out H_v  (undo, after attention)
    if K is q8_0/q4_0: q goes through Q8_0 before the dot product (ggml's vec_dot type for K)
    scores = q . k / sqrt(d) in float32 with k dequantized, softmax in float32, out = p . v

H_k, H_v are orthonormal Walsh-Hadamard matrices (ggml_gen_hadamard) applied to runs of n elements
of each head: n = the largest power of two >= 64 dividing head_dim for K, 64 for V. Rotating q and
k alike leaves q . k unchanged and spreads outlier channels over the whole block before rounding.
(Set LLAMA_ATTN_ROT_DISABLE=1 and llama.cpp drops the rotation, and its q4_0 loses as much as the
plain simulation did.) Not reproduced: ggml accumulates an f16 V in f16; this reference in float32.

q4g (the improved 4-bit mode) keeps q in float and needs no rotation: its keys are quantized per
channel, and its newest partial group is f16. A batch of queries is split where a group completes,
so every query sees exactly what it would see had the tokens come one at a time.
"""

from __future__ import annotations

import torch

from qkvgguf.config import ModelConfig
from qkvgguf.errors import QkvggufError

from . import ops
from .kv_quant import KV_TYPES, KVType, hadamard, llama_rotation_size, q8_0_round_trip

CACHE_TYPES = tuple(KV_TYPES)  # valid names, for CLI choices and error messages


def cache_type(name: str, head_dim: int | None = None) -> KVType:
    """The KVType called `name`; QkvggufError (one line) for an unknown name or a head_dim it cannot hold."""
    if name not in KV_TYPES:
        raise QkvggufError(f"cache type '{name}' is not supported (valid: {', '.join(CACHE_TYPES)})")
    t = KV_TYPES[name]
    if head_dim is not None and head_dim % t.head_dim_multiple:
        raise QkvggufError(f"cache type '{name}' needs head_dim a multiple of {t.head_dim_multiple}, "
                           f"the model has {head_dim}")
    return t


def kv_layout_bytes(cfg: ModelConfig, n_ctx: int, type_k: str = "f16", type_v: str = "f16") -> tuple[int, int]:
    """(fixed, per_token) across all layers, K and V: a cache of n_ctx positions allocates exactly
    fixed + per_token * n_ctx. fixed is q4g's f16 sink and tail rows less the rate of the positions
    only they hold (0 for the other types); it varies with n_ctx mod 64, and at n_ctx 0 it is the
    f16 rows alone, which no n_ctx exceeds (see kv_max_ctx)."""
    d, heads = cfg.head_dim, cfg.n_layer * cfg.n_head_kv
    (fk, rk), (fv, rv) = (cache_type(t, d).layout(n_ctx, d) for t in (type_k, type_v))
    return heads * (fk + fv), heads * (rk + rv)


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
    """kv_cache_bytes * 8 over the values held, 2 * n_layer * n_head_kv * n_ctx * head_dim (K and V)."""
    if n_ctx < 1:
        raise ValueError(f"bits per value of a KV cache needs n_ctx >= 1, got {n_ctx}")
    return kv_cache_bytes(cfg, n_ctx, type_k, type_v) * 8 / (2 * cfg.n_layer * cfg.n_head_kv * n_ctx * cfg.head_dim)


def kv_max_ctx(cfg: ModelConfig, room: int, type_k: str = "f16", type_v: str = "f16") -> int:
    """The largest n_ctx whose cache fits in `room` bytes (0 when none does).

    Solved from the layout, not by dividing by the rate: with the f16 rows F (fixed at n_ctx 0) and
    the rate R, n = (room - F) // R always fits, and since at most f16_rows positions per store skip
    the rate, the answer is below n + max f16_rows + 1; bytes never fall as n_ctx grows, so bisect.
    """
    rows, rate = kv_layout_bytes(cfg, 0, type_k, type_v)
    if room < rows:
        return 0
    d = cfg.head_dim
    lo = (room - rows) // rate  # fits
    hi = lo + max(cache_type(t, d).f16_rows for t in (type_k, type_v)) + 1  # does not fit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if kv_cache_bytes(cfg, mid, type_k, type_v) <= room:
            lo = mid
        else:
            hi = mid
    return lo


class KVCache:
    def __init__(self, cfg: ModelConfig, n_ctx: int, type_k: str = "f32", type_v: str = "f32",
                 device: str | torch.device = "cpu", backend: str = "torch"):
        d = cfg.head_dim
        self.backend = backend  # "torch" (reference) or "triton" (kernels read the stores in place)
        tk, tv = cache_type(type_k, d), cache_type(type_v, d)
        self.n_ctx, self.pos = n_ctx, 0
        self.type_k, self.type_v = type_k, type_v
        shape = (cfg.n_layer, cfg.n_head_kv, n_ctx, d)
        device = torch.device(device)
        self.k_store, self.v_store = tk.make(shape, "k", device), tv.make(shape, "v", device)
        self.rot_k = llama_rotation_size(d, True) if tk.llama_maths else 0
        self.rot_v = llama_rotation_size(d, False) if tv.llama_maths else 0
        self.q_as_q8_0 = tk.llama_maths
        self.device = device
        self.pos_t: torch.Tensor | None = None  # device mirror of pos (use_device_position)

    @property
    def n_bytes(self) -> int:
        return self.k_store.n_bytes + self.v_store.n_bytes

    def use_device_position(self) -> torch.Tensor:
        """Keep a device copy of pos that one-token steps read and `advance` increments on the device,
        so a decode step launches the same work at every position (a CUDA graph replays it: see
        runtime/cuda_graph.py). Not for q4g (its group boundaries are decided on the host)."""
        for t in (self.type_k, self.type_v):
            if t == "q4g":
                raise QkvggufError("cache type q4g cannot decode from a device position (CUDA graphs); use q8_0 or q4_0")
        if self.pos_t is None:
            self.pos_t = torch.tensor([self.pos], dtype=torch.int64, device=self.device)
        return self.pos_t

    def positions(self, T: int) -> torch.Tensor:
        """Positions [pos, pos + T) on the cache's device; one-token steps in device-position mode
        return the device counter itself (no host value baked into the step)."""
        if self.pos_t is not None and T == 1:
            return self.pos_t
        return torch.arange(self.pos, self.pos + T, device=self.device)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store k, v (n_head_kv, T, hd) at [pos, pos+T); causal attention of q (n_head, T, hd) over all."""
        p0, T = self.pos, q.shape[1]
        dtype = q.dtype
        q, k, v = q.float(), k.float(), v.float()
        if self.rot_k:
            q, k = hadamard(q, self.rot_k), hadamard(k, self.rot_k)
        if self.rot_v:
            v = hadamard(v, self.rot_v)
        if self.q_as_q8_0:
            q = q8_0_round_trip(q)
        if self.pos_t is not None and T == 1:
            out = self._attend_at_device_position(layer, q, k, v, dtype)
            return (hadamard(out, self.rot_v) if self.rot_v else out).to(dtype)
        cuts = sorted(set(self.k_store.cuts(p0, p0 + T) + self.v_store.cuts(p0, p0 + T)))
        bounds = [p0, *cuts, p0 + T]
        outs = []
        fused = self.backend == "triton"
        for a, b in zip(bounds[:-1], bounds[1:]):  # queries [a, b) all see the same stored state
            qa, ka, va = q[:, a - p0:b - p0], k[:, a - p0:b - p0], v[:, a - p0:b - p0]
            if fused:
                self.k_store.write_fused(layer, a, ka)
                self.v_store.write_fused(layer, a, va)
                outs.append(self._attend_stored(layer, qa.to(dtype), a, b).float())
            else:
                self.k_store.write(layer, a, ka)
                self.v_store.write(layer, a, va)
                keys, values = self.k_store.read(layer, b), self.v_store.read(layer, b)
                outs.append(ops.attention(qa, keys, values, a))
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        if self.rot_v:
            out = hadamard(out, self.rot_v)
        return out.to(dtype)

    def _attend_stored(self, layer: int, q: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Triton: q (n_head, T, d) at [start, end) over the stores as they are (no float copy)."""
        from .kernels.attention import attend_decode, attend_prefill

        K, V = self.k_store.operand(layer, end), self.v_store.operand(layer, end)
        if q.shape[1] == 1:
            return attend_decode(q, K, V, end)
        return attend_prefill(q, K, V, start)

    def _attend_at_device_position(self, layer, q, k, v, dtype) -> torch.Tensor:
        """One token at position pos_t (a device scalar): store it there, attend over [0, pos_t]."""
        fused = self.backend == "triton"
        self.k_store.write_at(layer, self.pos_t, k, fused)
        self.v_store.write_at(layer, self.pos_t, v, fused)
        if fused:
            from .kernels.attention import attend_decode

            K, V = self.k_store.operand(layer, self.n_ctx), self.v_store.operand(layer, self.n_ctx)
            return attend_decode(q.to(dtype), K, V, self.pos_t + 1).float()
        keys, values = self.k_store.read(layer, self.n_ctx), self.v_store.read(layer, self.n_ctx)
        visible = torch.arange(self.n_ctx, device=q.device) <= self.pos_t  # (n_ctx,)
        return torch.nn.functional.scaled_dot_product_attention(
            q, keys, values, attn_mask=visible[None, :], enable_gqa=q.shape[0] != keys.shape[0])

    def advance(self, n: int) -> None:
        self.pos += n
        if self.pos_t is not None:
            self.pos_t += n

    def reset(self, pos: int = 0) -> None:
        """Forget positions >= pos."""
        if not 0 <= pos <= self.pos:
            raise ValueError(f"cannot reset a cache holding {self.pos} positions to position {pos}")
        self.k_store.truncate(self.pos, pos)
        self.v_store.truncate(self.pos, pos)
        self.pos = pos
        if self.pos_t is not None:
            self.pos_t.fill_(pos)
