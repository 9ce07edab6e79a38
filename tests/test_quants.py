"""Quant formats against gguf.quants: bit-exact torch dequantization and numpy quantization.

"Bit-exact" means equal float32 bit patterns, -0.0 and +0.0 told apart; NaNs only have to be NaN
where the reference has NaN (torch quiets signalling f16 NaNs, numpy keeps their payload).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

import qkvgguf.quants as Q
from qkvgguf.errors import UnsupportedError

ALL = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K,
       T.Q2_K, T.Q3_K, T.IQ4_NL, T.IQ4_XS]
QUANTIZABLE = [T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q8_0]  # gguf.quants has a reference quantizer
KQUANTIZABLE = [T.Q4_K, T.Q5_K, T.Q6_K,  # ours only; tests/test_kquants_quantize.py checks them vs llama.cpp
                T.Q2_K, T.Q3_K, T.IQ4_NL, T.IQ4_XS]  # and tests/test_lowbit_quantize.py these
# byte offsets of the f16 scales inside one block
F16_FIELDS = {T.F16: [0], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
              T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208], T.Q2_K: [80, 82], T.Q3_K: [108],
              T.IQ4_NL: [0], T.IQ4_XS: [0]}
# f16 bit patterns: +inf, -inf, quiet NaN, signalling NaN, smallest/largest subnormal, -0, max, min normal
F16_SPECIALS = [0x7C00, 0xFC00, 0x7E00, 0x7C01, 0x0001, 0x03FF, 0x8000, 0x7BFF, 0x0400]


def assert_same_bits(ours, ref) -> None:
    ours = ours.numpy() if isinstance(ours, torch.Tensor) else np.asarray(ours)
    ref = np.asarray(ref)
    assert ours.dtype == np.float32 and ref.dtype == np.float32, (ours.dtype, ref.dtype)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    nan_ours, nan_ref = np.isnan(ours), np.isnan(ref)
    assert np.array_equal(nan_ours, nan_ref), f"NaN at {np.argwhere(nan_ours != nan_ref)[:5].tolist()}"
    a, b = ours[~nan_ours].view(np.uint32), ref[~nan_ref].view(np.uint32)
    bad = np.flatnonzero(a != b)
    assert bad.size == 0, (f"{bad.size} of {a.size} values differ, first: "
                           f"{ours[~nan_ours][bad[:4]].tolist()} vs {ref[~nan_ref][bad[:4]].tolist()}")


def ref_dequantize(raw: np.ndarray, qtype: T) -> np.ndarray:
    with np.errstate(all="ignore"):  # random scales make inf * 0 on purpose
        return np.asarray(gq.dequantize(raw, qtype), dtype=np.float32)


def ref_quantize(values: np.ndarray, qtype: T) -> np.ndarray:
    """gguf.quants.quantize as bytes (it returns F32/F16 as float arrays)."""
    with np.errstate(all="ignore"):  # f16 scales overflowing to inf, on purpose
        out = np.ascontiguousarray(gq.quantize(values, qtype))
    return out.view(np.uint8).reshape(values.shape[0], -1)


def our_dequantize(raw: np.ndarray, qtype: T) -> torch.Tensor:
    out = Q.dequantize(torch.from_numpy(raw), qtype)
    assert out.dtype == torch.float32 and out.is_contiguous()
    return out


def random_blocks(qtype: T, rows: int, n_blocks: int, seed: int) -> np.ndarray:
    """Random bytes, a zero block at [0, 0], and special f16 values planted in the scale fields."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, n_blocks, type_size), dtype=np.uint8)
    raw[0, 0] = 0
    for k, bits in enumerate(F16_SPECIALS):
        for offset in F16_FIELDS.get(qtype, []):
            row, block = divmod(1 + k, n_blocks)
            if row < rows:
                raw[row, block, offset:offset + 2] = np.array([bits], dtype=np.uint16).view(np.uint8)
    return raw.reshape(rows, n_blocks * type_size)


# -- layout table ---------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_layout_matches_gguf(qtype):
    fmt = Q.get_format(qtype)
    assert (fmt.block_size, fmt.type_size) == GGML_QUANT_SIZES[qtype]
    assert (fmt.quantize is not None) == (qtype in QUANTIZABLE + KQUANTIZABLE)


def test_unsupported_type_is_named():
    with pytest.raises(UnsupportedError, match="IQ2_XXS"):
        Q.get_format(T.IQ2_XXS)
    with pytest.raises(UnsupportedError, match="IQ2_XXS"):  # neither qkvgguf nor gguf.quants quantize it
        Q.quantize(np.zeros((1, 256), np.float32), T.IQ2_XXS)


