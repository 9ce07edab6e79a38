"""Flash attention over the KV cache: causal prefill with a position offset, and split-K decode.

Shapes follow `runtime.ops.attention` and the cache layout of `runtime.kv_cache` (per layer
(n_head_kv, n_ctx, head_dim)); the kernels read the cache in place, only its first S valid rows:

    q (n_head, T, d) at positions [n_past, n_past + T);  k, v (n_kv, >= n_past + T, d)
    out[h, t] = softmax_j(q[h, t] . k[h // G, j] / sqrt(d), j <= n_past + t) @ v[h // G]
    with G = n_head / n_kv query heads per KV head (GQA).

Prefill (`flash_prefill`): a program owns BLOCK_M queries of one head and streams BLOCK_N keys
at a time with the online softmax (running max m, running sum l, rescaled accumulator), so the
T x S score matrix never exists; it stops at the last key its last query can see.

Decode (`flash_decode`, T = 1): one query against a long cache leaves too few programs if one
program owns a head, so the keys are cut into `num_splits` ranges. A program owns one KV head (all
G query heads that share it, as the rows of a tl.dot, so every K/V byte is read once) and one
range, and writes its unnormalized partial output with its (m, l); a second kernel combines the
splits: o = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s. Memory traffic: K and V once
(2 * n_kv * n_valid * d * elt) plus n_head * num_splits * (d + 2) * 4 bytes of partials.

Scores are computed in base 2 (scaled by log2(e) / sqrt(d)), accumulation in float32. fp16 q/k/v
use fp16 tl.dot operands (p is cast to fp16 for p @ v, as in every flash kernel); all-fp32 inputs
use fp32 operands with `precision` (launch.fp32_precision: TF32 by default on sm80+, "tf32x3" or
"ieee" on request). The usual GPU cache is f16.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from qkvgguf.errors import QkvggufError

from .launch import fp32_precision, next_pow2

LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr,  # pointers
    T, S, n_past, GROUP, qk_scale,  # sizes: queries, valid keys (n_past + T), offset, heads per kv head
    stride_qh, stride_qt, stride_kh, stride_ks, stride_vh, stride_vs, stride_oh, stride_ot,  # strides
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_F16: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    dmask = (rd < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + h * stride_qh + rm[:, None] * stride_qt + rd[None, :],
                mask=(rm < T)[:, None] & dmask, other=0.0)
    q = q.to(tl.float16) if DOT_F16 else q.to(tl.float32)
    k_base = k_ptr + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + kvh.to(tl.int64) * stride_vh

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    end = tl.minimum(S, n_past + (pid_m + 1) * BLOCK_M)  # past the last key this tile's queries see
    for start in range(0, end, BLOCK_N):
        rn = start + tl.arange(0, BLOCK_N)
        kvmask = (rn < S)[:, None] & dmask
        k = tl.load(k_base + rn[:, None] * stride_ks + rd[None, :], mask=kvmask, other=0.0)
        if DOT_F16:
            s = tl.dot(q, tl.trans(k.to(tl.float16)))
        else:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=PRECISION)
        visible = (rn[None, :] <= n_past + rm[:, None]) & (rn < S)[None, :]
        s = tl.where(visible, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: key 0 is visible to every query
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + rn[:, None] * stride_vs + rd[None, :], mask=kvmask, other=0.0)
        if DOT_F16:
            acc = tl.dot(p.to(tl.float16), v.to(tl.float16), acc * alpha[:, None])
        else:
            acc = tl.dot(p, v.to(tl.float32), acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(o_ptr + h * stride_oh + rm[:, None] * stride_ot + rd[None, :],
             out.to(o_ptr.dtype.element_ty), mask=(rm < T)[:, None] & dmask)


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, acc_ptr, m_ptr, l_ptr,  # pointers; partials (n_head, num_splits[, d]) fp32
    n_valid_ptr, n_valid, GROUP, qk_scale,  # valid keys (read from n_valid_ptr if VALID_FROM_PTR), heads per kv head
    stride_qh, stride_kh, stride_ks, stride_vh, stride_vs,  # strides
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    VALID_FROM_PTR: tl.constexpr, DOT_F16: tl.constexpr, PRECISION: tl.constexpr,
):
    kvh = tl.program_id(0)
    split = tl.program_id(1)
    num_splits = tl.num_programs(1)
    if VALID_FROM_PTR:  # a device scalar: one CUDA graph serves every cache length
        n_valid = tl.load(n_valid_ptr)
    split_len = tl.cdiv(tl.cdiv(n_valid, num_splits), BLOCK_N) * BLOCK_N  # keys per split
    rh = tl.arange(0, BLOCK_H)
    heads = kvh * GROUP + rh
    hmask = (rh < GROUP)[:, None]
    rd = tl.arange(0, BLOCK_D)
    dmask = (rd < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + heads[:, None] * stride_qh + rd[None, :], mask=hmask & dmask, other=0.0)
    q = q.to(tl.float16) if DOT_F16 else q.to(tl.float32)
    k_base = k_ptr + kvh.to(tl.int64) * stride_kh
    v_base = v_ptr + kvh.to(tl.int64) * stride_vh

    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_D), dtype=tl.float32)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, n_valid)
    for start in range(lo, hi, BLOCK_N):
        rn = start + tl.arange(0, BLOCK_N)
        kvmask = (rn < hi)[:, None] & dmask
        k = tl.load(k_base + rn[:, None] * stride_ks + rd[None, :], mask=kvmask, other=0.0)
        if DOT_F16:
            s = tl.dot(q, tl.trans(k.to(tl.float16)))
        else:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision=PRECISION)
        s = tl.where((rn < hi)[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: the first key of a split is valid
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + rn[:, None] * stride_vs + rd[None, :], mask=kvmask, other=0.0)
        if DOT_F16:
            acc = tl.dot(p.to(tl.float16), v.to(tl.float16), acc * alpha[:, None])
        else:
            acc = tl.dot(p, v.to(tl.float32), acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
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


# -- wrappers ------------------------------------------------------------------------------------
def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, what: str) -> tuple[int, int, int, int]:
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        raise QkvggufError(f"{what}: q (n_head, T, d), k and v (n_kv, S, d) expected, got "
                           f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    n_head, T, d = q.shape
    n_kv = k.shape[0]
    if k.shape[2] != d or n_kv == 0 or n_head % n_kv:
        raise QkvggufError(f"{what}: q {tuple(q.shape)} and k {tuple(k.shape)} need the same head_dim "
                           f"and n_head a multiple of n_kv")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in (torch.float16, torch.float32):
            raise QkvggufError(f"{what}: {name} must be float16 or float32, got {t.dtype}")
        if t.stride(2) != 1:
            raise QkvggufError(f"{what}: {name} needs a contiguous last dim")
    if d > 256:
        raise QkvggufError(f"{what}: head_dim {d} > 256 is not supported")
    return n_head, T, d, n_kv


def _dot_f16(q, k, v) -> bool:
    """fp16 operands when the cache is fp16 (the usual case); fp32 only when everything is fp32."""
    return not (q.dtype == k.dtype == v.dtype == torch.float32)


def prefill_config(head_dim: int, f16: bool) -> dict:
    """Tiles without ptxas spills on sm80/sm90 (aot.py): 64 x 64, 8 warps past head_dim 64, keys
    in 32s for fp32 operands."""
    return {"block_m": 64, "block_n": 64 if f16 else 32, "num_warps": 4 if head_dim <= 64 else 8, "num_stages": 2}


def flash_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_past: int,
                  *, block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
                  num_stages: int | None = None, precision: str | None = None) -> torch.Tensor:
    """Causal GQA attention of q (n_head, T, d) at positions [n_past, n_past + T) over the first
    n_past + T rows of k, v (n_kv, >= n_past + T, d) -> (n_head, T, d) in q's dtype.

    Tiles default to prefill_config; precision applies to all-fp32 inputs (launch.fp32_precision).
    """
    n_head, T, d, n_kv = _check(q, k, v, "flash_prefill")
    S = n_past + T
    if n_past < 0 or k.shape[1] < S:
        raise QkvggufError(f"flash_prefill: the cache holds {k.shape[1]} positions, need n_past + T = {S}")
    out = torch.empty_like(q)
    if T == 0:
        return out
    f16 = _dot_f16(q, k, v)
    cfg = prefill_config(d, f16)
    block_m = min(block_m or cfg["block_m"], max(16, next_pow2(T)))
    block_n = block_n or cfg["block_n"]
    num_warps = num_warps or cfg["num_warps"]
    num_stages = num_stages or cfg["num_stages"]
    grid = (triton.cdiv(T, block_m), n_head)
    _prefill_kernel[grid](
        q, k, v, out, T, S, n_past, n_head // n_kv, LOG2E / math.sqrt(d),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=d, BLOCK_D=max(16, next_pow2(d)), BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_F16=f16, PRECISION=fp32_precision(q.device, precision), num_warps=num_warps, num_stages=num_stages,
    )
    return out


def decode_config(head_dim: int) -> dict:
    """Key tile and warps without ptxas spills on sm80/sm90 (aot.py)."""
    return {"block_n": 64, "num_warps": 4 if head_dim <= 64 else 8}


def decode_splits(n_kv: int, n_valid: int, device: torch.device, block_n: int = 64,
                  min_keys: int = 256, max_splits: int = 64) -> int:
    """Enough splits to give every SM about two programs, but at least min_keys keys per split."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    want = triton.cdiv(2 * sms, n_kv)
    most = max(1, triton.cdiv(n_valid, max(min_keys, block_n)))
    return max(1, min(want, most, max_splits))


