"""The compiled CPU matmul kernels (runtime/cpu) against the dequantize-then-matmul reference.

- every block format the library has, on random blocks with an all-zero block and extreme f16 scales
  (65504, the largest; 2^-24, the smallest subnormal): qk_dequant_rows equals qkvgguf.quants'
  dequantizer (bit-exact with gguf.quants) bit for bit; matmul at 1 row, 3 rows (decode kernel) and
  GEMV_ROWS + 1 rows (dequantized tiles + torch GEMM, several tiles) within float32 rounding of the
  float64 product of the same dequantized values, at 1 and 2 threads
- the real SmolLM2 weights (Q4_1 and the Q8_0 embedding) the same way
- SmolLM2 through the kernels against the float32 path (QKVGGUF_CPU_KERNELS=0): perplexity within
  0.3%, greedy tokens identical on 3 prompts
- the fallback: QKVGGUF_CPU_KERNELS=0 disables the build, says so once, and linear still works

Tests that need the compiled library skip (saying why) on a machine without a C++ compiler; the
fallback tests run everywhere.
"""

import logging
import os

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from qkvgguf.quants import dequantize, get_format
from qkvgguf.runtime import cpu, ops
from qkvgguf.runtime.cpu import build
from qkvgguf.runtime.weights import QTensor

TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS,
         T.F32, T.F16, T.BF16]
F16_FIELDS = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0], T.Q4_K: [0, 2],
              T.Q5_K: [0, 2], T.Q6_K: [208], T.Q2_K: [80, 82], T.Q3_K: [108], T.IQ4_NL: [0],
              T.IQ4_XS: [0]}  # byte offsets of the f16 scales in a block
EXTREME = [np.float16(65504.0), np.float16(2.0 ** -24)]


@pytest.fixture
def fresh_build(monkeypatch):
    """build.load() decides again (and logs again) inside the test; the previous decision is restored after."""
    monkeypatch.setattr(build, "_state", {})
    monkeypatch.setattr(cpu, "_by_type", {})


@pytest.fixture(scope="module")
def kernels():
    if not cpu.available():
        pytest.skip("the CPU kernels are not built here (no C++ compiler, or QKVGGUF_CPU_KERNELS=0)")


def random_tensor(qtype: T, rows: int, blocks: int, seed: int = 0) -> QTensor:
    """rows x blocks blocks of random bytes with sane f16 scales; row 0's first block all zero, row 1's
    scales the largest f16, row 2's the smallest subnormal."""
    rng = np.random.default_rng(seed)
    fmt = get_format(qtype)
    if fmt.block_size == 1:  # float types: random values of that dtype
        dtype = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}[qtype]
        vals = torch.from_numpy(rng.standard_normal((rows, blocks)).astype(np.float32)).to(dtype)
        vals[0, :8] = 0
        raw = vals.view(torch.uint8).reshape(rows, -1).contiguous()
    else:
        raw = rng.integers(0, 256, (rows, blocks, fmt.type_size), dtype=np.uint8)
        for off in F16_FIELDS[qtype]:
            scale = (rng.standard_normal((rows, blocks)) * 0.05).astype(np.float16)
            scale[1] = EXTREME[0]
            scale[2] = EXTREME[1]
            raw[:, :, off:off + 2] = scale.view(np.uint8).reshape(rows, blocks, 2)
        raw[0, 0] = 0
        raw = torch.from_numpy(raw.reshape(rows, -1).copy())
    K = blocks * fmt.block_size
    return QTensor(f"random.{qtype.name}", qtype, (rows, K), raw)


