"""GGUF block formats decoded in registers: one @triton.jit helper per format family.

The quantized matmul kernels never write a dequantized weight to memory. They read the raw GGUF
bytes of a weight, shaped (N, row_bytes) uint8 exactly as they sit in the file, and call
`dequant` below to turn a tile of those bytes into float32 values in registers.

Layouts (elements, bytes per block), the facts of `gguf.quants` / llama.cpp's ggml-common.h:

    Q8_0: (32,  2 + 32)                  # f16 d, 32 int8                       x = d * q
    Q4_0: (32,  2 + 16)                  # f16 d, 16 bytes of nibbles           x = d * (q - 8)
    Q4_1: (32,  2 + 2 + 16)              # f16 d, f16 m, nibbles                x = d * q + m
    Q5_0: (32,  2 + 4 + 16)              # f16 d, 32 fifth bits, nibbles        x = d * (q - 16)
    Q5_1: (32,  2 + 2 + 4 + 16)          # f16 d, f16 m, fifth bits, nibbles    x = d * q + m
    Q4_K: (256, 2 + 2 + 12 + 128)        # d, dmin, 8 x 6-bit (scale, min), nibbles
    Q5_K: (256, 2 + 2 + 12 + 32 + 128)   # as Q4_K plus 32 bytes of fifth bits
    Q6_K: (256, 128 + 64 + 16 + 2)       # ql nibbles, qh 2-bit pairs, 16 int8 scales, f16 d
    Q2_K: (256, 16 + 64 + 2 + 2)         # 16 x (4-bit scale, 4-bit min), 2-bit qs, d, dmin
    Q3_K: (256, 32 + 64 + 12 + 2)        # hmask (third bits), 2-bit qs, 16 x 6-bit scales, d
    IQ4_NL: (32, 2 + 16)                 # f16 d, nibbles indexing KVALUES      x = d * KVALUES[q]
    IQ4_XS: (256, 2 + 2 + 4 + 128)       # d, scales_h, scales_l, nibbles; 8 x 6-bit scales

The facts per type (block size, bytes, the tiling below, autotune tiles that spill) are the records
of the weight-type registry (qkvgguf/quants, `QuantFormat.tiling`); `LAYOUTS` reads them when used.
A new type whose bytes an existing branch decodes (`Tiling.branch`) needs nothing here; a new bit
layout adds its branch to `_legacy` / `_kquant` and its element order to `dequant`.

How a tile is addressed. Every block is cut into G groups of INNER consecutive quant bytes; each
byte holds PLANES values (the two nibbles of a 4-bit format, one int8 for Q8_0). A tile is indexed
by (row, block, group, inner) and `dequant(..., PLANE=p)` returns the values of plane p together
with their element index inside the row, so the caller loads the matching activations:

    format        G  INNER PLANES  element of (block b, group g, inner i, plane p)
    Q8_0          1  32    1       32b + i
    Q4_0..Q5_1    1  16    2       32b + 16p + i                   byte i: low nibble, then high
    Q4_K, Q5_K    4  32    2       256b + 64g + 32p + i            sub-block 2g + p
    Q6_K          8  16    2       256b + 128(g//4) + 64p + 16(g%4) + i
    Q2_K, Q3_K    4  16    4       256b + 128(g//2) + 32p + 16(g%2) + i      sub-block 8(g//2) + 2p + g%2
    IQ4_NL        1  16    2       32b + 16p + i                   as Q4_0
    IQ4_XS        8  16    2       256b + 32g + 16p + i            sub-block g

IQ4_NL / IQ4_XS levels come from the 16-entry table KVALUES without a memory load: two int64
constants hold its bytes (qkvgguf/quants/iq4.py's KVALUES_WORDS), a level is a shift and a mask.

Every quant byte is loaded once per plane (L1 serves the second plane). Callers pass 3-D index
tensors, (rows, groups, inner) for the GEMV and (groups, inner, rows) for the GEMM, so scales and
minimums are loaded and decoded once per (row, group) and broadcast along `inner`
(`_dequant_rows_kernel`, one row per program, passes 2-D (groups, inner)).

Unaligned f16 scales: all type sizes and all f16 field offsets are even, so the kernels read every
f16 (and Q5_0/Q5_1's 32 fifth bits, as two 16-bit words) through an int16 view of the same bytes
(`w16_ptr`, the same storage reinterpreted by the wrapper) and bitcast it: one 2-byte load per
scale, no repack, no extra memory. The GGUF bytes are the only copy of a weight in VRAM.

Arithmetic follows `gguf.quants` (scale products in float32 first, then one multiply by q and, for
the formats with a minimum, a separately rounded add/subtract), so a dequantized value is
bit-exact with the numpy reference; only the summation order of the dot product differs. Every
product before an add is exact in float32 (11-bit f16 times at most 6 + 5 bits; see
qkvgguf/quants/kquants.py), so the GPU's FMA contraction changes no bit either.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from gguf import GGMLQuantizationType as T

from qkvgguf.errors import QkvggufError
from qkvgguf.quants import FORMATS, QuantFormat, View, type_name
from qkvgguf.quants.iq4 import KVALUES_WORDS


@dataclass(frozen=True)
class BlockLayout:
    """A registry record's facts the kernels use (qkvgguf/quants: `QuantFormat.tiling`)."""
    name: str
    block_size: int  # elements per block
    type_size: int  # bytes per block
    groups: int  # G: groups of quant bytes per block
    inner: int  # INNER: consecutive quant bytes per group
    planes: int  # PLANES: values per quant byte
    branch: int  # QTYPE: the ggml id of the decode branch below that reads these bytes

    def kernel_args(self) -> dict:
        """The format's constexpr arguments of every kernel here and in qmatmul.py."""
        return dict(QTYPE=self.branch, BS=self.block_size, TS=self.type_size, G=self.groups, INNER=self.inner,
                    PLANES=self.planes)


