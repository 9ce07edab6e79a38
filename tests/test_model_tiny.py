"""The model graph against transformers on tiny random models of every supported architecture."""

import pytest
import torch

from qkvgguf import GGUFFile
from qkvgguf.runtime import Model, Sampler, SamplingParams, Session

from tiny_models import VOCAB, hf_model, write_gguf

CASES = [("llama", False), ("llama", True), ("qwen2", False), ("qwen3", True)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{'tied' if t else 'untied'}" for a, t in CASES])
def pair(request, tmp_path_factory):
    arch, tied = request.param
    hf = hf_model(arch, tied=tied, seed=len(arch) + tied)
    path = tmp_path_factory.mktemp(arch) / f"{arch}.gguf"
    write_gguf(hf, arch, path)
    return arch, hf, Model(GGUFFile(path))


def test_config_flags(pair):
    arch, hf, model = pair
    cfg = model.config
    assert cfg.arch == arch
    assert cfg.rope_neox == (arch != "llama")
    assert cfg.qkv_bias == (arch == "qwen2")
    assert cfg.qk_norm == (arch == "qwen3")
    assert cfg.tied_embeddings == hf.config.tie_word_embeddings
    assert (cfg.n_head, cfg.n_head_kv) == (4, 2)


def test_logits_match_transformers(pair):
    _, hf, model = pair
    ids = torch.randint(0, VOCAB, (40,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    ours = model.forward(ids, model.new_cache(64), logits="all")
    rel = (ours - ref).abs().max() / ref.abs().max()
    assert rel <= 1e-4, f"relative error {rel:.2e}"


def test_chunked_and_incremental_equal_one_pass(pair):
    """Prompt in chunks of 7, then token by token: same logits as one pass (cache positions, masks)."""
    _, _, model = pair
    ids = torch.randint(0, VOCAB, (30,), generator=torch.Generator().manual_seed(2))
    full = model.forward(ids, model.new_cache(64), logits="all")
    cache = model.new_cache(64)
    parts = [model.forward(ids[s:s + 7], cache, logits="all") for s in range(0, 21, 7)]
    parts += [model.forward(ids[s:s + 1], cache, logits="all") for s in range(21, 30)]
    torch.testing.assert_close(torch.cat(parts), full, rtol=1e-4, atol=1e-4)


def test_f16_cache_close_to_f32(pair):
    _, _, model = pair
    ids = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(3))
    a = model.forward(ids, model.new_cache(32, "f32", "f32"), logits="all")
    b = model.forward(ids, model.new_cache(32, "f16", "f16"), logits="all")
    assert (a - b).abs().max() / a.abs().max() < 1e-2
    assert not torch.equal(a, b)  # the f16 cache really is used


def test_greedy_session_matches_transformers(pair):
    _, hf, model = pair
    prompt = [5, 17, 42, 99, 3]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 5:].tolist()
    session = Session(model, n_ctx=64, n_batch=2)
    ours = list(session.generate(prompt, 12, Sampler(SamplingParams(temperature=0))))
    assert ours == ref


def test_session_reuses_prefix(pair):
    _, _, model = pair
    session = Session(model, n_ctx=64)
    a = session.feed([1, 2, 3, 4, 5, 6])
    assert session.n_fed == 6
    b = session.feed([1, 2, 3, 4, 5, 6])
    assert session.n_fed == 1  # only the last token re-run, for its logits
    torch.testing.assert_close(a, b)
    session.feed([1, 2, 3, 9, 9])
    assert session.n_fed == 2


def test_sampler_seeded_and_filters():
    logits = torch.tensor([5.0, 4.9, 1.0, -3.0, 0.0])
    draws = lambda seed, **kw: [Sampler(SamplingParams(seed=seed, **kw))(logits) for _ in range(1)]  # noqa: E731
    assert draws(7) == draws(7)
    s = Sampler(SamplingParams(temperature=1.0, top_k=2, top_p=1.0, min_p=0.0, seed=0))
    assert {s(logits) for _ in range(200)} == {0, 1}
    s = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.5, seed=0))
    assert {s(logits) for _ in range(200)} == {0, 1}
    assert Sampler(SamplingParams(temperature=0))(logits) == 0
