"""--numerics llamacpp (runtime/llamacpp_numerics.py): matmul inputs rounded as llama.cpp's CPU backend
rounds them, checked against ggml's own kernels (libggml-cpu of llama-cpp-python, through ctypes:
tests/llamacpp.py) — its conversion of activations (from_float) value for value, and its dot products
(vec_dot) for every registered weight type. Model-level agreement with llama.cpp on whole files is in
test_hf_interop.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

import llamacpp
from qkvgguf.errors import QkvggufError
from qkvgguf.quants import FORMATS, dequantize, quantize
from qkvgguf.runtime import llamacpp_numerics as LN
from qkvgguf.runtime import ops as torch_ops
from qkvgguf.runtime.numerics import numerics_ops
from qkvgguf.runtime.weights import QTensor

needs_ggml = pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python (the [dev] extra) not installed")


def _rows(n: int, K: int, seed: int = 0) -> np.ndarray:
    """Rows with what breaks a block quantizer: a zero block, a block whose largest magnitude is
    negative, values on exact half steps of the grid, tiny and huge scales."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, K)) * 10.0 ** rng.integers(-3, 4, (n, 1))).astype(np.float32)
    x[0, :256] = 0.0
    x[1, :32] = np.arange(32, dtype=np.float32) - 31.0  # max |x| = 31 and negative
    x[2, :256] = np.arange(256) % 32 - 15.5  # with a largest magnitude of 127 the scale is 1: exact ties at .5
    x[2, :256:32] = -127.0
    return x