def flash_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_valid: int | torch.Tensor,
                 num_splits: int | None = None, *, block_n: int | None = None, num_warps: int | None = None,
                 precision: str | None = None) -> torch.Tensor:
    """One query per head, q (n_head, 1, d), over the first n_valid rows of k, v (n_kv, >= n_valid, d)
    -> (n_head, 1, d) in q's dtype; split-K over num_splits key ranges (default: decode_splits).

    n_valid may be a one-element int32/int64 tensor on q's device (read by the kernel, so a captured
    CUDA graph replays for any cache length); then num_splits is sized for the whole cache.
    """
    n_head, T, d, n_kv = _check(q, k, v, "flash_decode")
    if T != 1:
        raise QkvggufError(f"flash_decode: one query token expected, got T={T} (use flash_prefill)")
    block_n = block_n or decode_config(d)["block_n"]
    num_warps = num_warps or decode_config(d)["num_warps"]
    from_ptr = isinstance(n_valid, torch.Tensor)
    if from_ptr:
        if n_valid.numel() != 1 or n_valid.dtype not in (torch.int32, torch.int64) or n_valid.device != q.device:
            raise QkvggufError(f"flash_decode: n_valid tensor must be one int32/int64 on {q.device}")
        keys = k.shape[1]  # splits sized for the capacity; the kernel clips to n_valid
    else:
        if not 1 <= n_valid <= k.shape[1]:
            raise QkvggufError(f"flash_decode: n_valid={n_valid} outside 1..{k.shape[1]} (cache positions)")
        keys = int(n_valid)
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
        q, k, v, acc, m, l, n_valid if from_ptr else acc, 0 if from_ptr else keys, group, LOG2E / math.sqrt(d),
        q.stride(0), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_H=max(16, next_pow2(group)), BLOCK_N=block_n,
        VALID_FROM_PTR=from_ptr, DOT_F16=_dot_f16(q, k, v), PRECISION=fp32_precision(q.device, precision),
        num_warps=num_warps,
    )
    out = torch.empty_like(q)
    _decode_reduce_kernel[(n_head,)](
        acc, m, l, out, num_splits, out.stride(0),
        BLOCK_S=next_pow2(num_splits), HEAD_DIM=d, BLOCK_D=block_d, num_warps=4,
    )
    return out