def test_selector_falls_back_to_gguf_quants_and_says_so(caplog):
    """Q5_0 has no quantizer of ours: the registry's selector takes gguf.quants' and logs it once."""
    import gguf.quants

    from qkvgguf.quants import registry

    registry._LOGGED.clear()
    x = np.random.default_rng(5).standard_normal((3, 64)).astype(np.float32)
    with caplog.at_level("INFO", logger="qkvgguf.quants.registry"):
        got = Q.quantize(x, T.Q5_0)
        Q.quantize(x, T.Q5_0)
    assert np.array_equal(got, gguf.quants.quantize(x, T.Q5_0))
    assert [r.getMessage() for r in caplog.records] == ["Q5_0: no qkvgguf quantizer, quantized by gguf.quants"]


# -- dequantization -------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
@pytest.mark.parametrize("rows, n_blocks", [(1, 1), (3, 5), (7, 12)])
def test_dequantize_random_bytes(qtype, rows, n_blocks):
    raw = random_blocks(qtype, rows, n_blocks, seed=rows * 100 + n_blocks)
    assert_same_bits(our_dequantize(raw, qtype), ref_dequantize(raw, qtype))


@pytest.mark.parametrize("qtype", [T.F16, T.BF16], ids=lambda t: t.name)
def test_dequantize_every_16_bit_pattern(qtype):
    raw = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.uint8).reshape(64, -1)
    assert_same_bits(our_dequantize(raw, qtype), ref_dequantize(raw, qtype))


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_dequantize_all_zero(qtype):
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    raw = np.zeros((2, 3 * type_size), np.uint8)
    out = our_dequantize(raw, qtype)
    assert out.shape == (2, 3 * block_size) and (out == 0).all()
    assert_same_bits(out, ref_dequantize(raw, qtype))  # d * (0 - 8) = -0.0 in Q4_0: signs count


