"""Flash attention over the KV cache as it is stored: causal prefill with a position offset, and
split-K decode; K and V may each be dense (f16/f32), ggml q8_0/q4_0 blocks, or q4g.

Shapes follow `runtime.ops.attention`; K and V are `KVOperand`s, one layer of a cache store
(runtime/kv_quant.py `Store.operand`), read in place, only their first S valid positions:

    q (n_head, T, d) at positions [n_past, n_past + T);  K, V hold positions [0, >= n_past + T)
    out[h, t] = softmax_j(q[h, t] . k[h // G, j] / sqrt(d), j <= n_past + t) @ v[h // G]
    with G = n_head / n_kv query heads per KV head (GQA).

Row formats (`FMT`: the codes of qkvgguf/kv_types.py `ROW_FORMATS`; bytes per KV head and position):

    DENSE  rows of d float16/float32                      x = row[c]
    Q8_0   d/32 blocks of 34 bytes: f16 scale, 32 int8     x = d * q
    Q4_0   d/32 blocks of 18 bytes: f16 scale, 16 bytes    x = d * (q - 8); byte j = element j (low
           nibble) | element j + 16 (high nibble)
    Q4G_K  per-channel codes over groups of 64 positions: d/2 bytes per position (byte c = channel
           c low | channel c + d/2 high), f16 [scale, min] per channel and group: x = scale * q + min
    Q3G_K  the same with 3-bit codes: d/4 bytes of 2-bit parts (byte j = channels j + k d/4 at
           shift 2k), d/8 bytes of high bits (byte j = channels j + k d/8 at bit k)
    Q4_64  d/64 blocks of 34 bytes: f16 s, byte j = q[j] | q[j + 32] << 4      x = s (2q - 15) / 15
    Q3_64  d/64 blocks of 26 bytes: f16 s, 16 + 8 bytes of planes as Q3G_K's    x = s L3[q]

A segmented operand (q4g, q3g) keeps positions [0, a_end) as dense f16 rows in `a` (attention
sinks), [a_end, b_end) in the block format in `b` (row = position - a_end), and [b_end, ...) in `c`
(the newest, partial group): dense f16 rows, or q8_0 rows when `c` is uint8. A key tile loads each position from the segment that
holds it (masked loads: no traffic for the others), dequantizes in registers and runs the same
online-softmax step; no dequantized copy of the cache is ever written.

Prefill (`attend_prefill`): a program owns BLOCK_M queries of one head and streams BLOCK_N keys
at a time with the online softmax (running max m, running sum l, rescaled accumulator), so the
T x S score matrix never exists; it stops at the last key its last query can see.

Decode (`attend_decode`, T = 1): one query against a long cache leaves too few programs if one
program owns a head, so the keys are cut into `num_splits` ranges. A program owns one KV head (all
G query heads that share it, as the rows of a tl.dot, so every K/V byte is read once) and one
range, and writes its unnormalized partial output with its (m, l); a second kernel combines the
splits: o = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s. Memory traffic: K and V once
(n_kv * n_valid * row bytes each) plus n_head * num_splits * (d + 2) * 4 bytes of partials.
n_valid may be a device scalar (a CUDA graph replays for any cache length; not with q4g, whose
segment bounds are host integers).

`flash_prefill(q, k, v, n_past)` / `flash_decode(q, k, v, n_valid)` are the same kernels over
dense (n_kv, S, d) tensors.

Scores are computed in base 2 (scaled by log2(e) / sqrt(d)), accumulation in float32. fp16 q
uses fp16 tl.dot operands (K/V values rounded to fp16; p is cast to fp16 for p @ v, as in every
flash kernel); fp32 q uses fp32 operands with `precision` (launch.fp32_precision: TF32 by default
on sm80+, "tf32x3" or "ieee" on request).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from qkvgguf.errors import QkvggufError
from qkvgguf.kv_types import L3, ROW_FORMATS

from .launch import fp32_precision, next_pow2

LOG2E = 1.4426950408889634

FORMATS = {name: f.code for name, f in ROW_FORMATS.items()}  # row format -> FMT
DENSE, Q8_0, Q4_0, Q4G_K = (tl.constexpr(FORMATS[n]) for n in ("dense", "q8_0", "q4_0", "q4g_k"))
Q4_64, Q3_64, Q3G_K = (tl.constexpr(FORMATS[n]) for n in ("q4_64", "q3_64", "q3g_k"))
L3_0, L3_1, L3_2, L3_3 = (tl.constexpr(x) for x in L3[4:])  # q3_64's positive levels (kv_types.L3)
GROUP_POSITIONS = 64  # q4g, q3g: positions per group of per-channel scales


# -- device helpers ------------------------------------------------------------------------------
@triton.jit
def _load_rows(b, b16, bs, rows, rd, mask, stride_bs, FMT: tl.constexpr, HEAD_DIM: tl.constexpr):
    """float32 (N, BLOCK_D): rows (N,) of one KV head's main segment in format FMT.

    b: dense values (DENSE) or the row bytes (uint8); b16: the same bytes as float16 (block
    scales); bs: q4g per-channel scales (n_group, 2, d) float16. stride_bs: elements (DENSE) or
    bytes per row."""
    r = rows[:, None] * stride_bs
    c = rd[None, :]
    if FMT == DENSE:
        x = tl.load(b + r + c, mask=mask, other=0.0).to(tl.float32)
    elif FMT == Q8_0:
        blk = r + (c // 32) * 34
        d = tl.load(b16 + blk // 2, mask=mask, other=0.0).to(tl.float32)
        q = tl.load(b + blk + 2 + c % 32, mask=mask, other=0).to(tl.int8, bitcast=True)
        x = d * q.to(tl.float32)
    elif FMT == Q4_0:
        blk = r + (c // 32) * 18
        d = tl.load(b16 + blk // 2, mask=mask, other=0.0).to(tl.float32)
        byte = tl.load(b + blk + 2 + c % 16, mask=mask, other=0).to(tl.int32)
        q = tl.where(c % 32 < 16, byte & 15, byte >> 4)
        x = d * (q.to(tl.float32) - 8.0)
    elif FMT == Q4_64:  # q4g values: f16 s, 32 nibble bytes per 64 values, 16 symmetric levels
        blk = r + (c // 64) * 34
        s = tl.load(b16 + blk // 2, mask=mask, other=0.0).to(tl.float32)
        byte = tl.load(b + blk + 2 + c % 32, mask=mask, other=0).to(tl.int32)
        q = tl.where(c % 64 < 32, byte & 15, byte >> 4)
        x = s * ((2 * q - 15).to(tl.float32) / 15.0)
    elif FMT == Q3_64:  # q3g values: f16 s, 16 + 8 bytes of 3-bit planes per 64 values, Lloyd-Max levels
        blk = r + (c // 64) * 26
        e = c % 64
        s = tl.load(b16 + blk // 2, mask=mask, other=0.0).to(tl.float32)
        low = tl.load(b + blk + 2 + e % 16, mask=mask, other=0).to(tl.int32)
        high = tl.load(b + blk + 18 + e % 8, mask=mask, other=0).to(tl.int32)
        q = ((low >> (2 * (e // 16))) & 3) | (((high >> (e // 8)) & 1) << 2)
        x = s * _level3(q)
    else:  # per channel over groups of 64 positions: Q4G_K (q4g keys), Q3G_K (q3g keys)
        if FMT == Q4G_K:
            byte = tl.load(b + r + c % (HEAD_DIM // 2), mask=mask, other=0).to(tl.int32)
            q = tl.where(c < HEAD_DIM // 2, byte & 15, byte >> 4)
        else:
            low = tl.load(b + r + c % (HEAD_DIM // 4), mask=mask, other=0).to(tl.int32)
            high = tl.load(b + r + HEAD_DIM // 4 + c % (HEAD_DIM // 8), mask=mask, other=0).to(tl.int32)
            q = ((low >> (2 * (c // (HEAD_DIM // 4)))) & 3) | (((high >> (c // (HEAD_DIM // 8))) & 1) << 2)
        g = (rows // 64)[:, None] * (2 * HEAD_DIM)
        scale = tl.load(bs + g + c, mask=mask, other=0.0).to(tl.float32)
        lo = tl.load(bs + g + HEAD_DIM + c, mask=mask, other=0.0).to(tl.float32)
        x = scale * q.to(tl.float32) + lo
    return x


@triton.jit
def _level3(q):
    """q3_64's level of code q (0..7): -L3[7 - q] below 4, L3[q] from 4 (kv_types.L3, symmetric)."""
    m = tl.where(q >= 4, q - 4, 3 - q)
    v = tl.where(m == 0, L3_0, tl.where(m == 1, L3_1, tl.where(m == 2, L3_2, L3_3)))
    return tl.where(q >= 4, v, -v)


