"""RMSNorm, optionally fused with the residual add that precedes it.

    h   = x + residual                      (only when residual is given)
    out = h / sqrt(mean(h^2) + eps) * weight

over the last dim D of x (any leading shape, rows flattened). One program per row holds the whole
row in registers (D <= 65536), computes in float32 and writes `out` in x's dtype (or out_dtype), plus
h in the residual's dtype when fused: the model keeps its residual stream in float32 on the GPU too
(fp16's 65504 is within reach of real models' outlier channels) while the matmul inputs are fp16.

Memory traffic: unfused, read x + write out = 2 * rows * D * elt; fused, read x and residual, write
h and out = 4 * rows * D * elt, where the separate add + norm would move 5 (add: 3, norm: 2).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qkvgguf.errors import QkvggufError

from .launch import next_pow2


@triton.jit
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, h_ptr,  # pointers (r_ptr, h_ptr unused unless HAS_RESIDUAL)
    D, eps,  # sizes, epsilon
    stride_x, stride_r, stride_o, stride_h,  # row strides
    HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(h_ptr + row * stride_h + cols, h.to(h_ptr.dtype.element_ty), mask=mask)
    inv = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / D + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (h * inv * w).to(out_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, D: int) -> torch.Tensor:
    t = t.reshape(-1, D)
    return t if t.stride(1) == 1 else t.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             out_dtype: torch.dtype | None = None):
    """RMSNorm of x (..., D) by weight (D,) -> out (..., D) in out_dtype (default: x's dtype).

    With residual (same shape as x): returns (out, h) where h = x + residual is the new residual
    stream (in the residual's dtype) and out = rms_norm(h) * weight.
    """
    D = x.shape[-1]
    if x.dtype not in (torch.float16, torch.float32, torch.bfloat16):
        raise QkvggufError(f"rms_norm: x must be floating point, got {x.dtype}")
    if weight.shape != (D,):
        raise QkvggufError(f"rms_norm: weight must be ({D},), got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise QkvggufError(f"rms_norm: residual {tuple(residual.shape)} does not match x {tuple(x.shape)}")
    if D > 65536:
        raise QkvggufError(f"rms_norm: rows of {D} elements exceed the one-row-per-program limit 65536")
    xr = _rows(x, D)
    out = torch.empty_like(xr, dtype=out_dtype or x.dtype)
    rr = _rows(residual, D) if residual is not None else xr
    h = torch.empty_like(rr) if residual is not None else out
    if xr.shape[0]:
        block = next_pow2(D)
        _rms_norm_kernel[(xr.shape[0],)](
            xr, rr, weight.contiguous(), out, h, D, float(eps),
            xr.stride(0), rr.stride(0), out.stride(0), h.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK_D=block, num_warps=min(16, max(1, block // 256)),
        )
    if residual is None:
        return out.view(x.shape)
    return out.view(x.shape), h.view(x.shape)
