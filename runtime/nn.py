"""GGUF weights as PyTorch modules: a quantized `nn.Linear` and `nn.Embedding` that keep the blocks.

    GGUFLinear(in_features, out_features, qtype, bias=False)   y = x @ dequant(qweight).T + bias
    GGUFLinear.from_linear(linear, qtype, imatrix=None)        quantize an existing nn.Linear (qkvgguf.quants;
                                                               gguf.quants for types we only decode)
    GGUFLinear.from_raw(raw, qtype, bias=None)                 wrap GGUF bytes as they are (no copy)
    GGUFEmbedding.from_raw(raw, qtype)                         rows dequantized only when looked up

Buffers (what `state_dict` holds, what `.to(device)` moves):

    qweight  uint8 (out_features, in_features / block_size * type_size)  the GGUF blocks, one row
             per output feature, exactly as a GGUF file stores the tensor (`GGUFFile.raw`)
    qtype    int64 scalar: the ggml type (gguf.GGMLQuantizationType), any type of qkvgguf.quants
    bias     float (out_features,), a Parameter as in nn.Linear (GGUFLinear only)

Loading a state_dict takes the stored type and bytes even where the module was built with another
type (the byte shape follows the type); `.to(dtype)` / `.half()` leave the blocks alone (uint8) and
set the dtype of the bias and of nothing else.

The matmul (`qmatmul`) goes where the runtime's goes (runtime/ops.py, ops_triton.py):
- CUDA with Triton (backend.select_backend): kernels/qmatmul.py reads the blocks in place and
  dequantizes in registers; F32/F16/BF16 weights multiply as stored;
- CPU: runtime/cpu's compiled kernels read the blocks in place (a fused dequant-dot for up to
  cpu.GEMV_ROWS rows of x, dequantized tiles and torch's GEMM above);
- anything else (a type without a kernel there, no compiler, no Triton): the weight dequantized to
  float32 for that call only, with one log line per (type, device kind) saying so.
`backend="triton"` forces the Triton kernels on any device (on the CPU only under
TRITON_INTERPRET=1: the tests), `backend="torch"` the CPU/dequantize path. Activations of any float
dtype go in; the output has x's dtype, computed in float32 (CPU) or x's dtype with float32
accumulation (Triton, fp16/fp32 x; bf16 x goes through fp32).
"""

from __future__ import annotations

import functools
import logging
import warnings

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from qkvgguf.errors import QkvggufError
from qkvgguf.quants import dequantize, get_format, quantize

from . import cpu
from .backend import BACKENDS, select_backend
from .weights import QTensor

log = logging.getLogger(__name__)

FLOAT_TYPES = (T.F32, T.F16, T.BF16)
_TORCH_FLOATS = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}
_fallbacks_logged: set = set()


def as_qtype(qtype) -> T:
    """A ggml type from a GGMLQuantizationType, its int value or its name ("Q4_K", "q4_k")."""
    try:
        if isinstance(qtype, str):
            return T[qtype.upper()]
        return T(int(qtype))
    except (KeyError, ValueError):
        raise QkvggufError(f"'{qtype}' is not a ggml type") from None


def row_bytes(row_len: int, qtype) -> int:
    """Bytes of one row of `row_len` values in qtype; a QkvggufError when blocks do not fit the row."""
    fmt = get_format(as_qtype(qtype))
    if row_len % fmt.block_size:
        raise QkvggufError(f"{fmt.type.name} stores rows in blocks of {fmt.block_size} values; "
                           f"a row of {row_len} is not a whole number of blocks")
    return row_len // fmt.block_size * fmt.type_size


def _torch_from_numpy(array: np.ndarray) -> torch.Tensor:
    with warnings.catch_warnings():  # a read-only memory map: nothing writes through these views
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def quantize_weight(weight: torch.Tensor, qtype, imatrix=None) -> torch.Tensor:
    """float (rows, row_len) -> GGUF blocks (rows, row_bytes) uint8 on weight's device: qkvgguf.quants
    (importance-weighted with imatrix (row_len,)), gguf.quants for types our registry only decodes."""
    qtype = as_qtype(qtype)
    weight = weight.detach()
    row_bytes(weight.shape[1], qtype)  # the clear error before any work
    if imatrix is not None:
        imatrix = np.asarray(torch.as_tensor(imatrix).detach().cpu(), dtype=np.float32)
        if imatrix.shape != (weight.shape[1],):
            raise QkvggufError(f"imatrix has shape {imatrix.shape}, expected ({weight.shape[1]},): one per input column")
    values = np.ascontiguousarray(weight.to("cpu", torch.float32).numpy())
    if get_format(qtype).quantize is None and imatrix is None:  # Q5_0, Q5_1
        import gguf.quants

        data = gguf.quants.quantize(values, qtype)
    else:
        data = quantize(values, qtype, imatrix)
    return torch.from_numpy(np.ascontiguousarray(data)).to(weight.device)


