"""Triton kernels against the numpy/torch references: gguf.quants.dequantize and runtime.ops.

On CPU the kernels run under TRITON_INTERPRET=1 (conftest.py sets it) with small shapes; with a
CUDA GPU the same tests run compiled, with larger shapes. Tolerances are stated per test; the
matmul ones are element-wise, relative to sum_k |x_k| |w_k| (the scale of the rounding error of
any summation order), so rows made of random bytes with huge scales are held to the same bar.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

triton = pytest.importorskip("triton")

from gguf import GGML_QUANT_SIZES  # noqa: E402
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf import quants as gq  # noqa: E402

from qkvgguf import quants  # noqa: E402
from qkvgguf.errors import QkvggufError  # noqa: E402
from qkvgguf.runtime import ops  # noqa: E402
from qkvgguf.runtime.backend import select_backend  # noqa: E402
from qkvgguf.runtime.kernels import flash_decode, flash_prefill, qmatmul, rms_norm, rope, swiglu  # noqa: E402
from qkvgguf.runtime.kernels.dequant import LAYOUTS, dequantize_rows  # noqa: E402

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
if not GPU and os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    pytest.skip("no GPU and TRITON_INTERPRET is not 1 (set it before triton is imported)", allow_module_level=True)

FORMATS = [T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K, T.Q2_K, T.Q3_K, T.IQ4_NL, T.IQ4_XS]
QUANTIZABLE = {T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1}  # gguf.quants.quantize has these
OURS_QUANTIZE = {T.Q2_K, T.Q3_K, T.IQ4_NL, T.IQ4_XS}  # ours (bytes equal llama.cpp's, test_lowbit_quantize.py)
F16_FIELDS = {T.Q8_0: [0], T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2],
              T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208], T.Q2_K: [80, 82], T.Q3_K: [108],
              T.IQ4_NL: [0], T.IQ4_XS: [0]}  # byte offsets of f16 fields in a block

# weight shape: odd N, odd blocks per row (so the last K step of every pinned config is partial)
N_ROWS = 257 if GPU else 33
N_BLOCKS = {32: 33 if GPU else 3, 256: 9 if GPU else 3}
ZERO_ROW, ZERO_BLOCK = N_ROWS - 1, (3, 1)  # an all-zero row and one all-zero block


def pinned(qtype: T, gemm: bool) -> dict:
    """One config per format: a K step of GS groups, so 3 blocks per row end in a partial step."""
    g = LAYOUTS[qtype].groups
    if gemm:
        return {"BLOCK_M": 16, "BLOCK_N": 16, "GS": 2 * g, "GROUP_M": 2, "num_warps": 4}
    return {"BLOCK_N": 16, "GS": 2 * g, "num_warps": 4}


# -- GGUF bytes ----------------------------------------------------------------------------------
def finite_f16_bytes(rng: np.random.Generator, shape, scale: float | None) -> np.ndarray:
    """f16 values as bytes (..., 2): normal(0, scale), or random bit patterns that are finite."""
    if scale is not None:
        return (rng.standard_normal(shape) * scale).astype(np.float16).view(np.uint8).reshape(*shape, 2)
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    bits = np.where((bits & 0x7C00) == 0x7C00, bits & 0xBFFF, bits)  # clear one exponent bit of inf/NaN
    return bits.view(np.uint8).reshape(*shape, 2)


def random_blocks(qtype: T, rows: int, nblk: int, rng: np.random.Generator, scale: float | None) -> np.ndarray:
    """Random bytes (rows, nblk * type_size) with finite f16 fields (sane ones when scale is given)."""
    _, ts = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, nblk, ts), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        raw[..., off:off + 2] = finite_f16_bytes(rng, (rows, nblk), scale)
    return raw.reshape(rows, nblk * ts)


@functools.cache
def weight(qtype: T, sane_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(GGUF bytes (N, row_bytes) uint8, their gguf.quants dequantization (N, K) float32).

    Rows: the first half quantized from normal data by gguf.quants.quantize (K-quants, which it
    cannot quantize: random bytes with sane f16 scales); then random bytes with random finite f16
    fields (huge scales included; unless sane_only); the last row and one block all zero.
    """
    rng = np.random.default_rng(int(qtype))
    bs, ts = GGML_QUANT_SIZES[qtype]
    nblk = N_BLOCKS[bs]
    half = N_ROWS // 2
    if qtype in QUANTIZABLE | OURS_QUANTIZE:
        values = (rng.standard_normal((half, nblk * bs)) * 0.05).astype(np.float32)
        if qtype in OURS_QUANTIZE:
            first = quants.quantize(values, qtype)
        else:
            first = np.asarray(gq.quantize(values, qtype)).view(np.uint8).reshape(half, -1)
    else:
        first = random_blocks(qtype, half, nblk, rng, scale=1e-3)
    rest = random_blocks(qtype, N_ROWS - half, nblk, rng, scale=1e-3 if sane_only else None)
    raw = np.concatenate([first, rest])
    raw[ZERO_ROW] = 0
    r, b = ZERO_BLOCK
    raw[r, b * ts:(b + 1) * ts] = 0
    with np.errstate(all="ignore"):
        dense = np.asarray(gq.dequantize(raw, qtype), dtype=np.float32)
    assert np.isfinite(dense).all() and (dense[ZERO_ROW] == 0).all()
    return torch.from_numpy(raw).to(DEV), torch.from_numpy(dense).to(DEV)