def check_matmul(w: QTensor, T_rows: int, seed: int = 1) -> None:
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((T_rows, w.shape[1])).astype(np.float32))
    ref_w = dequantize(w.raw, w.type).double()
    ref = x.double() @ ref_w.T
    bound = x.double().abs() @ ref_w.abs().T  # float32 sums of these terms err by a small multiple of eps
    y = cpu.matmul(x, w)
    assert y is not None and y.shape == ref.shape and y.dtype == torch.float32
    err = (y.double() - ref).abs()
    assert torch.all(err <= 1e-5 * bound + 1e-30), f"{w.name}: max error {float((err / (bound + 1e-30)).max()):.2e} of |x||w|"


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequant_rows_bit_exact(kernels, qtype):
    blocks = 3 if get_format(qtype).block_size == 256 else 7
    w = random_tensor(qtype, 37, blocks if get_format(qtype).block_size > 1 else 96)
    got = cpu.dequantize_rows(w, 0, w.shape[0])
    want = dequantize(w.raw, w.type)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32)), qtype.name
    assert torch.equal(cpu.dequantize_rows(w, 5, 9), want[5:9])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matmul_random_blocks(kernels, qtype, threads, monkeypatch):
    torch.set_num_threads(threads)
    monkeypatch.setattr(cpu, "TILE_BYTES", 4 * 256 * 10)  # the prompt path in several tiles
    try:
        fmt = get_format(qtype)
        w = random_tensor(qtype, 37, 3 if fmt.block_size == 256 else (7 if fmt.block_size > 1 else 96), seed=threads)
        for rows in (1, 3, cpu.GEMV_ROWS + 1):
            check_matmul(w, rows)
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.7.ffn_down.weight", "token_embd.weight"])
def test_matmul_smollm2_weights(kernels, smollm2_path, name):
    from qkvgguf.gguf_file import GGUFFile
    from qkvgguf.runtime.weights import Weights

    w = Weights(GGUFFile(smollm2_path))[name]
    if name == "token_embd.weight":  # 49,152 rows: a slice keeps the float64 reference small
        w = QTensor(name, w.type, (4096, w.shape[1]), w.raw[:4096])
    for rows in (1, cpu.GEMV_ROWS + 1):
        check_matmul(w, rows)


def check_attend_one(dtype, window=0, ring=0, d=40, pos=37):
    """cpu.attend_one (store k, v at pos, attend) against ops.attention over the same rows as float32."""
    g = torch.Generator().manual_seed(pos + d)
    rows = ring or pos + 16
    K = torch.randn(3, rows, d, generator=g).to(dtype)
    V = torch.randn(3, rows, d, generator=g).to(dtype)
    q, k, v = torch.randn(6, 1, d, generator=g), torch.randn(3, 1, d, generator=g), torch.randn(3, 1, d, generator=g)
    Kr, Vr = K.clone(), V.clone()
    slot = pos % ring if ring else pos
    Kr[:, slot], Vr[:, slot] = k[:, 0].to(dtype), v[:, 0].to(dtype)
    S = min(pos + 1, ring) if ring else pos + 1
    want = ops.attention(q, Kr[:, :S].float(), Vr[:, :S].float(), pos, window, ring)
    got = cpu.attend_one(K, V, q, k, v, pos, window, ring)
    assert torch.equal(K, Kr) and torch.equal(V, Vr), "k, v stored at their slot as the torch cast stores them"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_attend_one(kernels, dtype):
    """One query row over a plain cache: GQA (6 query heads on 3 KV heads), head_dim 40 (SIMD tails),
    causal, a sliding window, a ring of rows that has wrapped, and 2 threads (keys split)."""
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            check_attend_one(dtype)
            check_attend_one(dtype, window=9)
            check_attend_one(dtype, window=9, ring=12, pos=40)
            check_attend_one(dtype, d=256, pos=300)
        finally:
            torch.set_num_threads(1)


SIMD_LEVELS = {"avx2": ["-mno-avx512f"], "scalar": ["-mno-avx512f", "-mno-avx2", "-mno-fma", "-mno-f16c"]}


