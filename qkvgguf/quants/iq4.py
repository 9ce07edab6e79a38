"""IQ4_NL and IQ4_XS: 4-bit indices into a fixed non-linear table of 16 levels.

Layouts (elements, bytes per block), as in llama.cpp's ggml-common.h:

    IQ4_NL: (32,  2 + 16)                 # f16 d, 16 bytes of nibbles            x = d * KVALUES[q]
    IQ4_XS: (256, 2 + 2 + 4 + 128)        # f16 d, u16 scales_h, scales_l[4], nibbles
                                          # sub-block s (32 weights): x = (d * (ls_s - 32)) * KVALUES[q]

    bits per weight: IQ4_NL 18 * 8 / 32 = 4.5, IQ4_XS 136 * 8 / 256 = 4.25

    KVALUES = -127 -104 -83 -65 -49 -35 -22 -10 1 13 25 38 53 69 89 113   (llama.cpp's kvalues_iq4nl)

Nibble order as Q4_0, per 32 weights: byte j of a sub-block holds element j in its low nibble and
element j + 16 in its high nibble (IQ4_XS: sub-block s uses qs bytes 16s .. 16s + 15). IQ4_XS's
6-bit sub-block scale: ls_s = (scales_l[s // 2] >> 4 (s % 2)) & 15 | ((scales_h >> 2s) & 3) << 4.

Arithmetic (bit-exact with `gguf.quants`): IQ4_XS's d * (ls - 32) in float32 first, then one
multiply by the level; every product is exact in float32 (11-bit f16 times 6 + 7 bits).

`KVALUES_WORDS`: the table as two int64 words of eight bytes, byte k of word h = KVALUES[8h + k] + 127,
so code that cannot index a host array (a Triton kernel, a torch op inside CUDA-graph capture)
decodes a level as ((word >> 8 (q % 8)) & 255) - 127.

Quantizers (numpy, vectorized over blocks): ggml's `quantize_row_iq4_nl_impl` as llama.cpp's
quantizer calls it (`quantize_iq4_nl`, `quantize_iq4_xs`, ntry 7), operation for operation in float32,
sums element after element; the bytes equal llama.cpp's (tests/test_lowbit_quantize.py):

    per 32 weights, rounding weights x^2 (with an importance matrix qw: qw * sqrt(2 sigma2 + x^2),
    sigma2 = mean x^2 of the (super-)block): levels nearest to x / d (ggml's `best_index_int8`) for
    d = max / 127 (max: the signed element of largest magnitude), refit d = sum w q x / sum w q^2;
    then 15 more candidates 1 / d = (i - 127) / max, i = -7..7, each refit, keeping the one with the
    largest (sum w q x)^2 / sum w q^2.
    IQ4_NL: d stored as f16, levels recomputed against the unrounded d.
    IQ4_XS: the 8 sub-block scales to 6 bits against d = -max / 32 (max: the signed scale of largest
    magnitude; d unrounded in the arithmetic, f16 in the file), levels recomputed against d * l.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from .floats import as_blocks, codes_input, f16_at, np_quantize_rows, np_quantize_rows_weighted, shifts
from .kquants import GROUP_MAX_EPS, QK_K, _sum
from .q4 import NIBBLES, unpack_nibbles
from .registry import Codes, Layout, QuantFormat, Tiling, register

F32 = np.float32
KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
KV = np.array(KVALUES, dtype=F32)
MIDPOINTS = (KV[:-1] + KV[1:]) / F32(2)  # exact: half-integers
IQ4_NL_SIZE = 2 + 16
IQ4_XS_SIZE = 2 + 2 + 4 + 128


def _word(values) -> int:
    """Eight levels -> one int64 (two's complement) word of biased bytes."""
    w = sum((v + 127) << (8 * k) for k, v in enumerate(values))
    return w - (1 << 64) if w >= 1 << 63 else w


KVALUES_WORDS = (_word(KVALUES[:8]), _word(KVALUES[8:]))


# -- dequantizers (torch) -------------------------------------------------------------------------
def kvalues_like(like: torch.Tensor) -> torch.Tensor:
    """The 16 levels as float32 on `like`'s device, made there from the two words (no host copy)."""
    i = torch.arange(16, dtype=torch.int64, device=like.device)
    word = torch.where(i < 8, KVALUES_WORDS[0], KVALUES_WORDS[1])
    return (((word >> (8 * (i & 7))) & 255) - 127).float()


def dequantize_iq4_nl(raw: torch.Tensor) -> torch.Tensor:
    blocks = as_blocks(raw, T.IQ4_NL, IQ4_NL_SIZE)  # (rows, nb, 18)
    rows, nb, _ = blocks.shape
    levels = kvalues_like(blocks)[unpack_nibbles(blocks[..., 2:]).long()]  # (rows, nb, 2, 16)
    return levels.mul_(f16_at(blocks, 0)[..., None, None]).view(rows, nb * 32)


def scales_iq4_xs(blocks: torch.Tensor) -> torch.Tensor:
    """IQ4_XS blocks (rows, nsb, 136) -> the 8 sub-block scales minus 32, int32 (rows, nsb, 8)."""
    low = (blocks[..., 4:8].unsqueeze(-1) >> shifts(2, 4, blocks).view(1, 2)) & 15  # (.., 4, 2): s = 2k + h
    high = blocks[..., 2:4].view(torch.int16)[..., 0:1].int() & 0xFFFF  # (.., 1)
    high = (high >> (2 * torch.arange(8, dtype=torch.int32, device=blocks.device))) & 3  # (.., 8)
    return (low.flatten(-2).int() | (high << 4)) - 32


def dequantize_iq4_xs(raw: torch.Tensor) -> torch.Tensor:
    blocks = as_blocks(raw, T.IQ4_XS, IQ4_XS_SIZE)  # (rows, nsb, 136)
    rows, nsb, _ = blocks.shape
    dl = f16_at(blocks, 0)[..., None] * scales_iq4_xs(blocks).float()  # (rows, nsb, 8)
    q = unpack_nibbles(blocks[..., 8:].unflatten(-1, (8, 16)))  # (rows, nsb, 8, 2, 16)
    levels = kvalues_like(blocks)[q.long()]
    return levels.mul_(dl[..., None, None]).view(rows, nsb * QK_K)


# -- inspect's decoders: blocks (n, type_size) -> Codes (levels: KVALUES) ------------------------------
def decode_iq4_nl(b: np.ndarray) -> Codes:
    t = codes_input(b)
    d = f16_at(t, 0)
    q = unpack_nibbles(t[:, 2:]).reshape(len(b), 32).numpy().astype(np.int16)
    return Codes(q, d[:, None].numpy(), np.zeros((len(b), 1), np.float32), 0, {"d": d.numpy()}, levels=KV)


def decode_iq4_xs(b: np.ndarray) -> Codes:
    t = codes_input(b)
    d = f16_at(t, 0)
    ls = scales_iq4_xs(t)  # (n, 8), ls - 32
    q = unpack_nibbles(t[:, 8:].unflatten(-1, (8, 16))).reshape(len(b), QK_K).numpy().astype(np.int16)
    return Codes(q, (d[:, None] * ls.float()).numpy(), np.zeros((len(b), 8), np.float32), 0,
                 {"d": d.numpy(), "ls": (ls + 32).numpy()}, levels=KV)


# -- quantizers -----------------------------------------------------------------------------------
def best_index(v: np.ndarray) -> np.ndarray:
    """ggml's best_index_int8 over KVALUES: the nearest level's index (the upper one on a tie), int8.

    ggml compares x - lo < hi - x between the two levels around x; near a midpoint both differences
    are exact in float32 (|x| >= 4.5 there, the half gaps <= 12 < 2 |x|), so that is x < (lo + hi) / 2
    exactly, and the index is the number of midpoints <= x (checked against ggml's search, ulp by ulp
    around every midpoint, in tests/test_lowbit_quantize.py).
    """
    idx = np.zeros(v.shape, dtype=np.int8)
    for m in MIDPOINTS:
        idx += v >= m
    return idx


def best_index_ggml(v: np.ndarray) -> np.ndarray:
    """ggml's binary search itself, for the test of `best_index`."""
    mu = np.clip(np.searchsorted(KV, v, side="right"), 1, 15)  # first level above v
    lo, hi = KV[mu - 1], KV[mu]
    idx = np.where(v - lo < hi - v, mu - 1, mu)
    return np.where(v <= KV[0], 0, np.where(v >= KV[15], 15, idx)).astype(np.int8)


def _search(x: np.ndarray, w: np.ndarray, ntry: int = 7) -> np.ndarray:
    """x, w float32 (32, m): element, block -> scale d (m,) of each block (0 for an all-zero block)."""
    imax = np.abs(x).argmax(axis=0)
    vmax = np.take_along_axis(x, imax[None], axis=0)[0]
    zero = np.abs(vmax) < GROUP_MAX_EPS
    vmax = np.where(zero, F32(1), vmax)

    def sums(inv):
        q = KV[best_index(inv * x)]
        wq = w * q
        return _sum(wq * x), _sum(wq * q)

    with np.errstate(divide="ignore", invalid="ignore"):
        d = -vmax / F32(KVALUES[0])
        sumqx, sumq2 = sums(F32(1) / d)
        d = np.where(sumq2 > 0, sumqx / sumq2, F32(0))
        best = d * sumqx
        for itry in range(-ntry, ntry + 1):
            sumqx, sumq2 = sums(F32(itry + KVALUES[0]) / vmax)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = np.where(better, sumqx / sumq2, d)
            best = np.where(better, d * sumqx, best)
    return np.where(zero, F32(0), d).astype(F32)


def _weights(blocks: np.ndarray, qw: np.ndarray | None) -> np.ndarray:
    """Rounding weights of (super-)blocks float32 (n, size): x^2, or qw * sqrt(2 sigma2 + x^2)."""
    if qw is None:
        return blocks * blocks
    sumx2 = np.add.reduce(np.ascontiguousarray((blocks * blocks).T), axis=0)  # in order, as in C
    sigma2 = sumx2 * F32(2.0 / blocks.shape[1])
    return qw * np.sqrt(sigma2[:, None] + blocks * blocks)


def _nibbles(L: np.ndarray) -> np.ndarray:
    """Level indices (n, 32k) -> bytes (n, 16k): element j low nibble, j + 16 high, per 32."""
    L = L.reshape(len(L), -1, 2, 16).astype(np.uint8)
    return (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(len(L), -1)


def quantize_blocks_iq4_nl(blocks: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """float32 (n, 32) -> uint8 (n, 18); qw (n, 32): importance per element (ggml's quant_weights)."""
    x = np.ascontiguousarray(blocks.T)  # (32, n)
    d = _search(x, np.ascontiguousarray(_weights(blocks, qw).T))
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, F32(1) / d, F32(0))
    out = np.empty((len(blocks), IQ4_NL_SIZE), dtype=np.uint8)
    out[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    out[:, 2:] = _nibbles(best_index(inv[:, None] * blocks))
    return out


def quantize_blocks_iq4_xs(blocks: np.ndarray, qw: np.ndarray | None = None) -> np.ndarray:
    """float32 (n, 256) -> uint8 (n, 136); qw (n, 256): importance per element (ggml's quant_weights)."""
    n = len(blocks)
    w = _weights(blocks, qw)
    scales = _search(np.ascontiguousarray(blocks.reshape(n * 8, 32).T),
                     np.ascontiguousarray(w.reshape(n * 8, 32).T)).reshape(n, 8)
    imax = np.abs(scales).argmax(axis=1)[:, None]
    max_scale = np.take_along_axis(scales, imax, axis=1)  # (n, 1), signed
    max_scale = np.where(np.abs(max_scale) > 0, max_scale, F32(0))  # C starts from +0
    d = -max_scale / F32(32)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = np.where(d != 0, F32(1) / d, F32(0))
        ls = np.clip(np.rint(inv * scales).astype(np.int32), -32, 31)  # (n, 8)
        dl = d * ls.astype(F32)
        idl = np.where(dl != 0, F32(1) / dl, F32(0))
    L = best_index(idl[:, :, None] * blocks.reshape(n, 8, 32)).reshape(n, 256)
    ls = (ls + 32).astype(np.uint16)
    out = np.empty((n, IQ4_XS_SIZE), dtype=np.uint8)
    out[:, 0:2] = d.astype(np.float16).view(np.uint8).reshape(n, 2)
    scales_h = np.bitwise_or.reduce((ls >> 4) << (2 * np.arange(8, dtype=np.uint16)), axis=1).astype("<u2")
    out[:, 2:4] = scales_h.view(np.uint8).reshape(n, 2)
    low = (ls & 15).astype(np.uint8).reshape(n, 4, 2)
    out[:, 4:8] = low[:, :, 0] | (low[:, :, 1] << 4)
    out[:, 8:] = _nibbles(L)
    return out


def quantize_iq4_nl(values: np.ndarray) -> np.ndarray:
    return np_quantize_rows(values, T.IQ4_NL, 32, IQ4_NL_SIZE, quantize_blocks_iq4_nl, chunk_blocks=8192)


def quantize_iq4_xs(values: np.ndarray) -> np.ndarray:
    return np_quantize_rows(values, T.IQ4_XS, QK_K, IQ4_XS_SIZE, quantize_blocks_iq4_xs, chunk_blocks=1024)


IQ4_FORMULA = "x = d * KVALUES[q], KVALUES = " + " ".join(map(str, KVALUES))
# not full outtypes: llama.cpp's iq4_nl and iq4_xs are recipes (convert/writer.py)
register(QuantFormat(
    T.IQ4_NL, 32, 2 + 16, dequantize_iq4_nl,
    Layout.of([("d", 2, "f16 scale"), ("qs", 16, f"32 x 4-bit index into KVALUES; {NIBBLES}")], IQ4_FORMULA, (0, 15)),
    decode_iq4_nl, quantize_iq4_nl, np_quantize_rows_weighted(T.IQ4_NL, 32, IQ4_NL_SIZE, quantize_blocks_iq4_nl),
    Tiling(1, 16, 2, gemm_spills=frozenset({(128, 64)})), auto=True, act_type=T.Q8_0))
register(QuantFormat(
    T.IQ4_XS, QK_K, 2 + 2 + 4 + 128, dequantize_iq4_xs,
    Layout.of([("d", 2, "f16 super-block scale"), ("scales_h", 2, "u16: bits 2j, 2j+1 = bits 4, 5 of ls[j]"),
               ("scales_l", 4, "bits 0-3 of ls[j]: nibble j % 2 of byte j // 2"),
               ("qs", 128, "256 x 4-bit index; sub-block j: bytes 16j..16j+15, as IQ4_NL")],
              "x = (d * (ls[j] - 32)) * KVALUES[q], j = sub-block of 32", (0, 15), 32),
    decode_iq4_xs, quantize_iq4_xs, np_quantize_rows_weighted(T.IQ4_XS, QK_K, IQ4_XS_SIZE, quantize_blocks_iq4_xs),
    Tiling(8, 16, 2, gemm_spills=frozenset({(64, 64), (128, 64)})), fallback=T.IQ4_NL, auto=True, act_type=T.Q8_K))
