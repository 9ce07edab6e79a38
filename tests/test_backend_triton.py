"""The Triton backend against the torch backend on whole models (issue 4, done-when 2).

Without a GPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) on tiny models whose
weights use every quantized format we can write, so every qmatmul path runs inside a real forward
pass: perplexity within 0.2% and identical greedy continuations for 3 prompts.
"""

import pytest
import torch
from gguf import GGMLQuantizationType as T

from qkvgguf import GGUFFile
from qkvgguf.runtime import Model, Sampler, SamplingParams, Session, perplexity

from tiny_models import VOCAB, hf_model, write_gguf

pytest.importorskip("triton")

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"  # on a GPU the compiled kernels, fp16 activations; else the interpreter
LOGITS_RTOL = 2e-2 if GPU else 1e-4

QTYPES = [T.Q4_K, T.Q8_0, T.Q6_K, T.Q4_0, T.Q5_K, T.Q4_1]
PROMPTS = [[5, 17, 42, 99], [200, 3, 3, 7, 250, 11], [1]]


@pytest.fixture(scope="module", params=[("llama", True), ("qwen3", False)], ids=lambda p: p[0])
def models(request, tmp_path_factory):
    arch, quantized = request.param
    hf = hf_model(arch, tied=arch == "qwen3", seed=3, hidden=256, ff=512)
    path = tmp_path_factory.mktemp("triton") / f"{arch}.gguf"
    write_gguf(hf, arch, path, qtypes=QTYPES if quantized else None)
    gguf = GGUFFile(path)
    if quantized:
        assert {t.type for t in gguf.tensors.values()} >= set(QTYPES)
    return Model(gguf, backend="torch"), Model(gguf, backend="triton", device=DEV)


def test_backend_is_triton(models):
    ref, tri = models
    assert (ref.backend, tri.backend) == ("torch", "triton")


def test_logits_close(models):
    ref, tri = models
    ids = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(0))
    a = ref.forward(ids, ref.new_cache(16), logits="all")
    b = tri.forward(ids, tri.new_cache(16), logits="all")
    assert (a - b.cpu()).abs().max() / a.abs().max() < LOGITS_RTOL


def test_perplexity_within_0_2_percent(models):
    ref, tri = models
    ids = torch.randint(0, VOCAB, (32,), generator=torch.Generator().manual_seed(1)).tolist()
    a = perplexity(ref, ids, 16)
    b = perplexity(tri, ids, 16)
    assert abs(b.ppl / a.ppl - 1) < 0.002, (a.ppl, b.ppl)


@pytest.mark.parametrize("prompt", PROMPTS, ids=["p4", "p6", "p1"])
def test_greedy_identical(models, prompt):
    ref, tri = models
    greedy = Sampler(SamplingParams(temperature=0))
    a = list(Session(ref, n_ctx=32, n_batch=3).generate(prompt, 6, greedy))
    b = list(Session(tri, n_ctx=32, n_batch=3).generate(prompt, 6, greedy))
    assert a == b
