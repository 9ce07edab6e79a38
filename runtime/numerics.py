"""What arithmetic the weight matmuls use (`--numerics`, Model(numerics=)): one dispatch point.

    exact     float32 activations times the exactly dequantized weights, float32 sums (default)
    llamacpp  activations rounded first as llama.cpp's CPU backend rounds them (runtime/llamacpp_numerics.py):
              reproduces its logits on the same file
    bf16      prompt matmuls on the CPU (more than cpu.GEMV_ROWS rows) in bfloat16: activations and
              dequantized weight tiles rounded to bfloat16 (nearest, ties to even), float32 sums in oneDNN's
              GEMM (AMX tiles where the CPU has them), the output rounded to bfloat16 and widened. Decode
              rows, attention, norms and the residual stream stay float32. On a CPU with AMX it runs a
              prompt's matmuls 2-5x faster than float32 (benchmarks/cpu_prompt.py); its rounding moves
              the output distributions 5-9x less than llama.cpp's 8-bit activation rounding does
              (benchmarks/RESULTS.md "CPU prompt in bfloat16": perplexity and KL divergence against exact)

A mode is a wrapper around a backend's ops module that replaces `linear` and leaves every other op as
it is. bf16 needs the compiled CPU kernels (runtime/cpu): without them (no C++ compiler,
QKVGGUF_CPU_KERNELS=0) it computes as exact, and on CUDA it changes nothing (Triton's activations are
float16 there).
"""

from __future__ import annotations

import torch

from qkvgguf.errors import QkvggufError

from . import cpu
from .llamacpp_numerics import LlamacppOps

NUMERICS = ("exact", "llamacpp", "bf16")


class Bf16PromptOps:
    """A backend's ops with the CPU prompt matmuls in bfloat16 (see the module docstring). Weights the
    planner computes on the host, float32 copies from --cpu-cache and decode rows keep float32."""

    def __init__(self, base):
        self.base = base

    def __getattr__(self, name):
        return getattr(self.base, name)

    def linear(self, x: torch.Tensor, W, name: str, bias: str | None = None) -> torch.Tensor:
        # where ops.linear would call cpu.matmul, call it with bf16 (which leaves decode rows as they are)
        if x.device.type != "cpu" or name in getattr(W, "cpu_computed", ()) or W.cache.peek(name) is not None:
            return self.base.linear(x, W, name, bias)
        y = cpu.matmul(x, W[name], bf16=True)
        if y is None:  # no CPU kernel for this tensor's type
            return self.base.linear(x, W, name, bias)
        if bias is not None:
            y = y + W.dense(bias)
        return y


def numerics_ops(ops, numerics: str, dtype: torch.dtype = torch.float32):
    """The ops a Model runs for --numerics: the backend's own ("exact") or wrapped ("llamacpp", which
    needs float32 activations: the rounded values are not float16 numbers; "bf16", which changes only
    float32 CPU matmuls and leaves a float16 GPU backend as it is)."""
    if numerics not in NUMERICS:
        raise QkvggufError(f"--numerics must be one of {', '.join(NUMERICS)}, got '{numerics}'")
    if numerics == "llamacpp" and dtype != torch.float32:
        raise QkvggufError("--numerics llamacpp reproduces llama.cpp's CPU backend and needs float32 activations; "
                           "the Triton backend computes in float16 (use --device cpu or --backend torch)")
    if numerics == "llamacpp":
        return LlamacppOps(ops)
    return Bf16PromptOps(ops) if numerics == "bf16" else ops
