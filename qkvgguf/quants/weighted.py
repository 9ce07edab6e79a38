"""Importance-weighted rounding for Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K.

The plain quantizers (q4.py, q8.py; bit-exact with ggml) choose each block's scale from its
largest value. With an importance matrix (imatrix[j] = mean of x_j^2 over calibration inputs of
the matmul, per input column j) the error that matters is the output error, sum_j imatrix_j *
(w_j - what_j)^2 per row, so the scale (and min) are chosen to minimize a weighted error instead:

    weights  u_j = imatrix_j * sqrt(sigma2 + w_j^2)        sigma2 = mean of the row's w^2
             (large weights and important columns count more: llama.cpp's heuristic, ggml-quants.c)
    symmetric (Q4_0 levels -8..7, Q5_0 -16..15, Q8_0 -127..127), x = d * l:
             for 19 candidate scales d_k = m / -(n + 0.1 k), k = -9..9 (m = the signed value of
             largest |w|; n = 8, 16; Q8_0: d_k = max|w| / (127 + 0.1 k)), round l, refit
             d = sum u w l / sum u l^2, keep the candidate of least sum u (w - d l)^2
    asymmetric (Q4_1 levels 0..15, Q5_1 0..31), x = d * l + m:
             for candidate ranges [min + a r, max - b r] (a, b in 0, 0.03, 0.08, r = max - min)
             with d = range / nmax, and d = r / (nmax + delta) from min (delta = +-0.2 .. +-1),
             round l, refit (d, m) by weighted least squares, keep the least weighted error

K-quants reuse kquants.py's searches (make_qkx2_quants for Q4_K/Q5_K sub-blocks of 32, min <= 0;
make_qx_quants for Q6_K sub-blocks of 16) with u in place of their built-in weights; the 6/8-bit
sub-block scales and f16 super-block scales are then quantized as in the plain path.

Scales are rounded to f16 and the levels recomputed against the stored values, so the bytes are
ggml's standard layout (gguf.quants and llama.cpp read them). Finally each block keeps whichever
of this result and the plain quantizer's has the smaller error sum_j imatrix_j (w_j - what_j)^2,
so the importance-weighted error is never worse than the plain path's (with any imatrix).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

CHUNK = 8192  # blocks per step: (CHUNK, candidates, 32) float32 temporaries of ~20 MB

SYMMETRIC = {T.Q4_0: (8, -8, 7), T.Q5_0: (16, -16, 15), T.Q8_0: (127, -127, 127)}
ASYMMETRIC = {T.Q4_1: 15, T.Q5_1: 31}
KQUANTS = (T.Q4_K, T.Q5_K, T.Q6_K)  # kquants.py's searches with these rounding weights
TYPES = tuple(SYMMETRIC) + tuple(ASYMMETRIC) + KQUANTS


def block_weights(values: np.ndarray, imatrix: np.ndarray) -> np.ndarray:
    """(rows, n) -> (rows, n) rounding weights u = imatrix * sqrt(sigma2 + w^2)."""
    sigma2 = (values.astype(np.float64) ** 2).mean(axis=1, keepdims=True)
    return (imatrix[None, :].astype(np.float64) * np.sqrt(sigma2 + values.astype(np.float64) ** 2)).astype(np.float32)


def _f16(x):
    return x.astype(np.float16).astype(np.float32)


def _symmetric(x: np.ndarray, u: np.ndarray, qtype: T):
    """x, u (B, 32) -> d (B,) f16-exact, levels (B, 32) int."""
    n, lo, hi = SYMMETRIC[qtype]
    k = np.arange(-9, 10, dtype=np.float32)
    if qtype == T.Q8_0:
        amax = np.abs(x).max(axis=1)
        cand = amax[:, None] / (127 + 0.1 * k)[None, :]  # (B, K)
    else:
        idx = np.abs(x).argmax(axis=1)
        m = x[np.arange(len(x)), idx]
        cand = m[:, None] / -(n + 0.1 * k)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(cand == 0, 0, 1 / cand)
    lv = np.clip(np.rint(x[:, None, :] * inv[:, :, None]), lo, hi)  # (B, K, 32)
    uw = u[:, None, :]
    num = (uw * x[:, None, :] * lv).sum(-1)
    den = (uw * lv * lv).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(den > 0, num / den, 0).astype(np.float32)
    err = (uw * (x[:, None, :] - d[:, :, None] * lv) ** 2).sum(-1)
    best = err.argmin(axis=1)
    d = _f16(d[np.arange(len(x)), best])
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(d == 0, 0, 1 / d)
    return d, np.clip(np.rint(x * inv[:, None]), lo, hi).astype(np.int32)


def _asymmetric(x: np.ndarray, u: np.ndarray, nmax: int):
    """x, u (B, 32) -> d, m (B,) f16-exact, levels (B, 32) in 0..nmax."""
    mn, mx = x.min(axis=1), x.max(axis=1)
    r = mx - mn
    shrink = np.array([0.0, 0.03, 0.08], dtype=np.float32)
    a, b = np.meshgrid(shrink, shrink, indexing="ij")
    lo = mn[:, None] + a.reshape(1, -1) * r[:, None]  # (B, 9): ranges shrunk at either end
    hi = mx[:, None] - b.reshape(1, -1) * r[:, None]
    d0 = (hi - lo) / nmax
    steps = np.array([-1.0, -0.8, -0.6, -0.4, -0.2, 0.2, 0.4, 0.6, 0.8, 1.0], dtype=np.float32)
    lo = np.concatenate([lo, np.repeat(mn[:, None], len(steps), axis=1)], axis=1)  # (B, 19)
    d0 = np.concatenate([d0, r[:, None] / (nmax + steps)[None, :]], axis=1)  # + full range, nmax + delta steps
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(d0 == 0, 0, 1 / d0)
    lv = np.clip(np.rint((x[:, None, :] - lo[:, :, None]) * inv[:, :, None]), 0, nmax)  # (B, K, 32)
    uw = u[:, None, :]
    s0, s1, s2 = uw.sum(-1), (uw * lv).sum(-1), (uw * lv * lv).sum(-1)
    t0, t1 = (uw * x[:, None, :]).sum(-1), (uw * x[:, None, :] * lv).sum(-1)
    det = s2 * s0 - s1 * s1
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(det > 0, (t1 * s0 - t0 * s1) / det, d0)
        m = np.where(det > 0, (s2 * t0 - s1 * t1) / det, lo)
    err = (uw * (x[:, None, :] - d[:, :, None] * lv - m[:, :, None]) ** 2).sum(-1)
    best = err.argmin(axis=1)
    rows = np.arange(len(x))
    d, m = _f16(d[rows, best].astype(np.float32)), _f16(m[rows, best].astype(np.float32))
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(d == 0, 0, 1 / d)
    return d, m, np.clip(np.rint((x - m[:, None]) * inv[:, None]), 0, nmax).astype(np.int32)


def _pack(qtype: T, d, m, lv) -> np.ndarray:
    """ggml block bytes from f16-exact scales and integer levels; (B, type_size) uint8."""
    f16 = lambda v: v.astype(np.float16).view(np.uint8).reshape(-1, 2)  # noqa: E731
    if qtype == T.Q8_0:
        return np.concatenate([f16(d), lv.astype(np.int8).view(np.uint8)], axis=1)
    q = lv + (8 if qtype == T.Q4_0 else 16 if qtype == T.Q5_0 else 0)  # stored unsigned
    nib = (q[:, :16] & 15) | ((q[:, 16:] & 15) << 4)
    head = [f16(d)] if qtype in (T.Q4_0, T.Q5_0) else [f16(d), f16(m)]
    if qtype in (T.Q4_0, T.Q4_1):
        return np.concatenate(head + [nib.astype(np.uint8)], axis=1)
    bits = ((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)  # qh bit j = bit 4 of element j
    qh = bits.sum(axis=1, dtype=np.uint32).astype("<u4").view(np.uint8).reshape(-1, 4)
    return np.concatenate(head + [qh, nib.astype(np.uint8)], axis=1)


def _blockwise_error(values: np.ndarray, raw: np.ndarray, qtype: T, weights: np.ndarray, block: int) -> np.ndarray:
    """Weighted squared error of each block of `block` elements: (rows * n / block,) float64."""
    import torch

    from . import dequantize

    deq = dequantize(torch.from_numpy(np.ascontiguousarray(raw)), qtype).numpy()
    e = weights.astype(np.float64) * (values.astype(np.float64) - deq) ** 2
    return e.reshape(-1, block).sum(axis=1)


def _plain(values: np.ndarray, qtype: T) -> np.ndarray:
    """The unweighted quantizer: ours, or gguf.quants' where we have none (Q5_0, Q5_1)."""
    from . import get_format

    fmt = get_format(qtype)
    if fmt.quantize is not None:
        return fmt.quantize(values)
    import gguf.quants

    return gguf.quants.quantize(values, qtype)


