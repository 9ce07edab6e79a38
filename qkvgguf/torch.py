"""`qkvgguf.torch`: GGUF weights as PyTorch modules (the implementation lives in runtime/nn.py).

    from qkvgguf.torch import GGUFLinear
    q = GGUFLinear.from_linear(torch.nn.Linear(4096, 4096), "Q4_K")   # 4.5 bits per weight, stays so
    y = q(x)                                                          # Triton on CUDA, C++ on the CPU
"""

from qkvgguf.runtime.nn import (GGUFEmbedding, GGUFLinear, as_qtype, gguf_modules, qmatmul, quantize_weight,
                                row_bytes)

__all__ = ["GGUFEmbedding", "GGUFLinear", "as_qtype", "gguf_modules", "qmatmul", "quantize_weight", "row_bytes"]
