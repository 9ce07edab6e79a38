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

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as FT

from . import weighted
from .floats import as_blocks, codes_input, f16_at, shifts
from .q4 import NIBBLES, unpack_nibbles
from .registry import Codes, Layout, QuantFormat, Tiling, register


def unpack_q5(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """qh uint8 (..., 4), qs uint8 (..., 16) -> 5-bit q uint8 (..., 2, 16), element order."""
    high = (qh.unsqueeze(-1) >> shifts(8, 1, qh).view(8)) & 1  # (..., 4, 8): element 8k + j
    return unpack_nibbles(qs) | (high.view(*qh.shape[:-1], 2, 16) << 4)


def decode_q5(b: np.ndarray, with_min: bool) -> Codes:
    """Q5_0 / Q5_1 blocks (n, 22 / 24) -> Codes (inspect's decoder)."""
    t = codes_input(b)
    at = 4 if with_min else 2  # qh
    d = f16_at(t, 0).numpy()
    q = unpack_q5(t[:, at:at + 4], t[:, at + 4:]).reshape(len(b), 32).numpy().astype(np.int16)
    m = f16_at(t, 2).numpy() if with_min else np.zeros(len(b), np.float32)
    return Codes(q, d[:, None], m[:, None], 0 if with_min else 16, {"d": d, "m": m} if with_min else {"d": d})


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


QH = "u32: bit i = bit 4 of q[i]"
# no plain quantizer of ours: the registry's selector takes gguf.quants' (bit-exact with llama.cpp's)
register(QuantFormat(
    T.Q5_0, 32, 2 + 4 + 16, dequantize_q5_0,
    Layout.of([("d", 2, "f16 scale"), ("qh", 4, QH), ("qs", 16, f"low 4 bits of 32 q; {NIBBLES}")],
              "x = d * (q - 16)", (0, 31)),
    lambda b: decode_q5(b, False), None, weighted.symmetric(T.Q5_0, 16, -16, 15, bits=5, zero=16),
    Tiling(1, 16, 2), "q5_0", FT.MOSTLY_Q5_0, auto=True, act_type=T.Q8_0))
register(QuantFormat(
    T.Q5_1, 32, 2 + 2 + 4 + 16, dequantize_q5_1,
    Layout.of([("d", 2, "f16 scale"), ("m", 2, "f16 min"), ("qh", 4, QH),
               ("qs", 16, f"low 4 bits of 32 q; {NIBBLES}")], "x = d * q + m", (0, 31)),
    lambda b: decode_q5(b, True), None, weighted.asymmetric(T.Q5_1, 31, bits=5),
    Tiling(1, 16, 2), "q5_1", FT.MOSTLY_Q5_1, auto=True, act_type=T.Q8_1))
