"""Rotary position embedding, in both pairings, as `runtime.ops.rope`.

    normal (llama GGUF): pairs (x[2i], x[2i + 1])
    neox   (qwen):       pairs (x[i],  x[i + d/2])
    (a, b) -> (a cos - b sin, a sin + b cos),  with cos, sin = cos/sin(pos * theta_i), (T, d/2)

x is (heads, T, d) with any head/token strides (a view of a projection output is fine) and a
contiguous last dim. A program rotates BLOCK_H heads of one token, so cos/sin are read once per
token. Computes in float32, writes x's dtype into `out` (a new tensor, or x itself for in place).
Memory traffic: read + write x, read cos/sin once per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qkvgguf.errors import QkvggufError

from .launch import next_pow2


@triton.jit
def _rope_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr,  # pointers
    H, HALF,  # sizes: heads, d / 2
    stride_xh, stride_xt, stride_oh, stride_ot, stride_ct,  # strides
    NEOX: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0)
    rh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    ri = tl.arange(0, BLOCK_HALF)
    mask = (rh < H)[:, None] & (ri < HALF)[None, :]
    cos = tl.load(cos_ptr + t * stride_ct + ri, mask=ri < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + t * stride_ct + ri, mask=ri < HALF, other=0.0).to(tl.float32)[None, :]
    if NEOX:
        i0 = ri
        i1 = ri + HALF
    else:
        i0 = 2 * ri
        i1 = 2 * ri + 1
    xrow = x_ptr + rh[:, None].to(tl.int64) * stride_xh + t * stride_xt
    orow = out_ptr + rh[:, None].to(tl.int64) * stride_oh + t * stride_ot
    a = tl.load(xrow + i0[None, :], mask=mask, other=0.0).to(tl.float32)
    b = tl.load(xrow + i1[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(orow + i0[None, :], (a * cos - b * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(orow + i1[None, :], (a * sin + b * cos).to(out_ptr.dtype.element_ty), mask=mask)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate x (heads, T, d) by cos, sin (T, d/2) (ops.rope_cos_sin); out=x rotates in place."""
    if x.dim() != 3 or x.stride(2) != 1:
        raise QkvggufError(f"rope: x must be (heads, T, d) with a contiguous last dim, got {tuple(x.shape)}")
    H, T, d = x.shape
    if d % 2 or cos.shape != (T, d // 2) or sin.shape != cos.shape:
        raise QkvggufError(f"rope: cos/sin must be (T, d/2) = ({T}, {d // 2}), got {tuple(cos.shape)}, {tuple(sin.shape)}")
    cos, sin = cos.contiguous(), sin.contiguous()
    if out is None:
        out = torch.empty_like(x)
    elif out.shape != x.shape or out.stride(2) != 1:
        raise QkvggufError(f"rope: out must be {tuple(x.shape)} with a contiguous last dim")
    if H and T:
        block_h = min(next_pow2(H), 16)
        _rope_kernel[(T, triton.cdiv(H, block_h))](
            x, cos, sin, out, H, d // 2,
            x.stride(0), x.stride(1), out.stride(0), out.stride(1), cos.stride(0),
            NEOX=bool(neox), BLOCK_H=block_h, BLOCK_HALF=next_pow2(d // 2),
        )
    return out
