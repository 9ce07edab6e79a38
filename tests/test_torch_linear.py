"""qkvgguf.torch.GGUFLinear against dequantize-then-F.linear, for every registered weight type.

The reference is F.linear over `quants.dequantize` of the module's own bytes (bit-exact with
gguf.quants.dequantize, tests/test_quants.py), so what is tested here is the matmul paths: the C++
CPU kernels (fused GEMV up to cpu.GEMV_ROWS rows of x, dequantized tiles + GEMM above) and the Triton
kernels (TRITON_INTERPRET=1 on the CPU, compiled on a GPU), with bias, batch and sequence dims.
Tolerance: element-wise, relative to (|x| @ |W|.T), the scale of any summation order's rounding.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

from qkvgguf.errors import QkvggufError
from qkvgguf.quants import FORMATS, dequantize, quantize
from qkvgguf.torch import GGUFEmbedding, GGUFLinear

TYPES = sorted(FORMATS, key=int)
GPU = torch.cuda.is_available()
TRITON_OK = GPU or os.environ.get("TRITON_INTERPRET") == "1"
IN, OUT = 512, 37  # two 256-blocks (K-quants), 16 32-blocks; an odd number of output rows


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: these matmuls are tiny, and on a loaded 2-core machine an OpenMP pool of 2
    spends 100x the work in its barriers."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _linear(seed: int = 0, bias: bool = True) -> torch.nn.Linear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(IN, OUT, bias=bias)
    with torch.no_grad():
        lin.weight[3].zero_()  # an all-zero row
        lin.weight[5, :32] *= 40.0  # one block of large values
    return lin


def _check(y: torch.Tensor, x: torch.Tensor, q: GGUFLinear, rtol: float) -> None:
    w = q.dequantize()
    ref = F.linear(x.double(), w.double(), None if q.bias is None else q.bias.double())
    scale = x.double().abs() @ w.double().abs().T + 1e-30
    err = ((y.double() - ref).abs() / scale).max().item()
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert err <= rtol, f"{q.weight_type.name}: error {err:.2e} of sum |x||w| > {rtol:g}"


def _count(monkeypatch, module, name: str) -> list:
    """Record the calls of module.name (the path a forward took), calling through."""
    calls, original = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [(3,), (2, 7)], ids=["gemv-3", "batch2x7"])
def test_cpu_matches_dequantized_linear(qtype, rows, monkeypatch):
    from qkvgguf.runtime import cpu

    q = GGUFLinear.from_linear(_linear(), qtype, backend="torch")
    calls = _count(monkeypatch, cpu, "matmul")
    x = torch.randn(*rows, IN)
    _check(q(x), x, q, 2e-6)
    float_type = qtype in (T.F32, T.F16, T.BF16)  # multiplied as stored, no kernel
    assert len(calls) == (0 if float_type else 1)  # quantized: the C++ kernels were asked first


@pytest.mark.skipif(not TRITON_OK, reason="no GPU and TRITON_INTERPRET is not 1")
@pytest.mark.parametrize("qtype", [t for t in TYPES if t not in (T.F32, T.F16, T.BF16)], ids=lambda t: t.name)
@pytest.mark.parametrize("rows", [(1, 3), (2, 5)], ids=["gemv-3", "gemm-2x5"])
def test_triton_matches_dequantized_linear(qtype, rows, monkeypatch):
    pytest.importorskip("triton")
    from qkvgguf.runtime import kernels

    dev = "cuda" if GPU else "cpu"
    q = GGUFLinear.from_linear(_linear(), qtype, backend="triton").to(dev)
    calls = _count(monkeypatch, kernels, "qmatmul")
    x = torch.randn(*rows, IN, device=dev)
    assert q(x).shape == (*rows, OUT) and len(calls) == 1
    # the GEMM rounds fp32 operands to TF32 on sm80+ GPUs: 10-bit mantissas
    _check(q(x).cpu(), x.cpu(), q.cpu(), 2e-3 if GPU and rows[0] > 1 else 2e-6)


def test_no_bias_and_activation_dtypes():
    q = GGUFLinear.from_linear(_linear(bias=False), "Q4_K")
    assert q.bias is None
    x = torch.randn(4, IN)
    _check(q(x), x, q, 2e-6)
    for dt in (torch.bfloat16, torch.float16):  # computed in float32, returned in x's dtype
        y = q(x.to(dt))
        assert y.dtype == dt
        torch.testing.assert_close(y.float(), q(x.to(dt).float()), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0], ids=lambda t: t.name)
def test_from_linear_bytes_equal_gguf_quants(qtype):
    lin = _linear()
    q = GGUFLinear.from_linear(lin, qtype)
    expected = gq.quantize(lin.weight.detach().numpy(), qtype)
    assert np.array_equal(q.qweight.numpy(), expected)
    assert torch.equal(q.bias, lin.bias)


def test_from_linear_with_imatrix_uses_weighted_rounding():
    lin = _linear()
    imatrix = np.random.default_rng(1).gamma(0.5, size=IN).astype(np.float32)
    q = GGUFLinear.from_linear(lin, "Q4_K", imatrix=imatrix)
    expected = quantize(lin.weight.detach().numpy(), T.Q4_K, imatrix)
    assert np.array_equal(q.qweight.numpy(), expected)
    assert not np.array_equal(expected, quantize(lin.weight.detach().numpy(), T.Q4_K))  # the imatrix mattered


def test_state_dict_round_trip_is_byte_exact():
    q = GGUFLinear.from_linear(_linear(), "Q5_K")
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf)
    assert set(sd) == {"qweight", "qtype", "bias"} and int(sd["qtype"]) == int(T.Q5_K)
    other = GGUFLinear(IN, OUT, "Q4_0", bias=True)  # another type: the stored one wins, bytes reshaped
    other.load_state_dict(sd)
    assert other.weight_type == T.Q5_K
    assert other.qweight.shape == q.qweight.shape and torch.equal(other.qweight, q.qweight)
    assert torch.equal(other.bias, q.bias)
    x = torch.randn(2, IN)
    assert torch.equal(other(x), q(x))


def test_state_dict_with_wrong_bytes_is_refused():
    sd = GGUFLinear.from_linear(_linear(), "Q4_0").state_dict()
    sd["qweight"] = sd["qweight"][:, :-1]
    with pytest.raises(RuntimeError, match=r"qweight: Q4_0 \(37, 512\) needs uint8 bytes of shape \(37, 288\)"):
        GGUFLinear(IN, OUT, "Q4_0", bias=True).load_state_dict(sd)


def test_to_moves_blocks_and_casts_only_the_bias():
    q = GGUFLinear.from_linear(_linear(), "Q8_0").to(torch.float16)
    assert q.qweight.dtype == torch.uint8 and q.bias.dtype == torch.float16
    m = q.to("meta")
    assert m.qweight.is_meta and m.qtype.is_meta and m.weight_type == T.Q8_0
    if GPU:
        g = GGUFLinear.from_linear(_linear(), "Q8_0").cuda()
        assert g.qweight.is_cuda and g(torch.randn(2, IN, device="cuda")).is_cuda


def test_bad_sizes_and_types_are_clear_errors():
    with pytest.raises(QkvggufError, match="Q4_K stores rows in blocks of 256 values; a row of 96"):
        GGUFLinear.from_linear(torch.nn.Linear(96, 8), "Q4_K")
    with pytest.raises(QkvggufError, match="'Q9_9' is not a ggml type"):
        GGUFLinear(64, 8, "Q9_9")
    with pytest.raises(QkvggufError, match=r"needs uint8 bytes of shape \(8, 36\)"):
        GGUFLinear(64, 8, "Q4_0", raw=torch.zeros(8, 35, dtype=torch.uint8))


def test_embedding_dequantizes_only_the_rows_looked_up():
    w = torch.randn(50, 256)
    raw = torch.from_numpy(quantize(w.numpy(), T.Q6_K))
    emb = GGUFEmbedding.from_raw(raw, T.Q6_K)
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    assert torch.equal(emb(ids), dequantize(raw, T.Q6_K)[ids])
    assert emb.qweight.data_ptr() == raw.data_ptr()  # no copy of the blocks


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_module_uses_triton_and_matches_cpu(dtype, monkeypatch):
    """backend="auto" on a CUDA device: the Triton kernels, output in x's dtype, close to the CPU path."""
    from qkvgguf.runtime import kernels

    cpu_q = GGUFLinear.from_linear(_linear(), "Q4_K")
    gpu_q = GGUFLinear.from_linear(_linear(), "Q4_K").cuda().to(dtype)
    calls = _count(monkeypatch, kernels, "qmatmul")
    for rows in ((1, 1), (3, 40)):  # GEMV and a prompt-sized batch
        x = torch.randn(*rows, IN)
        y = gpu_q(x.cuda().to(dtype))
        assert y.dtype == dtype and y.is_cuda
        torch.testing.assert_close(y.float().cpu(), cpu_q(x), rtol=2e-2, atol=2e-2)
    assert len(calls) == 2