def assert_matmul_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, rtol: float, out_rtol: float = 0.0):
    """|y - x @ w.T| <= rtol * (|x| @ |w|.T) + out_rtol * |x @ w.T|, element-wise, in float64."""
    xd, wd = x.double(), w.double()
    ref = xd @ wd.T
    bound = rtol * (xd.abs() @ wd.abs().T) + out_rtol * ref.abs()
    err = (y.double() - ref).abs()
    bad = err > bound
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} outputs off, worst error/bound "
                           f"{(err / bound.clamp_min(1e-300)).max().item():.3g}")


# -- dequantization in registers -----------------------------------------------------------------
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_dequant_helper_bit_exact_on_random_bytes(qtype):
    """The in-register decoder vs gguf.quants on fully random bytes, inf/NaN scales included."""
    rng = np.random.default_rng(100 + int(qtype))
    bs, ts = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(7, 3 * ts), dtype=np.uint8)
    raw[2] = 0
    for off in F16_FIELDS[qtype]:  # every f16 special somewhere: +-inf, NaN, subnormals, -0
        for j, bits in enumerate([0x7C00, 0xFC00, 0x7E00, 0x0001, 0x03FF, 0x8000]):
            raw[3 + j % 4, (j % 3) * ts + off:(j % 3) * ts + off + 2] = np.array([bits], np.uint16).view(np.uint8)
    with np.errstate(all="ignore"):
        ref = np.asarray(gq.dequantize(raw, qtype), dtype=np.float32)
    ids = torch.tensor([6, 0, 2, 5, 1, 3, 4])
    with np.errstate(all="ignore"):  # the interpreter's numpy multiplies inf by 0 as well
        ours = dequantize_rows(torch.from_numpy(raw).to(DEV), qtype, ids.to(DEV)).cpu().numpy()
    ref = ref[ids.numpy()]
    assert np.array_equal(np.isnan(ours), np.isnan(ref))
    finite = ~np.isnan(ref)
    bad = np.flatnonzero(ours[finite].view(np.uint32) != ref[finite].view(np.uint32))
    assert bad.size == 0, f"{bad.size} values differ, first {ours[finite][bad[:4]]} vs {ref[finite][bad[:4]]}"


# -- quantized matmul ----------------------------------------------------------------------------
@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_qmatmul_fp32(qtype, M):
    """fp32 activations: within 1e-5 of sum|x||w| (GEMV for M <= 8, GEMM for M = 17; on a GPU the
    GEMM's tl.dot in 3xTF32, the default TF32 being as coarse as fp16)."""
    raw, dense = weight(qtype)
    x = torch.randn(M, dense.shape[1], generator=torch.Generator().manual_seed(M)).to(DEV)
    y = qmatmul(x, raw, qtype, config=pinned(qtype, gemm=M > 8), precision="tf32x3")
    assert y.shape == (M, N_ROWS) and y.dtype == torch.float32
    assert_matmul_close(y, x, dense, rtol=1e-5)
    assert (y[:, ZERO_ROW] == 0).all()