@pytest.mark.parametrize("level", list(SIMD_LEVELS))
def test_matmul_other_simd_levels(kernels, level, monkeypatch, fresh_build, tmp_path):
    """The library built as for a CPU without AVX-512 (the AVX2 + FMA dots) and without any SIMD
    extension (the dequantize-into-a-buffer loop, software half floats): the same reference checks,
    every type, and the decode attention."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    if level == "avx2" and not (" avx2" in flags and " fma" in flags):
        pytest.skip("this CPU has no AVX2 + FMA")
    monkeypatch.setenv("QKVGGUF_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build, "FLAGS", build.FLAGS + SIMD_LEVELS[level])
    assert cpu.available()
    for qtype in TYPES:
        fmt = get_format(qtype)
        w = random_tensor(qtype, 37, 3 if fmt.block_size == 256 else (7 if fmt.block_size > 1 else 96), seed=5)
        for rows in (1, 3):
            check_matmul(w, rows)
    for dtype in (torch.float32, torch.float16):  # decode.cpp: the half conversions, the attention's dots
        check_attend_one(dtype, window=9, ring=12, pos=40)
        check_attend_one(dtype, d=256, pos=300)


def test_row_length_not_whole_blocks(kernels):
    w = random_tensor(T.Q4_0, 4, 2)
    bad = QTensor("bad", T.Q4_0, (4, 48), w.raw)  # 48 is not a multiple of 32
    with pytest.raises(ValueError, match="'bad'.*whole number of blocks"):
        cpu.matmul(torch.zeros(1, 48), bad)


# -- the fallback -------------------------------------------------------------------------------------

class _W:  # the part of runtime.weights.Weights that ops.linear uses
    def __init__(self, w):
        from qkvgguf.runtime.weights import DequantCache

        self.w, self.cache = w, DequantCache(0)

    def __getitem__(self, name):
        return self.w

    def dense(self, name):
        return self.cache.get(self.w)


def test_fallback_when_disabled(monkeypatch, fresh_build, caplog):
    monkeypatch.setenv("QKVGGUF_CPU_KERNELS", "0")
    w = random_tensor(T.Q4_1, 8, 4)
    x = torch.randn(2, w.shape[1])
    with caplog.at_level(logging.INFO, logger="qkvgguf.runtime.cpu.build"):
        assert not cpu.available()
        assert cpu.matmul(x, w) is None
        y = ops.linear(x, _W(w), w.name)
        cpu.available()
    assert torch.equal(y, x @ dequantize(w.raw, w.type).T)
    said = [r for r in caplog.records if "QKVGGUF_CPU_KERNELS=0" in r.getMessage()]
    assert len(said) == 1, "the fallback is announced exactly once"


def test_fallback_without_compiler(monkeypatch, fresh_build, caplog):
    monkeypatch.setattr(build, "_compiler", lambda: None)
    with caplog.at_level(logging.WARNING, logger="qkvgguf.runtime.cpu.build"):
        assert not cpu.available()
    assert any("no C++ compiler" in r.getMessage() for r in caplog.records)


def test_failed_build_falls_back(monkeypatch, fresh_build, tmp_path, caplog):
    monkeypatch.setenv("QKVGGUF_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build, "SOURCES", [str(tmp_path / "broken.cpp")])
    (tmp_path / "broken.cpp").write_text("this is not C++\n")
    if build._compiler() is None:
        pytest.skip("no C++ compiler here")
    with caplog.at_level(logging.WARNING, logger="qkvgguf.runtime.cpu.build"):
        assert not cpu.available()
    assert any("failed" in r.getMessage() and "torch path" in r.getMessage() for r in caplog.records)
    assert not any(p.suffix == ".so" for p in (tmp_path / "cpu").iterdir()), "no half-written library left behind"


def test_no_build_at_import():
    import subprocess
    import sys

    code = ("import qkvgguf.runtime, qkvgguf.runtime.ops, qkvgguf.cli; from qkvgguf.runtime.cpu import build; "
            "print(build._state)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "{}"


# -- the model: kernels against the float32 path --------------------------------------------------------

PROMPTS = [
    "Once upon a time, in a small village at the edge of the forest,",
    "The three most important things to know about the French Revolution are",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
]


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_path):
    """{kernels on: a model without float32 cache, off: one with the 1 GiB cache (the old default)}, tokenizer."""
    from qkvgguf import GGUFFile
    from qkvgguf.runtime import Model
    from qkvgguf.tokenizer import Tokenizer

    gguf = GGUFFile(smollm2_path)
    return {True: Model(gguf, cache_bytes=0), False: Model(gguf, cache_bytes=1 << 30)}, Tokenizer.from_gguf(gguf)


def _with_kernels(enabled: bool):
    """A context where build.load() returns the library (enabled) or None (the float32 path)."""
    import contextlib

    @contextlib.contextmanager
    def ctx():
        saved, memo = dict(build._state), dict(cpu._by_type)
        if not enabled:
            build._state["lib"] = None
            cpu._by_type.clear()
        try:
            yield
        finally:
            build._state.clear()
            build._state.update(saved)
            cpu._by_type.clear()
            cpu._by_type.update(memo)
    return ctx()


@pytest.mark.slow
def test_smollm2_perplexity_and_greedy_match_float32(kernels, smollm2_pair):
    import texts
    from qkvgguf.runtime import Sampler, SamplingParams, Session, perplexity

    models, tok = smollm2_pair
    ids = tok.encode(texts.sherlock()[30_000:50_000])[:512]
    ppl, greedy = {}, {}
    for enabled in (True, False):
        model = models[enabled]
        with _with_kernels(enabled):
            assert cpu.available() == enabled
            ppl[enabled] = perplexity(model, ids, 256).ppl  # 2 windows
            greedy[enabled] = []
            for prompt in PROMPTS:
                session = Session(model, n_ctx=128)
                greedy[enabled].append(list(session.generate(tok.encode(prompt, add_special=True), 32,
                                                             Sampler(SamplingParams(temperature=0)))))
    assert abs(ppl[True] / ppl[False] - 1) < 0.003, ppl
    assert greedy[True] == greedy[False]


# -- the whole decode block in one call (runtime/cpu/layer.py) against the Python blocks -------------------

BLOCK_CASES = [("llama", None), ("qwen2", [T.Q4_0, T.Q8_0]), ("qwen3", None), ("gemma3", [T.Q4_1, T.Q8_0])]


def _tiny(arch, qtypes, path, hidden=64):
    if arch == "gemma3":
        import tiny_gemma3

        tiny_gemma3.write_gguf(tiny_gemma3.hf_model(seed=3, window=8, pattern=3), path, qtypes=qtypes)
    else:
        from tiny_models import hf_model, write_gguf

        write_gguf(hf_model(arch, seed=4, hidden=hidden), arch, path, qtypes=qtypes)


@pytest.mark.parametrize("kv", ["f32", "f16"])
@pytest.mark.parametrize("arch,qtypes", BLOCK_CASES, ids=[a for a, _ in BLOCK_CASES])
def test_decode_block_equals_python_block(kernels, tmp_path, arch, qtypes, kv):
    """llama (adjacent-pair rope), qwen2 (biases), qwen3 (QK-norm, head_dim 24: SIMD tails), gemma3
    (post-norms, gelu, sliding window decoded past its ring), F32 and quantized weights: 30 decode
    steps through the C block equal the Python block's bit for bit (the same kernels in the same
    order), and the C block ran for every layer of every step."""
    from qkvgguf import GGUFFile
    from qkvgguf.runtime import Model
    from qkvgguf.runtime.cpu import layer
    from qkvgguf.runtime.kv_cache import KVCache

    path = tmp_path / f"{arch}.gguf"
    _tiny(arch, qtypes, path)
    model = Model(GGUFFile(path))
    ids = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(6))
    ran = []

    def counted(*args):
        out = layer.decode_block(*args)
        ran.append(out is not None)
        return out

    logits = {}
    for fused in (counted, None):
        model.decode_block = fused
        cache = KVCache(model.config, 48, kv, kv, ops=model.ops, swa_slack=4)  # gemma3: rings of 12 rows
        model.forward(ids[:10], cache)
        logits[fused is not None] = torch.stack([model.forward(ids[t:t + 1], cache) for t in range(10, 40)])
    assert ran and all(ran) and len(ran) == 30 * model.config.n_layer
    if arch == "gemma3":
        assert cache.ring_rows < 48, "the tiny Gemma's local layers decode through a ring"
    # the same kernels in the same order: the same bits (runtime/batch.py's rows rely on it)
    assert torch.equal(logits[True], logits[False]), f"{arch} {kv}: {(logits[True] - logits[False]).abs().max()}"


def test_decode_block_declines_what_it_does_not_do(kernels, tmp_path):
    """A rotated/quantized KV cache (q8_0) is not read by the C block: it returns None and the Python
    block runs (and the results stay those of the Python block)."""
    from qkvgguf import GGUFFile
    from qkvgguf.runtime import Model
    from qkvgguf.runtime.cpu import layer

    path = tmp_path / "llama.gguf"
    _tiny("llama", None, path, hidden=128)  # head_dim 32, as q8_0 needs
    model = Model(GGUFFile(path))
    cache = model.new_cache(16, "q8_0", "q8_0")
    model.forward(torch.tensor([1, 2, 3]), cache)
    h = torch.zeros(1, model.config.n_embd)
    rope = (torch.ones(1, model.config.head_dim // 2), torch.zeros(1, model.config.head_dim // 2))
    assert layer.decode_block(model, 0, h, h, rope, cache, "blk.1.attn_norm.weight") is None
    assert layer.decode_block(model, 0, h.half(), h, rope, model.new_cache(16, "f16", "f16"),
                              "blk.1.attn_norm.weight") is None  # not float32


def test_batch_of_one_sequence_decodes(kernels, tmp_path):
    """runtime/batch.py's decode of one sequence (T = 1 over a SequenceBatch, which has no plain rows
    to hand out) runs the Python block and equals the model's own one-token step."""
    from qkvgguf import GGUFFile
    from qkvgguf.runtime import Model
    from qkvgguf.runtime.batch import decode_batch

    path = tmp_path / "llama.gguf"
    _tiny("llama", None, path)
    model = Model(GGUFFile(path))
    a, b = model.new_cache(16, "f16", "f16"), model.new_cache(16, "f16", "f16")
    for c in (a, b):
        model.forward(torch.tensor([1, 2, 3]), c)
    torch.testing.assert_close(decode_batch(model, [7], [a])[0], model.forward(torch.tensor([7]), b),
                               rtol=1e-5, atol=1e-5)
