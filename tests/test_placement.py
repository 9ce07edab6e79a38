"""The planner's third placement, "computed on the CPU" (runtime/planner.py placement "cpu"/"auto"),
and the runtime path that honours it (Weights.cpu_computed -> ops.host_linear).

Planner: every plan partitions the units, never exceeds the budget, has staging only when something
streams; the cost model moves units to whichever side the costs favour. Runtime, on the simulated
device: one forward with units resident, streamed and CPU-computed gives the all-CPU logits bit for
bit (torch backend), every CPU-computed matmul goes through host_linear and nothing else does, and
the streamer copies only the streamed units.
"""

import dataclasses

import pytest
import torch

from qkvgguf import GGUFFile
from qkvgguf.config import ModelConfig
from qkvgguf.runtime import Model, ops
from qkvgguf.runtime.planner import OUTPUT_UNIT, BudgetTooSmall, Costs, plan, specs_of

MiB = 2**20


@pytest.fixture(scope="module")
def smol(smollm2_path):
    gguf = GGUFFile(smollm2_path)
    return gguf, specs_of(gguf), ModelConfig.from_gguf(gguf)


def _costs(h2d=12e9, dev=160e9, cpu=10e9):
    return Costs(h2d, dev, {"Q4_1": cpu, "Q8_0": cpu, "Q6_K": cpu, "Q4_0": cpu, "F32": cpu})


def _check(p, budget):
    units = set(p.unit_bytes)
    parts = [set(p.resident_units), set(p.streamed_units), set(p.cpu_units)]
    assert set().union(*parts) == units and sum(map(len, parts)) == len(units)  # a partition
    assert p.total_bytes <= budget
    assert (p.staging_bytes > 0) == bool(p.streamed_units)


def _budget(specs, cfg, frac):
    """The cache, activations and CUDA context, plus frac of the rest (the weights)."""
    full = plan(specs, cfg, None, 2048, "q8_0", "q8_0")
    fixed = full.kv_bytes + full.activation_bytes + full.context_bytes
    return fixed + int(frac * (full.total_bytes - fixed))


@pytest.mark.parametrize("placement", ["stream", "cpu", "auto"])
def test_plans_partition_units_and_fit_every_budget(smol, placement):
    _, specs, cfg = smol
    for frac in (0.05, 0.2, 0.4, 0.6, 0.8, 0.95, 1.0):
        budget = _budget(specs, cfg, frac)
        try:
            p = plan(specs, cfg, budget, 2048, "q8_0", "q8_0", placement=placement, costs=_costs())
        except BudgetTooSmall:
            assert placement == "stream" and frac < 0.7  # streaming needs two slots of the 30 MB output matrix
            continue
        _check(p, budget)
        assert p.all_resident == (frac == 1.0)


def test_cpu_placement_keeps_more_resident_than_streaming(smol):
    """No staging slots: the bytes they would take hold resident weights instead."""
    _, specs, cfg = smol
    budget = _budget(specs, cfg, 0.8)
    s = plan(specs, cfg, budget, 2048, "q8_0", "q8_0", placement="stream")
    c = plan(specs, cfg, budget, 2048, "q8_0", "q8_0", placement="cpu")
    assert c.cpu_units and not c.streamed_units and c.staging_bytes == 0
    assert c.resident_weight_bytes > s.resident_weight_bytes
    assert set(s.resident_units) <= set(c.resident_units) or c.resident_weight_bytes > s.resident_weight_bytes