@pytest.mark.parametrize("M", [1, 17])
@pytest.mark.parametrize("qtype", FORMATS, ids=lambda t: t.name)
def test_qmatmul_fp16(qtype, M):
    """fp16 activations and output: within 2e-3 of sum|x||w| plus 1e-3 of |y| (fp16 rounding of
    the output, and of the dequantized weight for the GEMM's fp16 tl.dot)."""
    raw, dense = weight(qtype, sane_only=True)
    x = torch.randn(M, dense.shape[1], generator=torch.Generator().manual_seed(M)).to(DEV).half()
    y = qmatmul(x, raw, qtype, config=pinned(qtype, gemm=M > 8))
    assert y.dtype == torch.float16
    assert_matmul_close(y, x, dense, rtol=2e-3, out_rtol=1e-3)


@pytest.mark.parametrize("M", [2, 40])
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q6_K], ids=lambda t: t.name)
def test_qmatmul_default_config_and_out_dtype(qtype, M):
    """No pinned config: the interpreter's default tiles (autotuning on a GPU); fp32 out of fp16 x."""
    raw, dense = weight(qtype, sane_only=True)
    x = torch.randn(M, dense.shape[1], generator=torch.Generator().manual_seed(7)).to(DEV).half()
    y = qmatmul(x, raw, qtype, out_dtype=torch.float32)
    assert y.dtype == torch.float32
    assert_matmul_close(y, x, dense, rtol=2e-3)


