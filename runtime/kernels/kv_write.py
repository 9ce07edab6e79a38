"""Append keys/values to a q8_0 or q4_0 KV cache: quantize and store in one launch.

    kv_write(x, blocks, pos, fmt)   x (n_kv, T, d) float  ->  blocks[:, pos:pos + T] (uint8 rows)

A program owns one (KV head, token) row of d values, i.e. d/32 ggml blocks, and writes the bytes
llama.cpp keeps for that row (the layouts of runtime/kv_quant.py), bit-exact with
`qkvgguf.quants.q8.quantize_q8_0_torch` / `qkvgguf.quants.q4.quantize_q4_0_torch`:

    q8_0: d = max|x| / 127, q = round-half-away(x * (1/d)),  bytes f16(d), 32 x int8
    q4_0: m = the first x of largest |x|, d = m / -8, q = min(15, floor(x * (1/d) + 8.5)),
          bytes f16(d), 16 x (q[j] | q[j + 16] << 4)

1/d is computed with IEEE rounding (tl.math.div_rn; a plain `/` may be approximate on the GPU).
`pos` may be a one-element device tensor (a CUDA graph replays the write at the current position).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qkvgguf.errors import QkvggufError
from qkvgguf.kv_types import ROW_FORMATS

from .launch import next_pow2

# the row formats this kernel writes (qkvgguf/kv_types.py: `fused_write`) and their FMT codes
BLOCK_BYTES = {name: f.block_bytes for name, f in ROW_FORMATS.items() if f.fused_write}
Q8_0, Q4_0 = tl.constexpr(ROW_FORMATS["q8_0"].code), tl.constexpr(ROW_FORMATS["q4_0"].code)


@triton.jit
def _round_half_away(y):
    a = tl.abs(y)
    fl = tl.floor(a)
    r = fl + tl.floor(2.0 * (a - fl))
    return tl.where(y < 0, -r, r)


@triton.jit
def _inverse(d):
    """1/d with IEEE rounding, 0 where d == 0; (B,) -> (B, 1)."""
    one = tl.full(d.shape, 1.0, tl.float32)
    return tl.where(d == 0.0, 0.0, tl.math.div_rn(one, tl.where(d == 0.0, one, d)))[:, None]


@triton.jit
def _store_f16(ptr, d, mask):
    bits = d.to(tl.float16).to(tl.uint16, bitcast=True)
    tl.store(ptr, (bits & 255).to(tl.uint8), mask=mask)
    tl.store(ptr + 1, (bits >> 8).to(tl.uint8), mask=mask)


@triton.jit
def _kv_write_kernel(
    x_ptr, out_ptr, pos_ptr, pos, stride_xh, stride_xt, stride_oh, stride_os,
    NB: tl.constexpr, BLOCK_B: tl.constexpr, FMT: tl.constexpr, POS_FROM_PTR: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    if POS_FROM_PTR:
        pos = tl.load(pos_ptr).to(tl.int32)
    rb = tl.arange(0, BLOCK_B)[:, None]  # block within the row
    bmask = rb < NB
    src = x_ptr + h * stride_xh + t * stride_xt + rb * 32
    row = out_ptr + h * stride_oh + (pos + t).to(tl.int64) * stride_os
    rj = tl.arange(0, 16)[None, :]
    lo = tl.load(src + rj, mask=bmask, other=0.0).to(tl.float32)  # elements 0..15 of each block
    hi = tl.load(src + 16 + rj, mask=bmask, other=0.0).to(tl.float32)  # elements 16..31
    if FMT == Q8_0:
        amax = tl.maximum(tl.max(tl.abs(lo), axis=1), tl.max(tl.abs(hi), axis=1))
        d = tl.math.div_rn(amax, tl.full(amax.shape, 127.0, tl.float32))  # IEEE: '/' may be approximate on a GPU
        inv = _inverse(d)
        qlo = _round_half_away(lo * inv).to(tl.int8).to(tl.uint8, bitcast=True)
        qhi = _round_half_away(hi * inv).to(tl.int8).to(tl.uint8, bitcast=True)
        blk = row + rb * 34
        _store_f16(blk, d[:, None], bmask)
        tl.store(blk + 2 + rj, qlo, mask=bmask)
        tl.store(blk + 18 + rj, qhi, mask=bmask)
    else:  # Q4_0
        alo, ahi = tl.abs(lo), tl.abs(hi)
        amax = tl.maximum(tl.max(alo, axis=1), tl.max(ahi, axis=1))[:, None]
        first = tl.minimum(tl.min(tl.where(alo == amax, rj, 32), axis=1),
                           tl.min(tl.where(ahi == amax, rj + 16, 32), axis=1))[:, None]
        m = tl.sum(tl.where(rj == first, lo, 0.0), axis=1) + tl.sum(tl.where(rj + 16 == first, hi, 0.0), axis=1)
        d = m * -0.125  # exact, as the IEEE quotient m / -8
        inv = _inverse(d)
        qlo = tl.minimum(tl.maximum(tl.floor(lo * inv + 8.5), 0.0), 15.0).to(tl.int32)
        qhi = tl.minimum(tl.maximum(tl.floor(hi * inv + 8.5), 0.0), 15.0).to(tl.int32)
        blk = row + rb * 18
        _store_f16(blk, d[:, None], bmask)
        tl.store(blk + 2 + rj, (qlo | (qhi << 4)).to(tl.uint8), mask=bmask)


def kv_write(x: torch.Tensor, blocks: torch.Tensor, pos: int | torch.Tensor, fmt: str) -> None:
    """Quantize x (n_kv, T, d) float16/float32 into blocks (n_kv, n_ctx, d/32 * block bytes) uint8
    at positions [pos, pos + T), in place."""
    if fmt not in BLOCK_BYTES:
        raise QkvggufError(f"kv_write: format {fmt!r} is not one of {', '.join(BLOCK_BYTES)}")
    n_kv, T, d = x.shape
    nb = d // 32
    if d % 32 or blocks.dim() != 3 or blocks.dtype != torch.uint8 or blocks.shape[0] != n_kv \
            or blocks.shape[2] != nb * BLOCK_BYTES[fmt] or blocks.stride(2) != 1:
        raise QkvggufError(f"kv_write: x {tuple(x.shape)} does not match {fmt} rows {tuple(blocks.shape)}")
    if x.stride(2) != 1:
        x = x.contiguous()
    from_ptr = isinstance(pos, torch.Tensor)
    if not from_ptr and not 0 <= pos <= blocks.shape[1] - T:
        raise QkvggufError(f"kv_write: positions [{pos}, {pos + T}) outside the cache's {blocks.shape[1]}")
    if T == 0:
        return
    _kv_write_kernel[(n_kv, T)](
        x, blocks, pos if from_ptr else blocks, 0 if from_ptr else pos,
        x.stride(0), x.stride(1), blocks.stride(0), blocks.stride(1),
        NB=nb, BLOCK_B=next_pow2(nb), FMT=ROW_FORMATS[fmt].code, POS_FROM_PTR=from_ptr, num_warps=1,
    )
