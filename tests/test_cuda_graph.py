"""The decode step that a CUDA graph captures (runtime/cuda_graph.py, KVCache.use_device_position).

A captured step must not bake the position into the graph: the cache keeps a device counter that
positions, the K/V write and the attention length read, and `advance` increments on the device.
On the CPU the same device-position step runs eagerly (torch backend, and the Triton kernels under
the interpreter) and must equal the ordinary host-position step: same greedy tokens, same logits
to float tolerance, same cache bytes. With a GPU, the captured graph's replays equal eager decode.
"""

import pytest
import torch

from qkvgguf import GGUFFile
from qkvgguf.errors import QkvggufError
from qkvgguf.runtime import Model, Sampler, SamplingParams, Session
from qkvgguf.runtime.cuda_graph import GraphDecoder, graph_supported

from tiny_models import hf_model, write_gguf

PROMPT = [5, 17, 42, 99, 3, 200, 7]


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    hf = hf_model("llama", seed=5, hidden=256, ff=512)  # head_dim 64: every cache type applies
    path = tmp_path_factory.mktemp("graph") / "llama.gguf"
    write_gguf(hf, "llama", path)
    return GGUFFile(path)


def _greedy_with_logits(session, n):
    logits = session.feed(PROMPT)
    toks, all_logits = [], []
    for _ in range(n):
        tok = int(logits.argmax())
        toks.append(tok)
        logits = session.decode(tok)
        all_logits.append(logits.clone())
    return toks, torch.stack(all_logits)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("cache_type", ["f32", "f16", "q8_0", "q4_0"])
def test_device_position_step_equals_host_step(gguf, backend, cache_type):
    if backend == "triton":
        pytest.importorskip("triton")
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"  # interpreter on the CPU
    model = Model(gguf, device=device, backend=backend)
    host = Session(model, 24, 4, cache_type, cache_type, cuda_graph=False)
    dev = Session(model, 24, 4, cache_type, cache_type, cuda_graph=False)
    dev.cache.use_device_position()
    a, la = _greedy_with_logits(host, 8)
    b, lb = _greedy_with_logits(dev, 8)
    assert a == b
    tol = 1e-4 if device == "cpu" else 2e-2
    torch.testing.assert_close(lb, la, atol=tol, rtol=tol)
    assert int(dev.cache.pos_t) == dev.cache.pos == host.cache.pos
    for name, t in host.cache.k_store.tensors.items():  # layer 0's keys depend on the tokens only:
        n = host.cache.pos                                 # the same bytes at the same places
        assert torch.equal(dev.cache.k_store.tensors[name][0, :, :n], t[0, :, :n]), name
    dev.cache.reset(3)  # the device counter follows resets (a chat turn re-running a suffix)
    assert int(dev.cache.pos_t) == 3


def test_q4g_refuses_device_position(gguf):
    cache = Model(gguf).new_cache(16, "q4g", "q4g")
    with pytest.raises(QkvggufError, match="q4g"):
        cache.use_device_position()


def test_graph_not_supported_on_cpu_says_why(gguf):
    model = Model(gguf, backend="torch")
    cache = model.new_cache(16)
    assert "CUDA" in graph_supported(model, cache)
    with pytest.raises(ValueError, match="CUDA"):
        GraphDecoder(model, cache)
    s = Session(model, 16)  # cuda_graph=True by default: falls back to eager decode on the CPU
    assert list(s.generate(PROMPT, 3, Sampler(SamplingParams(temperature=0))))
    assert s._graph is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cache_type", ["f16", "q8_0", "q4_0"])
def test_graph_replay_equals_eager_on_gpu(gguf, cache_type):
    model = Model(gguf, device="cuda", backend="triton")
    eager = Session(model, 64, 8, cache_type, cache_type, cuda_graph=False)
    graph = Session(model, 64, 8, cache_type, cache_type, cuda_graph=True)
    a, la = _greedy_with_logits(eager, 20)
    b, lb = _greedy_with_logits(graph, 20)
    assert graph._graph is not None
    assert a == b
    torch.testing.assert_close(lb, la, atol=2e-2, rtol=2e-2)
