"""Triton kernels for the GPU backend; torch wrappers that check shapes, allocate and launch.

Importing this package imports triton but compiles nothing and touches no GPU: kernels compile on
first launch. Under TRITON_INTERPRET=1 (set before triton is imported) they run on CPU tensors.

    qmatmul(x, w_raw, qtype)            quantized GEMV/GEMM on raw GGUF bytes      qmatmul.py
    rms_norm(x, w, eps, residual=None)  RMSNorm, optionally fused residual add     norm.py
    rope(x, cos, sin, neox)             rotary embedding, adjacent or NeoX pairs   rope.py
    swiglu(gate, up, act)               silu(gate) * up (or gelu_tanh)             swiglu.py
    flash_prefill(q, k, v, n_past)      causal GQA flash attention                 attention.py
    flash_decode(q, k, v, n_valid)      split-K flash-decoding for one token       attention.py
    attend_prefill/attend_decode        the same over a stored KV cache layer      attention.py
                                        (f16/f32, q8_0, q4_0, q4g) read in place
    kv_write(x, blocks, pos, fmt)       quantize + store new q8_0/q4_0 cache rows  kv_write.py
    dequantize_rows(w_raw, qtype, ids)  a few dense rows (embedding lookup)        dequant.py

aot.py compiles all of them for sm75/sm80/sm90 without a GPU (ptxas registers and spills).
"""

from .attention import KVOperand, attend_decode, attend_prefill, flash_decode, flash_prefill
from .dequant import dequantize_rows
from .norm import rms_norm
from .qmatmul import qmatmul
from .rope import rope
from .kv_write import kv_write
from .swiglu import swiglu

__all__ = ["KVOperand", "attend_decode", "attend_prefill", "dequantize_rows", "flash_decode", "flash_prefill",
           "kv_write", "qmatmul", "rms_norm", "rope", "swiglu"]
