"""Q4_0 and Q4_1: 4-bit weights in blocks of 32 with one f16 scale (and an f16 minimum for Q4_1).

Layouts (elements, bytes per block), as in llama.cpp's ggml-common.h:

    Q4_0: (32, 2 + 16)      # f16 d, 16 bytes of nibbles               x = d * (q - 8)
    Q4_1: (32, 2 + 2 + 16)  # f16 d, f16 m, 16 bytes of nibbles        x = d * q + m

Nibble order: byte j holds element j in its low nibble and element j + 16 in its high nibble.

Arithmetic (bit-exact with `gguf.quants`): d and m are widened to float32, q to float32, then one
float32 multiply (and for Q4_1 a separately rounded float32 add). The product is always exact
(11 significant bits of f16 times 4 of q), so the add is the only rounding step: a fused
multiply-add would agree too, but an add before the multiply would not.

Quantizers (numpy, bit-exact with `gguf.quants.quantize`, which mirrors ggml's reference C):
    Q4_0: a = the element of largest magnitude (first one on ties), d = a / -8,
          q = min(15, trunc(x / d + 8.5))        # with 1/d as a float32 reciprocal, 0 when d = 0
    Q4_1: d = (max - min) / 15, m = min,
          q = min(15, trunc((x - min) / d + 0.5))

Torch quantizer `quantize_q4_0_torch` (any device, any leading dims): the same operations on
float32 tensors, bytes equal to the numpy quantizer's (tested bit-exact vs gguf.quants); the KV
cache quantizes new keys/values with it.

Subsets of rows: pass `raw[rows]`; only those rows are read (see floats.py).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as FT

from . import weighted
from .floats import as_blocks, codes_input, f16_at, np_f16_bytes, np_quantize_rows, shifts
from .registry import Codes, Layout, QuantFormat, Tiling, register

NIBBLES = "byte j: q[j] low nibble, q[j + 16] high"


def unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 16) -> uint8 (..., 2, 16): low nibbles (elements 0-15), then high (16-31)."""
    return (qs.unsqueeze(-2) >> shifts(2, 4, qs)) & 15


def decode_nibbles(b: np.ndarray, at: int, with_min: bool, zero: int) -> Codes:
    """Blocks of 32 with f16 d (and f16 m) and 16 nibble bytes at `at` -> Codes (inspect's decoder)."""
    t = codes_input(b)
    d = f16_at(t, 0).numpy()
    q = unpack_nibbles(t[:, at:at + 16]).reshape(len(b), 32).numpy().astype(np.int16)
    m = f16_at(t, 2).numpy() if with_min else np.zeros(len(b), np.float32)
    return Codes(q, d[:, None], m[:, None], zero, {"d": d, "m": m} if with_min else {"d": d})


# -- Q4_0 ----------------------------------------------------------------------------------------
def dequantize_q4_0(raw: torch.Tensor) -> torch.Tensor:
    blocks = as_blocks(raw, T.Q4_0, 18)  # (rows, nb, 18)
    rows, nb, _ = blocks.shape
    d = f16_at(blocks, 0)  # (rows, nb)
    q = unpack_nibbles(blocks[..., 2:]).view(torch.int8) - 8  # (rows, nb, 2, 16), -8..7
    out = torch.empty((rows, nb, 2, 16), dtype=torch.float32, device=raw.device)
    out.copy_(q)
    out.mul_(d[..., None, None])
    return out.view(rows, nb * 32)


def quantize_blocks_q4_0(blocks: np.ndarray) -> np.ndarray:
    """float32 (n, 32) -> uint8 (n, 18)."""
    imax = np.abs(blocks).argmax(axis=-1, keepdims=True)
    amax = np.take_along_axis(blocks, imax, axis=-1)  # signed value of largest magnitude
    d = amax / np.float32(-8)
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = np.trunc(blocks * inv + np.float32(8.5)).astype(np.uint8).clip(0, 15)
    out = np.empty((len(blocks), 18), dtype=np.uint8)
    out[:, 0:2] = np_f16_bytes(d)
    out[:, 2:] = q[:, :16] | (q[:, 16:] << np.uint8(4))
    return out


