"""The real SmolLM2-135M-Instruct Q4_1 file against transformers and llama.cpp.

- logits for a 256-token real-text prompt: transformers loading the same GGUF (float32), max |d| <= 1e-2
- greedy 64-token continuations identical to transformers' for 3 prompts
- perplexity with -c 512 within 1% of llama.cpp's, computed the same way (same windows, same scoring)
"""

import os

import pytest
import torch

import llamacpp
import texts
from qkvgguf import GGUFFile
from qkvgguf.runtime import Model, Sampler, SamplingParams, Session, perplexity
from qkvgguf.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

PROMPTS = [
    "Once upon a time, in a small village at the edge of the forest,",
    "The three most important things to know about the French Revolution are",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
]


@pytest.fixture(scope="module")
def ours(smollm2_path):
    gguf = GGUFFile(smollm2_path)
    return Model(gguf, cache_bytes=1 << 30), Tokenizer.from_gguf(gguf)


@pytest.fixture(scope="module")
def hf(smollm2_path):
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model.eval()


def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Plain greedy loop with the KV cache (no generate() config: no EOS stop, no processors)."""
    out, past = [], None
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            res = model(ids, past_key_values=past, use_cache=True)
            past = res.past_key_values
            tok = int(res.logits[0, -1].argmax())
            out.append(tok)
            ids = torch.tensor([[tok]])
    return out


def test_logits_match_transformers(ours, hf):
    model, tok = ours
    ids = tok.encode(texts.sherlock()[20_000:40_000], add_special=True)[:256]
    assert len(ids) == 256
    got = model.forward(torch.tensor(ids), model.new_cache(256), logits="all")
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    diff = (got - ref).abs().max().item()
    assert diff <= 1e-2, f"max |logit difference| {diff:.3e}"


@pytest.mark.parametrize("prompt", PROMPTS, ids=["story", "history", "code"])
def test_greedy_matches_transformers(ours, hf, prompt):
    model, tok = ours
    ids = tok.encode(prompt, add_special=True)
    session = Session(model, n_ctx=256)
    got = list(session.generate(ids, 64, Sampler(SamplingParams(temperature=0))))
    assert got == _hf_greedy(hf, ids, 64)


def test_perplexity_close_to_llamacpp(ours, smollm2_path):
    model, tok = ours
    n_ctx, n_windows = 512, 4
    ids = tok.encode(texts.war_and_peace()[:60_000], add_special=True)[: n_ctx * n_windows]
    assert len(ids) == n_ctx * n_windows
    res = perplexity(model, ids, n_ctx, bos_id=tok.bos_id if tok.add_bos else None)
    assert res.n_scored == n_windows * (n_ctx - 1)
    windows = [ids[i * n_ctx:(i + 1) * n_ctx] for i in range(n_windows)]
    ref = llamacpp.perplexity(smollm2_path, windows)
    assert abs(res.ppl / ref - 1) <= 0.01, f"ours {res.ppl:.4f}, llama.cpp {ref:.4f}"