def test_auto_follows_the_costs(smol):
    _, specs, cfg = smol
    budget = _budget(specs, cfg, 0.75)
    fast_cpu = plan(specs, cfg, budget, 2048, "q8_0", "q8_0", placement="auto", costs=_costs(h2d=1e9, cpu=1e12))
    assert fast_cpu.cpu_units and not fast_cpu.streamed_units
    fast_bus = plan(specs, cfg, budget, 2048, "q8_0", "q8_0", placement="auto", costs=_costs(h2d=1e12, cpu=1e8))
    assert fast_bus.streamed_units and not fast_bus.cpu_units
    for costs in (_costs(), _costs(h2d=6e9, cpu=8e9), _costs(h2d=25e9, cpu=5e9)):
        auto = plan(specs, cfg, budget, 2048, "q8_0", "q8_0", placement="auto", costs=costs)
        _check(auto, budget)
        for other in ("stream", "cpu"):
            o = plan(specs, cfg, budget, 2048, "q8_0", "q8_0", placement=other, costs=costs)
            assert auto.step_seconds(costs) <= o.step_seconds(costs) * (1 + 1e-9)
        assert auto.summary()["predicted_tokens_per_s"] == pytest.approx(1 / auto.step_seconds(costs))


def test_step_seconds_arithmetic():
    cfg_units = {0: 100, 1: 100, OUTPUT_UNIT: 50}
    from qkvgguf.runtime.planner import Plan

    c = Costs(h2d_bytes_per_s=10.0, device_bytes_per_s=100.0, cpu_bytes_per_s={}, cpu_call_s=0.0)
    p = Plan(1000, 8, 8, "f16", "f16", kv_bytes=0, activation_bytes=0, context_bytes=0, small_bytes=0,
             unit_bytes=cfg_units, resident_units=[0], streamed_units=[1], cpu_units=[OUTPUT_UNIT],
             unit_raw=cfg_units, unit_cpu_s={OUTPUT_UNIT: 2.0})
    # GPU reads 200 bytes at 100/s = 2 s, the copy 100 bytes at 10/s = 10 s (overlapped: 10), then 2 s on the CPU
    assert p.step_seconds(c) == pytest.approx(12.0)


def test_ngl_with_cpu_placement_is_llamacpp_partial_offload(smol):
    _, specs, cfg = smol
    p = plan(specs, cfg, None, 512, "f16", "f16", n_gpu_layers=10, placement="cpu")
    assert [u for u in p.resident_units] == list(range(10))
    assert p.cpu_units == list(range(10, cfg.n_layer)) + [OUTPUT_UNIT] and not p.streamed_units
    assert p.staging_bytes == 0


def test_cpu_placement_error_names_the_minimum(smol):
    _, specs, cfg = smol
    with pytest.raises(BudgetTooSmall, match="needs at least"):
        plan(specs, cfg, 100 * MiB, 2048, "f16", "f16", placement="cpu")


@pytest.fixture(scope="module")
def smol_ref(smol):
    gguf, specs, cfg = smol
    ids = torch.tensor([1, 504, 3, 9922, 314, 253, 1345, 28, 216, 339, 6355, 282, 260, 1345])
    ref = Model(gguf).forward(ids, Model(gguf).new_cache(64), logits="all")
    return ids, ref


def _spy(monkeypatch):
    calls = []
    real = ops.host_linear

    def spy(x, W, name, bias=None):
        calls.append(name)
        return real(x, W, name, bias)

    monkeypatch.setattr(ops, "host_linear", spy)
    return calls


def test_hybrid_forward_equals_all_cpu(smol, smol_ref, monkeypatch):
    """Layers resident, streamed and CPU-computed in one forward (and the output matrix on the CPU)."""
    gguf, specs, cfg = smol
    ids, ref = smol_ref
    p = plan(specs, cfg, None, 64, "f32", "f32", n_batch=32)
    p = dataclasses.replace(p, resident_units=list(range(0, 10)), streamed_units=list(range(10, 20)),
                            cpu_units=list(range(20, cfg.n_layer)) + [OUTPUT_UNIT], host_tensors=[])
    model = Model(gguf, plan=p)
    names = model.weights.cpu_computed
    assert {n.split(".")[1] for n in names if n.startswith("blk.")} == {str(i) for i in range(20, cfg.n_layer)}
    calls = _spy(monkeypatch)
    out = model.forward(ids, model.new_cache(64), logits="all")
    assert torch.equal(out, ref)
    assert sorted(calls) == sorted(names) and len(calls) == len(names)  # each once, nothing else
    copied = model.weights.streamer.bytes_copied
    # only streamed units were copied: each once, and the first again (prefetched for the next pass)
    assert copied == p.pcie_bytes_per_token + p.unit_bytes[10] == 11 * p.unit_bytes[10]


