"""KV cache: keys and values of every past position, per layer, in one of the cache types.

The model calls only `attend(layer, q, k, v)` (store the new keys/values, attend over everything
stored), `advance(n)`, `reset(pos)`, `pos` and `n_ctx`. K and V each live in a store of their own
type (qkvgguf/kv_types.py: f32, f16, q8_0, q4_0, q4g; llama.cpp's `--cache-type-k/v` names), so K
and V may differ. Attention always runs over the stored form, through the backend's ops (the module
`Model` chose, passed in as `ops`; this file never picks a backend):

    ops.kv_write(store, layer, pos, x)   store new rows: torch `Store.write`; Triton one quantize-and-
                                         store kernel (kernels/kv_write.py) where the format has one
    ops.kv_read(store, layer, end)       the layer as that backend's attention reads it: torch float32
                                         rows; Triton a `KVOperand` over the store's bytes, in place
    ops.attention(q, K, V, n_past)       torch SDPA over the rows (the reference); Triton the flash
                                         kernels (kernels/attention.py), dequantizing in registers

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

q4g and q3g (the 4- and 3-bit modes) keep q in float and K unrotated: their keys are quantized per
channel, their newest partial group of keys is q8_0; their values are rotated as above (`rotate_v`).
A batch of queries is split where a key group completes, so every query sees exactly what it would
see had the tokens come one at a time.

Sliding-window layers (ModelConfig.window(i) > 0, Gemma 3's local layers) see only the last
`window` positions. Their K and V live in stores of their own holding `swa_rows` positions
(qkvgguf/kv_types.py: window + SWA_SLACK), used as a ring: position p sits in slot p % rows. A
batch of queries is split so that no query's keys are overwritten before it attends (at most
SWA_SLACK + 1 queries at once); the attention gets `window` and `ring` = rows and masks by the
position each slot holds. When a ring would be no shorter than n_ctx the layer keeps every
position and only the mask applies (so a full-cache computation masked the same way is
`KVCache(..., ring=False)`). A --kv-budget cache (the precision ladder) keeps every position of
every layer: its rungs follow positions, which a ring's reused slots would scramble.
"""

from __future__ import annotations

import torch

from qkvgguf.config import ModelConfig
from qkvgguf.errors import QkvggufError
from qkvgguf.kv_types import SWA_SLACK, cache_type, swa_rows

from . import ops as torch_ops
from .kv_quant import fwht, hadamard, llama_rotation_size, make_store, q8_0_round_trip

