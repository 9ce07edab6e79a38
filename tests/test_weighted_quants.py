"""Importance-weighted rounding (qkvgguf/quants/weighted.py) on real SmolLM2 weights with an
importance matrix collected by convert/imatrix.py through our runtime on real prose.

The SmolLM2 GGUF stores its matrices as Q4_1, so its weights lie on Q4_1's grid, which Q5_1 (half
the step) and nearly Q4_K also contain: those quantizers can reproduce them exactly and the
comparison would say nothing. For those three formats the weights get a small dither (0.3 of a
Q4_1 step, seeded) before quantizing.
"""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

import texts
from qkvgguf import GGUFFile, quants
from qkvgguf.convert.imatrix import collect_imatrix
from qkvgguf.quants.weighted import _plain

FORMATS = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K]
TENSORS = ["blk.3.attn_q.weight", "blk.3.attn_v.weight", "blk.20.ffn_gate.weight",
           "blk.3.ffn_down.weight", "blk.20.ffn_down.weight"]
DITHER = {T.Q4_1, T.Q5_1, T.Q4_K}


@pytest.fixture(scope="module")
def smol(smollm2_path):
    im = collect_imatrix(smollm2_path, texts.sherlock()[:12000], n_ctx=256, n_chunks=2)
    f = GGUFFile(str(smollm2_path))
    weights = {n: quants.dequantize(torch.from_numpy(np.array(f.raw(n))), f.tensors[n].type).numpy() for n in TENSORS}
    return im, weights


def _dither(W, seed=0):
    b = W.reshape(-1, 32)
    step = (b.max(1) - b.min(1)) / 15
    noise = np.random.default_rng(seed).standard_normal(b.shape) * 0.3 * step[:, None]
    return (b + noise).astype(np.float32).reshape(W.shape)


def _deq(raw, qt):
    return quants.dequantize(torch.from_numpy(np.ascontiguousarray(raw)), qt).numpy()


def _werr(W, raw, qt, imp):
    return float((imp[None, :].astype(np.float64) * (W - _deq(raw, qt)) ** 2).sum())


def test_weighted_beats_plain_on_smollm2(smol):
    import gguf.quants

    im, weights = smol
    ratios = {qt: [] for qt in FORMATS}
    for name, W0 in weights.items():
        imp = im.values[name]
        assert imp.shape == (W0.shape[1],) and (imp > 0).all()
        for qt in FORMATS:
            if W0.shape[1] % gguf.constants.GGML_QUANT_SIZES[qt][0]:
                continue  # K-quants: only the 1536-long ffn_down rows
            W = _dither(W0) if qt in DITHER else W0
            rw = quants.quantize(W, qt, imp)
            assert rw.shape == _plain(W, qt).shape and rw.dtype == np.uint8
            # standard ggml layout: gguf's reference dequantizer reads the same values
            np.testing.assert_array_equal(gguf.quants.dequantize(rw, qt).reshape(W.shape), _deq(rw, qt))
            e_w, e_p = _werr(W, rw, qt, imp), _werr(W, _plain(W, qt), qt, imp)
            assert e_w < e_p, (name, qt.name, e_w, e_p)
            ratios[qt].append(e_w / e_p)
    summary = {qt.name: round(float(np.mean(r)), 3) for qt, r in ratios.items()}
    print("weighted / plain importance-weighted error, mean over tensors:", summary)
    assert all(len(r) >= 2 for r in ratios.values())
    # measured: Q4_0 0.68 Q4_1 0.49 Q5_0 0.68 Q5_1 0.49 Q8_0 0.69 Q4_K 0.87 Q5_K 0.62 Q6_K 0.84
    assert max(summary.values()) < 0.95


def test_uniform_imatrix_no_worse_than_plain(smol):
    _, weights = smol
    for name in ["blk.3.attn_v.weight", "blk.3.ffn_down.weight"]:
        for qt in FORMATS:
            W = _dither(weights[name]) if qt in DITHER else weights[name]
            if W.shape[1] % gguf_block(qt):
                continue
            ones = np.ones(W.shape[1], np.float32)
            assert _werr(W, quants.quantize(W, qt, ones), qt, ones) <= _werr(W, _plain(W, qt), qt, ones) * (1 + 1e-6)


def gguf_block(qt):
    from gguf.constants import GGML_QUANT_SIZES

    return GGML_QUANT_SIZES[qt][0]


def test_zero_constant_rows_and_zero_importance(smol):
    im, weights = smol
    W = weights["blk.3.ffn_down.weight"][:8].copy()
    W[0] = 0.0
    W[1] = 0.0375
    W[2, :256] = -1.5
    imp = im.values["blk.3.ffn_down.weight"].copy()
    imp[100:300] = 0.0  # columns never seen by the calibration text
    for qt in FORMATS:
        raw = quants.quantize(W, qt, imp)
        d = _deq(raw, qt)
        assert np.isfinite(d).all(), qt.name
        assert (d[0] == 0).all(), qt.name
        np.testing.assert_allclose(d[1], W[1], rtol=5e-3, err_msg=qt.name)  # f16 (Q6_K: 8-bit) scales of a constant
        np.testing.assert_allclose(d[2, :256], -1.5, rtol=5e-3, err_msg=qt.name)
        # zero-importance columns still get a sensible rounding, not garbage
        err_zero = np.abs(d[3:, 100:300] - W[3:, 100:300]).max()
        assert err_zero <= np.abs(W[3:]).max() * 0.25, (qt.name, err_zero)
        assert _werr(W, raw, qt, imp) <= _werr(W, _plain(W, qt), qt, imp) * (1 + 1e-6)
    # no importance at all (every column zero) falls back to uniform weights
    raw = quants.quantize(W, T.Q4_0, np.zeros(W.shape[1], np.float32))
    assert np.isfinite(_deq(raw, T.Q4_0)).all()


def test_without_imatrix_unchanged(smol):
    _, weights = smol
    W = weights["blk.3.attn_v.weight"]
    for qt in [T.Q4_0, T.Q8_0]:
        np.testing.assert_array_equal(quants.quantize(W, qt), quants.quantize(W, qt, None))


def test_bad_imatrix_shape():
    with pytest.raises(ValueError, match="importance matrix"):
        quants.quantize(np.ones((2, 64), np.float32), T.Q4_0, np.ones(32, np.float32))


def test_row_length_not_a_multiple_of_the_block():
    with pytest.raises(ValueError, match="multiple of 256"):
        quants.quantize(np.ones((2, 576), np.float32), T.Q4_K, np.ones(576, np.float32))
