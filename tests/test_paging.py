"""Weight streaming (runtime/paging.py) on a simulated device: the planner's streamed units go
through two CPU "device" slots with the same bookkeeping as on CUDA (slot per unit, prefetch of the
next unit, busy slots never overwritten). Any slot or offset mistake changes the logits, so paged
runs must equal unpaged runs bit for bit: SmolLM2 (torch backend) at a budget that streams most
layers and at the minimum budget (everything streams), and a tiny model on the Triton backend.
"""

import dataclasses

import pytest
import torch

from qkvgguf import GGUFFile
from qkvgguf.config import ModelConfig
from qkvgguf.runtime import Model, Sampler, SamplingParams, Session
from qkvgguf.runtime.planner import minimum_budget, plan, specs_of

MiB = 2**20


def _plan(gguf, budget, n_ctx=64):
    return plan(specs_of(gguf), ModelConfig.from_gguf(gguf), budget, n_ctx, "f32", "f32", n_batch=32)


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    gguf = GGUFFile(smollm2_path)
    ids = torch.tensor([1, 504, 3, 9922, 314, 253, 1345, 28, 216, 339, 6355, 282, 260, 1345])
    ref = Model(gguf).forward(ids, Model(gguf).new_cache(64), logits="all")
    return gguf, ids, ref


@pytest.mark.parametrize("which", ["most layers stream", "minimum budget", "everything streams", "-ngl 10"])
def test_smollm2_paged_equals_unpaged(smollm2, which):
    gguf, ids, ref = smollm2
    cfg = ModelConfig.from_gguf(gguf)
    low = minimum_budget(specs_of(gguf), cfg, 64, "f32", "f32", 32)  # two slots of the output matrix
    budget = low + 20 * MiB if which == "most layers stream" else low
    p = _plan(gguf, budget)
    if which == "-ngl 10":  # layers 0-9 resident, 10-29 and the output streamed
        p = plan(specs_of(gguf), cfg, None, 64, "f32", "f32", n_batch=32, n_gpu_layers=10)
        budget = p.budget
    assert p.total_bytes <= budget and p.streamed_units
    if which == "everything streams":  # not a plan the planner makes (it keeps what fits): forced
        p = dataclasses.replace(p, resident_units=[], streamed_units=sorted(p.unit_bytes))
    model = Model(gguf, plan=p)
    assert model.weights.streamer.n_bytes == p.staging_bytes  # the pool is what the planner counted
    out = model.forward(ids, model.new_cache(64), logits="all")
    assert torch.equal(out, ref)
    copied = model.weights.streamer.bytes_copied
    model.forward(ids[:1], model.new_cache(64))  # one more forward moves each streamed unit once
    assert model.weights.streamer.bytes_copied - copied <= p.pcie_bytes_per_token


def test_smollm2_paged_greedy_decode(smollm2):
    gguf, _, _ = smollm2
    greedy = Sampler(SamplingParams(temperature=0))
    prompt = [1, 504, 3, 9922, 314]
    a = list(Session(Model(gguf), 64).generate(prompt, 8, greedy))
    paged = Model(gguf, plan=_plan(gguf, _plan(gguf, None).total_bytes - 20 * MiB))
    b = list(Session(paged, 64).generate(prompt, 8, greedy))
    assert a == b


def test_tiny_model_triton_paged(tmp_path):
    pytest.importorskip("triton")
    from gguf import GGMLQuantizationType as T

    from tiny_models import hf_model, write_gguf

    path = tmp_path / "tiny.gguf"
    write_gguf(hf_model("llama", seed=2, hidden=64, ff=96), "llama", path, qtypes=[T.Q8_0, T.Q4_0])
    gguf = GGUFFile(path)
    ids = torch.tensor([5, 17, 42, 99, 3])
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # CUDA: real pinned buffers, streams, events
    unpaged = Model(gguf, backend="triton", device=dev)
    ref = unpaged.forward(ids, unpaged.new_cache(8), logits="all")
    low = minimum_budget(specs_of(gguf), ModelConfig.from_gguf(gguf), 8, "f32", "f32", 8, context_bytes=0)
    p = plan(specs_of(gguf), ModelConfig.from_gguf(gguf), low, 8, "f32", "f32", n_batch=8, context_bytes=0)
    model = Model(gguf, backend="triton", plan=p, device=dev)
    assert torch.equal(model.forward(ids, model.new_cache(8), logits="all"), ref)