def _layout(fmt: QuantFormat) -> BlockLayout:
    t = fmt.tiling
    return BlockLayout(fmt.name, fmt.block_size, fmt.type_size, t.groups, t.inner, t.planes, fmt.kernel_branch)


_CACHE: dict[int, tuple[QuantFormat, BlockLayout]] = {}


def layout_of(qtype) -> BlockLayout | None:
    """The kernel layout of a registered type with a tiling, else None (a dict lookup on the hot path)."""
    fmt = FORMATS.get(qtype)
    hit = _CACHE.get(qtype)
    if hit is not None and hit[0] is fmt:
        return hit[1]
    if fmt is None or fmt.tiling is None:
        return None
    _CACHE[qtype] = (fmt, _layout(fmt))
    return _CACHE[qtype][1]


# every registered type the kernels read, read from the registry when used (a type registered later shows)
LAYOUTS = View(lambda: {t: layout_of(t) for t, f in FORMATS.items() if f.tiling is not None})

# the decode branches: ggml type ids as constexprs, the kernels branch on them at compile time
Q4_0, Q4_1, Q5_0, Q5_1 = tl.constexpr(int(T.Q4_0)), tl.constexpr(int(T.Q4_1)), tl.constexpr(int(T.Q5_0)), tl.constexpr(int(T.Q5_1))
Q8_0, Q4_K, Q5_K, Q6_K = tl.constexpr(int(T.Q8_0)), tl.constexpr(int(T.Q4_K)), tl.constexpr(int(T.Q5_K)), tl.constexpr(int(T.Q6_K))
Q2_K, Q3_K, IQ4_NL, IQ4_XS = tl.constexpr(int(T.Q2_K)), tl.constexpr(int(T.Q3_K)), tl.constexpr(int(T.IQ4_NL)), tl.constexpr(int(T.IQ4_XS))
KVALUES_LO, KVALUES_HI = tl.constexpr(KVALUES_WORDS[0]), tl.constexpr(KVALUES_WORDS[1])  # IQ4_NL's table


def check_weight(w_raw: torch.Tensor, qtype, what: str) -> tuple[int, BlockLayout, int]:
    """(ggml type, its kernel layout, blocks per row) of GGUF bytes w_raw, or a QkvggufError naming the problem."""
    lay = layout_of(qtype)
    if lay is None:
        names = ", ".join(lay.name for lay in LAYOUTS.values())
        raise QkvggufError(f"{what}: ggml type {type_name(qtype)} has no Triton kernel (supported: {names})")
    if w_raw.dim() != 2 or w_raw.dtype != torch.uint8:
        raise QkvggufError(f"{what}: w_raw must be 2-D uint8 GGUF bytes, got {tuple(w_raw.shape)} {w_raw.dtype}")
    if w_raw.shape[1] % lay.type_size:
        raise QkvggufError(f"{what}: {lay.name} rows are whole blocks of {lay.type_size} bytes, "
                           f"got {w_raw.shape[1]} bytes per row")
    if not w_raw.is_contiguous() or w_raw.storage_offset() % 2:
        raise QkvggufError(f"{what}: w_raw must be contiguous and start at an even byte offset")
    return qtype, lay, w_raw.shape[1] // lay.type_size