def _kquant_blocks(qtype: T):
    from . import kquants

    return {T.Q4_K: kquants.quantize_blocks_q4_k, T.Q5_K: kquants.quantize_blocks_q5_k,
            T.Q6_K: kquants.quantize_blocks_q6_k}[qtype]


def quantize_weighted(values: np.ndarray, qtype: T, imatrix: np.ndarray) -> np.ndarray:
    """float32 (rows, n) -> uint8 (rows, n / block * type_size), ggml layout, importance-weighted scales.

    Each block (super-block for K-quants) keeps whichever of the weighted search and the plain
    quantizer has the smaller error sum imatrix_j (w_j - what_j)^2, so the result is never worse
    than the plain path in that error.
    """
    from gguf.constants import GGML_QUANT_SIZES

    if qtype not in TYPES:
        raise ValueError(f"no importance-weighted quantizer for {T(qtype).name}")
    from .floats import np_blocks

    block, size = GGML_QUANT_SIZES[qtype]
    values = np.ascontiguousarray(np_blocks(values, qtype, block)).reshape(len(values), -1)  # checks the shape
    rows, n = values.shape
    imatrix = np.asarray(imatrix, dtype=np.float32)
    if imatrix.shape != (n,):
        raise ValueError(f"importance matrix has {imatrix.shape} entries, the rows have {n}")
    imatrix = np.where(np.isfinite(imatrix), np.maximum(imatrix, 0), 0)
    # a floor keeps zero-importance columns (never-seen inputs) rounded sensibly
    floor = 1e-6 * float(imatrix.mean()) if imatrix.any() else 1.0
    imp = imatrix + floor
    u = block_weights(values, imp).reshape(-1, block)
    x = values.reshape(-1, block)
    out = []
    step = CHUNK if block == 32 else 1024
    for s in range(0, len(x), step):
        xb, ub = x[s:s + step], u[s:s + step]
        if qtype in SYMMETRIC:
            d, lv = _symmetric(xb, ub, qtype)
            out.append(_pack(qtype, d, None, lv))
        elif qtype in ASYMMETRIC:
            d, m, lv = _asymmetric(xb, ub, ASYMMETRIC[qtype])
            out.append(_pack(qtype, d, m, lv))
        else:
            out.append(_kquant_blocks(qtype)(xb, ub))
    weighted = np.concatenate(out).reshape(-1, size)
    plain = _plain(values, qtype).reshape(-1, size)
    wcol = np.broadcast_to(imp[None, :], values.shape)
    e_w = _blockwise_error(values, weighted.reshape(rows, -1), qtype, wcol, block)
    e_p = _blockwise_error(values, plain.reshape(rows, -1), qtype, wcol, block)
    return np.where((e_w <= e_p)[:, None], weighted, plain).reshape(rows, -1)


def quantizer(qtype: T):
    """The (values, imatrix) -> bytes function registered on the format."""
    return lambda values, imatrix: quantize_weighted(values, qtype, imatrix)
