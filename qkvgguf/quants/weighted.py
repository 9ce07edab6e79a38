"""Importance-weighted rounding for blocks of 32 with one scale (and min), and for K-quants' block searches.

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

A format module builds its record's `quantize_weighted` here: `symmetric(...)` and `asymmetric(...)`
with its levels and packing (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), `blocks(qtype, quantize_blocks)` with its
block quantizer that takes rounding weights (Q4_K, Q5_K, Q6_K). Nothing here is keyed by type.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from .registry import block_sizes, dequantize, quantize, type_name

CHUNK = 8192  # blocks per step: (CHUNK, candidates, 32) float32 temporaries of ~20 MB


def block_weights(values: np.ndarray, imatrix: np.ndarray) -> np.ndarray:
    """(rows, n) -> (rows, n) rounding weights u = imatrix * sqrt(sigma2 + w^2)."""
    sigma2 = (values.astype(np.float64) ** 2).mean(axis=1, keepdims=True)
    return (imatrix[None, :].astype(np.float64) * np.sqrt(sigma2 + values.astype(np.float64) ** 2)).astype(np.float32)


def _f16(x):
    return x.astype(np.float16).astype(np.float32)


def _symmetric(x: np.ndarray, u: np.ndarray, n: int, lo: int, hi: int, amax: bool):
    """x, u (B, 32) -> d (B,) f16-exact, levels (B, 32) int in lo..hi.

    Candidates d_k = m / -(n + 0.1 k) (m: the signed value of largest |x|), or with `amax`
    d_k = max|x| / (n + 0.1 k), k = -9..9."""
    k = np.arange(-9, 10, dtype=np.float32)
    if amax:
        cand = np.abs(x).max(axis=1)[:, None] / (n + 0.1 * k)[None, :]  # (B, K)
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


def pack(d, m, lv, bits: int, zero: int) -> np.ndarray:
    """ggml block bytes of 32 from f16-exact scales d (and mins m, or None) and integer levels lv (B, 32):
    bits 8: f16 d, int8 levels (Q8_0); bits 4: f16 d (, f16 m), nibbles of lv + zero (Q4_0, Q4_1);
    bits 5: f16 d (, f16 m), the fifth bits as a u32, nibbles (Q5_0, Q5_1)."""
    f16 = lambda v: v.astype(np.float16).view(np.uint8).reshape(-1, 2)  # noqa: E731
    if bits == 8:
        return np.concatenate([f16(d), lv.astype(np.int8).view(np.uint8)], axis=1)
    q = lv + zero  # stored unsigned
    nib = (q[:, :16] & 15) | ((q[:, 16:] & 15) << 4)
    head = [f16(d)] if m is None else [f16(d), f16(m)]
    if bits == 4:
        return np.concatenate(head + [nib.astype(np.uint8)], axis=1)
    bits_ = ((q >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)  # qh bit j = bit 4 of element j
    qh = bits_.sum(axis=1, dtype=np.uint32).astype("<u4").view(np.uint8).reshape(-1, 4)
    return np.concatenate(head + [qh, nib.astype(np.uint8)], axis=1)


def _blockwise_error(values: np.ndarray, raw: np.ndarray, qtype: int, weights: np.ndarray, block: int) -> np.ndarray:
    """Weighted squared error of each block of `block` elements: (rows * n / block,) float64."""
    import torch

    deq = dequantize(torch.from_numpy(np.ascontiguousarray(raw)), qtype).numpy()
    e = weights.astype(np.float64) * (values.astype(np.float64) - deq) ** 2
    return e.reshape(-1, block).sum(axis=1)


def _plain(values: np.ndarray, qtype: int) -> np.ndarray:
    """The unweighted quantizer the registry's selector picks (ours, or gguf.quants' for Q5_0, Q5_1)."""
    return quantize(values, qtype)


def quantize_weighted(values: np.ndarray, qtype: int, imatrix: np.ndarray,
                      search: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """float32 (rows, n) -> uint8 (rows, n / block * type_size), ggml layout, importance-weighted scales.

    `search` maps blocks x (B, block) and rounding weights u (B, block) to bytes (B, type_size). Each
    block (super-block for K-quants) keeps whichever of the weighted search and the plain quantizer has
    the smaller error sum imatrix_j (w_j - what_j)^2, so the result is never worse than the plain path
    in that error.
    """
    from .floats import np_blocks

    block, size = block_sizes(qtype)
    values = np.ascontiguousarray(np_blocks(values, qtype, block)).reshape(len(values), -1)  # checks the shape
    rows, n = values.shape
    imatrix = np.asarray(imatrix, dtype=np.float32)
    if imatrix.shape != (n,):
        raise ValueError(f"{type_name(qtype)}: importance matrix has {imatrix.shape} entries, the rows have {n}")
    imatrix = np.where(np.isfinite(imatrix), np.maximum(imatrix, 0), 0)
    # a floor keeps zero-importance columns (never-seen inputs) rounded sensibly
    floor = 1e-6 * float(imatrix.mean()) if imatrix.any() else 1.0
    imp = imatrix + floor
    u = block_weights(values, imp).reshape(-1, block)
    x = values.reshape(-1, block)
    out = []
    step = CHUNK if block == 32 else 1024
    for s in range(0, len(x), step):
        out.append(search(x[s:s + step], u[s:s + step]))
    weighted = np.concatenate(out).reshape(-1, size)
    plain = _plain(values, qtype).reshape(-1, size)
    wcol = np.broadcast_to(imp[None, :], values.shape)
    e_w = _blockwise_error(values, weighted.reshape(rows, -1), qtype, wcol, block)
    e_p = _blockwise_error(values, plain.reshape(rows, -1), qtype, wcol, block)
    return np.where((e_w <= e_p)[:, None], weighted, plain).reshape(rows, -1)


# -- what a format module registers ------------------------------------------------------------------
Weighted = Callable[[np.ndarray, np.ndarray], np.ndarray]


def symmetric(qtype: int, n: int, lo: int, hi: int, bits: int, zero: int = 0, amax: bool = False) -> Weighted:
    """x = d * l, l in lo..hi stored as l + zero in `bits` bits (see `_symmetric`, `pack`)."""
    def search(x, u):
        d, lv = _symmetric(x, u, n, lo, hi, amax)
        return pack(d, None, lv, bits, zero)
    return lambda values, imatrix: quantize_weighted(values, qtype, imatrix, search)


def asymmetric(qtype: int, nmax: int, bits: int) -> Weighted:
    """x = d * l + m, l in 0..nmax (see `_asymmetric`, `pack`)."""
    def search(x, u):
        d, m, lv = _asymmetric(x, u, nmax)
        return pack(d, m, lv, bits, 0)
    return lambda values, imatrix: quantize_weighted(values, qtype, imatrix, search)


def blocks(qtype: int, quantize_blocks: Callable[[np.ndarray, Optional[np.ndarray]], np.ndarray]) -> Weighted:
    """A format's own block search given rounding weights: quantize_blocks(x (B, block), u (B, block))."""
    return lambda values, imatrix: quantize_weighted(values, qtype, imatrix, quantize_blocks)
