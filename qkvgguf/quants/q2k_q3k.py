"""K-quants Q2_K and Q3_K: super-blocks of 256 weights, 16 sub-blocks of 16 with 4- or 6-bit scales.

Layouts (elements, bytes per super-block), as in llama.cpp's ggml-common.h (QK_K = 256):

    Q2_K: (256, 16 + 64 + 2 + 2)       # 16 x (4-bit scale | 4-bit min << 4), 2-bit qs, f16 d, f16 dmin
    Q3_K: (256, 32 + 64 + 12 + 2)      # hmask: third bit, 2-bit qs, 16 x 6-bit scales in 12 bytes, f16 d

    bits per weight: Q2_K 84 * 8 / 256 = 2.625, Q3_K 110 * 8 / 256 = 3.4375

Element e of a super-block (sub-block s = e // 16): its low two bits are bits 2p, 2p + 1 of qs byte
32h + l, where e = 128h + 32p + l (h: half, p: plane 0..3, l: 0..31), as in Q6_K's ql. Q3_K's
third bit is bit e // 32 of hmask byte e % 32, and a set bit means "no offset": q = low - 4 * (1 - bit).

    Q2_K: x = (d * (sc_s & 15)) * q - (dmin * (sc_s >> 4))          q in 0..3
    Q3_K: x = (d * (scale_s - 32)) * q                               q in -4..3
          scale_s, 6 bits: low nibble of scales[s] (s < 8) or high nibble of scales[s - 8] (s >= 8),
          high two bits (scales[8 + s % 4] >> 2 (s // 4)) & 3

Arithmetic (bit-exact with `gguf.quants`): the scale product in float32 first, then one multiply by
q and, for Q2_K, a separately rounded subtract: all products are exact in float32 (11-bit f16 times
at most 6 + 3 bits).

Quantizers (numpy, vectorized over sub-blocks): ggml's functions in ggml-quants.c operation for
operation in float32, sums element after element (reductions over axis 0 of (elements, sub-blocks)
arrays, see kquants.py), so the bytes equal llama.cpp's quantizer's (tests/test_lowbit_quantize.py):

    Q2_K, plain (`quantize_row_q2_K_ref`): per sub-block `make_qkx2_quants` (nmax 3, weights |x|,
         absolute error, grid -0.5 + 0.1 i, i = 0..15); scales and mins to 4 bits against the
         super-block's largest (d = f16(max / 15)); q recomputed with the stored scales.
    Q2_K, importance-weighted (`quantize_row_q2_K_impl`): weights qw * sqrt(sigma2 + x^2)
         (sigma2 = mean x^2 of the super-block), make_qkx3_quants (squared error, grid -0.9 + 0.05 i,
         i = 0..36; the same search as make_qkx2_quants), then `make_qp_quants` fits the 4-bit
         scales and mins with the sub-blocks' summed weights.
    Q3_K, plain (`quantize_row_q3_K_ref`): per sub-block `make_q3_quants` (the symmetric scale
         -max / 4, then up to 5 passes of one-element-at-a-time level changes that raise
         (sum w x l)^2 / sum w l^2, weights x^2); the 16 scales to 6 bits against the largest
         (d = f16(max / -32)); q recomputed.
    Q3_K, importance-weighted (`quantize_row_q3_K_impl`): weights qw * sqrt(2 sigma2 + x^2),
         `make_qx_quants` (nmax 4) per sub-block, `make_qx_quants` (nmax 32) for the 16 scales.

The importance-weighted paths use the importance matrix as llama.cpp's quantizer does (its per-column
values are the `quant_weights` of the row), with no extra floor or fallback.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from .floats import as_blocks, codes_input, f16_at, np_quantize_rows, np_quantize_rows_weighted, shifts
from .kquants import GROUP_MAX_EPS, QK_K, _sum, make_qkx2_quants, make_qx_quants
from .registry import Codes, Layout, QuantFormat, Tiling, register

F32 = np.float32
Q2_K_SIZE = 16 + 64 + 2 + 2  # scales, qs, d, dmin
Q3_K_SIZE = 32 + 64 + 12 + 2  # hmask, qs, scales, d


# -- dequantizers (torch) -------------------------------------------------------------------------
def _low2(qs: torch.Tensor) -> torch.Tensor:
    """qs uint8 (rows, nsb, 64) -> uint8 (rows, nsb, 16, 16): 2-bit levels in element order."""
    q = (qs.unflatten(-1, (2, 1, 32)) >> shifts(4, 2, qs)) & 3  # (rows, nsb, half, plane, 32)
    return q.reshape(*qs.shape[:-1], 16, 16)


def dequantize_q2_k(raw: torch.Tensor) -> torch.Tensor:
    blocks = as_blocks(raw, T.Q2_K, Q2_K_SIZE)  # (rows, nsb, 84)
    rows, nsb, _ = blocks.shape
    sc = blocks[..., 0:16]
    dl = f16_at(blocks, 80)[..., None] * (sc & 15).float()  # (rows, nsb, 16)
    ml = f16_at(blocks, 82)[..., None] * (sc >> 4).float()
    out = torch.empty((rows, nsb, 16, 16), dtype=torch.float32, device=raw.device)
    out.copy_(_low2(blocks[..., 16:80]))
    out.mul_(dl[..., None])
    out.sub_(ml[..., None])
    return out.view(rows, nsb * QK_K)


def scales_q3_k(scales: torch.Tensor) -> torch.Tensor:
    """The 12 packed scale bytes (..., 12) -> the 16 6-bit scales minus 32, int8 (..., 16)."""
    low = (scales[..., 0:8].unsqueeze(-2) >> shifts(2, 4, scales)) & 15  # (..., 2, 8): s = 8k + j
    high = (scales[..., 8:12].unsqueeze(-2) >> shifts(4, 2, scales)) & 3  # (..., 4, 4): s = 4k + j
    return (low.flatten(-2) | (high.flatten(-2) << 4)).view(torch.int8) - 32


def _hbit_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    """Q3_K blocks (..., 110) -> the third bit of every q, uint8 (..., 8, 32): element 32b + l."""
    return (blocks[..., 0:32].unsqueeze(-2) >> shifts(8, 1, blocks)) & 1


def dequantize_q3_k(raw: torch.Tensor) -> torch.Tensor:
    blocks = as_blocks(raw, T.Q3_K, Q3_K_SIZE)  # (rows, nsb, 110)
    rows, nsb, _ = blocks.shape
    dl = f16_at(blocks, 108)[..., None] * scales_q3_k(blocks[..., 96:108]).float()  # (rows, nsb, 16)
    hbit = _hbit_q3_k(blocks)  # (rows, nsb, 8, 32): e = 32b + l
    q = _low2(blocks[..., 32:96]).view(torch.int8) - ((hbit ^ 1) << 2).view(torch.int8).reshape(rows, nsb, 16, 16)
    out = torch.empty((rows, nsb, 16, 16), dtype=torch.float32, device=raw.device)
    out.copy_(q)
    out.mul_(dl[..., None])
    return out.view(rows, nsb * QK_K)


# -- inspect's decoders: blocks (n, type_size) -> Codes -------------------------------------------------
def decode_q2_k(b: np.ndarray) -> Codes:
    """x = (d * (sc & 15)) * q - dmin * (sc >> 4) per sub-block of 16: scale and bias per sub-block."""
    t = codes_input(b)
    sc = t[:, 0:16]
    d, dmin = f16_at(t, 80), f16_at(t, 82)
    scale = d[:, None] * (sc & 15).float()
    bias = -(dmin[:, None] * (sc >> 4).float())
    q = _low2(t[:, 16:80]).reshape(len(b), QK_K).numpy().astype(np.int16)
    return Codes(q, scale.numpy(), bias.numpy(), 0,
                 {"d": d.numpy(), "dmin": dmin.numpy(), "sc": (sc & 15).numpy(), "m": (sc >> 4).numpy()})


def decode_q3_k(b: np.ndarray) -> Codes:
    """x = (d * (s - 32)) * (q - 4), q = 2 low bits | third bit << 2, per sub-block of 16."""
    t = codes_input(b)
    d = f16_at(t, 108)
    s = scales_q3_k(t[:, 96:108])  # (n, 16), s - 32
    q = _low2(t[:, 32:96]).reshape(len(b), QK_K) | (_hbit_q3_k(t).reshape(len(b), QK_K) << 2)
    return Codes(q.numpy().astype(np.int16), (d[:, None] * s.float()).numpy(), np.zeros((len(b), 16), np.float32),
                 4, {"d": d.numpy(), "scales": (s.int() + 32).numpy()})


# -- quantizer helpers ----------------------------------------------------------------------------
def _nearest(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int (round half to even) as int32."""
    return np.rint(v).astype(np.int32)


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """Levels uint8 (n, 256), each < 4 -> qs (n, 64): byte 32h + l = L[128h + l + 32p] << 2p."""
    L = L.reshape(-1, 2, 4, 32).astype(np.uint8)
    return (L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)).reshape(-1, 64)


