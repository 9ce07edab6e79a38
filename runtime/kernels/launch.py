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


def autotune_bench(fn, quantiles=None, warmup: int = 3, rep: int = 20) -> float:
    """Median milliseconds of fn() on the current CUDA stream, for `triton.autotune(do_bench=...)`.

    Triton's default benchmarker flushes L2 before each run through a 256 MB buffer: on a 4 GiB
    card that buffer is memory the VRAM planner never gave out, and the allocator cap
    (--vram) can make the first call of a kernel fail with out-of-memory. Our matmul weights
    are larger than L2 at the shapes that matter, so the flush changes no ranking there; without
    it, autotuning allocates nothing. `quantiles` is accepted (the autotuner passes it) and
    answered with the same median for each.
    """
    fn()  # compile / first launch outside the timing
    torch.cuda.synchronize()
    for _ in range(warmup):
        fn()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    for s, e in zip(start, end):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(start, end))
    med = times[len(times) // 2]
    return [med] * len(quantiles) if quantiles else med