def test_hybrid_forward_triton_backend(tmp_path, monkeypatch):
    """Triton ops for resident and streamed layers, the CPU kernels for the CPU layers, in one pass."""
    pytest.importorskip("triton")
    from gguf import GGMLQuantizationType as T

    from tiny_models import hf_model, write_gguf

    path = tmp_path / "tiny.gguf"
    write_gguf(hf_model("llama", seed=2, hidden=64, ff=96), "llama", path, qtypes=[T.Q8_0, T.Q4_0])
    gguf = GGUFFile(path)
    cfg = ModelConfig.from_gguf(gguf)
    assert cfg.n_layer >= 2
    ids = torch.tensor([5, 17, 42, 99, 3])
    ref = Model(gguf, backend="triton").forward(ids, Model(gguf, backend="triton").new_cache(8), logits="all")
    cpu_ref = Model(gguf).forward(ids, Model(gguf).new_cache(8), logits="all")
    p = plan(specs_of(gguf), cfg, None, 8, "f32", "f32", n_batch=8, context_bytes=0)
    p = dataclasses.replace(p, resident_units=[], streamed_units=[0], cpu_units=list(range(1, cfg.n_layer)) + [OUTPUT_UNIT])
    model = Model(gguf, backend="triton", plan=p)
    calls = _spy(monkeypatch)
    out = model.forward(ids, model.new_cache(8), logits="all")
    assert len(calls) == len(model.weights.cpu_computed) > 0
    assert torch.allclose(out, ref, atol=2e-3, rtol=0) and torch.allclose(out, cpu_ref, atol=2e-3, rtol=0)


def test_machine_costs_measure_once_and_cache(tmp_path, monkeypatch):
    """CPU rates measured with the real kernels, written to the cache file, read back without measuring."""
    from qkvgguf.runtime import machine

    monkeypatch.setenv("QKVGGUF_MACHINE_FILE", str(tmp_path / "machine.json"))
    c = machine.costs("cpu", ["Q4_0", "Q8_0"], threads=1)
    assert set(c.cpu_bytes_per_s) == {"Q4_0", "Q8_0"} and all(r > 1e6 for r in c.cpu_bytes_per_s.values())
    assert "assumed GPU" in c.source and (tmp_path / "machine.json").exists()
    monkeypatch.setattr(machine, "measure_cpu", lambda t: pytest.fail(f"measured {t} again"))
    again = machine.costs("cpu", ["Q4_0"], threads=1)
    assert again.cpu_bytes_per_s["Q4_0"] == c.cpu_bytes_per_s["Q4_0"]
    (tmp_path / "machine.json").write_text("not json")  # a damaged cache is ignored, not trusted
    assert machine.costs("cpu", ["Q4_0"], threads=1, measure=False).cpu_bytes_per_s["Q4_0"] > 0


def test_cuda_graph_refuses_cpu_computed_layers(smol):
    from qkvgguf.runtime.cuda_graph import graph_supported

    gguf, specs, cfg = smol
    p = plan(specs, cfg, None, 64, "f32", "f32", n_batch=32)
    p = dataclasses.replace(p, resident_units=list(range(cfg.n_layer)), cpu_units=[OUTPUT_UNIT])
    model = Model(gguf, plan=p)
    cache = model.new_cache(8, "f16", "f16")
    model.device = torch.device("cuda")  # what graph_supported checks first; nothing runs
    model.backend = "triton"
    why = graph_supported(model, cache)
    assert why and "CPU" in why