@triton.jit
def _load_q8_0_bytes(p, rows, rd, mask, stride):
    """float32 (N, BLOCK_D): q8_0 rows through a uint8 pointer alone (the scale from its two bytes)."""
    blk = rows[:, None] * stride + (rd[None, :] // 32) * 34
    bits = tl.load(p + blk, mask=mask, other=0).to(tl.uint16) | (tl.load(p + blk + 1, mask=mask, other=0).to(tl.uint16) << 8)
    d = bits.to(tl.float16, bitcast=True).to(tl.float32)
    q = tl.load(p + blk + 2 + rd[None, :] % 32, mask=mask, other=0).to(tl.int8, bitcast=True)
    return d * q.to(tl.float32)


@triton.jit
def _at_head(kvh, a, b, b16, bs, c, sh_a, sh_b, sh_bs, sh_c):
    """An operand's pointers moved to KV head kvh (int64); b16 counts float16 elements (half of b's bytes)."""
    return a + kvh * sh_a, b + kvh * sh_b, b16 + kvh * sh_b // 2, bs + kvh * sh_bs, c + kvh * sh_c


@triton.jit
def _load_kv(pos, valid, rd, a, b, b16, bs, c, a_end, b_end, stride_as, stride_bs, stride_cs,
             FMT: tl.constexpr, SEG: tl.constexpr, HEAD_DIM: tl.constexpr):
    """float32 (N, BLOCK_D): positions pos (N,) of one KV head, each read from its segment."""
    dm = (rd < HEAD_DIM)[None, :]
    if SEG:
        in_a = pos < a_end
        in_c = pos >= b_end
        in_b = (pos >= a_end) & (pos < b_end)
        x = _load_rows(b, b16, bs, pos - a_end, rd, (valid & in_b)[:, None] & dm, stride_bs, FMT, HEAD_DIM)
        x += tl.load(a + pos[:, None] * stride_as + rd[None, :],
                     mask=(valid & in_a)[:, None] & dm, other=0.0).to(tl.float32)
        if c.dtype.element_ty == tl.uint8:  # the tail in q8_0 rows (q4g, q3g keys)
            x += _load_q8_0_bytes(c, pos - b_end, rd, (valid & in_c)[:, None] & dm, stride_cs)
        else:
            x += tl.load(c + (pos - b_end)[:, None] * stride_cs + rd[None, :],
                         mask=(valid & in_c)[:, None] & dm, other=0.0).to(tl.float32)
    else:
        x = _load_rows(b, b16, bs, pos, rd, valid[:, None] & dm, stride_bs, FMT, HEAD_DIM)
    return x


@triton.jit
def _softmax_step(q, k, v, visible, qk_scale, m_i, l_i, acc, DOT_F16: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile of the online softmax: q (M, D), k and v (N, D) float32, visible (M, N).
    Rows that have seen no visible key yet keep m = -inf, l = 0, acc = 0."""
    if DOT_F16:
        s = tl.dot(q, tl.trans(k.to(tl.float16)))
    else:
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    s = tl.where(visible, s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)  # m_i = -inf -> 0
    p = tl.exp2(s - m_safe[:, None])  # invisible -> 0
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if DOT_F16:
        acc = tl.dot(p.to(tl.float16), v.to(tl.float16), acc * alpha[:, None])
    else:
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _key_pos(rn, end, ring):
    """Position held by rows rn: rn itself (ring 0), or in a ring of `ring` rows after positions
    [0, end) were written, the last p < end with p % ring == rn (negative: never written).
    end - 1 - rn + ring > 0 for rows of the ring, so the integer division is a floor."""
    rr = tl.maximum(ring, 1)
    return rn + ring * ((end - 1 - rn + rr) // rr - 1)


# -- kernels -------------------------------------------------------------------------------------
@triton.jit
def _prefill_kernel(
    q_ptr, o_ptr, T, S, n_past, window, ring, GROUP, qk_scale, stride_qh, stride_qt, stride_oh, stride_ot,
    ka, kb, kb16, kbs, kc, k_a_end, k_b_end, k_sh_a, k_ss_a, k_sh_b, k_ss_b, k_sh_bs, k_sh_c, k_ss_c,
    va, vb, vb16, vbs, vc, v_a_end, v_b_end, v_sh_a, v_ss_a, v_sh_b, v_ss_b, v_sh_bs, v_sh_c, v_ss_c,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    K_FMT: tl.constexpr, K_SEG: tl.constexpr, V_FMT: tl.constexpr, V_SEG: tl.constexpr,
    DOT_F16: tl.constexpr, PRECISION: tl.constexpr, SWA: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    kvh = (h // GROUP).to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    dmask = (rd < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + h * stride_qh + rm[:, None] * stride_qt + rd[None, :],
                mask=(rm < T)[:, None] & dmask, other=0.0)
    q = q.to(tl.float16) if DOT_F16 else q.to(tl.float32)
    ka, kb, kb16, kbs, kc = _at_head(kvh, ka, kb, kb16, kbs, kc, k_sh_a, k_sh_b, k_sh_bs, k_sh_c)
    va, vb, vb16, vbs, vc = _at_head(kvh, va, vb, vb16, vbs, vc, v_sh_a, v_sh_b, v_sh_bs, v_sh_c)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    end = tl.minimum(S, n_past + (pid_m + 1) * BLOCK_M)  # past the last key this tile's queries see
    lo = 0
    if SWA:  # a ring: every row may hold a visible position; a window without one: skip the early keys
        end = tl.where(ring > 0, S, end)
        lo = tl.where((ring == 0) & (window > 0),
                      tl.maximum(n_past + pid_m * BLOCK_M - window + 1, 0) // BLOCK_N * BLOCK_N, 0)
    for start in range(lo, end, BLOCK_N):
        rn = start + tl.arange(0, BLOCK_N)
        valid = rn < S
        k = _load_kv(rn, valid, rd, ka, kb, kb16, kbs, kc, k_a_end, k_b_end, k_ss_a, k_ss_b, k_ss_c,
                     K_FMT, K_SEG, HEAD_DIM)
        v = _load_kv(rn, valid, rd, va, vb, vb16, vbs, vc, v_a_end, v_b_end, v_ss_a, v_ss_b, v_ss_c,
                     V_FMT, V_SEG, HEAD_DIM)
        if SWA:
            kpos = _key_pos(rn, n_past + T, ring)
            qpos = n_past + rm
            visible = (kpos[None, :] <= qpos[:, None]) & (kpos[None, :] >= 0) & valid[None, :]
            visible &= (window == 0) | (kpos[None, :] > qpos[:, None] - window)
        else:
            visible = (rn[None, :] <= n_past + rm[:, None]) & valid[None, :]
        m_i, l_i, acc = _softmax_step(q, k, v, visible, qk_scale, m_i, l_i, acc, DOT_F16, PRECISION)
    out = acc / l_i[:, None]
    tl.store(o_ptr + h * stride_oh + rm[:, None] * stride_ot + rd[None, :],
             out.to(o_ptr.dtype.element_ty), mask=(rm < T)[:, None] & dmask)


@triton.jit
def _decode_split_kernel(
    q_ptr, acc_ptr, m_ptr, l_ptr,  # partials (n_head, num_splits[, d]) fp32
    n_valid_ptr, n_valid, window, ring, GROUP, qk_scale, stride_qh,  # valid keys (from n_valid_ptr if VALID_FROM_PTR)
    ka, kb, kb16, kbs, kc, k_a_end, k_b_end, k_sh_a, k_ss_a, k_sh_b, k_ss_b, k_sh_bs, k_sh_c, k_ss_c,
    va, vb, vb16, vbs, vc, v_a_end, v_b_end, v_sh_a, v_ss_a, v_sh_b, v_ss_b, v_sh_bs, v_sh_c, v_ss_c,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    K_FMT: tl.constexpr, K_SEG: tl.constexpr, V_FMT: tl.constexpr, V_SEG: tl.constexpr,
    VALID_FROM_PTR: tl.constexpr, DOT_F16: tl.constexpr, PRECISION: tl.constexpr, SWA: tl.constexpr,
):
    kvh = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    if VALID_FROM_PTR:  # a device scalar: one CUDA graph serves every cache length
        n_valid = tl.load(n_valid_ptr).to(tl.int32)
    n_rows = n_valid  # rows holding positions [0, n_valid)
    if SWA:
        n_rows = tl.where(ring > 0, tl.minimum(n_valid, ring), n_valid)
    split_len = tl.cdiv(tl.cdiv(n_rows, num_splits), BLOCK_N) * BLOCK_N  # keys per split
    rh = tl.arange(0, BLOCK_H)
    heads = kvh * GROUP + rh
    hmask = (rh < GROUP)[:, None]
    rd = tl.arange(0, BLOCK_D)
    dmask = (rd < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + heads[:, None] * stride_qh + rd[None, :], mask=hmask & dmask, other=0.0)
    q = q.to(tl.float16) if DOT_F16 else q.to(tl.float32)
    kvh = kvh.to(tl.int64)
    ka, kb, kb16, kbs, kc = _at_head(kvh, ka, kb, kb16, kbs, kc, k_sh_a, k_sh_b, k_sh_bs, k_sh_c)
    va, vb, vb16, vbs, vc = _at_head(kvh, va, vb, vb16, vbs, vc, v_sh_a, v_sh_b, v_sh_bs, v_sh_c)

    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, n_rows)
    for start in range(lo, hi, BLOCK_N):
        rn = start + tl.arange(0, BLOCK_N)
        valid = rn < hi
        k = _load_kv(rn, valid, rd, ka, kb, kb16, kbs, kc, k_a_end, k_b_end, k_ss_a, k_ss_b, k_ss_c,
                     K_FMT, K_SEG, HEAD_DIM)
        v = _load_kv(rn, valid, rd, va, vb, vb16, vbs, vc, v_a_end, v_b_end, v_ss_a, v_ss_b, v_ss_c,
                     V_FMT, V_SEG, HEAD_DIM)
        if SWA:
            kpos = _key_pos(rn, n_valid, ring)
            valid &= (kpos >= 0) & ((window == 0) | (kpos > n_valid - 1 - window))
        m_i, l_i, acc = _softmax_step(q, k, v, valid[None, :], qk_scale, m_i, l_i, acc, DOT_F16, PRECISION)
    # an empty split (lo >= n_valid) stores m = -inf, l = 0, acc = 0: the reduction weighs it 0
    part = heads * num_splits + split
    tl.store(acc_ptr + part[:, None] * HEAD_DIM + rd[None, :], acc, mask=hmask & dmask)
    tl.store(m_ptr + part, m_i, mask=rh < GROUP)
    tl.store(l_ptr + part, l_i, mask=rh < GROUP)


@triton.jit
def _decode_reduce_kernel(
    acc_ptr, m_ptr, l_ptr, o_ptr,  # pointers
    num_splits, stride_oh,
    BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    h = tl.program_id(0)
    rs = tl.arange(0, BLOCK_S)
    rd = tl.arange(0, BLOCK_D)
    smask = rs < num_splits
    m = tl.load(m_ptr + h * num_splits + rs, mask=smask, other=float("-inf"))
    l = tl.load(l_ptr + h * num_splits + rs, mask=smask, other=0.0)
    acc = tl.load(acc_ptr + (h * num_splits + rs)[:, None] * HEAD_DIM + rd[None, :],
                  mask=smask[:, None] & (rd < HEAD_DIM)[None, :], other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.where(m > float("-inf"), tl.exp2(m - m_max), 0.0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
    tl.store(o_ptr + h * stride_oh + rd, out.to(o_ptr.dtype.element_ty), mask=rd < HEAD_DIM)


# -- operands ------------------------------------------------------------------------------------
@dataclass
class KVOperand:
    """One layer of K or V as a kernel reads it (see the module docstring).

    b: (n_kv, rows, d) float16/float32 for "dense", (n_kv, rows, row_bytes) uint8 otherwise.
    scales: q4g keys' (n_kv, n_group, 2, d) float16. a, c: (n_kv, rows, d) float16 segments of a
    segmented (q4g) operand, holding positions [0, a_end) and [b_end, b_end + rows).
    capacity: positions the operand can hold (bounds n_valid)."""

    fmt: str
    b: torch.Tensor
    n_kv: int
    head_dim: int
    capacity: int
    scales: Optional[torch.Tensor] = None
    a: Optional[torch.Tensor] = None
    c: Optional[torch.Tensor] = None
    a_end: int = 0
    b_end: int = 1 << 30

    @classmethod
    def dense(cls, t: torch.Tensor) -> "KVOperand":
        return cls("dense", t, t.shape[0], t.shape[2], t.shape[1])

    @property
    def segmented(self) -> bool:
        return self.a is not None

    def args(self) -> list:
        """Kernel arguments: a, b, b16, bs, c, a_end, b_end, strides (h/s of a, b, bs, c)."""
        b = self.b
        b16 = b if self.fmt == "dense" else b.view(torch.float16)
        bs = self.scales if self.scales is not None else b
        a = self.a if self.a is not None else b
        c = self.c if self.c is not None else b
        return [a, b, b16, bs, c, self.a_end, self.b_end, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                bs.stride(0), c.stride(0), c.stride(1)]

    def constexprs(self, prefix: str) -> dict:
        return {f"{prefix}_FMT": FORMATS[self.fmt], f"{prefix}_SEG": self.segmented}


def _check(q: torch.Tensor, K: KVOperand, V: KVOperand, what: str) -> tuple[int, int, int, int]:
    if q.dim() != 3:
        raise QkvggufError(f"{what}: q (n_head, T, d) expected, got {tuple(q.shape)}")
    n_head, T, d = q.shape
    if (K.n_kv, K.head_dim) != (V.n_kv, V.head_dim) or K.head_dim != d or K.n_kv == 0 or n_head % K.n_kv:
        raise QkvggufError(f"{what}: q {tuple(q.shape)}, K ({K.n_kv} heads x {K.head_dim}) and V ({V.n_kv} x "
                           f"{V.head_dim}) need the same head_dim and n_head a multiple of n_kv")
    if q.dtype not in (torch.float16, torch.float32) or q.stride(2) != 1:
        raise QkvggufError(f"{what}: q must be float16/float32 with a contiguous last dim")
    for name, op in (("K", K), ("V", V)):
        if op.fmt == "dense":
            if op.b.dtype not in (torch.float16, torch.float32):
                raise QkvggufError(f"{what}: {name} must be float16 or float32, got {op.b.dtype}")
            if op.b.stride(2) != 1:
                raise QkvggufError(f"{what}: {name} needs a contiguous last dim")
        elif d % ROW_FORMATS[op.fmt].block:
            raise QkvggufError(f"{what}: {name} in {op.fmt} needs head_dim a multiple of "
                               f"{ROW_FORMATS[op.fmt].block}, got {d}")
    if d > 256:
        raise QkvggufError(f"{what}: head_dim {d} > 256 is not supported")
    return n_head, T, d, K.n_kv


def _dense_pair(q, k, v, what):
    if k.dim() != 3 or v.shape != k.shape:
        raise QkvggufError(f"{what}: q (n_head, T, d), k and v (n_kv, S, d) expected, got "
                           f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    return KVOperand.dense(k), KVOperand.dense(v)


def _dot_f16(q: torch.Tensor, K: KVOperand, V: KVOperand) -> bool:
    """fp16 tl.dot operands for fp16 queries (the GPU model's activations); fp32 for fp32 queries,
    whatever the cache holds (f16 and dequantized values are exact in fp32)."""
    return q.dtype == torch.float16


# -- wrappers ------------------------------------------------------------------------------------
def prefill_config(head_dim: int, f16: bool, quantized: bool = False) -> dict:
    """Tiles without ptxas spills on sm80/sm90 (aot.py): 64 x 64, 8 warps past head_dim 64, keys
    in 32s for fp32 operands; a quantized cache dequantizes in registers: keys in 32s (16s past
    head_dim 64), 8 warps."""
    if quantized:
        return {"block_m": 64, "block_n": 32 if head_dim <= 64 else 16, "num_warps": 8, "num_stages": 2}
    return {"block_m": 64, "block_n": 64 if f16 else 32, "num_warps": 4 if head_dim <= 64 else 8, "num_stages": 2}


def _quantized(K: KVOperand, V: KVOperand) -> bool:
    return K.fmt != "dense" or V.fmt != "dense"


def attend_prefill(q: torch.Tensor, K: KVOperand, V: KVOperand, n_past: int, window: int = 0, ring: int = 0,
                   *, block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                   num_stages: int | None = None, precision: str | None = None) -> torch.Tensor:
    """Causal GQA attention of q (n_head, T, d) at positions [n_past, n_past + T) over positions
    [0, n_past + T) of K, V -> (n_head, T, d) in q's dtype. window > 0: a query at p sees keys at
    (p - window, p] only; ring > 0: K, V are rings of `ring` rows (position p in row p % ring).

    Tiles default to prefill_config; precision applies to fp32 operands (launch.fp32_precision).
    """
    n_head, T, d, n_kv = _check(q, K, V, "attention prefill")
    S = n_past + T if not ring else min(n_past + T, ring)  # rows read
    if n_past < 0 or min(K.capacity, V.capacity) < S:
        raise QkvggufError(f"attention prefill: the cache holds {min(K.capacity, V.capacity)} positions, "
                           f"need n_past + T = {S}")
    out = torch.empty_like(q)
    if T == 0:
        return out
    f16 = _dot_f16(q, K, V)
    cfg = prefill_config(d, f16, _quantized(K, V))
    block_m = min(block_m or cfg["block_m"], max(16, next_pow2(T)))
    block_n = block_n or cfg["block_n"]
    grid = (triton.cdiv(T, block_m), n_head)
    _prefill_kernel[grid](
        q, out, T, S, n_past, window, ring, n_head // n_kv, LOG2E / math.sqrt(d),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *K.args(), *V.args(),
        HEAD_DIM=d, BLOCK_D=max(16, next_pow2(d)), BLOCK_M=block_m, BLOCK_N=block_n,
        **K.constexprs("K"), **V.constexprs("V"), DOT_F16=f16, PRECISION=fp32_precision(q.device, precision),
        SWA=bool(window or ring), num_warps=num_warps or cfg["num_warps"], num_stages=num_stages or cfg["num_stages"],
    )
    return out


def flash_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_past: int, window: int = 0,
                  ring: int = 0, **kw) -> torch.Tensor:
    """attend_prefill over dense k, v (n_kv, >= n_past + T, d)."""
    return attend_prefill(q, *_dense_pair(q, k, v, "flash_prefill"), n_past, window, ring, **kw)


def decode_config(head_dim: int, quantized: bool = False) -> dict:
    """Key tile and warps without ptxas spills on sm80/sm90 (aot.py)."""
    if quantized:
        return {"block_n": 32 if head_dim <= 64 else 16, "num_warps": 8}
    return {"block_n": 64, "num_warps": 4 if head_dim <= 64 else 8}


def decode_splits(n_kv: int, n_valid: int, device: torch.device, block_n: int = 64,
                  min_keys: int = 256, max_splits: int = 64) -> int:
    """Enough splits to give every SM about two programs, but at least min_keys keys per split."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    want = triton.cdiv(2 * sms, n_kv)
    most = max(1, triton.cdiv(n_valid, max(min_keys, block_n)))
    return max(1, min(want, most, max_splits))


def attend_decode(q: torch.Tensor, K: KVOperand, V: KVOperand, n_valid: int | torch.Tensor,
                  num_splits: int | None = None, window: int = 0, ring: int = 0, *, block_n: int | None = None, num_warps: int | None = None,
                  precision: str | None = None) -> torch.Tensor:
    """One query per head, q (n_head, 1, d), over positions [0, n_valid) of K, V -> (n_head, 1, d)
    in q's dtype; split-K over num_splits key ranges (default: decode_splits).

    n_valid may be a one-element int32/int64 tensor on q's device (read by the kernel, so a captured
    CUDA graph replays for any cache length); then num_splits is sized for the whole cache.
    window, ring: as attend_prefill (with a ring, n_valid may exceed the capacity).
    """
    n_head, T, d, n_kv = _check(q, K, V, "attention decode")
    if T != 1:
        raise QkvggufError(f"attention decode: one query token expected, got T={T} (use prefill)")
    cfg = decode_config(d, _quantized(K, V))
    block_n = block_n or cfg["block_n"]
    num_warps = num_warps or cfg["num_warps"]
    capacity = min(K.capacity, V.capacity)
    from_ptr = isinstance(n_valid, torch.Tensor)
    if from_ptr:
        if n_valid.numel() != 1 or n_valid.dtype not in (torch.int32, torch.int64) or n_valid.device != q.device:
            raise QkvggufError(f"attention decode: n_valid tensor must be one int32/int64 on {q.device}")
        keys = capacity  # splits sized for the capacity; the kernel clips to n_valid
    else:
        if not 1 <= (min(n_valid, ring) if ring else n_valid) <= capacity:
            raise QkvggufError(f"attention decode: n_valid={n_valid} outside 1..{capacity} (cache positions)")
        keys = int(min(n_valid, ring) if ring else n_valid)
    if num_splits is None:
        num_splits = decode_splits(n_kv, keys, q.device, block_n)
    num_splits = max(1, min(int(num_splits), triton.cdiv(keys, block_n)))
    group = n_head // n_kv
    f32 = dict(dtype=torch.float32, device=q.device)
    acc = torch.empty((n_head, num_splits, d), **f32)
    m = torch.empty((n_head, num_splits), **f32)
    l = torch.empty((n_head, num_splits), **f32)  # noqa: E741
    block_d = max(16, next_pow2(d))
    _decode_split_kernel[(n_kv, num_splits)](
        q, acc, m, l, n_valid if from_ptr else acc, 0 if from_ptr else int(n_valid), window, ring, group,
        LOG2E / math.sqrt(d),
        q.stride(0), *K.args(), *V.args(),
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_H=max(16, next_pow2(group)), BLOCK_N=block_n,
        **K.constexprs("K"), **V.constexprs("V"), VALID_FROM_PTR=from_ptr, DOT_F16=_dot_f16(q, K, V),
        PRECISION=fp32_precision(q.device, precision), SWA=bool(window or ring), num_warps=num_warps,
    )
    out = torch.empty_like(q)
    _decode_reduce_kernel[(n_head,)](
        acc, m, l, out, num_splits, out.stride(0),
        BLOCK_S=next_pow2(num_splits), HEAD_DIM=d, BLOCK_D=block_d, num_warps=4,
    )
    return out


def flash_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_valid: int | torch.Tensor,
                 num_splits: int | None = None, window: int = 0, ring: int = 0, **kw) -> torch.Tensor:
    """attend_decode over dense k, v (n_kv, >= n_valid, d)."""
    return attend_decode(q, *_dense_pair(q, k, v, "flash_decode"), n_valid, num_splits, window, ring, **kw)