class KVCache:
    def __init__(self, cfg: ModelConfig, n_ctx: int, type_k: str = "f32", type_v: str = "f32",
                 device: str | torch.device = "cpu", ops=torch_ops, budget: int | None = None,
                 ring: bool = True, swa_slack: int = SWA_SLACK):
        """budget: --kv-budget bytes; the cache is then the q8_0 -> q4g -> q3g ladder of
        qkvgguf/kv_budget.py (type_k/type_v are ignored, and reported as "budget"), without rings.
        ring=False: sliding-window layers keep all n_ctx positions (the mask alone applies);
        swa_slack: their rings hold window + swa_slack positions (kv_types.swa_rows)."""
        d = cfg.head_dim
        self.ops = ops  # the backend's ops module (runtime/ops.py or ops_triton.py), chosen by Model
        self.n_ctx, self.pos = n_ctx, 0
        device = torch.device(device)
        # layer -> (index in its stores, window, ring rows or 0); global layers first, then local ones
        self.windows = [cfg.window(i) for i in range(cfg.n_layer)]
        local = [i for i, w in enumerate(self.windows) if w]
        glob = [i for i, w in enumerate(self.windows) if not w]
        self.schedule = None
        if budget is not None:
            from qkvgguf.kv_budget import plan_budget

            from .kv_ladder import LadderStore

            self.schedule = plan_budget(cfg, n_ctx, budget)
            self.type_k = self.type_v = "budget"
            self.ring_rows = n_ctx

            def make(shape, kind):
                return LadderStore(shape, kind, device, self.schedule)

            self.rot_k, self.rot_v, self.q_as_q8_0 = 0, llama_rotation_size(d, False), False
            self.v_butterflies = True
        else:
            tk, tv = cache_type(type_k, d), cache_type(type_v, d)
            self.type_k, self.type_v = type_k, type_v
            self.ring_rows = swa_rows(cfg, n_ctx, type_k, type_v, swa_slack) if ring else n_ctx

            def make(shape, kind):
                return make_store(tk if kind == "k" else tv, shape, kind, device)

            self.rot_k = llama_rotation_size(d, True) if tk.llama_maths else 0
            self.rot_v = llama_rotation_size(d, False) if tv.llama_maths or tv.rotate_v else 0
            self.q_as_q8_0 = tk.llama_maths
            self.v_butterflies = not tv.llama_maths  # q4g/q3g: the same bits whatever the batch (kv_quant.fwht)
        rings = self.ring_rows < n_ctx
        shape = (len(glob) if rings else cfg.n_layer, cfg.n_head_kv, n_ctx, d)
        self.k_store, self.v_store = make(shape, "k"), make(shape, "v")
        self._where = {i: (self.k_store, self.v_store, glob.index(i) if rings else i, 0) for i in glob}
        if rings:  # the local layers' rings
            shape = (len(local), cfg.n_head_kv, self.ring_rows, d)
            self.k_ring, self.v_ring = make(shape, "k"), make(shape, "v")
            self._where.update({i: (self.k_ring, self.v_ring, j, self.ring_rows) for j, i in enumerate(local)})
        else:
            self.k_ring = self.v_ring = None
            self._where.update({i: (self.k_store, self.v_store, i, 0) for i in local})
        self.device = device
        self.pos_t: torch.Tensor | None = None  # device mirror of pos (use_device_position)

    @property
    def n_bytes(self) -> int:
        rings = self.k_ring.n_bytes + self.v_ring.n_bytes if self.k_ring is not None else 0
        return self.k_store.n_bytes + self.v_store.n_bytes + rings

    def _stores(self):
        return [s for s in (self.k_store, self.v_store, self.k_ring, self.v_ring) if s is not None]

    def use_device_position(self) -> torch.Tensor:
        """Keep a device copy of pos that one-token steps read and `advance` increments on the device,
        so a decode step launches the same work at every position (a CUDA graph replays it: see
        runtime/cuda_graph.py). Not for q4g (its group boundaries are decided on the host)."""
        for t in (self.type_k, self.type_v):
            if t == "budget" or not cache_type(t).device_position:
                raise QkvggufError(f"cache type {t} cannot decode from a device position (CUDA graphs); use q8_0 or q4_0")
        if self.pos_t is None:
            self.pos_t = torch.tensor([self.pos], dtype=torch.int64, device=self.device)
        return self.pos_t

    def check_room(self, T: int) -> None:
        """ValueError unless T more tokens fit after the pos already held."""
        if self.pos + T > self.n_ctx:
            raise ValueError(f"{T} tokens at position {self.pos} overflow the {self.n_ctx}-token context")

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
            v = fwht(v, self.rot_v) if self.v_butterflies else hadamard(v, self.rot_v)
        if self.q_as_q8_0:
            q = q8_0_round_trip(q)
        ops = self.ops
        ks, vs, j, ring = self._where[layer]
        window = self.windows[layer]
        if self.pos_t is not None and T == 1:  # one token at the device position pos_t (CUDA graphs)
            at = self.pos_t % ring if ring else self.pos_t
            ops.kv_write(ks, j, at, k)
            ops.kv_write(vs, j, at, v)
            rows = ring or self.n_ctx
            K, V = ops.kv_read(ks, j, rows), ops.kv_read(vs, j, rows)
            out = ops.attention(q.to(dtype), K, V, self.pos_t, window, ring).float()
            return (hadamard(out, self.rot_v) if self.rot_v else out).to(dtype)
        rows = self.dense_layer(layer) if T == 1 else None
        if rows is not None:  # a plain-float cache, one query: write + attend in one call (runtime/ops.py)
            fast = getattr(ops, "attend_one", None)
            out = fast(*rows, q, k, v, p0, window) if fast is not None else None
            if out is not None:
                return out.to(dtype)
        cuts = set(ks.cuts(p0, p0 + T) + vs.cuts(p0, p0 + T))
        if ring:  # queries [a, b) need positions (a - window, b) in the ring at once
            cuts |= set(range(p0 + ring - window + 1, p0 + T, ring - window + 1))
        bounds = [p0, *sorted(cuts), p0 + T]
        outs = []
        for a, b in zip(bounds[:-1], bounds[1:]):  # queries [a, b) all see the same stored state
            self._write(ks, j, a, k[:, a - p0:b - p0], ring)
            self._write(vs, j, a, v[:, a - p0:b - p0], ring)
            rows = min(b, ring) if ring else b
            K, V = ops.kv_read(ks, j, rows), ops.kv_read(vs, j, rows)
            outs.append(ops.attention(q[:, a - p0:b - p0].to(dtype), K, V, a, window, ring).float())
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        if self.rot_v:
            out = hadamard(out, self.rot_v)
        return out.to(dtype)

    def dense_layer(self, layer: int):
        """(K, V, ring) of a layer whose rows are stored as plain floats and read as stored: the rows
        (n_kv, rows, d) float32/float16, written and read in place by the CPU decode kernels (ring:
        the rows form a ring, position p in row p % ring; 0: row p). None for a rotated or quantized
        cache, or in device-position mode."""
        if self.rot_k or self.rot_v or self.q_as_q8_0 or self.pos_t is not None:
            return None
        ks, vs, j, ring = self._where[layer]
        K, V = ks.dense(j), vs.dense(j)
        if K is None or V is None:
            return None
        return K, V, ring

    def _write(self, store, j: int, pos: int, x: torch.Tensor, ring: int) -> None:
        """x (n_kv, T, d) at positions [pos, pos + T): slots pos % ring onward in a ring (wrapping)."""
        if not ring:
            return self.ops.kv_write(store, j, pos, x)
        at, T = pos % ring, x.shape[1]
        n = min(T, ring - at)
        self.ops.kv_write(store, j, at, x[:, :n])
        if n < T:
            self.ops.kv_write(store, j, 0, x[:, n:])

    def can_reset(self, pos: int) -> bool:
        """Whether `reset(pos)` keeps what the next query needs: a ring still holds positions
        [pos - window + 1, pos) unless later positions overwrote them (always true without rings)."""
        if self.k_ring is None or pos == 0:
            return True
        window = max(self.windows)
        return self.pos <= max(pos - window + 1, 0) + self.ring_rows

    def advance(self, n: int) -> None:
        self.pos += n
        if self.pos_t is not None:
            self.pos_t += n

    def reset(self, pos: int = 0) -> None:
        """Forget positions >= pos."""
        if not 0 <= pos <= self.pos:
            raise ValueError(f"cannot reset a cache holding {self.pos} positions to position {pos}")
        if not self.can_reset(pos):
            raise ValueError(f"cannot reset a sliding-window cache holding {self.pos} positions to position "
                             f"{pos}: its rings of {self.ring_rows} rows no longer hold the window before it")
        for store in self._stores():
            store.truncate(self.pos, pos)
        self.pos = pos
        if self.pos_t is not None:
            self.pos_t.fill_(pos)