def _ggml_values(act: int, blocks: np.ndarray, K: int) -> tuple[np.ndarray, np.ndarray | None]:
    """ggml's Q8_0 / Q8_1 / Q8_K bytes of one row -> the values d * q (float32), and Q8_1's s."""
    if act in (T.Q8_0, T.Q8_1):
        b = blocks.reshape(K // 32, 36 if act == T.Q8_1 else 34)
        d = b[:, 0:2].copy().view(np.float16).astype(np.float32)
        off = 4 if act == T.Q8_1 else 2
        q = b[:, off:off + 32].copy().view(np.int8).astype(np.float32)
        s = b[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0] if act == T.Q8_1 else None
        return (q * d).reshape(K), s
    b = blocks.reshape(K // 256, -1)  # block_q8_K: float d, int8 qs[256], int16 bsums[16]
    d = b[:, 0:4].copy().view(np.float32)
    q = b[:, 4:260].copy().view(np.int8).astype(np.float32)
    return (q * d).reshape(K), None


@needs_ggml
def test_act_type_is_ggml_vec_dot_type():
    """Each registered type's act_type is the vec_dot_type ggml's CPU backend uses for it (F32: none)."""
    for fmt in FORMATS.values():
        want = llamacpp.vec_dot_type(fmt.type)
        assert (fmt.act_type if fmt.act_type is not None else T.F32) == want, fmt.name


@needs_ggml
@pytest.mark.parametrize("act", [T.Q8_0, T.Q8_1, T.Q8_K], ids=["q8_0", "q8_1", "q8_k"])
def test_rounding_equals_ggml_from_float(act):
    """round_activations gives ggml's rounded values bit for bit (and Q8_1's per-block sum s)."""
    K = 512
    x = _rows(8, K)
    ours, fix = LN.round_activations(torch.from_numpy(x), act)
    for r in range(len(x)):
        want, s = _ggml_values(act, llamacpp.from_float(act, x[r]), K)
        np.testing.assert_array_equal(ours[r].numpy(), want, err_msg=f"row {r}")
        if act == T.Q8_1:  # our min term is m * (f16(d) * sum q + fix): llama.cpp's m * s
            blocks = llamacpp.from_float(act, x[r]).reshape(K // 32, 36)
            fd = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)[:, 0]
            qsum = blocks[:, 4:36].copy().view(np.int8).astype(np.float32).sum(1)
            np.testing.assert_allclose(fd * qsum + fix[r].numpy(), s, rtol=1e-6, atol=1e-30, err_msg=f"row {r}")
    assert (act == T.Q8_1) == (fix is not None)


def test_rounded_values_lie_on_the_grid():
    """Without ggml: every value is q * scale with |q| <= 127 and one scale per block, the block's
    largest magnitude maps to 127 (Q8_0) or -127 (Q8_K: the signed largest value sets the scale)."""
    x = torch.from_numpy(_rows(4, 512, seed=1))
    for act, block in ((T.Q8_0, 32), (T.Q8_K, 256)):
        r, _ = LN.round_activations(x, act)
        xb, rb = x.view(4, -1, block), r.view(4, -1, block)
        top = xb.abs().argmax(-1, keepdim=True)
        scale = rb.gather(-1, top).abs() / 127
        nz = scale[..., 0] > 0
        q = rb[nz] / scale[nz]
        assert (q - q.round()).abs().max() < 1e-3 and q.abs().max() <= 127 + 1e-3
        assert torch.equal(r.view(4, -1, block)[~nz], torch.zeros_like(rb[~nz]))
        assert (r - x).abs().max() > 0  # it rounds
    assert torch.equal(LN.round_activations(x, T.F16)[0], x.half().float())


class _W(dict):
    """The weights mapping ops.linear reads: QTensors by name, no float32 cache."""

    class cache:  # noqa: N801
        @staticmethod
        def peek(name):
            return None

    def dense(self, name):
        return self[name].dequantize()


@needs_ggml
@pytest.mark.parametrize("qtype", [f.type for f in FORMATS.values() if f.type != T.F32],
                         ids=[f.name for f in FORMATS.values() if f.type != T.F32])
def test_linear_equals_ggml_vec_dot(qtype):
    """LlamacppOps.linear over the CPU kernels equals ggml's dot products (its rounding of x, its
    integer dots) to float32 summation order, for every registered type; the exact linear does not."""
    N, K = 6, 512
    rng = np.random.default_rng(int(qtype))
    w = rng.standard_normal((N, K)).astype(np.float32)
    raw = quantize(w, qtype)
    W = _W({"w": QTensor("w", T(qtype), (N, K), torch.from_numpy(raw))})
    x = _rows(3, K, seed=int(qtype))[1:]  # a row with half steps, a random row
    x = np.concatenate([x, rng.standard_normal((1, K)).astype(np.float32)])
    ours = LN.LlamacppOps(torch_ops).linear(torch.from_numpy(x), W, "w").numpy()
    exact = torch_ops.linear(torch.from_numpy(x), W, "w").numpy()
    want = np.array([[llamacpp.vec_dot(qtype, raw[n], x[t]) for n in range(N)] for t in range(len(x))])
    wd = dequantize(torch.from_numpy(raw), qtype).numpy()
    scale = np.abs(x) @ np.abs(wd).T  # the size of the terms summed
    assert np.abs(ours - want).max() <= 2e-6 * scale.max(), FORMATS[qtype].name
    assert np.abs(exact - want).max() > 10 * np.abs(ours - want).max(), FORMATS[qtype].name


def test_model_numerics_choice(tmp_path):
    """Model(numerics=...): "llamacpp" wraps the backend's ops without the one-call decode block;
    anything else, or float16 activations, is refused with a one-line error."""
    import tiny_models

    from qkvgguf import GGUFFile
    from qkvgguf.runtime import Model

    path = tmp_path / "m.gguf"
    tiny_models.write_gguf(tiny_models.hf_model("llama"), "llama", str(path), qtypes=[T.Q8_0, T.Q4_1])
    gguf = GGUFFile(path)
    exact, rounded = Model(gguf), Model(gguf, numerics="llamacpp")
    assert rounded.decode_block is None and isinstance(rounded.ops, LN.LlamacppOps)
    ids = torch.tensor([1, 5, 9, 2])
    a = exact.forward(ids, exact.new_cache(8), logits="all")
    b = rounded.forward(ids, rounded.new_cache(8), logits="all")
    assert 1e-5 < float((a - b).abs().max() / a.abs().max()) < 0.05
    with pytest.raises(QkvggufError, match="numerics"):
        Model(gguf, numerics="fast")
    with pytest.raises(QkvggufError, match="float32"):  # the Triton backend's float16 activations
        numerics_ops(torch_ops, "llamacpp", torch.float16)
    assert math.isfinite(float(b.sum()))