@pytest.mark.parametrize("dtype,out_dtype", [(torch.float32, None), (torch.float16, None), (torch.float16, torch.float32)])
@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q5_0, T.Q6_K], ids=lambda t: t.name)
def test_qmatmul_dense_strategy_tiles(qtype, dtype, out_dtype, monkeypatch):
    """Prompt-sized M: w dequantized tile by tile (here 5 rows of w a tile, the last one partial) and
    multiplied by torch (cuBLAS on a GPU); the same bounds as the kernels."""
    import importlib

    qm = importlib.import_module("qkvgguf.runtime.kernels.qmatmul")
    raw, dense = weight(qtype, sane_only=True)
    monkeypatch.setattr(qm, "DENSE_TILE_BYTES", 5 * dense.shape[1] * torch.finfo(dtype).bits // 8)
    x = torch.randn(70, dense.shape[1], generator=torch.Generator().manual_seed(3)).to(DEV).to(dtype)
    y = qmatmul(x, raw, qtype, out_dtype=out_dtype, strategy="dense")
    assert y.dtype == (out_dtype or dtype) and y.shape == (70, N_ROWS)
    if dtype == torch.float32:
        assert_matmul_close(y, x, dense, rtol=1e-5 if not GPU else 2e-3)
    else:
        assert_matmul_close(y, x, dense, rtol=2e-3, out_rtol=1e-3)


def test_qmatmul_rejects_bad_input():
    raw, dense = weight(T.Q4_0)
    x = torch.zeros(1, dense.shape[1], device=DEV)
    with pytest.raises(QkvggufError, match="K=64"):
        qmatmul(x[:, :64], raw, T.Q4_0)
    with pytest.raises(QkvggufError, match="whole blocks of 18 bytes"):
        qmatmul(x, raw[:, :-1].contiguous(), T.Q4_0)
    with pytest.raises(QkvggufError, match="no Triton kernel"):
        qmatmul(x, raw, T.TQ2_0)
    with pytest.raises(QkvggufError, match="float16/float32"):
        qmatmul(x.double(), raw, T.Q4_0)
    with pytest.raises(QkvggufError, match="contiguous"):
        qmatmul(x, raw[:, 18:], T.Q4_0)


# -- fused small ops -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm(dtype):
    """vs ops.rms_norm in float32: 1e-5 relative (fp32), one fp16 rounding (fp16)."""
    g = torch.Generator().manual_seed(0)
    D = 4099 if GPU else 97
    x = (torch.randn(2, 5, D, generator=g) * 3).to(DEV, dtype)
    r = torch.randn(2, 5, D, generator=g).to(DEV, dtype)
    w = torch.randn(D, generator=g).to(DEV)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    out = rms_norm(x, w, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out.float(), ops.rms_norm(x.float(), w, 1e-5), **tol)
    out, h = rms_norm(x, w, 1e-6, residual=r)
    torch.testing.assert_close(h, x + r, rtol=0, atol=0)
    torch.testing.assert_close(out.float(), ops.rms_norm(h.float(), w, 1e-6), **tol)
    # a transposed view (rows not contiguous) gives the same
    xt = x.float().transpose(0, 1)
    torch.testing.assert_close(rms_norm(xt, w, 1e-5), ops.rms_norm(xt, w, 1e-5), rtol=1e-5, atol=1e-5)
    with pytest.raises(QkvggufError, match="weight"):
        rms_norm(x, w[:-1], 1e-5)


def test_rms_norm_keeps_a_float32_residual_beyond_fp16():
    """The model's residual stream is float32 on the GPU (GPU-REVIEW 8): fp16 block output + fp32
    residual whose values pass fp16's 65504 -> h exact in float32, out (fp16) finite and right."""
    g = torch.Generator().manual_seed(3)
    D = 4099 if GPU else 97
    a = torch.randn(3, D, generator=g).to(DEV, torch.float16)
    r = (torch.randn(3, D, generator=g) * 10).to(DEV)
    r[:, 5] = 9e4  # an outlier channel fp16 cannot hold
    w = torch.rand(D, generator=g).to(DEV)
    out, h = rms_norm(a, w, 1e-5, residual=r)
    assert h.dtype == torch.float32 and out.dtype == torch.float16
    torch.testing.assert_close(h, a.float() + r, rtol=0, atol=0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ops.rms_norm(a.float() + r, w, 1e-5), rtol=2e-3, atol=2e-3)
    first = rms_norm(r, w, 1e-5, out_dtype=torch.float16)  # the first layer's norm of the fp32 stream
    assert first.dtype == torch.float16 and torch.isfinite(first).all()


@pytest.mark.parametrize("neox", [False, True], ids=["normal", "neox"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rope(neox, dtype):
    """vs ops.rope: 1e-6 (fp32), one fp16 rounding (fp16); a strided view and in place."""
    n_head, T_, d = (32, 19, 128) if GPU else (6, 5, 64)
    g = torch.Generator().manual_seed(1)
    proj = torch.randn(T_, n_head * d, generator=g).to(DEV, dtype)  # (T, n_head * d), as linear makes it
    x = proj.view(T_, n_head, d).transpose(0, 1)  # (n_head, T, d) view
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2).float() / d))
    cos, sin = ops.rope_cos_sin(inv, torch.arange(7, 7 + T_))
    cos, sin = cos.to(DEV), sin.to(DEV)
    ref = ops.rope(x.float(), cos, sin, neox)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(rope(x, cos, sin, neox).float(), ref, **tol)
    xc = x.contiguous()
    rope(xc, cos, sin, neox, out=xc)
    torch.testing.assert_close(xc.float(), ref, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_swiglu(dtype):
    g = torch.Generator().manual_seed(2)
    shape = (9, 11008) if GPU else (7, 33)
    gate = (torch.randn(shape, generator=g) * 6).to(DEV, dtype)  # far into silu's tails too
    up = torch.randn(shape, generator=g).to(DEV, dtype)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(swiglu(gate, up).float(), ops.swiglu(gate.float(), up.float()), **tol)


# -- attention -----------------------------------------------------------------------------------
def kv_cache(n_kv: int, n_ctx: int, filled: int, d: int, dtype, seed: int):
    """k, v (n_kv, n_ctx, d), positions >= filled set to NaN: a kernel that reads them fails."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n_kv, n_ctx, d, generator=g)
    v = torch.randn(n_kv, n_ctx, d, generator=g)
    k[:, filled:] = float("nan")
    v[:, filled:] = float("nan")
    return k.to(DEV, dtype), v.to(DEV, dtype)


ATT_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=3e-3, atol=3e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("T_,n_past", [(1, 0), (5, 0), (5, 7), (1, 36)])
def test_flash_prefill(T_, n_past, group, dtype):
    """vs ops.attention (causal with offset, GQA) over a cache of 37 positions, the rest NaN."""
    n_kv, d, n_ctx = 2, 64, 37
    k, v = kv_cache(n_kv, n_ctx, n_past + T_, d, dtype, seed=T_ + n_past)
    q = torch.randn(n_kv * group, T_, d, generator=torch.Generator().manual_seed(3)).to(DEV, dtype)
    S = n_past + T_
    ref = ops.attention(q.float(), k[:, :S].float(), v[:, :S].float(), n_past)
    out = flash_prefill(q, k, v, n_past, precision="tf32x3")
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, **ATT_TOL[dtype])


@pytest.mark.parametrize("n_past", [0, 21])
def test_flash_prefill_many_tiles(n_past):
    """T = 37 queries in tiles of 16, keys in tiles of 16: the causal stop and the tile edges."""
    n_kv, group, d, T_ = 2, 2, 64, 37
    S = n_past + T_
    k, v = kv_cache(n_kv, S + 3, S, d, torch.float32, seed=5)
    q = torch.randn(n_kv * group, T_, d, generator=torch.Generator().manual_seed(4)).to(DEV)
    ref = ops.attention(q, k[:, :S], v[:, :S], n_past)
    out = flash_prefill(q, k, v, n_past, block_m=16, block_n=16, precision="tf32x3")
    torch.testing.assert_close(out, ref, **ATT_TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("num_splits", [1, 3, 8, None])
def test_flash_decode(num_splits, group, dtype):
    """One token against a cache of n_valid = 4099 (GPU) / 301 positions, split in ranges."""
    n_kv, d = 2, 64
    n_valid = 4099 if GPU else 301
    k, v = kv_cache(n_kv, n_valid + 10, n_valid, d, dtype, seed=9)
    q = torch.randn(n_kv * group, 1, d, generator=torch.Generator().manual_seed(6)).to(DEV, dtype)
    ref = ops.attention(q.float(), k[:, :n_valid].float(), v[:, :n_valid].float(), n_valid - 1)
    out = flash_decode(q, k, v, n_valid, num_splits, precision="tf32x3")
    assert out.shape == q.shape and out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, **ATT_TOL[dtype])


def test_flash_head_dim_not_a_power_of_two():
    """head_dim 80 (phi-2-like): padded to 128 lanes, the padding masked."""
    n_kv, group, d, n_past, T_ = 1, 2, 80, 6, 3
    k, v = kv_cache(n_kv, 20, n_past + T_, d, torch.float32, seed=12)
    q = torch.randn(n_kv * group, T_, d, generator=torch.Generator().manual_seed(13)).to(DEV)
    S = n_past + T_
    ref = ops.attention(q, k[:, :S], v[:, :S], n_past)
    torch.testing.assert_close(flash_prefill(q, k, v, n_past, precision="tf32x3"), ref, **ATT_TOL[torch.float32])
    ref = ops.attention(q[:, -1:], k[:, :S], v[:, :S], S - 1)
    torch.testing.assert_close(flash_decode(q[:, -1:], k, v, S, 2, block_n=16, precision="tf32x3"), ref,
                               **ATT_TOL[torch.float32])


def test_flash_decode_device_length_and_empty_splits():
    """n_valid as a device tensor (CUDA-graph friendly): splits sized for the whole cache, most
    of them empty for a short prefix; and more splits than key tiles."""
    n_kv, group, d, n_ctx = 2, 4, 64, 512
    k, v = kv_cache(n_kv, n_ctx, 70, d, torch.float32, seed=11)
    q = torch.randn(n_kv * group, 1, d, generator=torch.Generator().manual_seed(8)).to(DEV)
    ref = ops.attention(q, k[:, :70], v[:, :70], 69)
    out = flash_decode(q, k, v, torch.tensor([70], dtype=torch.int32, device=DEV), num_splits=8, precision="tf32x3")
    torch.testing.assert_close(out, ref, **ATT_TOL[torch.float32])
    out = flash_decode(q, k, v, 70, num_splits=64, block_n=16, precision="tf32x3")
    torch.testing.assert_close(out, ref, **ATT_TOL[torch.float32])
    with pytest.raises(QkvggufError, match="n_valid"):
        flash_decode(q, k, v, n_ctx + 1)
    with pytest.raises(QkvggufError, match="one query"):
        flash_decode(torch.cat([q, q], 1), k, v, 70)


# -- backend choice ------------------------------------------------------------------------------
def test_select_backend(monkeypatch):
    assert select_backend("torch") == "torch"
    assert select_backend("torch", "cuda") == "torch"
    with pytest.raises(QkvggufError, match="not one of"):
        select_backend("cuda")
    if not GPU:
        assert select_backend("auto") == "torch"
        assert select_backend() == "torch"
        assert select_backend("triton") == "triton"  # TRITON_INTERPRET=1 here: the test mode
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(QkvggufError, match="backend triton is not available") as e:
            select_backend("triton")
        assert "\n" not in str(e.value)
    else:
        want = "triton" if torch.cuda.get_device_capability() >= (7, 5) else "torch"
        assert select_backend("auto") == want
        assert select_backend("auto", "cpu") == "torch"


def test_import_compiles_nothing_and_allocates_no_cuda(tmp_path):
    """Importing the kernels (as @jit, not interpreted) neither initializes CUDA nor compiles."""
    code = ("import torch, qkvgguf.runtime.kernels, qkvgguf.runtime.backend, triton\n"
            "assert not torch.cuda.is_initialized()\n"
            "from qkvgguf.runtime.kernels import qmatmul as q\n"
            "import importlib; m = importlib.import_module('qkvgguf.runtime.kernels.qmatmul')\n"
            "assert isinstance(m._gemv_kernel, triton.runtime.jit.JITFunction)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # cwd outside the checkout: its 'qkvgguf' folder would shadow a non-editable install of the package
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]


def test_kernels_compile_for_gpus_without_one(tmp_path):
    """The interpreter cannot tell whether a kernel compiles: lower a few to cubins (sm_80) with
    the ptxas inside the triton wheel, and require the default GEMV tiles not to spill."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cmd = [sys.executable, "-m", "qkvgguf.runtime.kernels.aot", "80", "--only", "gemv Q4_0,gemm Q4_0,Q4_K,Q6_K,flash,rms,rope,swiglu"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    if r.returncode != 0 and "ptxas" in r.stderr and "No such file" in r.stderr:  # pragma: no cover
        pytest.skip("this triton has no bundled ptxas")
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("sm_80")]
    assert any("gemv Q4_K" in ln for ln in lines) and any("flash_decode" in ln for ln in lines), r.stdout
    assert not [ln for ln in lines if ln.split()[1] == "gemv" and "SPILLS" in ln], r.stdout


def test_untuned_config_is_the_first_candidate(monkeypatch):
    """QKVGGUF_AUTOTUNE=0 (the GPU suite's tests stage: one compile per format) pins the first candidate."""
    import importlib

    qm = importlib.import_module("qkvgguf.runtime.kernels.qmatmul")  # the module (the package exports the function)
    monkeypatch.delenv("QKVGGUF_AUTOTUNE", raising=False)
    assert qm.autotuning()
    monkeypatch.setenv("QKVGGUF_AUTOTUNE", "0")
    assert not qm.autotuning()
    for kind, configs in (("gemv", qm.gemv_configs), ("gemm", qm.gemm_configs)):
        for qtype in FORMATS:
            c = configs(qtype)[0]
            assert qm.untuned_config(kind, qtype) == {**c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages}
