"""Triton backend ops: the same functions as runtime/ops.py, backed by runtime/kernels.

`Model` picks this module or `ops` once (backend.select_backend); the model code calls
`self.ops.<name>` and never branches on the device. Quantized weights stay in their GGUF bytes
and are dequantized in registers by `qmatmul`; float weights (F32/F16/BF16) use a torch matmul.
"""

from __future__ import annotations

import torch
from gguf import GGMLQuantizationType as T

from . import kernels
from . import ops as torch_ops

FLOAT_TYPES = (T.F32, T.F16, T.BF16)

rope_inv_freq = torch_ops.rope_inv_freq
rope_cos_sin = torch_ops.rope_cos_sin


def linear(x: torch.Tensor, W, name: str, bias: str | None = None) -> torch.Tensor:
    """x (T, in) @ W[name].T -> (T, out) in x's dtype (a CPU-computed unit's: torch_ops.host_linear)."""
    if name in getattr(W, "cpu_computed", ()):  # duck-typed weight mappings need not have it
        return torch_ops.host_linear(x, W, name, bias)
    w = W[name]
    if w.type in FLOAT_TYPES:  # the stored floats as they are: no dequantized or converted copy
        wf = w.float_view()  # fp16 x: an F16/BF16 weight is used in its own dtype, F32 in fp32
        dt = wf.dtype if wf.dtype != torch.float32 and x.dtype == torch.float16 else torch.promote_types(x.dtype, wf.dtype)
        y = (x.to(dt) @ wf.to(dt).T).to(x.dtype)
    else:
        y = kernels.qmatmul(x, w.raw, w.type)
    if bias is not None:
        y = y + W.dense(bias).to(y.dtype)
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    return kernels.rms_norm(x, weight, eps, out_dtype=out_dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """The residual add fused into the norm: one kernel reads x and residual, writes out (x's dtype)
    and h (the residual's dtype: float32, so the stream cannot overflow fp16)."""
    return kernels.rms_norm(x, weight, eps, residual=residual)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return kernels.swiglu(gate, up)


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return kernels.swiglu(gate, up, act="gelu_tanh")


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """x (heads, T, d); the kernel needs a contiguous last dim (views from a (T, heads*d) matmul have it).
    cos/sin stay float32 (the kernel computes in float32), as on the torch path."""
    return kernels.rope(x, cos, sin, neox)


# -- attention over the KV cache (see runtime/ops.py) -----------------------------------------------
def kv_write(store, layer: int, pos, x: torch.Tensor) -> None:
    """Store x (n_kv, T, d) at [pos, pos + T): q8_0/q4_0 rows quantized and stored by one kernel."""
    if isinstance(pos, torch.Tensor):
        store.write_at(layer, pos, x, fused=True)
    else:
        store.write_fused(layer, pos, x)


def kv_read(store, layer: int, end: int) -> kernels.KVOperand:
    """One layer of a store as the flash kernels read it, in place (no float copy)."""
    return store.operand(layer, end)


def attention(q: torch.Tensor, k, v, n_past, window: int = 0, ring: int = 0) -> torch.Tensor:
    """q (n_head, T, d) at [n_past, n_past+T) over the first n_past+T positions of k, v: dense
    (n_kv, >= n_past+T, d) tensors or `KVOperand`s (kv_read); n_past may be a device tensor (T = 1).
    window / ring: a sliding window and a ring of rows, as runtime/ops.py `attention`."""
    kw = dict(window=window, ring=ring)
    if isinstance(k, torch.Tensor):
        if q.shape[1] == 1:
            return kernels.flash_decode(q, k, v, n_past + 1, **kw)
        return kernels.flash_prefill(q, k, v, n_past, **kw)
    if q.shape[1] == 1:
        return kernels.attend_decode(q, k, v, n_past + 1, **kw)
    return kernels.attend_prefill(q, k, v, n_past, **kw)