def quantize_q4_0_torch(x: torch.Tensor) -> torch.Tensor:
    """float (..., n) -> uint8 (..., n // 32 * 18) Q4_0 blocks along the last dim; n % 32 == 0."""
    b = x.float().unflatten(-1, (-1, 32))  # (..., nb, 32)
    imax = b.abs().argmax(-1, keepdim=True)  # first index on ties, like numpy
    d = b.gather(-1, imax) / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc(b * inv + 8.5).clamp_(0, 15).to(torch.uint8)
    out = torch.cat([d.half().view(torch.uint8), q[..., :16] | (q[..., 16:] << 4)], dim=-1)
    return out.flatten(-2)  # (..., nb * 18)


def quantize_q4_0(values: np.ndarray) -> np.ndarray:
    return np_quantize_rows(values, T.Q4_0, 32, 18, quantize_blocks_q4_0)


# -- Q4_1 ----------------------------------------------------------------------------------------
def dequantize_q4_1(raw: torch.Tensor) -> torch.Tensor:
    blocks = as_blocks(raw, T.Q4_1, 20)  # (rows, nb, 20)
    rows, nb, _ = blocks.shape
    d, m = f16_at(blocks, 0), f16_at(blocks, 2)  # (rows, nb)
    out = torch.empty((rows, nb, 2, 16), dtype=torch.float32, device=raw.device)
    out.copy_(unpack_nibbles(blocks[..., 4:]))
    out.mul_(d[..., None, None])
    out.add_(m[..., None, None])
    return out.view(rows, nb * 32)


def quantize_blocks_q4_1(blocks: np.ndarray) -> np.ndarray:
    """float32 (n, 32) -> uint8 (n, 20)."""
    hi = blocks.max(axis=-1, keepdims=True)
    lo = blocks.min(axis=-1, keepdims=True)
    d = (hi - lo) / np.float32(15)
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    q = np.trunc((blocks - lo) * inv + np.float32(0.5)).astype(np.uint8).clip(0, 15)
    out = np.empty((len(blocks), 20), dtype=np.uint8)
    out[:, 0:2] = np_f16_bytes(d)
    out[:, 2:4] = np_f16_bytes(lo)
    out[:, 4:] = q[:, :16] | (q[:, 16:] << np.uint8(4))
    return out


def quantize_q4_1(values: np.ndarray) -> np.ndarray:
    return np_quantize_rows(values, T.Q4_1, 32, 20, quantize_blocks_q4_1)


register(QuantFormat(
    T.Q4_0, 32, 2 + 16, dequantize_q4_0,
    Layout.of([("d", 2, "f16 scale"), ("qs", 16, f"32 x 4-bit q; {NIBBLES}")], "x = d * (q - 8)", (0, 15)),
    lambda b: decode_nibbles(b, 2, False, 8), quantize_q4_0, weighted.symmetric(T.Q4_0, 8, -8, 7, bits=4, zero=8),
    Tiling(1, 16, 2), "q4_0", FT.MOSTLY_Q4_0, auto=True, act_type=T.Q8_0))
register(QuantFormat(
    T.Q4_1, 32, 2 + 2 + 16, dequantize_q4_1,
    Layout.of([("d", 2, "f16 scale"), ("m", 2, "f16 min"), ("qs", 16, f"32 x 4-bit q; {NIBBLES}")],
              "x = d * q + m", (0, 15)),
    lambda b: decode_nibbles(b, 4, True, 0), quantize_q4_1, weighted.asymmetric(T.Q4_1, 15, bits=4),
    Tiling(1, 16, 2), "q4_1", FT.MOSTLY_Q4_1, auto=True, act_type=T.Q8_1))
