"""Q5_0 and Q5_1: 5-bit weights in blocks of 32, the fifth bits packed into one 32-bit word.

Layouts (elements, bytes per block), as in llama.cpp's ggml-common.h:

    Q5_0: (32, 2 + 4 + 16)      # f16 d, u32 qh, 16 bytes of nibbles          x = d * (q - 16)
    Q5_1: (32, 2 + 2 + 4 + 16)  # f16 d, f16 m, u32 qh, 16 bytes of nibbles   x = d * q + m

q = low nibble | (bit << 4). Nibbles as in Q4 (byte j: element j low, element j + 16 high); bit i
of the little-endian qh (bit i % 8 of byte i // 8) is the fifth bit of element i. qh is read
byte-wise: at offset 2 (Q5_0) it is not 4-byte aligned.

Arithmetic (bit-exact with `gguf.quants`): float32 d (and m) from f16, q to float32, one float32
multiply, then for Q5_1 a separately rounded float32 add.

Subsets of rows: pass `raw[rows]`; only those rows are read (see floats.py).
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from . import QuantFormat, register
from .floats import as_blocks, f16_at, shifts
from .q4 import unpack_nibbles


def unpack_q5(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """qh uint8 (..., 4), qs uint8 (..., 16) -> 5-bit q uint8 (..., 2, 16), element order."""
    high = (qh.unsqueeze(-1) >> shifts(8, 1, qh).view(8)) & 1  # (..., 4, 8): element 8k + j
    return unpack_nibbles(qs) | (high.view(*qh.shape[:-1], 2, 16) << 4)


def dequantize_q5_0(raw: torch.Tensor) -> torch.Tensor:
    blocks = as_blocks(raw, T.Q5_0, 22)  # (rows, nb, 22)
    rows, nb, _ = blocks.shape
    d = f16_at(blocks, 0)
    q = unpack_q5(blocks[..., 2:6], blocks[..., 6:]).view(torch.int8) - 16  # (rows, nb, 2, 16), -16..15
    out = torch.empty((rows, nb, 2, 16), dtype=torch.float32, device=raw.device)
    out.copy_(q)
    out.mul_(d[..., None, None])
    return out.view(rows, nb * 32)


def dequantize_q5_1(raw: torch.Tensor) -> torch.Tensor:
    blocks = as_blocks(raw, T.Q5_1, 24)  # (rows, nb, 24)
    rows, nb, _ = blocks.shape
    d, m = f16_at(blocks, 0), f16_at(blocks, 2)
    out = torch.empty((rows, nb, 2, 16), dtype=torch.float32, device=raw.device)
    out.copy_(unpack_q5(blocks[..., 4:8], blocks[..., 8:]))
    out.mul_(d[..., None, None])
    out.add_(m[..., None, None])
    return out.view(rows, nb * 32)


register(QuantFormat(T.Q5_0, 32, 2 + 4 + 16, dequantize_q5_0))
register(QuantFormat(T.Q5_1, 32, 2 + 2 + 4 + 16, dequantize_q5_1))