@triton.jit
def _f16(w16_ptr, byte_off, mask):
    """The f16 at an even byte offset, read as one int16 and bitcast, widened to float32."""
    h = tl.load(w16_ptr + (byte_off >> 1), mask=mask, other=0)
    return h.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _u8(w8_ptr, byte_off, mask):
    return tl.load(w8_ptr + byte_off, mask=mask, other=0).to(tl.int32)


@triton.jit
def _iq4_level(q):
    """KVALUES[q] for int32 q in 0..15, as float32: byte q % 8 of the table's word q // 8, minus the bias."""
    word = tl.where(q < 8, KVALUES_LO, KVALUES_HI)
    return (((word >> (8 * (q & 7)).to(tl.int64)) & 255) - 127).to(tl.float32)


@triton.jit
def _legacy(w8_ptr, w16_ptr, base, i, mask, QTYPE: tl.constexpr, PLANE: tl.constexpr):
    """Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL: blocks of 32 with f16 d (and f16 m)."""
    if QTYPE == IQ4_NL:  # d, nibbles indexing KVALUES
        d = _f16(w16_ptr, base, mask)
        q = (_u8(w8_ptr, base + 2 + i, mask) >> (4 * PLANE)) & 15
        vals = d * _iq4_level(q)
    elif QTYPE == Q8_0:  # d, 32 x int8
        d = _f16(w16_ptr, base, mask)
        q = tl.load(w8_ptr + base + 2 + i, mask=mask, other=0).to(tl.int8, bitcast=True)
        vals = d * q.to(tl.float32)
    elif QTYPE == Q4_0:  # d, nibbles
        d = _f16(w16_ptr, base, mask)
        q = (_u8(w8_ptr, base + 2 + i, mask) >> (4 * PLANE)) & 15
        vals = d * (q - 8).to(tl.float32)
    elif QTYPE == Q4_1:  # d, m, nibbles
        d = _f16(w16_ptr, base, mask)
        m = _f16(w16_ptr, base + 2, mask)
        q = (_u8(w8_ptr, base + 4 + i, mask) >> (4 * PLANE)) & 15
        vals = d * q.to(tl.float32) + m
    elif QTYPE == Q5_0:  # d, qh (bit j = fifth bit of element j), nibbles
        d = _f16(w16_ptr, base, mask)
        qh = tl.load(w16_ptr + ((base + 2 + 2 * PLANE) >> 1), mask=mask, other=0).to(tl.int32)
        ql = (_u8(w8_ptr, base + 6 + i, mask) >> (4 * PLANE)) & 15
        q = ql | (((qh >> i) & 1) << 4)
        vals = d * (q - 16).to(tl.float32)
    else:  # Q5_1: d, m, qh, nibbles
        tl.static_assert(QTYPE == Q5_1)
        d = _f16(w16_ptr, base, mask)
        m = _f16(w16_ptr, base + 2, mask)
        qh = tl.load(w16_ptr + ((base + 4 + 2 * PLANE) >> 1), mask=mask, other=0).to(tl.int32)
        ql = (_u8(w8_ptr, base + 8 + i, mask) >> (4 * PLANE)) & 15
        q = ql | (((qh >> i) & 1) << 4)
        vals = d * q.to(tl.float32) + m
    return vals


