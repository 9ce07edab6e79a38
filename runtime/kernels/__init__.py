"""Triton kernels for the GPU backend; torch wrappers that check shapes, allocate and launch.

Importing this package imports triton but compiles nothing and touches no GPU: kernels compile on
first launch. Under TRITON_INTERPRET=1 (set before triton is imported) they run on CPU tensors.

    qmatmul(x, w_raw, qtype)            quantized GEMV/GEMM on raw GGUF bytes      qmatmul.py
    rms_norm(x, w, eps, residual=None)  RMSNorm, optionally fused residual add     norm.py
    rope(x, cos, sin, neox)             rotary embedding, adjacent or NeoX pairs   rope.py
    swiglu(gate, up)                    silu(gate) * up                            swiglu.py
    flash_prefill(q, k, v, n_past)      causal GQA flash attention                 attention.py
    flash_decode(q, k, v, n_valid)      split-K flash-decoding for one token       attention.py
    dequantize_rows(w_raw, qtype, ids)  a few dense rows (embedding lookup)        dequant.py

aot.py compiles all of them for sm75/sm80/sm90 without a GPU (ptxas registers and spills).
"""

from .attention import flash_decode, flash_prefill
from .dequant import dequantize_rows
from .norm import rms_norm
from .qmatmul import qmatmul
from .rope import rope
from .swiglu import swiglu

__all__ = ["dequantize_rows", "flash_decode", "flash_prefill", "qmatmul", "rms_norm", "rope", "swiglu"]
