"""CUDA-only code paths, reviewed on the CPU with honest fakes and run for real on a GPU.

Each test names the defect it guards (shared/GPU-REVIEW.md, 2026-11-28). On the CPU the device
mismatches are caught by the meta device or FakeTensorMode (both refuse a CPU tensor mixed with a
tensor of another device, as CUDA does); where no fake can check the rule (generators, pinned
memory, autotuning) the test runs on a GPU only, and benchmarks/gpu_suite.py runs this file there.
"""

import dataclasses

import pytest
import torch
from gguf import GGMLQuantizationType as T

from qkvgguf import GGUFFile
from qkvgguf.config import ModelConfig
from qkvgguf.runtime import Model, Sampler, SamplingParams
from qkvgguf.runtime import ops
from qkvgguf.runtime.planner import minimum_budget, plan, specs_of

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def _fake_cuda():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


# -- 2: the sampler's generator lives on the probabilities' device ------------------------------
def test_sampler_generator_on_probabilities_device(monkeypatch):
    """torch.multinomial refuses a generator of another device (CUDA probabilities with a CPU
    generator fail every sampled token). Faked: the generator records its device and multinomial
    asserts torch's rule, with logits on the meta device."""
    import qkvgguf.runtime.generate as gen

    made = []

    class FakeGenerator:
        def __init__(self, device="cpu"):
            self.device = torch.device(device)
            made.append(self.device)

        def manual_seed(self, seed):
            return self

        def seed(self):
            return 0

    def multinomial(probs, n, generator=None):
        assert generator.device == probs.device, (generator.device, probs.device)
        return torch.zeros(n, dtype=torch.long, device=probs.device)

    monkeypatch.setattr(gen.torch, "Generator", FakeGenerator)
    monkeypatch.setattr(gen.torch, "multinomial", multinomial)
    monkeypatch.setattr(gen, "int", lambda t: 0, raising=False)  # meta tensors hold no value to read
    s = Sampler(SamplingParams(temperature=0.8, seed=3))
    s(torch.randn(50, device="meta"))
    assert made == [torch.device("meta")]


def test_sampler_seeded_stream_is_reproducible():
    logits = torch.randn(100, generator=torch.Generator().manual_seed(0))
    a = [Sampler(SamplingParams(seed=7))(logits) for _ in range(3)]
    s = Sampler(SamplingParams(seed=7))
    b = [s(logits) for _ in range(3)]
    assert a[0] == b[0] and len(set(a)) == 1  # a fresh sampler restarts the stream


@needs_cuda
def test_sampler_on_cuda_logits():
    logits = torch.randn(1000, device="cuda")
    s = Sampler(SamplingParams(temperature=0.8, seed=1))
    toks = [s(logits) for _ in range(20)]
    assert s.generator.device.type == "cuda"
    s2 = Sampler(SamplingParams(temperature=0.8, seed=1))
    assert toks == [s2(logits) for _ in range(20)]


# -- 3: rope frequencies from a tensor on the GPU -----------------------------------------------
def test_rope_inv_freq_follows_the_factors_device():
    cfg = dataclasses.make_dataclass("C", ["rope_dim", "rope_base"])(64, 500000.0)
    ref = ops.rope_inv_freq(cfg, torch.full((32,), 2.0))
    inv = ops.rope_inv_freq(cfg, torch.full((32,), 2.0, device="meta"))  # a CPU tensor here would raise
    assert inv.device.type == "meta" and inv.shape == ref.shape
    torch.testing.assert_close(ref * 2, ops.rope_inv_freq(cfg))


# -- 5: the causal mask is built on the queries' device -------------------------------------------
def test_attention_mask_on_query_device():
    q = torch.randn(4, 3, 16, device="meta")  # T = 3: a mask is needed
    k = torch.randn(2, 5, 16, device="meta")
    assert ops.attention(q, k, k, 2).device.type == "meta"


# -- 4: perplexity's targets follow the logits -------------------------------------------------
def test_perplexity_targets_on_logits_device():
    from qkvgguf.runtime.perplexity import token_nll

    with _fake_cuda():
        logits = torch.randn(4, 10, device="cuda")
        assert token_nll(logits, [1, 2, 3, 4]).device.type == "cuda"  # CPU targets would raise
    logits = torch.randn(4, 10, dtype=torch.float64)
    want = -torch.log_softmax(logits, -1)[torch.arange(4), torch.tensor([1, 2, 3, 4])]
    torch.testing.assert_close(token_nll(logits.float(), [1, 2, 3, 4]).double(), want, atol=1e-5, rtol=1e-6)


# -- 1: dequantization of device bytes copies nothing from the host (CUDA-graph capture) -----------
@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.F16, T.F32],
                         ids=lambda t: t.name)
