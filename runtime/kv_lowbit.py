"""Torch codecs of the KV cache's own low-bit formats (q4g and q3g; layouts in qkvgguf/kv_types.py).

Keys, per channel over a group of G positions (KIVI's layout: keys have outlier channels, so a
channel's G values share one range), `bits` = 4 (q4g_k) or 3 (q3g_k):

    scales (..., 2, d) f16   [scale, min] per channel, scale = (max - min) / (2^bits - 1)
    codes  (..., G, d * bits / 8) uint8, one row per position:       x = scale * q + min
        4 bits: byte j = channel j (low nibble) | channel j + d/2 (high nibble)
        3 bits: planes, as in ggml's q3_K: d/4 bytes of 2-bit low parts (byte j holds channels
                j, j + d/4, j + d/2, j + 3d/4 at shifts 0, 2, 4, 6), then d/8 bytes of high bits
                (byte j holds channel j + k d/8 at bit k)

    q = the nearest level under the stored f16 (scale, min), clamped (a channel far from zero with
    a small range would otherwise be shifted by the f16 rounding of its min).

Values, per position in blocks of 64 (they are rotated by a Hadamard matrix before they get here,
runtime/kv_cache.py, so a block is close to Gaussian and one scale serves it):

    q4_64   (64, 2 + 32)  f16 s, byte j = q[j] | q[j + 32] << 4       x = s * (2q - 15) / 15
    q3_64   (64, 2 + 24)  f16 s, the 3-bit planes above over 64 values x = s * L3[q]

    s is chosen per block among max|x| * (1, 0.95, ..., 0.6) (clipping the largest values when that
    lowers the block's squared error), q = the nearest level. L3 (kv_types.L3): the 8 Lloyd-Max
    levels of a unit Gaussian over the outer one; their squared error on Gaussian values is 8%
    below 8 uniform levels'.
"""

from __future__ import annotations

import torch

from qkvgguf.kv_types import L3

CLIP = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)  # candidate s / max|x| per block of values


# -- bit packing ----------------------------------------------------------------------------------
def pack4(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 (..., n) -> (..., n/2): byte j = q[j] | q[j + n/2] << 4."""
    h = q.shape[-1] // 2
    return q[..., :h] | (q[..., h:] << 4)


def unpack4(b: torch.Tensor) -> torch.Tensor:
    return torch.cat([b & 15, b >> 4], dim=-1)


def pack3(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..7 (..., n) -> (..., 3n/8): n/4 bytes of low 2-bit parts, n/8 of high bits."""
    n = q.shape[-1]
    lo = (q & 3).unflatten(-1, (4, n // 4))
    hi = (q >> 2).unflatten(-1, (8, n // 8))
    low = lo[..., 0, :] | (lo[..., 1, :] << 2) | (lo[..., 2, :] << 4) | (lo[..., 3, :] << 6)
    high = hi[..., 0, :]
    for k in range(1, 8):
        high = high | (hi[..., k, :] << k)
    return torch.cat([low, high], dim=-1)


def unpack3(b: torch.Tensor) -> torch.Tensor:
    """(..., 3n/8) -> uint8 codes (..., n)."""
    n = b.shape[-1] * 8 // 3
    low, high = b[..., :n // 4], b[..., n // 4:]
    lo = torch.cat([(low >> (2 * k)) & 3 for k in range(4)], dim=-1)
    hi = torch.cat([(high >> k) & 1 for k in range(8)], dim=-1)
    return lo | (hi << 2)


PACK = {4: (pack4, unpack4), 3: (pack3, unpack3)}


# -- keys: per channel over a group of positions ----------------------------------------------------
def quantize_channels(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float (..., G, d) -> codes uint8 (..., G, d * bits / 8), scales f16 (..., 2, d)."""
    top = (1 << bits) - 1
    x = x.float()
    lo, hi = x.amin(-2, keepdim=True), x.amax(-2, keepdim=True)  # (..., 1, d)
    scales = torch.cat([(hi - lo) / top, lo], dim=-2).half()  # (..., 2, d)
    d, m = scales[..., 0:1, :].float(), scales[..., 1:2, :].float()
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.floor((x - m) * inv + 0.5).clamp_(0, top).to(torch.uint8)  # (..., G, d)
    return PACK[bits][0](q), scales


def dequantize_channels(codes: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (..., n_group*G, d*bits/8), scales (..., n_group, 2, d) -> float32 (..., n_group*G, d)."""
    n_group = scales.shape[-3]
    q = PACK[bits][1](codes).unflatten(-2, (n_group, -1)).float()  # (..., n_group, G, d)
    s = scales.float()
    return (q * s[..., 0:1, :] + s[..., 1:2, :]).flatten(-3, -2)


# -- values: a scale per 64 and a table of levels ----------------------------------------------------
def _levels(bits: int, device) -> torch.Tensor:
    if bits == 4:
        return (2 * torch.arange(16, dtype=torch.float32, device=device) - 15) / 15
    return torch.tensor(L3, dtype=torch.float32, device=device)


def _quantize_rows(x: torch.Tensor, bits: int) -> torch.Tensor:
    """float (..., n) -> uint8 (..., n/64 * (2 + 8 * bits)): blocks of 64, f16 s then packed codes."""
    lv = _levels(bits, x.device)
    mids = (lv[1:] + lv[:-1]) / 2
    xb = x.float().unflatten(-1, (-1, 64))  # (..., nb, 64)
    amax = xb.abs().amax(-1, keepdim=True)  # (..., nb, 1)
    best_err, best_s, best_q = None, None, None
    for f in CLIP:
        s = (amax * f).half().float()
        inv = torch.where(s == 0, torch.zeros_like(s), 1 / s)
        q = torch.bucketize(xb * inv, mids)  # nearest level (levels ascending)
        err = ((lv[q] * s - xb) ** 2).sum(-1, keepdim=True)
        if best_err is None:
            best_err, best_s, best_q = err, s, q
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, s, best_s)
            best_q = torch.where(better, q, best_q)
    codes = PACK[bits][0](best_q.to(torch.uint8))  # (..., nb, 8 * bits)
    scale = best_s.half().view(torch.uint8)  # (..., nb, 2)
    return torch.cat([scale, codes], dim=-1).flatten(-2)


def _dequantize_rows(raw: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 (rows, nb * (2 + 8 * bits)) -> float32 (rows, nb * 64)."""
    blk = raw.unflatten(-1, (-1, 2 + 8 * bits))  # (rows, nb, bytes)
    s = blk[..., :2].contiguous().view(torch.float16).float()  # (rows, nb, 1)
    q = PACK[bits][1](blk[..., 2:]).long()
    return (_levels(bits, raw.device)[q] * s).flatten(-2)


def quantize_q4_64(x: torch.Tensor) -> torch.Tensor:
    return _quantize_rows(x, 4)


def dequantize_q4_64(raw: torch.Tensor) -> torch.Tensor:
    return _dequantize_rows(raw, 4)


def quantize_q3_64(x: torch.Tensor) -> torch.Tensor:
    return _quantize_rows(x, 3)


def dequantize_q3_64(raw: torch.Tensor) -> torch.Tensor:
    return _dequantize_rows(raw, 3)
