"""Q8_0: 8-bit signed weights in blocks of 32 with one f16 scale.

Layout (elements, bytes per block), as in llama.cpp's ggml-common.h:

    Q8_0: (32, 2 + 32)  # f16 d, 32 int8 q        x = d * q

Arithmetic (bit-exact with `gguf.quants`): float32 d from f16, q to float32, one float32 multiply.
The dequantizer makes two passes over the output: an int8 -> float32 copy into a preallocated
tensor, then an in-place multiply by the broadcast scale.

Quantizer (numpy, bit-exact with `gguf.quants.quantize` / ggml's reference C):
    d = max|x| / 127,  q = round_half_away_from_zero(x * (1/d))   # 1/d a float32 reciprocal, 0 when d = 0
with the rounding written as gguf's `np_roundf`: sign(y) * (floor|y| + floor(2 (|y| - floor|y|))).

Torch quantizer `quantize_q8_0_torch` (any device, any leading dims): the same operations in the
same order on float32 tensors, so its bytes equal the numpy quantizer's (tested bit-exact vs
gguf.quants). The KV cache uses it to quantize new keys/values (and llama.cpp's q8_0 copy of q).

Subsets of rows (embedding lookups): pass `raw[ids]` or `raw[a:b]`; only those rows are read and
converted, e.g. `dequantize_q8_0(raw[token_ids])` costs len(token_ids) rows, not the table.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as FT

from . import weighted
from .floats import as_blocks, codes_input, f16_at, np_f16_bytes, np_quantize_rows
from .registry import Codes, Layout, QuantFormat, Tiling, register


def dequantize_q8_0(raw: torch.Tensor) -> torch.Tensor:
    blocks = as_blocks(raw, T.Q8_0, 34)  # (rows, nb, 34)
    rows, nb, _ = blocks.shape
    d = f16_at(blocks, 0)  # (rows, nb)
    out = torch.empty((rows, nb, 32), dtype=torch.float32, device=raw.device)
    out.copy_(blocks[..., 2:].view(torch.int8))
    out.mul_(d[..., None])
    return out.view(rows, nb * 32)


def decode_q8_0(b: np.ndarray) -> Codes:
    """Blocks (n, 34) -> codes int8 as stored, scale d (inspect's decoder)."""
    t = codes_input(b)
    d = f16_at(t, 0).numpy()
    return Codes(t[:, 2:].view(torch.int8).numpy().astype(np.int16), d[:, None], np.zeros((len(b), 1), np.float32),
                 0, {"d": d})


def round_half_away(y: np.ndarray) -> np.ndarray:
    """Round half away from zero, operation for operation as gguf's `np_roundf` (float32 in, out)."""
    a = np.abs(y)
    floored = np.floor(a)
    return np.sign(y) * (floored + np.floor(np.float32(2) * (a - floored)))


def quantize_blocks_q8_0(blocks: np.ndarray) -> np.ndarray:
    """float32 (n, 32) -> uint8 (n, 34)."""
    d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore", over="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    out = np.empty((len(blocks), 34), dtype=np.uint8)
    out[:, 0:2] = np_f16_bytes(d)
    out[:, 2:] = round_half_away(blocks * inv).astype(np.int8).view(np.uint8)
    return out


def round_half_away_torch(y: torch.Tensor) -> torch.Tensor:
    """`round_half_away` for float32 tensors, operation for operation."""
    a = y.abs()
    floored = a.floor()
    return y.sign() * (floored + (2 * (a - floored)).floor())


def quantize_q8_0_torch(x: torch.Tensor) -> torch.Tensor:
    """float (..., n) -> uint8 (..., n // 32 * 34) Q8_0 blocks along the last dim; n % 32 == 0."""
    b = x.float().unflatten(-1, (-1, 32))  # (..., nb, 32)
    d = b.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = round_half_away_torch(b * inv).to(torch.int8).view(torch.uint8)
    out = torch.cat([d.half().view(torch.uint8), q], dim=-1)  # (..., nb, 34)
    return out.flatten(-2)


def quantize_q8_0(values: np.ndarray) -> np.ndarray:
    return np_quantize_rows(values, T.Q8_0, 32, 34, quantize_blocks_q8_0)


register(QuantFormat(
    T.Q8_0, 32, 2 + 32, dequantize_q8_0,
    Layout.of([("d", 2, "f16 scale"), ("qs", 32, "32 x int8 q")], "x = d * q", (-128, 127)),
    decode_q8_0, quantize_q8_0, weighted.symmetric(T.Q8_0, 127, -127, 127, bits=8, amax=True),
    Tiling(1, 32, 1), "q8_0", FT.MOSTLY_Q8_0, auto=True, act_type=T.Q8_0))