def test_dequantize_makes_no_host_copy(qtype, monkeypatch):
    """The embedding gather runs inside the captured decode graph: any tensor built from host
    data (torch.tensor on a device, or a CPU tensor moved over) aborts capture. Dequantize bytes
    on the meta device and flag both."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from gguf import GGML_QUANT_SIZES

    from qkvgguf.quants import dequantize

    real_tensor = torch.tensor

    def tensor(*a, device=None, **kw):
        assert device is None or torch.device(device).type == "cpu", "a tensor built from host data on the device"
        return real_tensor(*a, device=device, **kw)

    class HostCopies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            leaves = torch.utils._pytree.tree_leaves((args, kwargs or {}))
            devices = {x.device.type for x in leaves if isinstance(x, torch.Tensor) and x.dim() > 0}
            assert "cpu" not in devices, f"{func} reads a host tensor"
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(torch, "tensor", tensor)
    bs, ts = GGML_QUANT_SIZES[qtype]
    raw = torch.zeros(6, 2 * ts * (256 // bs if bs > 1 else 64), dtype=torch.uint8, device="meta")
    ids = torch.zeros(3, dtype=torch.long, device="meta")
    with HostCopies():
        assert dequantize(raw[ids], qtype).device.type == "meta"


# -- 6: a streamed tied embedding is gathered from its host bytes ---------------------------------
def test_streamed_tied_embedding_gathers_host_bytes(tmp_path, monkeypatch):
    """When the tied embedding streams as the output unit, its slot is refilled for other units
    between forwards: the gather must not read it. The slot is poisoned at every release."""
    from qkvgguf.runtime import paging

    from tiny_models import hf_model, write_gguf

    path = tmp_path / "tied.gguf"
    write_gguf(hf_model("llama", tied=True, seed=4), "llama", path)
    gguf = GGUFFile(path)
    cfg = ModelConfig.from_gguf(gguf)
    ids = torch.tensor([5, 17, 42, 99, 3])
    ref_model = Model(gguf, backend="torch")
    ref = [ref_model.forward(ids, ref_model.new_cache(16), logits="all") for _ in range(2)]
    low = minimum_budget(specs_of(gguf), cfg, 16, "f32", "f32", 8, context_bytes=0)
    p = plan(specs_of(gguf), cfg, low, 16, "f32", "f32", n_batch=8, context_bytes=0)
    p = dataclasses.replace(p, resident_units=[], streamed_units=sorted(p.unit_bytes))  # everything streams
    real_release = paging.Streamer.release

    def release_and_poison(self, u):
        real_release(self, u)
        s = self.slot_of[u]
        self.slots[s].fill_(0x7F)  # what a later copy for another unit would leave there
        self.in_slot[s] = None

    monkeypatch.setattr(paging.Streamer, "release", release_and_poison)
    model = Model(gguf, backend="torch", plan=p)
    assert "token_embd.weight" in model.weights.host_raw
    for want in ref:
        assert torch.equal(model.forward(ids, model.new_cache(16), logits="all"), want)


# -- 7: float weights are used in place, resident weights packed in one buffer --------------------
def test_triton_linear_uses_float_weights_in_place(monkeypatch):
    from qkvgguf.runtime import ops_triton
    from qkvgguf.runtime.weights import QTensor

    w = torch.randn(8, 16)
    for qtype, raw in ((T.F32, w.view(torch.uint8)), (T.F16, w.half().view(torch.uint8)),
                       (T.BF16, w.bfloat16().view(torch.uint8))):
        qt = QTensor("w", qtype, (8, 16), raw.reshape(8, -1))

        class W(dict):
            def dense(self, name):
                raise AssertionError("a dequantized copy was made")

        x = torch.randn(3, 16)
        y = ops_triton.linear(x, W(w=qt), "w")
        torch.testing.assert_close(y, x @ qt.float_view().float().T, atol=1e-5, rtol=1e-5)


def test_resident_weights_share_one_aligned_buffer():
    from qkvgguf.runtime.weights import QTensor, _load_arena

    ts = [QTensor(f"t{i}", T.F32, (n,), torch.arange(4 * n, dtype=torch.uint8).view(1, -1) + i)
          for i, n in enumerate((3, 100, 64, 1))]
    before = [t.raw.clone() for t in ts]
    arena = _load_arena(ts, torch.device("cpu"))
    for t, b in zip(ts, before):
        assert torch.equal(t.raw, b)
        assert t.raw.untyped_storage().data_ptr() == arena.untyped_storage().data_ptr()
        assert (t.raw.data_ptr() - arena.data_ptr()) % 256 == 0
    assert arena.numel() == 256 + 512 + 256 + 256  # each tensor's bytes rounded up to 256, nothing more


# -- GPU only: pinned memory, autotuning without the flush buffer --------------------------------
@needs_cuda
def test_pinned_host_buffer_is_pinned_and_exact():
    from qkvgguf.runtime.paging import pinned_host_buffer

    buf = pinned_host_buffer(3 * 2**20 + 5)
    assert buf.is_pinned() and buf.numel() == 3 * 2**20 + 5
    dst = torch.empty(buf.numel(), dtype=torch.uint8, device="cuda")
    buf.fill_(7)
    dst.copy_(buf, non_blocking=True)
    torch.cuda.synchronize()
    assert int(dst.sum()) == 7 * buf.numel()


@needs_cuda
def test_autotune_bench_allocates_nothing():
    from qkvgguf.runtime.kernels.launch import autotune_bench

    x = torch.randn(1 << 20, device="cuda")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t = autotune_bench(lambda: x.mul_(1.0), quantiles=(0.5, 0.2, 0.8))
    assert len(t) == 3 and t[0] > 0
    assert torch.cuda.max_memory_allocated() - before < 2**20
