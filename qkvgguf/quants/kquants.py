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

Quantizers (numpy, vectorized over blocks): the algorithm of ggml's reference quantizers
(`quantize_row_q{4,5,6}_K_ref` in ggml-quants.c, what llama.cpp's quantizer runs without an
importance matrix), in float32 with the same order of operations:

    Q4_K / Q5_K  per sub-block of 32: weights w = rms(x) + |x|; `make_qkx2_quants` picks scale s
                 and min m (m <= 0) minimizing sum w (s q + m - x)^2 over a grid of inverse scales
                 (nmax + rmin + rdelta i) / (max - m), each refined by weighted least squares (m:
                 the best min so far, as in ggml);
                 then the 8 scales and 8 mins are quantized to 6 bits against the super-block's
                 largest (d = max s / 63, dmin = max -m / 63, both f16) and q is recomputed with
                 the quantized scales: q = round((x - m') / s'), clamped to 0..nmax.
                 Q4_K: nmax 15, grid -1 + 0.1 i, i = 0..20.  Q5_K: nmax 31, grid -0.5 + 0.1 i, i = 0..15.
    Q6_K         per sub-block of 16: `make_qx_quants` (nmax 32, weights x^2): the symmetric scale
                 -max / 32 (max: the signed element of largest magnitude), then 19 others,
                 -max / (32 + 0.1 i), i = -9..9, each refined by least squares, best kept;
                 the 16 scales become int8 against the largest (d = f16(max / -128)), q recomputed.

Rounding is ggml's `nearest_int` (round half to even, as `np.rint`); sums run element by element
in order, as in the C loops: reductions over axis 0 of C-contiguous (elements, sub-blocks) arrays,
which numpy adds row after row (along a contiguous axis it would sum pairwise, and near-ties
between candidate scales, decided by the last bit of a sum, would go the other way in a few
percent of the blocks). The bytes then equal llama.cpp's quantizer's (tests/test_kquants_quantize.py).

Subsets of rows (dequantizers): pass `raw[rows]`; only those rows are read (see floats.py).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as FT

from . import weighted
from .floats import as_blocks, codes_input, f16_at, np_quantize_rows, shifts
from .registry import Codes, Layout, QuantFormat, Tiling, register

QK_K = 256


def scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed scale bytes (..., 12) -> 6-bit (scale, min), each uint8 (..., 8).

    The one copy of this unpack in Python: the dequantizer and inspect's decoder call it (the Triton
    kernels decode one sub-block's pair in registers, runtime/kernels/dequant.py `_scale_min_k4`)."""
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
    q = (qs.unflatten(-1, (4, 1, 32)) >> shifts(2, 4, qs)) & 15  # (rows, nsb, 4, 2, 32)
    return q.flatten(-3, -2)


def _codes_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_K blocks (..., 176) -> 5-bit q uint8 (..., 8, 32), sub-block major."""
    qh = blocks[..., 16:48].unsqueeze(-2) >> shifts(8, 1, blocks)  # (..., 8, 32)
    return _nibbles_k(blocks[..., 48:]) | ((qh & 1) << 4)


def _codes_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q6_K blocks (..., 210) -> 6-bit q uint8 (..., 8, 32) in element order."""
    ql = (blocks[..., 0:128].unflatten(-1, (2, 1, 64)) >> shifts(2, 4, blocks)) & 15  # (.., 2, 2, 64)
    qh = (blocks[..., 128:192].unflatten(-1, (2, 1, 32)) >> shifts(4, 2, blocks)) & 3  # (.., 2, 4, 32)
    lead = blocks.shape[:-1]
    return ql.reshape(*lead, 8, 32) | (qh.reshape(*lead, 8, 32) << 4)


def dequantize_q4_k(raw: torch.Tensor) -> torch.Tensor:
    blocks = as_blocks(raw, T.Q4_K, 144)  # (rows, nsb, 144)
    return _dequantize_k4(blocks, _nibbles_k(blocks[..., 16:]))


def dequantize_q5_k(raw: torch.Tensor) -> torch.Tensor:
    blocks = as_blocks(raw, T.Q5_K, 176)  # (rows, nsb, 176)
    return _dequantize_k4(blocks, _codes_q5_k(blocks))


def dequantize_q6_k(raw: torch.Tensor) -> torch.Tensor:
    blocks = as_blocks(raw, T.Q6_K, 210)  # (rows, nsb, 210)
    rows, nsb, _ = blocks.shape
    q = _codes_q6_k(blocks).view(torch.int8) - 32
    d = f16_at(blocks, 208)[..., None] * blocks[..., 192:208].view(torch.int8).float()  # (rows, nsb, 16)
    out = torch.empty((rows, nsb, 16, 16), dtype=torch.float32, device=raw.device)
    out.copy_(q.view(rows, nsb, 16, 16))
    out.mul_(d[..., None])
    return out.view(rows, nsb * QK_K)


# -- inspect's decoders: blocks (n, type_size) -> Codes -------------------------------------------------
def decode_k4(b: np.ndarray, codes) -> Codes:
    """Q4_K / Q5_K: x = (d * sc[j]) * q - dmin * m[j]: scale d * sc, bias -(dmin * m) per sub-block of 32."""
    t = codes_input(b)
    d, dmin = f16_at(t, 0), f16_at(t, 2)
    sc, mn = scale_min_k4(t[:, 4:16])
    scale = d[:, None] * sc.float()
    bias = -(dmin[:, None] * mn.float())
    q = codes(t).reshape(len(b), QK_K).numpy().astype(np.int16)
    return Codes(q, scale.numpy(), bias.numpy(), 0,
                 {"d": d.numpy(), "dmin": dmin.numpy(), "sc": sc.numpy(), "m": mn.numpy()})


def decode_q6_k(b: np.ndarray) -> Codes:
    """x = (d * scale[j]) * (q - 32), sub-blocks of 16."""
    t = codes_input(b)
    d = f16_at(t, 208)
    scales = t[:, 192:208].view(torch.int8)
    q = _codes_q6_k(t).reshape(len(b), QK_K).numpy().astype(np.int16)
    return Codes(q, (d[:, None] * scales.float()).numpy(), np.zeros((len(b), 16), np.float32), 32,
                 {"d": d.numpy(), "scales": scales.numpy()})


# -- quantizers -----------------------------------------------------------------------------------
# Arrays are (elements, sub-blocks): sums over axis 0 add element after element, as the C loops do.
F32 = np.float32
GROUP_MAX_EPS = F32(1e-15)


def _sum(a: np.ndarray) -> np.ndarray:
    return np.add.reduce(a, axis=0)


def make_qkx2_quants(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                     w: Optional[np.ndarray] = None, use_mad: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x float32 (n, m): m sub-blocks of n -> (q uint8 (n, m) in 0..nmax, scale (m,), -min (m,) >= 0).

    x ~ scale * q + min with min <= 0, minimizing the weighted squared error (weights rms + |x|).
    As in ggml, a better candidate's min replaces the min the next candidates are measured from
    (both in (x - min) and in the range max - min). `w` (n, m) replaces the weights (weighted.py);
    use_mad measures the weighted absolute error instead of the squared one (Q2_K, q2k_q3k.py).
    """
    n = x.shape[0]
    if w is None:
        w = np.sqrt(_sum(x * x) / F32(n)) + np.abs(x)  # av_x + |x|
    hi = x.max(axis=0)
    lo = np.minimum(x.min(axis=0), F32(0))
    sum_w, sum_x = _sum(w), _sum(w * x)
    flat = hi == lo  # constant (or all-zero) sub-block: q = 0, scale 0, min = lo
    nmax_f = F32(nmax)

    def levels(iscale, lo):
        return np.clip(np.rint(iscale * (x - lo)), 0, nmax).astype(F32)

    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = nmax_f / (hi - lo)
        scale = F32(1) / iscale
        q = levels(iscale, lo)
        diff = scale * q + lo - x
        best = _sum(w * (np.abs(diff) if use_mad else diff * diff))
        for i in range(nstep + 1):
            iscale = (F32(rmin) + F32(rdelta) * F32(i) + nmax_f) / (hi - lo)
            qa = levels(iscale, lo)
            wl = w * qa
            sum_l, sum_l2, sum_xl = _sum(wl), _sum(wl * qa), _sum(wl * x)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            pos = this_min > 0
            this_scale = np.where(pos, sum_xl / sum_l2, this_scale)
            this_min = np.where(pos, F32(0), this_min)
            diff = this_scale * qa + this_min - x
            err = _sum(w * (np.abs(diff) if use_mad else diff * diff))
            better = (det > 0) & (err < best) & ~flat
            q = np.where(better, qa, q)
            best = np.where(better, err, best)
            scale = np.where(better, this_scale, scale)
            lo = np.where(better, this_min, lo)
    q = np.where(flat, F32(0), q).astype(np.uint8)
    scale = np.where(flat, F32(0), scale)
    return q, scale, -lo


def pack_scale_min_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """6-bit scales and mins uint8 (n, 8) -> the 12 scale bytes (n, 12) (inverse of scale_min_k4)."""
    out = np.empty((len(ls), 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4)
    return out


def quantize_scales6(v: np.ndarray, sw: np.ndarray):
    """Q4_K/Q5_K sub-block scales (or mins) v (n, 8) >= 0 with weights sw (n, 8) -> (f16 (n, 1), uint8 (n, 8)).

    v ~ d * L, L in 0..63: 9 candidates d = max / (63 + 0.1 k), k = -4..4, keep the least
    sum sw (v - d L)^2, then refit d = sum sw v L / sum sw L^2 (ggml's make_qp_quants, without its
    per-level refinement).
    """
    v = np.maximum(v, 0).astype(np.float32)
    mx = v.max(axis=1, keepdims=True)  # (n, 1)
    k = np.arange(-4, 5, dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(mx > 1e-15, (63 + 0.1 * k)[None, :] / mx, 0)  # (n, K)
        L = np.minimum(np.rint(iscale[:, :, None] * v[:, None, :]), 63)  # (n, K, 8)
        scale = np.where(iscale > 0, 1 / iscale, 0)
    err = (sw[:, None, :] * (v[:, None, :] - scale[:, :, None] * L) ** 2).sum(-1)
    best = err.argmin(axis=1)
    L = L[np.arange(len(v)), best]  # (n, 8)
    num, den = (sw * v * L).sum(1, keepdims=True), (sw * L * L).sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(den > 0, num / den, 0).astype(np.float32)
    d16 = d.astype(np.float16)
    df = d16.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        L = np.where(df > 0, np.clip(np.rint(v / df), 0, 63), 0)
    return d16, L.astype(np.uint8)


def _quantize_k4(blocks: np.ndarray, nmax: int, rmin: float, nstep: int, w: Optional[np.ndarray] = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shared head of Q4_K / Q5_K: float32 (n, 256) -> (d|dmin|scales bytes (n, 16), q (n, 8, 32))."""
    n = len(blocks)
    x = np.ascontiguousarray(blocks.reshape(n * 8, 32).T)  # (32, n * 8): element, sub-block
    if w is not None:  # importance weights (weighted.py): a finer search, weighted 6-bit scales
        w = np.ascontiguousarray(w.reshape(n * 8, 32).T)
        q, scales, mins = make_qkx2_quants(x, nmax, -0.9, 0.05, 36, w)
    else:
        q, scales, mins = make_qkx2_quants(x, nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(n, 8), mins.reshape(n, 8)
    if w is not None:
        sw = w.sum(axis=0).reshape(n, 8)
        d16, ls = quantize_scales6(scales, sw)
        dmin16, lm = quantize_scales6(mins, sw)
    else:
        max_scale = np.maximum(scales.max(axis=1, keepdims=True), F32(0))
        max_min = np.maximum(mins.max(axis=1, keepdims=True), F32(0))
        with np.errstate(divide="ignore"):
            inv_scale = np.where(max_scale > 0, F32(63) / max_scale, F32(0))
            inv_min = np.where(max_min > 0, F32(63) / max_min, F32(0))
        # C: uint8_t ls = nearest_int(...); MIN(63, ls): the cast (wrapping) comes before the clamp
        ls = np.minimum(np.rint(inv_scale * scales).astype(np.int32).astype(np.uint8), 63)
        lm = np.minimum(np.rint(inv_min * mins).astype(np.int32).astype(np.uint8), 63)
        d16, dmin16 = (max_scale / F32(63)).astype(np.float16), (max_min / F32(63)).astype(np.float16)
    d = (d16.astype(F32) * ls.astype(F32)).reshape(1, -1)  # (1, n * 8)
    dm = (dmin16.astype(F32) * lm.astype(F32)).reshape(1, -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(np.rint((x + dm) / d), 0, nmax).astype(np.uint8)
    q = np.where(d != 0, requant, q)  # a zero scale keeps the search's q (its values are all -m)
    head = np.empty((n, 16), dtype=np.uint8)
    head[:, 0:2] = d16.view(np.uint8)
    head[:, 2:4] = dmin16.view(np.uint8)
    head[:, 4:16] = pack_scale_min_k4(ls, lm)
    return head, q.T.reshape(n, 8, 32)


def quantize_blocks_q4_k(blocks: np.ndarray, w: Optional[np.ndarray] = None) -> np.ndarray:
    """float32 (n, 256) -> uint8 (n, 144); `w` (n, 256): rounding weights (weighted.py)."""
    head, q = _quantize_k4(blocks, 15, -1.0, 20, w)
    out = np.empty((len(blocks), 144), dtype=np.uint8)
    out[:, :16] = head
    q = q.reshape(-1, 4, 2, 32)  # sub-block 2i + h -> nibble h of qs bytes 32i ..
    out[:, 16:] = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return out


def quantize_blocks_q5_k(blocks: np.ndarray, w: Optional[np.ndarray] = None) -> np.ndarray:
    """float32 (n, 256) -> uint8 (n, 176); `w` (n, 256): rounding weights (weighted.py)."""
    head, q = _quantize_k4(blocks, 31, -0.5, 15, w)
    out = np.empty((len(blocks), 176), dtype=np.uint8)
    out[:, :16] = head
    high = (q >> 4).astype(np.uint8)  # (n, 8, 32): fifth bit of sub-block j -> bit j of qh
    out[:, 16:48] = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[:, None], axis=1)
    low = (q & 15).reshape(-1, 4, 2, 32)
    out[:, 48:] = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    return out


def make_qx_quants(x: np.ndarray, nmax: int, w: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """x float32 (n, m) -> (q uint8 (n, m) in 0..2 nmax - 1, scale (m,)): x ~ scale * (q - nmax).

    ggml's `make_qx_quants` with rmse_type 1 (weights x^2); `w` (n, m) replaces them (weighted.py).
    """
    imax = np.abs(x).argmax(axis=0)  # first element of largest magnitude
    vmax = np.take_along_axis(x, imax[None], axis=0)[0]
    zero = np.abs(vmax) < GROUP_MAX_EPS
    vmax = np.where(zero, F32(1), vmax)
    if w is None:
        w = x * x
    wx = w * x
    nmax_f = F32(nmax)

    def levels(iscale):
        return np.clip(np.rint(iscale * x), -nmax, nmax - 1).astype(F32)

    def sums(lv):
        return _sum(wx * lv), _sum((w * lv) * lv)

    q = levels(-nmax_f / vmax)
    sumlx, suml2 = sums(q)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(suml2 != 0, sumlx / suml2, F32(0))
        best = scale * sumlx
        for i in range(-9, 10):
            if i == 0:
                continue
            qa = levels(-(nmax_f + F32(0.1) * F32(i)) / vmax)
            sumlx, suml2 = sums(qa)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            q = np.where(better, qa, q)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    q = np.where(zero, F32(0), q + nmax_f).astype(np.uint8)  # ggml leaves L = 0 for an all-zero group
    return q, np.where(zero, F32(0), scale)


def quantize_blocks_q6_k(blocks: np.ndarray, w: Optional[np.ndarray] = None) -> np.ndarray:
    """float32 (n, 256) -> uint8 (n, 210); `w` (n, 256): rounding weights (weighted.py)."""
    n = len(blocks)
    x = np.ascontiguousarray(blocks.reshape(n * 16, 16).T)  # (16, n * 16): element, sub-block
    if w is not None:
        w = np.ascontiguousarray(w.reshape(n * 16, 16).T)
    q, scales = make_qx_quants(x, 32, w)
    scales = scales.reshape(n, 16)
    imax = np.abs(scales).argmax(axis=1)[:, None]
    max_scale = np.take_along_axis(scales, imax, axis=1)  # (n, 1), signed
    zero = np.abs(max_scale) < GROUP_MAX_EPS  # the whole super-block is zero: all bytes 0
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(-128) / np.where(zero, F32(1), max_scale)
        d16 = (F32(1) / iscale).astype(np.float16)
        sc = np.minimum(np.rint(iscale * scales), 127).astype(np.int8)
        d = (d16.astype(F32) * sc.astype(F32)).reshape(1, -1)  # (1, n * 16)
        requant = (np.clip(np.rint(x / d), -32, 31) + 32).astype(np.uint8)
    q = np.where(d != 0, requant, q).T.reshape(n, 2, 4, 32)  # half, quarter s, l
    out = np.empty((n, 210), dtype=np.uint8)
    # ql byte 64k + 32(s % 2) + l: low nibble quarter s (s < 2), high nibble quarter s + 2
    out[:, 0:128] = ((q[:, :, 0:2] & 15) | ((q[:, :, 2:4] & 15) << 4)).reshape(n, 128)
    # qh byte 32k + l: bits 2s, 2s + 1 hold quarter s's high two bits
    qh = (q >> 4) << (np.arange(4, dtype=np.uint8) * 2)[:, None]
    out[:, 128:192] = np.bitwise_or.reduce(qh, axis=2).reshape(n, 64)
    out[:, 192:208] = sc.view(np.uint8)
    out[:, 208:210] = d16.view(np.uint8)
    zero = zero[:, 0]
    out[zero] = 0
    return out


def quantize_q4_k(values: np.ndarray) -> np.ndarray:
    return np_quantize_rows(values, T.Q4_K, QK_K, 144, quantize_blocks_q4_k, chunk_blocks=1024)


def quantize_q5_k(values: np.ndarray) -> np.ndarray:
    return np_quantize_rows(values, T.Q5_K, QK_K, 176, quantize_blocks_q5_k, chunk_blocks=1024)


def quantize_q6_k(values: np.ndarray) -> np.ndarray:
    return np_quantize_rows(values, T.Q6_K, QK_K, 210, quantize_blocks_q6_k, chunk_blocks=1024)


K4_HEAD = [("d", 2, "f16 super-block scale"), ("dmin", 2, "f16 super-block min scale"),
           ("scales", 12, "8 x (6-bit sc, 6-bit m), packed")]
K4_FORMULA = "x = (d * sc[j]) * q - dmin * m[j], j = sub-block of 32"
GEMV_SPILLS_G4 = frozenset({(16, 128, 4)})  # 4 groups per block: ptxas spills 200-400 bytes (sm80, sm90)
register(QuantFormat(
    T.Q4_K, QK_K, 2 + 2 + 12 + 128, dequantize_q4_k,
    Layout.of(K4_HEAD + [("qs", 128, "256 x 4-bit q; sub-block 2i+h: nibble h of bytes 32i..32i+31")],
              K4_FORMULA, (0, 15), 32),
    lambda b: decode_k4(b, lambda t: _nibbles_k(t[:, 16:])), quantize_q4_k,
    weighted.blocks(T.Q4_K, quantize_blocks_q4_k), Tiling(4, 32, 2, gemv_skip=GEMV_SPILLS_G4),
    "q4_k", FT.MOSTLY_Q4_K_S, fallback=T.Q5_0, auto=True, act_type=T.Q8_K))
register(QuantFormat(
    T.Q5_K, QK_K, 2 + 2 + 12 + 32 + 128, dequantize_q5_k,
    Layout.of(K4_HEAD + [("qh", 32, "bit 2i+h of byte l: bit 4 of sub-block 2i+h's q[l]"),
                         ("qs", 128, "low 4 bits of 256 q, as Q4_K")], K4_FORMULA, (0, 31), 32),
    lambda b: decode_k4(b, _codes_q5_k), quantize_q5_k,
    weighted.blocks(T.Q5_K, quantize_blocks_q5_k), Tiling(4, 32, 2, gemv_skip=GEMV_SPILLS_G4),
    "q5_k", FT.MOSTLY_Q5_K_S, fallback=T.Q5_1, auto=True, act_type=T.Q8_K))
register(QuantFormat(
    T.Q6_K, QK_K, 128 + 64 + 16 + 2, dequantize_q6_k,
    Layout.of([("ql", 128, "low 4 bits of 256 q"), ("qh", 64, "high 2 bits of 256 q"),
               ("scales", 16, "16 x int8 sub-block scale"), ("d", 2, "f16 super-block scale")],
              "x = (d * scale[j]) * (q - 32), j = sub-block of 16", (0, 63), 16),
    decode_q6_k, quantize_q6_k, weighted.blocks(T.Q6_K, quantize_blocks_q6_k), Tiling(8, 16, 2),
    "q6_k", FT.MOSTLY_Q6_K, fallback=T.Q8_0, auto=True, act_type=T.Q8_K))
