"""K-quants Q4_K, Q5_K, Q6_K: super-blocks of 256 weights with quantized per-sub-block scales.

Layouts (elements, bytes per super-block), as in llama.cpp's ggml-common.h (QK_K = 256):

    Q4_K: (256, 2 + 2 + 12 + 128)        # f16 d, f16 dmin, 8 x (6-bit scale, 6-bit min), 256 nibbles
    Q5_K: (256, 2 + 2 + 12 + 32 + 128)   # as Q4_K plus qh: the fifth bit of every weight
    Q6_K: (256, 128 + 64 + 16 + 2)       # ql: low 4 bits, qh: high 2 bits, 16 int8 scales, f16 d

Q4_K / Q5_K: 8 sub-blocks of 32, x = (d * sc) * q - (dmin * m). The 12 scale bytes, as 3 rows of 4
(a, b, c), hold sub-block j's scale and min:
    j < 4:  sc = a[j] & 63,                          m = b[j] & 63
    j >= 4: sc = c[j-4] & 15 | (a[j-4] >> 6) << 4,   m = c[j-4] >> 4 | (b[j-4] >> 6) << 4
Sub-block 2i + h takes nibble h (low, then high) of qs bytes 32i .. 32i + 31; in Q5_K its fifth
bits are bit (2i + h) of the 32 qh bytes.

Q6_K: 16 sub-blocks of 16, x = (d * scale) * (q - 32), q = 4 low bits | 2 high bits << 4. Within
each half of 128 weights (ql bytes 64k .. 64k + 63, qh bytes 32k .. 32k + 31), weight 32s + l
(s = 0..3) takes the low nibble (s < 2) or high nibble (s >= 2) of ql byte 64k + 32(s % 2) + l and
bits 2s, 2s + 1 of qh byte 32k + l.

Arithmetic (bit-exact with `gguf.quants`): scale products d * sc and dmin * m in float32 first,
then one float32 multiply by q and, for Q4_K / Q5_K, a separately rounded float32 subtract. Every
product is exact in float32: f16 has 11 significant bits, sc, m < 64 and q < 32 add at most 6 + 5,
Q6_K's int8 scale and q - 32 at most 7 + 5 (-128 and -32 are powers of two), all within float32's 24.
The subtract is the only rounding step.

Dequantizers only: K-quant quantizers are written elsewhere. Subsets of rows: pass `raw[rows]`;
only those rows are read (see floats.py).
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from . import QuantFormat, register
from .floats import as_blocks, f16_at, shifts

QK_K = 256


def scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed scale bytes (..., 12) -> 6-bit (scale, min), each uint8 (..., 8)."""
    a, b, c = scales.unflatten(-1, (3, 4)).unbind(-2)  # (..., 4) each
    sc = torch.cat([a & 63, (c & 15) | ((a >> 2) & 48)], dim=-1)
    mn = torch.cat([b & 63, (c >> 4) | ((b >> 2) & 48)], dim=-1)
    return sc, mn


def _dequantize_k4(blocks: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Shared tail of Q4_K / Q5_K: blocks (rows, nsb, bytes), q uint8 (rows, nsb, 8, 32)."""
    rows, nsb, _ = blocks.shape
    sc, mn = scale_min_k4(blocks[..., 4:16])
    d = f16_at(blocks, 0)[..., None] * sc.float()  # (rows, nsb, 8)
    dm = f16_at(blocks, 2)[..., None] * mn.float()  # (rows, nsb, 8)
    out = torch.empty((rows, nsb, 8, 32), dtype=torch.float32, device=blocks.device)
    out.copy_(q)
    out.mul_(d[..., None])
    out.sub_(dm[..., None])
    return out.view(rows, nsb * QK_K)


def _nibbles_k(qs: torch.Tensor) -> torch.Tensor:
    """qs uint8 (rows, nsb, 128) -> uint8 (rows, nsb, 8, 32): sub-block 2i + h = nibble h of 32i.."""
    q = (qs.unflatten(-1, (4, 1, 32)) >> shifts([0, 4], qs)) & 15  # (rows, nsb, 4, 2, 32)
    return q.flatten(-3, -2)


def dequantize_q4_k(raw: torch.Tensor) -> torch.Tensor:
    blocks = as_blocks(raw, T.Q4_K, 144)  # (rows, nsb, 144)
    return _dequantize_k4(blocks, _nibbles_k(blocks[..., 16:]))


def dequantize_q5_k(raw: torch.Tensor) -> torch.Tensor:
    blocks = as_blocks(raw, T.Q5_K, 176)  # (rows, nsb, 176)
    qh = blocks[..., 16:48].unsqueeze(-2) >> shifts(list(range(8)), blocks)  # (rows, nsb, 8, 32)
    q = _nibbles_k(blocks[..., 48:]) | ((qh & 1) << 4)
    return _dequantize_k4(blocks, q)


def dequantize_q6_k(raw: torch.Tensor) -> torch.Tensor:
    blocks = as_blocks(raw, T.Q6_K, 210)  # (rows, nsb, 210)
    rows, nsb, _ = blocks.shape
    ql = (blocks[..., 0:128].unflatten(-1, (2, 1, 64)) >> shifts([0, 4], blocks)) & 15  # (.., 2, 2, 64)
    qh = (blocks[..., 128:192].unflatten(-1, (2, 1, 32)) >> shifts([0, 2, 4, 6], blocks)) & 3  # (.., 2, 4, 32)
    q = (ql.reshape(rows, nsb, 8, 32) | (qh.reshape(rows, nsb, 8, 32) << 4)).view(torch.int8) - 32
    d = f16_at(blocks, 208)[..., None] * blocks[..., 192:208].view(torch.int8).float()  # (rows, nsb, 16)
    out = torch.empty((rows, nsb, 16, 16), dtype=torch.float32, device=raw.device)
    out.copy_(q.view(rows, nsb, 16, 16))
    out.mul_(d[..., None])
    return out.view(rows, nsb * QK_K)


register(QuantFormat(T.Q4_K, QK_K, 2 + 2 + 12 + 128, dequantize_q4_k))
register(QuantFormat(T.Q5_K, QK_K, 2 + 2 + 12 + 32 + 128, dequantize_q5_k))
register(QuantFormat(T.Q6_K, QK_K, 128 + 64 + 16 + 2, dequantize_q6_k))