def _tiny_paged(tmp_path, dev, tied=True):
    from gguf import GGMLQuantizationType as T

    from tiny_models import hf_model, write_gguf

    path = tmp_path / "tiny.gguf"
    write_gguf(hf_model("llama", seed=2, hidden=64, ff=96, tied=tied), "llama", path, qtypes=[T.Q8_0, T.Q4_0])
    gguf = GGUFFile(path)
    cfg = ModelConfig.from_gguf(gguf)
    low = minimum_budget(specs_of(gguf), cfg, 32, "f16", "f16", 8, context_bytes=0)
    p = plan(specs_of(gguf), cfg, low, 32, "f16", "f16", n_batch=8, context_bytes=0)
    assert p.streamed_units
    return gguf, p


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_forward_from_embedding_rows_equals_forward_from_tokens(tmp_path, tied):
    """What a captured paged step feeds (Model.embed's rows instead of token ids) gives the same logits."""
    gguf, p = _tiny_paged(tmp_path, "cpu", tied)
    model = Model(gguf, plan=p, backend="torch")
    ids = torch.tensor([5, 17, 42, 99, 3])
    ref = model.forward(ids, model.new_cache(32), logits="all")
    rows = model.embed(ids)
    assert rows.shape == (5, model.config.n_embd)
    assert torch.equal(model.forward(ids, model.new_cache(32), logits="all", embeds=rows), ref)
    assert not model.embeds_on_host  # a CPU device gathers in place


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_paged_graph_decode_equals_paged_eager_on_gpu(tmp_path, tied):
    """The captured paged step (copies, side stream and events inside the graph) replays what eager
    paged decode computes, also with an eager prompt between replays: same greedy tokens, logits to
    fp16 tolerance."""
    pytest.importorskip("triton")
    gguf, p = _tiny_paged(tmp_path, "cuda", tied)
    model = Model(gguf, plan=p, backend="triton", device="cuda")
    assert model.weights.streamed
    prompt = [5, 17, 42, 99, 3]
    eager = Session(model, 32, 8, "f16", "f16", cuda_graph=False)
    graph = Session(model, 32, 8, "f16", "f16", cuda_graph=True, paged_graph=True)
    outs = []
    for s in (eager, graph):
        logits, toks, ls = s.feed(prompt), [], []
        for _ in range(12):
            toks.append(int(logits.argmax()))
            logits = s.decode(toks[-1])
            ls.append(logits.float().clone())
        # an eager prompt after the capture and replays (a chat turn), then replays again
        logits = s.feed(s.tokens + [7, 8, 9])
        ls.append(logits.float().clone())
        for _ in range(3):
            toks.append(int(logits.argmax()))
            logits = s.decode(toks[-1])
            ls.append(logits.float().clone())
        outs.append((toks, torch.stack(ls)))
    assert graph._graph is not None
    assert outs[0][0] == outs[1][0]
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=2e-2, rtol=2e-2)


def test_failed_graph_capture_falls_back_to_eager_decode(tmp_path, monkeypatch, caplog):
    """A capture the driver refuses must not end the run: the session warns once, forgets what the
    streamer's slots were thought to hold, and decodes eagerly with the same tokens."""
    from qkvgguf.runtime import generate

    gguf, p = _tiny_paged(tmp_path, "cpu")
    model = Model(gguf, plan=p, backend="torch")
    prompt = [5, 17, 42, 99, 3]

    def greedy(session):
        logits, out = session.feed(prompt), []
        for _ in range(6):
            out.append(int(logits.argmax()))
            logits = session.decode(out[-1])
            out.append(logits.clone())
        return out

    want = greedy(Session(model, 32, 8, "f16", "f16", cuda_graph=False))

    def refuse(model, cache, paged=False):
        st = model.weights.streamer  # a capture that ran the host side but copied nothing:
        st.in_slot = [st.order[0], st.order[1] if len(st.order) > 1 else None]
        for slot in st.slots:
            slot.zero_()
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(generate, "graph_supported", lambda m, c, paged=False: None)
    monkeypatch.setattr(generate, "GraphDecoder", refuse)
    s = Session(model, 32, 8, "f16", "f16", cuda_graph=True)
    with caplog.at_level("WARNING"):
        got = greedy(s)
    assert all(torch.equal(torch.as_tensor(a), torch.as_tensor(b)) for a, b in zip(got, want))
    assert s._graph is None and not s.cuda_graph
    assert sum("CUDA graph capture failed" in r.message for r in caplog.records) == 1