def _fallback(qtype: T, where: str) -> None:
    if (qtype, where) not in _fallbacks_logged:
        _fallbacks_logged.add((qtype, where))
        log.info("GGUFLinear: no %s kernel for %s, multiplying by the dequantized float32 weight", where, qtype.name)


@functools.lru_cache(maxsize=None)
def _use_triton(device: torch.device, backend: str) -> bool:
    """Asked once per (device, backend): the answer does not change within a process."""
    if backend == "torch":
        return False
    if backend == "triton":
        select_backend("triton", device)  # a QkvggufError saying why not, if it cannot
        return True
    return device.type == "cuda" and select_backend("auto", device) == "triton"


def qmatmul(x: torch.Tensor, raw: torch.Tensor, qtype: T, backend: str = "auto") -> torch.Tensor:
    """x (M, K) float @ dequant(raw (N, row_bytes) uint8, qtype).T -> (M, N) in x's dtype."""
    if qtype in FLOAT_TYPES:  # stored floats: multiply as they are (no dequantized copy)
        w = raw.view(_TORCH_FLOATS[qtype]).view(raw.shape[0], -1)
        dt = torch.promote_types(x.dtype, w.dtype)
        return (x.to(dt) @ w.to(dt).T).to(x.dtype)
    if _use_triton(raw.device, backend):
        from . import kernels
        from .kernels.dequant import LAYOUTS

        if qtype in LAYOUTS:
            xk = x if x.dtype in (torch.float16, torch.float32) else x.float()
            return kernels.qmatmul(xk, raw, qtype).to(x.dtype)
        _fallback(qtype, "Triton")
    elif raw.device.type == "cpu":
        y = cpu.matmul(x, QTensor("GGUFLinear", qtype, (raw.shape[0], x.shape[1]), raw))
        if y is not None:
            return y.to(x.dtype)
        _fallback(qtype, "CPU")
    return (x.float() @ dequantize(raw, qtype).T).to(x.dtype)