def realistic_bytes(qtype: T, rows: int, row_len: int, seed: int) -> np.ndarray:
    """Bytes as a real model has them: gguf's own quantizer where it has one, else plausible scales."""
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal((rows, row_len)) * 0.05).astype(np.float32)
    if qtype in (T.Q2_K, T.Q3_K, T.IQ4_NL, T.IQ4_XS):
        return Q.quantize(values, qtype)  # ours: bytes equal llama.cpp's (test_lowbit_quantize.py)
    if qtype not in (T.Q4_K, T.Q5_K, T.Q6_K):
        return ref_quantize(values, qtype)
    raw = random_blocks(qtype, rows, row_len // 256, seed).reshape(rows, row_len // 256, -1)
    for offset in F16_FIELDS[qtype]:  # small positive f16 super-block scales
        d = (rng.random((rows, row_len // 256, 1)) * 1e-3).astype(np.float16)
        raw[..., offset:offset + 2] = d.view(np.uint8)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_dequantize_realistic(qtype):
    raw = realistic_bytes(qtype, rows=9, row_len=768, seed=3)
    ours = our_dequantize(raw, qtype)
    assert np.isfinite(ours.numpy()).all()
    assert_same_bits(ours, ref_dequantize(raw, qtype))


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_dequantize_row_subsets_read_only(qtype):
    raw = realistic_bytes(qtype, rows=10, row_len=512, seed=4)
    raw.flags.writeable = False  # like a memory map opened read-only
    before = raw.copy()
    with warnings.catch_warnings():  # torch warns (once) about non-writable arrays; we only read
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(raw)
    out = Q.dequantize(t, qtype)
    full = out.numpy().copy()
    out.fill_(7.0)  # the output is the caller's, never a view of the (read-only) bytes
    ids = torch.tensor([7, 0, 7, 3])
    assert_same_bits(Q.dequantize(t[ids], qtype), full[ids.numpy()])  # gathered (a copy)
    assert_same_bits(Q.dequantize(t[1::3], qtype), full[1::3])  # strided view, read in place
    assert_same_bits(Q.dequantize(t[4:5], qtype), full[4:5])
    assert np.array_equal(raw, before)


@pytest.mark.parametrize("qtype", ALL, ids=lambda t: t.name)
def test_dequantize_misaligned_buffer_and_fresh_output(qtype):
    raw = realistic_bytes(qtype, rows=3, row_len=256, seed=5)
    buf = np.empty(raw.size + 1, np.uint8)
    buf[1:] = raw.ravel()
    odd = torch.from_numpy(buf)[1:].view(raw.shape)  # storage offset 1: f16 views need a copy
    out = Q.dequantize(odd, qtype)
    assert_same_bits(out, ref_dequantize(raw, qtype))
    out.fill_(1.0)  # the output is the caller's: writing it leaves the bytes alone
    assert np.array_equal(buf[1:], raw.ravel())


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_K, T.F32], ids=lambda t: t.name)
def test_dequantize_rejects_bad_shapes(qtype):
    type_size = GGML_QUANT_SIZES[qtype][1]
    with pytest.raises(ValueError, match=qtype.name):
        Q.dequantize(torch.zeros((2, type_size + 1), dtype=torch.uint8), qtype)
    with pytest.raises(ValueError, match=qtype.name):
        Q.dequantize(torch.zeros((2 * type_size,), dtype=torch.uint8), qtype)


# -- quantization ---------------------------------------------------------------------------------
def tie_rows() -> np.ndarray:
    """Blocks whose largest magnitude appears more than once, with both signs, at varied positions,
    and exact halves at rounding boundaries."""
    rng = np.random.default_rng(6)
    rows = []
    for i, j in [(0, 31), (31, 0), (5, 6), (6, 5), (15, 16), (16, 15)]:
        x = rng.uniform(-1, 1, 64).astype(np.float32)
        x[i], x[j] = 2.0, -2.0  # same magnitude: the first one decides Q4_0's sign
        x[32 + i] = x[32 + j] = -3.0  # repeated max in the second block
        rows.append(x)
    rows.append(np.concatenate([[-8.0], np.arange(-7.5, 8.0, 0.5)[:31]]).astype(np.float32).tolist() * 2)  # Q4_0: d = 1
    rows.append(np.concatenate([[0.0, 15.0], np.arange(0.5, 15.5, 0.5)]).astype(np.float32).tolist() * 2)  # Q4_1: d = 1
    rows.append(np.concatenate([[127.0], np.arange(-126.5, 0, 4.0)]).astype(np.float32)[:32].tolist() * 2)  # Q8_0: d = 1
    return np.array(rows, dtype=np.float32)


def quantize_cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    normal = rng.standard_normal((13, 160)).astype(np.float32)
    outliers = normal * np.where(rng.random(normal.shape) < 0.03, 300.0, 1.0).astype(np.float32)
    return {
        "normal": normal,
        "outliers": outliers,
        "beyond_f16": normal * np.float32(1e8),  # scales overflow f16 to inf
        "small": normal * np.float32(1e-6),  # scales become f16 subnormals or 0
        "zeros": np.zeros((3, 96), np.float32),
        "zero_row_among_others": np.concatenate([np.zeros((1, 160), np.float32), normal[:2]]),
        "constant": np.stack([np.full(96, c, np.float32) for c in (0.37, -2.5, 1e-3)]),
        "ties": tie_rows(),
        "float64_input": normal.astype(np.float64) * 0.1,
    }


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
@pytest.mark.parametrize("case", list(quantize_cases()))
def test_quantize_bytes_match_gguf(qtype, case):
    values = quantize_cases()[case]
    with np.errstate(over="ignore"):  # "beyond_f16": numpy warns as scales overflow, as in gguf
        ours = Q.quantize(values, qtype)
    ref = ref_quantize(values.astype(np.float32), qtype)
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    bad = np.argwhere(ours != ref)
    assert bad.size == 0, f"{len(bad)} bytes differ, first at (row, byte) {bad[:4].tolist()}"


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_round_trip(qtype):
    values = quantize_cases()["outliers"]
    ours = Q.dequantize(torch.from_numpy(Q.quantize(values, qtype)), qtype)
    assert_same_bits(ours, ref_dequantize(ref_quantize(values, qtype), qtype))
    if qtype == T.F32:
        assert_same_bits(ours, values)


def test_quantize_spans_chunks():
    """More blocks than one quantizer chunk (4,096), so chunk boundaries are covered."""
    values = np.random.default_rng(8).standard_normal((5, 32 * 1000)).astype(np.float32)
    for qtype in (T.Q4_0, T.Q4_1, T.Q8_0):
        assert np.array_equal(Q.quantize(values, qtype), ref_quantize(values, qtype)), qtype.name


def test_bf16_rounding_and_nans():
    patterns = np.array([
        0x3F808000,  # tie, even upper half: stays 0x3F80
        0x3F818000,  # tie, odd upper half: rounds up to 0x3F82
        0x3F808001,  # just above the tie: up
        0x7F7FFFFF,  # largest finite: rounds to +inf
        0x7F800000, 0xFF800000,  # +-inf
        0x7F800001, 0xFF800001,  # signalling NaNs: quieted, sign kept
        0x7FC00000, 0xFFFFFFFF,  # quiet NaNs
        0x00000001, 0x80000000,  # subnormal, -0
    ], dtype=np.uint32)
    random = np.random.default_rng(9).integers(0, 1 << 32, 1 << 16, dtype=np.uint64).astype(np.uint32)
    values = np.concatenate([patterns, random]).view(np.float32).reshape(-1, 4)
    ours = Q.quantize(values, T.BF16)
    assert np.array_equal(ours, ref_quantize(values, T.BF16))
    assert ours.view(np.uint16)[0, :4].tolist() == [0x3F80, 0x3F82, 0x3F81, 0x7F80]


def test_quantize_rejects_bad_shapes():
    with pytest.raises(ValueError, match="Q4_0"):
        Q.quantize(np.zeros((2, 48), np.float32), T.Q4_0)
