"""--numerics bf16 (runtime/numerics.py): the CPU prompt matmuls in bfloat16.

- qk_dequant_rows_bf16 equals the float32 reference dequantizer rounded to bfloat16 by torch (to
  nearest, ties to even) bit for bit, for every block format the library has, on the random blocks
  of test_cpu_kernels (an all-zero block, the largest and smallest f16 scales)
- matmul(bf16=True) on more than GEMV_ROWS rows: in one tile, bit-equal to torch's bfloat16 GEMM of
  the rounded operands; in several tiles, within float32 summation noise plus one bfloat16 rounding
  of the float64 product of the rounded operands, and further than that from the exact product (so
  the rounding happened); at GEMV_ROWS rows and fewer, bit-equal to the exact path (decode unchanged)
- a Model with numerics="bf16": prompt logits within 2% (max over the largest logit) of exact and not
  equal to them, a one-token step bit-equal; the CLI accepts it and reports it in --json
- on a CPU without bfloat16 matrix instructions: the same values and one warning
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from qkvgguf.quants import dequantize, get_format
from qkvgguf.runtime import cpu
from qkvgguf.runtime.numerics import NUMERICS, Bf16PromptOps
from test_cpu_kernels import TYPES, kernels, random_tensor  # noqa: F401 (the fixture)


def _bf16_tile(w):
    out = torch.empty(w.shape, dtype=torch.bfloat16)
    rc = cpu.build.load().qk_dequant_rows_bf16(int(w.type), w.raw.data_ptr(), w.raw.stride(0), 0, w.shape[0],
                                               w.shape[1], out.data_ptr(), 2)
    assert rc == 0
    return out


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequant_rows_bf16_round_to_nearest_even(kernels, qtype):
    fmt = get_format(qtype)
    w = random_tensor(qtype, 37, 3 if fmt.block_size == 256 else (7 if fmt.block_size > 1 else 96))
    want = dequantize(w.raw, w.type).to(torch.bfloat16)
    got = _bf16_tile(w)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16)), qtype.name


def test_rounding_ties_go_to_even(kernels):
    """float32 values exactly halfway between bfloat16 neighbours, stored as F32 'blocks' of one."""
    base = torch.tensor([1.0, 1.0078125, -3.0, 2.0 ** -100], dtype=torch.float32)
    half = base.view(torch.int32) + 0x8000  # halfway to the next bfloat16 up in magnitude
    vals = torch.cat([base, half.view(torch.float32), (half + 1).view(torch.float32)]).reshape(1, -1)
    from qkvgguf.runtime.weights import QTensor

    w = QTensor("ties", T.F32, tuple(vals.shape), vals.view(torch.uint8).reshape(1, -1).contiguous())
    got = _bf16_tile(w)
    assert torch.equal(got.view(torch.int16), vals.to(torch.bfloat16).view(torch.int16))
    assert got[0, 4].item() == 1.0 and got[0, 5].item() == 1.015625  # ties to even: down, then up


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q6_K, T.Q3_K, T.IQ4_XS, T.F16],
                         ids=lambda t: t.name)
def test_matmul_bf16(kernels, qtype, monkeypatch):
    fmt = get_format(qtype)
    w = random_tensor(qtype, 40, 4 if fmt.block_size == 256 else (16 if fmt.block_size > 1 else 512), seed=3)
    # scales of ordinary size only: rows 1-2 of random_tensor carry f16 extremes whose products
    # would dominate every tolerance below
    w.raw[1:3] = w.raw[3:5]
    rows = cpu.GEMV_ROWS + 5
    x = torch.from_numpy(np.random.default_rng(4).standard_normal((rows, w.shape[1])).astype(np.float32))
    wd = dequantize(w.raw, w.type)
    xb, wb = x.to(torch.bfloat16), wd.to(torch.bfloat16)

    one_tile = cpu.matmul(x, w, bf16=True)
    assert torch.equal(one_tile, (xb @ wb.T).float()), "one tile: torch's bfloat16 GEMM of the rounded operands"

    monkeypatch.setattr(cpu, "TILE_BYTES", 2 * w.shape[1] * 7)  # 7 rows a tile: 6 tiles
    y = cpu.matmul(x, w, bf16=True).double()
    ref = xb.double() @ wb.double().T
    bound = xb.double().abs() @ wb.double().abs().T
    err = (y - ref).abs()
    assert torch.all(err <= 2.0 ** -8 * ref.abs() + 1e-5 * bound), float((err - 2.0 ** -8 * ref.abs()).max())
    exact = x.double() @ wd.double().T
    assert float((cpu.matmul(x, w).double() - exact).abs().max()) < 0.1 * float((y - exact).abs().max())

    for r in (1, cpu.GEMV_ROWS):  # decode rows: the fused float32 dots, untouched
        assert torch.equal(cpu.matmul(x[:r], w, bf16=True), cpu.matmul(x[:r], w))


def test_model_bf16_numerics(tmp_path):
    import tiny_models

    from qkvgguf import GGUFFile
    from qkvgguf.runtime import Model

    assert NUMERICS == ("exact", "llamacpp", "bf16")
    path = tmp_path / "m.gguf"
    tiny_models.write_gguf(tiny_models.hf_model("llama"), "llama", str(path), qtypes=[T.Q8_0, T.Q4_K, T.Q6_K])
    gguf = GGUFFile(path)
    exact, fast = Model(gguf), Model(gguf, numerics="bf16")
    assert isinstance(fast.ops, Bf16PromptOps) and fast.numerics == "bf16"
    ids = torch.tensor([1, 5, 9, 2, 7, 3, 11, 4, 6, 8, 12, 10, 13, 2, 5, 1])
    a = exact.forward(ids, exact.new_cache(32), logits="all")
    b = fast.forward(ids, fast.new_cache(32), logits="all")
    rel = float((a - b).abs().max() / a.abs().max())
    assert 1e-5 < rel < 0.02, rel
    one = torch.tensor([3])
    assert torch.equal(exact.forward(one, exact.new_cache(4)), fast.forward(one, fast.new_cache(4)))


def test_cli_bench_reports_bf16(smollm2_path):
    r = subprocess.run([sys.executable, "-m", "qkvgguf.cli", "bench", "-m", smollm2_path, "-p", "16", "-n", "2",
                        "-r", "1", "-t", "1", "--device", "cpu", "--numerics", "bf16", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])
    assert out["numerics"] == "bf16" and out["prompt_tokens_per_s"] > 0


def test_cpu_without_bf16_instructions_says_so_once(kernels, monkeypatch, caplog):
    """Same values, one warning: on a CPU without AMX/AVX512-BF16 torch's bfloat16 GEMM is slower."""
    w = random_tensor(T.Q4_K, 24, 2, seed=5)
    x = torch.from_numpy(np.random.default_rng(6).standard_normal((cpu.GEMV_ROWS + 3, w.shape[1])).astype(np.float32))
    want = cpu.matmul(x, w, bf16=True)
    monkeypatch.setattr(cpu, "_state", {})
    monkeypatch.setattr(cpu, "has_bf16_matmul", lambda: False)
    with caplog.at_level("WARNING", logger=cpu.__name__):
        a, b = cpu.matmul(x, w, bf16=True), cpu.matmul(x, w, bf16=True)
    assert torch.equal(a, want) and torch.equal(b, want)
    said = [r for r in caplog.records if "bfloat16 matrix instructions" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]