class _GGUFModule(torch.nn.Module):
    """The buffers and state_dict rules shared by GGUFLinear and GGUFEmbedding."""

    qweight: torch.Tensor
    qtype: torch.Tensor

    def _init_blocks(self, rows: int, row_len: int, qtype, raw: torch.Tensor | None, device=None) -> None:
        qtype = as_qtype(qtype)
        shape = (rows, row_bytes(row_len, qtype))
        if raw is None:
            raw = torch.zeros(shape, dtype=torch.uint8, device=device)
        elif raw.dtype != torch.uint8 or tuple(raw.shape) != shape:
            raise QkvggufError(f"{qtype.name} weight ({rows}, {row_len}) needs uint8 bytes of shape {shape}, "
                               f"got {tuple(raw.shape)} {raw.dtype}")
        self.register_buffer("qweight", raw)
        self.register_buffer("qtype", torch.tensor(int(qtype), dtype=torch.int64, device=raw.device))
        self._type = qtype  # the buffer's value, kept on the host: no device sync per forward

    @property
    def weight_type(self) -> T:
        return self._type

    @property
    def weight_shape(self) -> tuple[int, int]:
        """(rows, row length) of the weight the blocks encode: nn.Linear's (out, in)."""
        return self.qweight.shape[0], self._row_len

    def dequantize(self) -> torch.Tensor:
        """The weight as float32 (rows, row_len): for checks and exports, not for the forward pass."""
        return dequantize(self.qweight, self.weight_type)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Take the stored type, and bytes of the shape that type gives, whatever this module held."""
        kq, kt = prefix + "qweight", prefix + "qtype"
        if kq in state_dict and kt in state_dict:
            raw, qtype = state_dict[kq], state_dict[kt]
            try:
                qtype = as_qtype(int(qtype))
                shape = (self.qweight.shape[0], row_bytes(self._row_len, qtype))
            except QkvggufError as e:
                error_msgs.append(f"{kq}: {e}")
                return
            if raw.dtype != torch.uint8 or tuple(raw.shape) != shape:
                error_msgs.append(f"{kq}: {qtype.name} ({shape[0]}, {self._row_len}) needs uint8 bytes of shape "
                                  f"{shape}, got {tuple(raw.shape)} {raw.dtype}")
                return
            if tuple(self.qweight.shape) != shape or self.qweight.is_meta:
                device = self.qweight.device if not self.qweight.is_meta else raw.device
                self._buffers["qweight"] = torch.empty(shape, dtype=torch.uint8, device=device)
            if self.qtype.is_meta:
                self._buffers["qtype"] = torch.empty((), dtype=torch.int64, device=self.qweight.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if not self.qtype.is_meta:
            self._type = T(int(self.qtype))


class GGUFLinear(_GGUFModule):
    """nn.Linear with its weight kept as GGUF blocks (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, qtype, bias: bool = False, device=None, dtype=None,
                 *, raw: torch.Tensor | None = None, backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise QkvggufError(f"backend '{backend}' is not one of {', '.join(BACKENDS)}")
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        self._init_blocks(out_features, in_features, qtype, raw, device)
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(out_features, device=self.qweight.device,
                                                       dtype=dtype or torch.float32))
        else:
            self.register_parameter("bias", None)

    @property
    def _row_len(self) -> int:
        return self.in_features

    @classmethod
    def from_raw(cls, raw: torch.Tensor | np.ndarray, qtype, bias: torch.Tensor | None = None,
                 backend: str = "auto") -> "GGUFLinear":
        """Wrap GGUF bytes (out_features, row_bytes) uint8 as they are, without a copy (a memory map
        stays a memory map); bias (out_features,) float, copied into a Parameter."""
        if isinstance(raw, np.ndarray):
            raw = _torch_from_numpy(raw)
        qtype = as_qtype(qtype)
        fmt = get_format(qtype)
        if raw.dim() != 2 or raw.shape[1] % fmt.type_size:
            raise QkvggufError(f"{qtype.name} bytes must be 2-D rows of whole {fmt.type_size}-byte blocks, "
                               f"got {tuple(raw.shape)}")
        in_features = raw.shape[1] // fmt.type_size * fmt.block_size
        module = cls(in_features, raw.shape[0], qtype, bias=bias is not None, raw=raw, backend=backend,
                     dtype=bias.dtype if bias is not None else None)
        if bias is not None:
            with torch.no_grad():
                module.bias.copy_(bias)
        return module

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, qtype, imatrix: np.ndarray | torch.Tensor | None = None,
                    backend: str = "auto") -> "GGUFLinear":
        """Quantize an nn.Linear (qkvgguf.quants.quantize: bit-exact with gguf.quants without an imatrix;
        importance-weighted rounding with one: imatrix (in_features,), mean x_j^2 per input column)."""
        qtype = as_qtype(qtype)
        raw = quantize_weight(linear.weight, qtype, imatrix)
        bias = linear.bias.detach() if linear.bias is not None else None
        return cls.from_raw(raw, qtype, bias, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in_features) -> (..., out_features)
        lead = x.shape[:-1]
        y = qmatmul(x.reshape(-1, self.in_features), self.qweight, self.weight_type, self.backend)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"qtype={self.weight_type.name}, bias={self.bias is not None}")


class GGUFEmbedding(_GGUFModule):
    """nn.Embedding over GGUF blocks: a lookup dequantizes only the rows it gathers (float32, or
    `dtype`), so the table costs its file size. Shares its bytes with a tied GGUFLinear head."""

    def __init__(self, num_embeddings: int, embedding_dim: int, qtype, device=None, *,
                 raw: torch.Tensor | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.dtype = num_embeddings, embedding_dim, dtype
        self._init_blocks(num_embeddings, embedding_dim, qtype, raw, device)

    @property
    def _row_len(self) -> int:
        return self.embedding_dim

    @classmethod
    def from_raw(cls, raw: torch.Tensor | np.ndarray, qtype, dtype: torch.dtype = torch.float32) -> "GGUFEmbedding":
        if isinstance(raw, np.ndarray):
            raw = _torch_from_numpy(raw)
        qtype = as_qtype(qtype)
        fmt = get_format(qtype)
        return cls(raw.shape[0], raw.shape[1] // fmt.type_size * fmt.block_size, qtype, raw=raw, dtype=dtype)

    @classmethod
    def from_embedding(cls, embedding: torch.nn.Embedding, qtype, imatrix=None) -> "GGUFEmbedding":
        """Quantize an nn.Embedding (rows = tokens); lookups return embedding's dtype."""
        raw = quantize_weight(embedding.weight, qtype, imatrix)
        return cls.from_raw(raw, qtype, dtype=embedding.weight.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: (...) int -> (..., embedding_dim)
        rows = dequantize(self.qweight[ids.reshape(-1).to(self.qweight.device)], self.weight_type)
        return rows.to(self.dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.weight_type.name}"


def gguf_modules(model: torch.nn.Module) -> dict[str, _GGUFModule]:
    """The GGUF modules of a model by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _GGUFModule)}


__all__ = ["GGUFEmbedding", "GGUFLinear", "as_qtype", "gguf_modules", "qmatmul", "quantize_weight", "row_bytes"]
