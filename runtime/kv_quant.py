"""KV cache storage formats: how the keys (or the values) of every layer, position and KV head are kept.

The model hands the cache new keys/values as (n_head_kv, T, head_dim) per layer. A store keeps
them in its format and reads any prefix back as float32. Each format is a few plain tensors with a
leading layer dim, laid out so that a fused attention kernel can read them in place.

Per-token layouts, d = head_dim (elements, bytes per block), and the rate in bytes per token and
KV head (`KVType.row_bytes`; q4g and q3g also keep fixed sink and tail rows, below):

    f32   (1, 4)           d*4      float32
    f16   (1, 2)           d*2      float16
    q8_0  (32, 2 + 32)     d/32*34  ggml block_q8_0 along head_dim: f16 d, 32 int8       x = d*q
    q4_0  (32, 2 + 16)     d/32*18  ggml block_q4_0 along head_dim: f16 d, 16 nibble bytes x = d*(q-8)
    q4g   K: d/2 + 4d/64   = 9d/16  4-bit codes + per-channel f16 (scale, min) per 64 positions
          V: d/64*34       = 17d/32 q4_64 rows of the rotated values (runtime/kv_lowbit.py)
    q3g   K: 3d/8 + 4d/64  = 7d/16  3-bit codes + per-channel f16 (scale, min) per 64 positions
          V: d/64*26       = 13d/32 q3_64 rows (8 Lloyd-Max levels) of the rotated values

q8_0/q4_0 rows are exactly ggml's: `blocks[layer, head, pos]` is the byte string llama.cpp keeps for
that token and head (nibble order: byte j = element j low, element j+16 high). New tokens are
quantized as they are written, with the quantizers of qkvgguf.quants (bit-exact with ggml).

q4g and q3g, the 4- and 3-bit modes (issue 18), after KIVI (Liu et al. 2024: keys per channel,
values per token), StreamingLLM (Xiao et al. 2023: attention sinks) and QuaRot-style Hadamard
rotation of V. A `GroupStore` per K and V, everything it allocates counted in the bits per value
(kv_types: at head_dim 64, q4g 4.82 / 4.49 / 4.40 and q3g 3.83 / 3.49 / 3.40 bits at 512 / 2048 /
8192 positions):

    positions 0 .. S-1          "attention sinks": float16 in `sink` (n_layer, n_kv, S, d);
                                S = 4 (q4g), 2 (q3g)
    K, groups of 64 positions   the newest partial group in `tail` (n_layer, n_kv, 64, d/32*34),
                                q8_0 rows; when its last position is written the group is
                                quantized per channel from those q8_0 values (kv_lowbit.
                                quantize_channels: scale = (max - min) / (2^bits - 1), min, f16)
        scales (n_layer, n_kv, n_group, 2, d) f16, codes (n_layer, n_kv, n_group*64, d*bits/8) uint8
    V, groups of 16 positions   the newest 16 in a q8_0 `tail`; then each position's rotated row
                                in `blocks` as q4_64 / q3_64 (one f16 scale per 64 values)

So a query sees the sinks in f16, the newest partial groups in q8_0 and everything older at 4 (3)
bits, whether its tokens came in one batch or one at a time (attention splits a batch where a
group completes: `cuts`).

The table of cache types and the byte accounting are qkvgguf/kv_types.py; `make_store` builds a
store for a type from its record (`store`, `formats`, `dtype`).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch

from qkvgguf.kv_types import GROUP, ROW_FORMATS, KVType, row_format_bytes
from qkvgguf.quants.q4 import dequantize_q4_0, quantize_q4_0_torch
from qkvgguf.quants.q8 import dequantize_q8_0, quantize_q8_0_torch

from .kv_lowbit import (dequantize_channels, dequantize_q3_64, dequantize_q4_64, quantize_channels, quantize_q3_64,
                        quantize_q4_64)

Codec = tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]
BLOCKS: dict[str, Codec] = {  # row format -> torch quantize (..., n) -> bytes, dequantize (rows, bytes)
    "q8_0": (quantize_q8_0_torch, dequantize_q8_0),
    "q4_0": (quantize_q4_0_torch, dequantize_q4_0),
    "q4_64": (quantize_q4_64, dequantize_q4_64),  # runtime/kv_lowbit.py
    "q3_64": (quantize_q3_64, dequantize_q3_64),
}
CHANNELS = {"q4g_k": 4, "q3g_k": 3}  # per-channel key formats -> bits per code (kv_lowbit.quantize_channels)


# -- stores ---------------------------------------------------------------------------------------
class Store:
    """One of K or V for all layers: (n_layer, n_kv, n_ctx, d) in some format.

    write(layer, pos, x): x (n_kv, T, d) at positions [pos, pos + T).
    read(layer, end): float32 (n_kv, end, d), positions [0, end) as stored once [0, end) is written.
    cuts(start, end): positions c in (start, end) where a query at c sees earlier positions in a new
    representation (a q4g group became complete): attention splits a batch of queries there.
    truncate(old, new): forget positions >= new (the cache held `old`).
    """

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    @property
    def n_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def cuts(self, start: int, end: int) -> list[int]:
        return []

    def write_fused(self, layer, pos, x):
        """write, in one kernel launch where the format has one (the Triton backend's path)."""
        self.write(layer, pos, x)

    def write_at(self, layer, pos_t, x, fused=False):
        """x (n_kv, 1, d) at position pos_t, a one-element device tensor (graph-capturable)."""
        raise NotImplementedError(f"{type(self).__name__} cannot write at a device position")

    def operand(self, layer: int, end: int):
        """This layer as a `kernels.attention.KVOperand` (read in place) once [0, end) is written."""
        raise NotImplementedError

    def dense(self, layer: int) -> torch.Tensor | None:
        """This layer's rows as stored, (n_kv, n_ctx, d) float32 or float16, where the format is plain
        floats (the CPU decode attention reads and writes them in place); None for block formats."""
        return None

    def truncate(self, old: int, new: int) -> None:
        pass


class DenseStore(Store):
    def __init__(self, shape, dtype, device):
        super().__init__({"data": torch.zeros(shape, dtype=dtype, device=device)})
        self.data = self.tensors["data"]

    def write(self, layer, pos, x):
        self.data[layer, :, pos:pos + x.shape[1]] = x

    def read(self, layer, end):
        return self.data[layer, :, :end].float()

    def write_at(self, layer, pos_t, x, fused=False):
        self.data[layer].index_copy_(1, pos_t, x.to(self.data.dtype))

    def dense(self, layer):
        return self.data[layer]

    def operand(self, layer, end):
        from .kernels.attention import KVOperand

        return KVOperand.dense(self.data[layer])


class BlockStore(Store):
    """ggml blocks along head_dim, one row of d/32 blocks per (layer, head, position)."""

    def __init__(self, shape, name, device):
        n_layer, n_kv, n_ctx, d = shape
        self.name, self.d = name, d
        self.block, self.size = ROW_FORMATS[name].block, ROW_FORMATS[name].block_bytes
        self.quantize, self.dequantize = BLOCKS[name]
        super().__init__({"blocks": torch.zeros((n_layer, n_kv, n_ctx, d // self.block * self.size),
                                                dtype=torch.uint8, device=device)})
        self.blocks = self.tensors["blocks"]

    def write(self, layer, pos, x):
        self.blocks[layer, :, pos:pos + x.shape[1]] = self.quantize(x)

    def read(self, layer, end):
        raw = self.blocks[layer, :, :end]
        return dequantize_rows(raw, self.dequantize)

    def write_fused(self, layer, pos, x):
        if not ROW_FORMATS[self.name].fused_write:
            return super().write_fused(layer, pos, x)
        from .kernels.kv_write import kv_write

        kv_write(x, self.blocks[layer], pos, self.name)

    def write_at(self, layer, pos_t, x, fused=False):
        if fused:
            self.write_fused(layer, pos_t, x)
        else:
            self.blocks[layer].index_copy_(1, pos_t, self.quantize(x))

    def operand(self, layer, end):
        from .kernels.attention import KVOperand

        b = self.blocks[layer]
        return KVOperand(self.name, b, b.shape[0], self.d, b.shape[1])


class GroupStore(Store):
    """q4g, q3g: f16 sinks, complete groups of 64 positions quantized, the newest partial group in
    tail rows (f16 or q8_0); a per-token format without a tail quantizes each row as it arrives."""

    def __init__(self, shape, kind, device, t: KVType):
        """The record's n_sink, formats and tails for this kind: parameters, so that
        benchmarks/kv_ablation.py can measure each part alone."""
        n_layer, n_kv, n_ctx, d = shape
        self.kind, self.d, self.n_ctx, self.n_sink = kind, d, n_ctx, t.n_sink
        self.fmt, self.tail_fmt = t.formats[kind == "v"], t.tails[kind == "v"]
        self.bits = CHANNELS.get(self.fmt)  # per-channel codes (bits per code), else per-token rows
        self.group = G = t.tail_rows[kind == "v"]  # positions per group: the tail's length
        if self.bits and (not self.tail_fmt or G != GROUP):
            raise ValueError(f"cache type {t.name}: per-channel {kind.upper()} needs a tail of {GROUP} positions")
        self.n_group = max(0, (n_ctx - self.n_sink) // G)
        n_q = self.n_group * G if self.tail_fmt else max(0, n_ctx - self.n_sink)
        t16 = dict(dtype=torch.float16, device=device)
        tensors = {"sink": torch.zeros((n_layer, n_kv, self.n_sink, d), **t16)}
        if self.tail_fmt == "dense":
            tensors["tail"] = torch.zeros((n_layer, n_kv, G, d), **t16)
        elif self.tail_fmt:
            tensors["tail"] = torch.zeros((n_layer, n_kv, G, row_format_bytes(self.tail_fmt, d)),
                                          dtype=torch.uint8, device=device)
        if self.bits:
            tensors["codes"] = torch.zeros((n_layer, n_kv, n_q, d * self.bits // 8), dtype=torch.uint8, device=device)
            tensors["scales"] = torch.zeros((n_layer, n_kv, self.n_group, 2, d), **t16)
        else:
            tensors["blocks"] = torch.zeros((n_layer, n_kv, n_q, row_format_bytes(self.fmt, d)),
                                            dtype=torch.uint8, device=device)
        super().__init__(tensors)
        self.sink, self.tail = tensors["sink"], tensors.get("tail")

    def cuts(self, start, end):
        # group g is complete once position S + G(g+1) - 1 is written; a query there sees it quantized
        if not self.tail_fmt:
            return []
        first = self.n_sink + self.group - 1
        c = first + max(0, -(-(start + 1 - first) // self.group)) * self.group  # smallest group end - 1 > start
        return list(range(c, end, self.group))

    def _to_tail(self, x):
        return x if self.tail_fmt == "dense" else BLOCKS[self.tail_fmt][0](x)

    def _from_tail(self, raw):
        return raw.float() if self.tail_fmt == "dense" else dequantize_rows(raw, BLOCKS[self.tail_fmt][1])

    def write(self, layer, pos, x):
        end = pos + x.shape[1]
        if pos < self.n_sink:
            n = min(end, self.n_sink) - pos
            self.sink[layer, :, pos:pos + n] = x[:, :n]
            x, pos = x[:, n:], pos + n
        if not self.tail_fmt:  # per-token rows, quantized as they arrive
            if pos < end:
                self.tensors["blocks"][layer, :, pos - self.n_sink:end - self.n_sink] = BLOCKS[self.fmt][0](x)
            return
        while pos < end:
            i = (pos - self.n_sink) % self.group
            n = min(end - pos, self.group - i)
            self.tail[layer, :, i:i + n] = self._to_tail(x[:, :n])
            if i + n == self.group:
                self._store_group(layer, (pos - self.n_sink) // self.group, self._from_tail(self.tail[layer]))
            x, pos = x[:, n:], pos + n

    def _store_group(self, layer, g, x):
        """x float32 (n_kv, 64, d): group g of this layer."""
        rows = slice(g * self.group, (g + 1) * self.group)
        if self.bits:
            codes, scales = quantize_channels(x, self.bits)
            self.tensors["codes"][layer, :, rows] = codes
            self.tensors["scales"][layer, :, g] = scales
        else:
            self.tensors["blocks"][layer, :, rows] = BLOCKS[self.fmt][0](x)

    def _load_groups(self, layer, g0, g1):
        """float32 (n_kv, (g1 - g0) * 64, d): groups [g0, g1) of this layer, dequantized."""
        return self._load_rows(layer, g0 * self.group, g1 * self.group)

    def _load_rows(self, layer, r0, r1):
        """float32 (n_kv, r1 - r0, d): quantized rows [r0, r1) (positions S + r); whole groups for K."""
        if self.bits:
            return dequantize_channels(self.tensors["codes"][layer, :, r0:r1],
                                       self.tensors["scales"][layer, :, r0 // self.group:r1 // self.group], self.bits)
        return dequantize_rows(self.tensors["blocks"][layer, :, r0:r1], BLOCKS[self.fmt][1])

    def read(self, layer, end):
        parts = [self.sink[layer, :, :min(end, self.n_sink)].float()]
        if end > self.n_sink:
            if not self.tail_fmt:
                parts.append(self._load_rows(layer, 0, end - self.n_sink))
            else:
                n_full = (end - self.n_sink) // self.group
                if n_full:
                    parts.append(self._load_groups(layer, 0, n_full))
                parts.append(self._from_tail(self.tail[layer, :, :end - self.n_sink - n_full * self.group]))
        return torch.cat(parts, dim=1)

    def operand(self, layer, end):
        """Segments: sinks [0, S), complete groups [S, b_end) quantized, the tail [b_end, end) in
        its rows (without a tail: every position past the sinks in the quantized rows)."""
        from .kernels.attention import KVOperand

        seg = dict(a=self.sink[layer], a_end=self.n_sink)
        if self.tail_fmt:
            n_full = max(0, end - self.n_sink) // self.group
            seg.update(c=self.tail[layer], b_end=self.n_sink + n_full * self.group)
        n_kv, n_ctx = self.sink.shape[1], self.n_ctx
        if self.bits:
            return KVOperand(self.fmt, self.tensors["codes"][layer], n_kv, self.d, n_ctx,
                             scales=self.tensors["scales"][layer], **seg)
        return KVOperand(self.fmt, self.tensors["blocks"][layer], n_kv, self.d, n_ctx, **seg)

    def truncate(self, old, new):
        """Reopen the group that `new` falls inside; if it was complete, its kept positions come
        back from the quantized values (they are quantized again when the group fills)."""
        if new <= self.n_sink or not self.tail_fmt:
            return
        g, i = divmod(new - self.n_sink, self.group)
        if i and old >= self.n_sink + (g + 1) * self.group:
            for layer in range(self.sink.shape[0]):
                self.tail[layer, :, :i] = self._to_tail(self._load_groups(layer, g, g + 1)[:, :i])


def dequantize_rows(raw: torch.Tensor, dequantize: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """uint8 (..., row_bytes) -> float32 (..., row_len) through a (rows, row_bytes) dequantizer."""
    out = dequantize(raw.reshape(-1, raw.shape[-1]))
    return out.view(*raw.shape[:-1], out.shape[-1])


# -- llama.cpp's rotation -------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _hadamard(n: int, device: str) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).to(device)


def hadamard(x: torch.Tensor, n: int) -> torch.Tensor:
    """x (..., d) float32 times the orthonormal, symmetric n x n Walsh-Hadamard matrix on each run of
    n elements of the last dim (ggml_gen_hadamard's matrix; it is its own inverse)."""
    h = _hadamard(n, str(x.device))
    return (x.unflatten(-1, (-1, n)) @ h).flatten(-2)


def fwht(x: torch.Tensor, n: int) -> torch.Tensor:
    """hadamard(x, n) by the fast Walsh-Hadamard butterflies: elementwise adds in a fixed order, so
    each row's result does not depend on how many rows come with it (a matmul's may, in the last
    bit): q4g/q3g store rotated values, and token-by-token must store what a whole batch stores."""
    y = x.unflatten(-1, (-1, n))
    h = 1
    while h < n:
        y = y.unflatten(-1, (n // (2 * h), 2, h))
        a, b = y.select(-2, 0), y.select(-2, 1)
        y = torch.stack([a + b, a - b], dim=-2).flatten(-3)
        h *= 2
    return (y * (1 / math.sqrt(n))).flatten(-2)


def llama_rotation_size(head_dim: int, is_k: bool) -> int:
    """llama.cpp (llama-kv-cache.cpp) rotates a quantized K or V cache when head_dim % 64 == 0:
    K by the largest power of two >= 64 dividing head_dim, V by 64. 0 = no rotation."""
    if head_dim % 64:
        return 0
    n = 64
    while is_k and head_dim % (2 * n) == 0:
        n *= 2
    return n


def q8_0_round_trip(x: torch.Tensor) -> torch.Tensor:
    """x (..., d) through Q8_0 and back: ggml's CPU flash attention converts q to K's vec_dot type."""
    return dequantize_rows(quantize_q8_0_torch(x), dequantize_q8_0)


# -- a store for a cache type --------------------------------------------------------------------------
STORES: dict[str, Callable[[KVType, tuple, str, torch.device], Store]] = {  # KVType.store -> constructor
    "dense": lambda t, shape, kind, device: DenseStore(shape, getattr(torch, t.dtype), device),
    "blocks": lambda t, shape, kind, device: BlockStore(shape, t.formats[kind == "v"], device),
    "groups": lambda t, shape, kind, device: GroupStore(shape, kind, device, t),
}


def make_store(t: KVType, shape: tuple, kind: str, device: torch.device) -> Store:
    """The K (kind "k") or V ("v") store of type t, shape (n_layer, n_kv, n_ctx, d)."""
    return STORES[t.store](t, shape, kind, device)

