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


def graph_time_ms(fn, calls: int = 1, reps: int = 20) -> float:
    """Median milliseconds of one fn() on the GPU, timed by replaying a CUDA graph of `calls` calls.

    Timing each call with events around an ordinary launch measures the host's launch overhead
    whenever the kernel is shorter than it (a decode GEMV takes a few microseconds; a Triton launch
    from Python costs tens): replaying a captured graph leaves only GPU time (plus one graph launch
    per replay, spread over `calls`). fn must be capturable: no host synchronization, no compile
    (it is called once before capture, outside it)."""
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    del graph
    return sorted(times)[len(times) // 2]


def autotune_bench(fn, quantiles=None) -> float:
    """Median milliseconds of fn(), for `triton.autotune(do_bench=...)`: `graph_time_ms`.

    Triton's default benchmarker times ordinary launches (host overhead included: for a decode
    GEMV the ranking is then mostly noise) and flushes L2 before each run through a 256 MB buffer,
    memory the VRAM planner never gave out (with the --vram allocator cap, the first call of a
    kernel could fail with out-of-memory). Our matmul weights are larger than L2 at the shapes that
    matter, so the flush changes no ranking there. `quantiles` is accepted (the autotuner passes
    it) and answered with the median for each.
    """
    med = graph_time_ms(fn, calls=1, reps=20)
    return [med] * len(quantiles) if quantiles else med