def _to_subblocks(blocks: np.ndarray, n: int = 16) -> np.ndarray:
    """float32 (nsb, 256) -> (n, nsb * 256 / n): element, sub-block (C-contiguous: sums run in order)."""
    return np.ascontiguousarray(blocks.reshape(-1, n).T)


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """x float32 (n, m) -> (L int32 (n, m) in 0..2 nmax - 1, scale (m,)): ggml's make_q3_quants, do_rmse.

    Start from the symmetric scale -nmax / max (max: the signed element of largest magnitude), then
    up to 5 passes over the elements in order, each moving one level to where it maximizes
    (sum w x l)^2 / sum w l^2 (weights x^2) given the others, kept only if that ratio grows.
    A pass that changes nothing ends ggml's loop; here every later pass changes nothing either.
    """
    n = x.shape[0]
    imax = np.abs(x).argmax(axis=0)
    vmax = np.take_along_axis(x, imax[None], axis=0)[0]
    zero = np.abs(vmax) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = F32(-nmax) / np.where(zero, F32(1), vmax)
    L = np.clip(_nearest(iscale * x), -nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx = _sum(wx * L.astype(F32))
    suml2 = _sum((w * L.astype(F32)) * L.astype(F32))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for _ in range(5):
            for i in range(n):
                li = L[i].astype(F32)
                slx = sumlx - wx[i] * li
                sl2 = suml2 - (w[i] * li) * li
                new = np.clip(_nearest(np.where(slx > 0, x[i] * sl2 / slx, F32(0))), -nmax, nmax - 1)
                nf = new.astype(F32)
                slx2 = slx + wx[i] * nf
                sl22 = sl2 + (w[i] * nf) * nf
                take = ((slx > 0) & (new != L[i]) & (sl22 > 0)
                        & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22))
                L[i] = np.where(take, new, L[i])
                sumlx = np.where(take, slx2, sumlx)
                suml2 = np.where(take, sl22, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
    L = np.where(zero, 0, L + nmax)  # ggml leaves L = 0 (not nmax) for an all-zero group
    return L.astype(np.int32), np.where(zero, F32(0), scale)


def make_qp_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x float32 (n, m) >= 0, weights w (n, m) -> (L int32 (n, m) in 0..nmax, scale (m,)): ggml's
    make_qp_quants: the best of 9 scales max / (nmax + 0.1 i), i = -4..4, then up to 5 passes of
    one-level-at-a-time refinement as in make_q3_quants."""
    n = x.shape[0]
    vmax = np.maximum(x.max(axis=0), F32(0))
    zero = vmax < GROUP_MAX_EPS
    vmax = np.where(zero, F32(1), vmax)
    nmax_f = F32(nmax)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = nmax_f / vmax
        L = _nearest(iscale * x)  # the first candidate is not clamped (as in ggml)
        scale = F32(1) / iscale
        diff = x - scale * L.astype(F32)
        best = _sum((w * diff) * diff)
        for i in range(-4, 5):
            if i == 0:
                continue
            iscale_i = (F32(0.1) * F32(i) + nmax_f) / vmax
            scale_i = F32(1) / iscale_i
            li = np.minimum(nmax, _nearest(iscale_i * x)).astype(F32)
            diff = x - scale_i * li
            mse = _sum((w * diff) * diff)
            better = mse < best
            best = np.where(better, mse, best)
            iscale = np.where(better, iscale_i, iscale)
        L = np.minimum(nmax, _nearest(iscale * x))
        wx = w * x
        sumlx = _sum(wx * L.astype(F32))
        suml2 = _sum((w * L.astype(F32)) * L.astype(F32))
        for _ in range(5):
            for i in range(n):
                li = L[i].astype(F32)
                slx = sumlx - wx[i] * li
                sl2 = suml2 - (w[i] * li) * li
                ok = (slx > 0) & (sl2 > 0)
                new = np.minimum(nmax, _nearest(np.where(ok, x[i] * sl2 / slx, F32(0))))
                nf = new.astype(F32)
                slx2 = slx + wx[i] * nf
                sl22 = sl2 + (w[i] * nf) * nf
                take = ok & (new != L[i]) & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22)
                L[i] = np.where(take, new, L[i])
                sumlx = np.where(take, slx2, sumlx)
                suml2 = np.where(take, sl22, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, F32(0)).astype(F32)
    return np.where(zero, 0, L).astype(np.int32), np.where(zero, F32(0), scale)


def _row_weights(blocks: np.ndarray, qw: np.ndarray, sigma_scale: float) -> np.ndarray:
    """ggml's rounding weights qw * sqrt(sigma2 + x^2), sigma2 = sigma_scale * sum x^2 / 256 per super-block.

    blocks, qw float32 (nsb, 256); the sum of squares runs element after element as in C."""
    sumx2 = np.add.reduce(np.ascontiguousarray((blocks * blocks).T), axis=0)  # (nsb,)
    sigma2 = F32(sigma_scale) * sumx2 / F32(QK_K)  # scaling by powers of two: exact in any order
    return qw * np.sqrt(sigma2[:, None] + blocks * blocks)


# -- Q2_K -----------------------------------------------------------------------------------------
def quantize_blocks_q2_k(blocks: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """float32 (n, 256) -> uint8 (n, 84); qw (n, 256): importance per element (ggml's quant_weights)."""
    n = len(blocks)
    x = _to_subblocks(blocks)  # (16, n * 16)
    if qw is None:
        q, scales, mins = make_qkx2_quants(x, 3, -0.5, 0.1, 15, w=np.abs(x), use_mad=True)
        scales, mins = scales.reshape(n, 16), mins.reshape(n, 16)
        max_scale = np.maximum(scales.max(axis=1, keepdims=True), F32(0))  # (n, 1)
        max_min = np.maximum(mins.max(axis=1, keepdims=True), F32(0))
        with np.errstate(divide="ignore", invalid="ignore"):
            ls = np.where(max_scale > 0, _nearest((F32(15) / max_scale) * scales), 0)
            lm = np.where(max_min > 0, _nearest((F32(15) / max_min) * mins), 0)
        d16 = np.where(max_scale > 0, max_scale / F32(15), F32(0)).astype(np.float16)
        dmin16 = np.where(max_min > 0, max_min / F32(15), F32(0)).astype(np.float16)
    else:
        w = _to_subblocks(_row_weights(blocks, qw, 1))
        q, scales, mins = make_qkx2_quants(x, 3, -0.9, 0.05, 36, w=w)
        sw = _sum(w).reshape(n, 16)  # summed weights per sub-block
        ls, dm = make_qp_quants(np.ascontiguousarray(scales.reshape(n, 16).T), 15, np.ascontiguousarray(sw.T))
        lm, mm = make_qp_quants(np.ascontiguousarray(mins.reshape(n, 16).T), 15, np.ascontiguousarray(sw.T))
        ls, lm = ls.T, lm.T
        d16, dmin16 = dm.astype(np.float16)[:, None], mm.astype(np.float16)[:, None]
    sc = ((ls & 255) | (lm << 4)).astype(np.uint8)  # C: uint8 scales[j] = l; scales[j] |= l << 4
    d = (d16.astype(F32) * (sc & 15).astype(F32)).reshape(1, -1)  # (1, n * 16)
    dm = (dmin16.astype(F32) * (sc >> 4).astype(F32)).reshape(1, -1)
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_nearest((x + dm) / d), 0, 3)
    L = np.where(d != 0, requant, q).T.reshape(n, 256)  # a zero scale keeps the search's levels
    out = np.empty((n, Q2_K_SIZE), dtype=np.uint8)
    out[:, 0:16] = sc
    out[:, 16:80] = _pack_2bit(L)
    out[:, 80:82] = d16.view(np.uint8).reshape(n, 2)
    out[:, 82:84] = dmin16.view(np.uint8).reshape(n, 2)
    return out


# -- Q3_K -----------------------------------------------------------------------------------------
def pack_scales_q3_k(l: np.ndarray) -> np.ndarray:
    """6-bit scales (n, 16) in 0..63 -> the 12 scale bytes (n, 12) (inverse of scales_q3_k)."""
    l = l.astype(np.uint8)
    out = np.empty((len(l), 12), dtype=np.uint8)
    out[:, 0:8] = (l[:, 0:8] & 15) | ((l[:, 8:16] & 15) << 4)
    h = (l >> 4).reshape(-1, 4, 4)  # s = 4k + j -> bits 2k of byte 8 + j
    out[:, 8:12] = h[:, 0] | (h[:, 1] << 2) | (h[:, 2] << 4) | (h[:, 3] << 6)
    return out


def quantize_blocks_q3_k(blocks: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """float32 (n, 256) -> uint8 (n, 110); qw (n, 256): importance per element (ggml's quant_weights)."""
    n = len(blocks)
    x = _to_subblocks(blocks)  # (16, n * 16)
    if qw is None:
        L, scales = make_q3_quants(x, 4)
        scales = scales.reshape(n, 16)
        imax = np.abs(scales).argmax(axis=1)[:, None]
        max_scale = np.take_along_axis(scales, imax, axis=1)  # (n, 1), signed
        with np.errstate(divide="ignore", invalid="ignore"):
            iscale = F32(-32) / max_scale
            ls = np.clip(_nearest(iscale * scales), -32, 31) + 32
            d16 = np.where(max_scale != 0, F32(1) / iscale, F32(0)).astype(np.float16)
        ls = np.where(max_scale != 0, ls, 0)  # scales bytes stay zero
    else:
        w = _to_subblocks(_row_weights(blocks, qw, 2))
        L, scales = make_qx_quants(x, 4, w)
        L = L.astype(np.int32)
        sw = _sum(w).reshape(n, 16)
        ls, d_block = make_qx_quants(np.ascontiguousarray(scales.reshape(n, 16).T), 32, np.ascontiguousarray(sw.T))
        ls = ls.T.astype(np.int32)
        d16 = d_block.astype(np.float16)[:, None]
    sc = pack_scales_q3_k(ls)
    d = (d16.astype(F32) * (ls.astype(F32) - F32(32))).reshape(1, -1)  # (1, n * 16), the stored scales
    with np.errstate(divide="ignore", invalid="ignore"):
        requant = np.clip(_nearest(x / d), -4, 3) + 4
    L = np.where(d != 0, requant, L).T.reshape(n, 256)
    out = np.empty((n, Q3_K_SIZE), dtype=np.uint8)
    high = (L > 3).reshape(n, 8, 32).astype(np.uint8)  # bit e // 32 of byte e % 32
    out[:, 0:32] = np.bitwise_or.reduce(high << np.arange(8, dtype=np.uint8)[:, None], axis=1)
    out[:, 32:96] = _pack_2bit(L & 3)
    out[:, 96:108] = sc
    out[:, 108:110] = d16.view(np.uint8).reshape(n, 2)
    return out


# -- rows -----------------------------------------------------------------------------------------
def quantize_q2_k(values: np.ndarray) -> np.ndarray:
    return np_quantize_rows(values, T.Q2_K, QK_K, Q2_K_SIZE, quantize_blocks_q2_k, chunk_blocks=1024)


def quantize_q3_k(values: np.ndarray) -> np.ndarray:
    return np_quantize_rows(values, T.Q3_K, QK_K, Q3_K_SIZE, quantize_blocks_q3_k, chunk_blocks=1024)


# not full outtypes: llama.cpp's q2_k and q3_k_* are recipes (convert/writer.py), so no `outtype` here
register(QuantFormat(
    T.Q2_K, QK_K, 16 + 64 + 2 + 2, dequantize_q2_k,
    Layout.of([("scales", 16, "16 x (4-bit sc | 4-bit m << 4)"),
               ("qs", 64, "256 x 2-bit q; byte 32h + l, bits 2p: q[128h + 32p + l]"),
               ("d", 2, "f16 super-block scale"), ("dmin", 2, "f16 super-block min scale")],
              "x = (d * sc[j]) * q - dmin * m[j], j = sub-block of 16", (0, 3), 16),
    decode_q2_k, quantize_q2_k, np_quantize_rows_weighted(T.Q2_K, QK_K, Q2_K_SIZE, quantize_blocks_q2_k),
    Tiling(4, 16, 4, gemv_skip=frozenset({(16, 128, 4), (16, 256, 4)}), gemm_spills=frozenset({(64, 64), (128, 64)})),
    fallback=T.Q4_0, auto=True, act_type=T.Q8_K))
register(QuantFormat(
    T.Q3_K, QK_K, 32 + 64 + 12 + 2, dequantize_q3_k,
    Layout.of([("hmask", 32, "bit b of byte l: bit 2 of q[32b + l]"), ("qs", 64, "low 2 bits of 256 q, as Q2_K"),
               ("scales", 12, "16 x 6-bit s, packed"), ("d", 2, "f16 super-block scale")],
              "x = (d * (s[j] - 32)) * (q - 4), j = sub-block of 16", (0, 7), 16),
    decode_q3_k, quantize_q3_k, np_quantize_rows_weighted(T.Q3_K, QK_K, Q3_K_SIZE, quantize_blocks_q3_k),
    Tiling(4, 16, 4, gemv_skip=frozenset({(16, 128, 4)}), gemm_spills=frozenset({(64, 64), (128, 64)})),
    fallback=T.Q4_0, auto=True, act_type=T.Q8_K))
