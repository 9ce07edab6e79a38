"""Small launch helpers shared by the kernel wrappers."""

from __future__ import annotations

import os

import torch

PRECISIONS = ("tf32", "tf32x3", "ieee")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def fp32_precision(device: torch.device, precision: str | None) -> str:
    """tl.dot input_precision for fp32 operands: TF32 (10-bit mantissa, like fp16, fp32 range) by
    default on sm80+, where "tf32x3" (about fp32 accuracy, 3 passes, more registers) and "ieee"
    (CUDA cores) can be asked for; "ieee" where the GPU has no TF32 (sm75) and in the interpreter."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        return "ieee"
    return precision or "tf32"