@triton.jit
def _scale_min_k4(w8_ptr, sbase, s, mask):
    """6-bit (scale, min) of sub-block s (0..7) from the 12 packed bytes at sbase (as kquants.py)."""
    lo = s < 4
    b_s = _u8(w8_ptr, sbase + s, mask)  # a[s] (s < 4), b[s - 4] (s >= 4)
    b_s4 = _u8(w8_ptr, sbase + s + 4, mask)  # b[s] (s < 4), c[s - 4] (s >= 4)
    b_sm4 = _u8(w8_ptr, sbase + tl.where(lo, s, s - 4), mask)  # a[s - 4] (s >= 4)
    sc = tl.where(lo, b_s & 63, (b_s4 & 15) | ((b_sm4 >> 6) << 4))
    mn = tl.where(lo, b_s4 & 63, (b_s4 >> 4) | ((b_s >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _kquant(w8_ptr, w16_ptr, base, g, i, mask, QTYPE: tl.constexpr, PLANE: tl.constexpr):
    """Q4_K, Q5_K, Q6_K, Q2_K, Q3_K, IQ4_XS: super-blocks of 256."""
    if QTYPE == Q2_K or QTYPE == Q3_K:  # 2-bit qs shared; sub-block s of 16
        s = 8 * (g // 2) + 2 * PLANE + g % 2
        if QTYPE == Q2_K:  # scales[16] (scale | min << 4), qs[64], d at 80, dmin at 82
            q = (_u8(w8_ptr, base + 16 + 16 * g + i, mask) >> (2 * PLANE)) & 3
            sc = _u8(w8_ptr, base + s, mask)
            d = _f16(w16_ptr, base + 80, mask) * (sc & 15).to(tl.float32)
            m = _f16(w16_ptr, base + 82, mask) * (sc >> 4).to(tl.float32)
            vals = d * q.to(tl.float32) - m
        else:  # hmask[32], qs[64], scales[12], d at 108
            ql = (_u8(w8_ptr, base + 32 + 16 * g + i, mask) >> (2 * PLANE)) & 3
            hb = (_u8(w8_ptr, base + 16 * (g % 2) + i, mask) >> (4 * (g // 2) + PLANE)) & 1
            lo = (_u8(w8_ptr, base + 96 + s % 8, mask) >> (4 * (s // 8))) & 15
            hi = (_u8(w8_ptr, base + 104 + s % 4, mask) >> (2 * (s // 4))) & 3
            d = _f16(w16_ptr, base + 108, mask) * ((lo | (hi << 4)) - 32).to(tl.float32)
            vals = d * (ql - 4 * (1 - hb)).to(tl.float32)
    elif QTYPE == IQ4_XS:  # d, scales_h (u16), scales_l[4], qs[128]; sub-block g of 32
        sh = tl.load(w16_ptr + ((base + 2) >> 1), mask=mask, other=0).to(tl.int32) & 0xFFFF
        lo = (_u8(w8_ptr, base + 4 + g // 2, mask) >> (4 * (g % 2))) & 15
        ls = lo | (((sh >> (2 * g)) & 3) << 4)
        d = _f16(w16_ptr, base, mask) * (ls - 32).to(tl.float32)
        q = (_u8(w8_ptr, base + 8 + 16 * g + i, mask) >> (4 * PLANE)) & 15
        vals = d * _iq4_level(q)
    elif QTYPE == Q6_K:  # ql[128], qh[64], int8 scales[16], f16 d at 208
        half = g // 4
        quarter = g % 4
        ql = (_u8(w8_ptr, base + 16 * g + i, mask) >> (4 * PLANE)) & 15
        qh_byte = _u8(w8_ptr, base + 128 + 32 * half + 16 * (quarter % 2) + i, mask)
        qh = (qh_byte >> (2 * (2 * PLANE + quarter // 2))) & 3
        sc = tl.load(w8_ptr + base + 192 + 8 * half + 4 * PLANE + quarter, mask=mask, other=0)
        d = _f16(w16_ptr, base + 208, mask) * sc.to(tl.int8, bitcast=True).to(tl.float32)
        vals = d * ((ql | (qh << 4)) - 32).to(tl.float32)
    else:  # Q4_K / Q5_K: d, dmin, scales[12], (qh[32],) qs[128]
        d = _f16(w16_ptr, base, mask)
        dmin = _f16(w16_ptr, base + 2, mask)
        sc, mn = _scale_min_k4(w8_ptr, base + 4, 2 * g + PLANE, mask)
        if QTYPE == Q4_K:
            q = (_u8(w8_ptr, base + 16 + 32 * g + i, mask) >> (4 * PLANE)) & 15
        else:
            tl.static_assert(QTYPE == Q5_K)
            ql = (_u8(w8_ptr, base + 48 + 32 * g + i, mask) >> (4 * PLANE)) & 15
            qh = (_u8(w8_ptr, base + 16 + i, mask) >> (2 * g + PLANE)) & 1
            q = ql | (qh << 4)
        vals = (d * sc) * q.to(tl.float32) - dmin * mn
    return vals


@triton.jit
def dequant(w8_ptr, w16_ptr, row_off, blk, g, i, mask,
            QTYPE: tl.constexpr, PLANE: tl.constexpr, BS: tl.constexpr, TS: tl.constexpr):
    """Plane PLANE of a tile of GGUF blocks -> (float32 values, element index inside the row).

    w8_ptr / w16_ptr: the weight's bytes as uint8 and as int16 (same storage).
    row_off: int64 byte offset of each row; blk, g, i: block, group and inner index tensors; all
    four broadcast against each other (any rank, any axis order). mask: which (row, block) are
    real; masked values are 0.
    """
    base = row_off + blk.to(tl.int64) * TS
    if BS == 32:
        vals = _legacy(w8_ptr, w16_ptr, base, i, mask, QTYPE, PLANE)
        if QTYPE == Q8_0:
            elem = blk * 32 + i
        else:
            elem = blk * 32 + 16 * PLANE + i
    else:
        vals = _kquant(w8_ptr, w16_ptr, base, g, i, mask, QTYPE, PLANE)
        if QTYPE == Q6_K:
            elem = blk * 256 + 128 * (g // 4) + 64 * PLANE + 16 * (g % 4) + i
        elif QTYPE == Q2_K or QTYPE == Q3_K:
            elem = blk * 256 + 128 * (g // 2) + 32 * PLANE + 16 * (g % 2) + i
        elif QTYPE == IQ4_XS:
            elem = blk * 256 + 32 * g + 16 * PLANE + i
        else:
            elem = blk * 256 + 64 * g + 32 * PLANE + i
    return vals, elem


# -- whole rows: embedding lookups and the tests -------------------------------------------------
@triton.jit
def _dequant_rows_kernel(
    w8_ptr, w16_ptr, ids_ptr, out_ptr,  # pointers: weight bytes, row ids, (len(ids), K) output
    NBLK, stride_wn, stride_on,  # blocks per row, byte stride of w rows, element stride of out rows
    QTYPE: tl.constexpr, BS: tl.constexpr, TS: tl.constexpr,
    G: tl.constexpr, INNER: tl.constexpr, PLANES: tl.constexpr, NB: tl.constexpr,
):
    r = tl.program_id(0)
    row_off = tl.load(ids_ptr + r).to(tl.int64) * stride_wn
    gg = tl.arange(0, NB * G)[:, None]
    ii = tl.arange(0, INNER)[None, :]
    blk = tl.program_id(1) * NB + gg // G
    mask = blk < NBLK
    for p in tl.static_range(PLANES):
        vals, elem = dequant(w8_ptr, w16_ptr, row_off, blk, gg % G, ii, mask, QTYPE, p, BS, TS)
        tl.store(out_ptr + r * stride_on + elem, vals, mask=mask)


def dequantize_rows(w_raw: torch.Tensor, qtype, ids: torch.Tensor | None = None,
                    out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows `ids` (default: all) of GGUF bytes w_raw (N, row_bytes) -> out_dtype (len(ids), K).

    For what must be dense: an embedding lookup of a few tokens, and the fp16 tiles that
    qmatmul hands to cuBLAS for prompt-sized batches.
    """
    qtype, lay, nblk = check_weight(w_raw, qtype, "dequantize_rows")
    if ids is None:
        ids = torch.arange(w_raw.shape[0], device=w_raw.device)
    ids = ids.to(device=w_raw.device, dtype=torch.int64).reshape(-1)
    out = torch.empty((ids.numel(), nblk * lay.block_size), dtype=out_dtype, device=w_raw.device)
    nb = max(1, 256 // lay.block_size)
    if ids.numel():
        _dequant_rows_kernel[(ids.numel(), triton.cdiv(nblk, nb))](
            w_raw, w_raw.view(torch.int16), ids, out, nblk, w_raw.stride(0), out.stride(0),
            **lay.kernel_args(), NB=nb,
        )
    return out
