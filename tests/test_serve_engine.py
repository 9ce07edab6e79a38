"""The serving engine on SmolLM2, in-process: batched decode against one sequence at a time (bit for
bit), the queue, cancellation, chunked prefill and the context limit."""

from __future__ import annotations

import pytest
import torch

from qkvgguf import GGUFFile
from qkvgguf.runtime import Model, Sampler, SamplingParams, Session
from qkvgguf.runtime.batch import decode_batch
from qkvgguf.runtime.engine import DoneEvent, Engine, GenParams, PromptTooLong, QueueFull, Request, TextEvent
from qkvgguf.tokenizer import Tokenizer

PROMPTS = ["The capital of France is", "Once upon a time, a small dog", "def fibonacci(n):",
           "The best way to learn to code is", "Water boils at"]
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def smol(smollm2_path):
    gguf = GGUFFile(smollm2_path)
    return Model(gguf), Tokenizer.from_gguf(gguf)


def ids_of(tok, text):
    return tok.encode(text, add_special=True, parse_special=True)


@pytest.mark.parametrize("ctype", ["f16", "q8_0"])
def test_batched_logits_equal_alone(smol, ctype):
    """Row b of a batched step is bit-identical to decoding sequence b alone (same cache contents)."""
    model, tok = smol
    steps = 6
    ref = []
    for p in PROMPTS[:3]:
        s = Session(model, 128, type_k=ctype, type_v=ctype)
        logits, rows = s.feed(ids_of(tok, p)), []
        for _ in range(steps):
            rows.append(logits.clone())
            logits = s.decode(int(logits.argmax()))
        ref.append(rows)
    sessions = [Session(model, 128, type_k=ctype, type_v=ctype) for _ in PROMPTS[:3]]
    logits = [s.feed(ids_of(tok, p)) for s, p in zip(sessions, PROMPTS[:3])]
    for step in range(steps):
        for b in range(3):
            assert torch.equal(logits[b], ref[b][step]), (ctype, step, b)
        logits = list(decode_batch(model, [int(x.argmax()) for x in logits], [s.cache for s in sessions]))


def run_engine(engine: Engine, requests: list[tuple[list[int], GenParams]]):
    """Submit all, step until all are done -> [(text, DoneEvent)]."""
    out = [[[], None] for _ in requests]
    reqs = []
    for i, (ids, params) in enumerate(requests):
        def on_event(ev, i=i):
            if isinstance(ev, TextEvent):
                out[i][0].append(ev.text)
            else:
                out[i][1] = ev
        reqs.append(Request(ids, params, on_event))
        engine.submit(reqs[-1])
    while engine.step():
        pass
    assert all(r.done for r in reqs)
    return [("".join(t), d) for t, d in out]


def test_parallel_equals_one_at_a_time(smol):
    model, tok = smol
    reqs = [(ids_of(tok, p), GenParams(max_tokens=n, sampling=GREEDY, stop=stop))
            for p, n, stop in zip(PROMPTS, [12, 5, 16, 9, 12], [(), (), ("\n",), (), (" 1",)])]
    alone = [run_engine(Engine(model, tok, 256, n_slots=1), [r])[0] for r in reqs]
    together = run_engine(Engine(model, tok, 256, n_slots=3, n_batch=4), reqs)  # 5 requests, 3 slots, chunked prompts
    assert together == alone
    assert [d.completion_tokens for _, d in together] == [d.completion_tokens for _, d in alone]
    assert alone[1][1].finish_reason == "length" and alone[1][1].completion_tokens == 5


def test_engine_matches_session_generate_up_to_a_full_context(smol):
    """The stopping rules of `qkvgguf run` (Session.generate): a full context ends the reply."""
    model, tok = smol
    ids = ids_of(tok, PROMPTS[1])
    n_ctx = len(ids) + 7
    expect = list(Session(model, n_ctx).generate(ids, 100, Sampler(GREEDY), tok.is_eog))
    (text, done), = run_engine(Engine(model, tok, n_ctx, n_slots=2), [(ids, GenParams(100, GREEDY))])
    assert text == tok.decode(expect, skip_special=True)
    assert done.finish_reason == "length" and done.completion_tokens == len(expect) == 8


def test_sampled_with_seed_is_reproducible_in_any_company(smol):
    model, tok = smol
    params = GenParams(12, SamplingParams(temperature=1.0, top_p=1.0, seed=3))
    alone = run_engine(Engine(model, tok, 256), [(ids_of(tok, PROMPTS[0]), params)])[0]
    mixed = run_engine(Engine(model, tok, 256, n_slots=2),
                       [(ids_of(tok, PROMPTS[2]), GenParams(12, SamplingParams(temperature=1.0, seed=9))),
                        (ids_of(tok, PROMPTS[0]), params)])[1]
    assert mixed == alone


def test_cancel_frees_the_slot(smol):
    model, tok = smol
    engine = Engine(model, tok, 256, n_slots=1, max_queue=4)
    events = {0: [], 1: []}
    first = Request(ids_of(tok, PROMPTS[0]), GenParams(200, GREEDY), events[0].append)
    second = Request(ids_of(tok, PROMPTS[1]), GenParams(3, GREEDY), events[1].append)
    engine.submit(first)
    engine.submit(second)
    for _ in range(3):
        engine.step()
    assert engine.status()["slots_busy"] == 1 and engine.status()["queued"] == 1
    engine.cancel(first)
    engine.step()  # the cancelled request leaves and the waiting one takes its slot in the same step
    assert isinstance(events[0][-1], DoneEvent) and events[0][-1].finish_reason == "cancelled"
    assert engine.status()["queued"] == 0
    while engine.step():
        pass
    assert events[1][-1].finish_reason == "length" and events[1][-1].completion_tokens == 3
    assert engine.status()["slots_busy"] == 0


def test_queue_full_and_prompt_too_long(smol):
    model, tok = smol
    engine = Engine(model, tok, 64, n_slots=1, max_queue=1)
    ids = ids_of(tok, PROMPTS[0])
    engine.submit(Request(ids, GenParams(4, GREEDY), lambda ev: None))  # will take the slot
    engine.submit(Request(ids, GenParams(4, GREEDY), lambda ev: None))  # waits
    with pytest.raises(QueueFull, match="max-queue 1"):
        engine.submit(Request(ids, GenParams(4, GREEDY), lambda ev: None))
    with pytest.raises(PromptTooLong, match="64-token context"):
        engine.check(list(range(100, 164)))
    engine.check(list(range(100, 163)))  # 63 tokens leave room for one
    with pytest.raises(PromptTooLong):
        engine.check([])


def test_max_tokens_zero_and_stop_at_the_first_token(smol):
    model, tok = smol
    ids = ids_of(tok, PROMPTS[0])
    (text, done), = run_engine(Engine(model, tok, 256), [(ids, GenParams(0, GREEDY))])
    assert (text, done.finish_reason, done.completion_tokens) == ("", "length", 0)
    full, _ = run_engine(Engine(model, tok, 256), [(ids, GenParams(6, GREEDY))])[0]
    (text, done), = run_engine(Engine(model, tok, 256), [(ids, GenParams(6, GREEDY, stop=(full[:2],)))])
    assert (text, done.finish_reason) == ("", "stop")


def test_prefill_is_chunked_between_decode_steps(smol):
    """A long prompt arriving while another request decodes costs it one chunk per step, not the prompt."""
    model, tok = smol
    engine = Engine(model, tok, 512, n_slots=2, n_batch=16)
    got = {"a": 0}
    a = Request(ids_of(tok, PROMPTS[0]), GenParams(40, GREEDY), lambda ev: got.__setitem__("a", got["a"] + 1))
    engine.submit(a)
    engine.step()
    engine.step()
    long_ids = ids_of(tok, " ".join(PROMPTS) * 4)
    assert len(long_ids) > 100
    engine.submit(Request(long_ids, GenParams(2, GREEDY), lambda ev: None))
    before = got["a"]
    for _ in range(len(long_ids) // 16):  # the long prompt still reading its chunks
        engine.step()
    assert got["a"] - before >= len(long_ids) // 16 - 1  # a got a token at (almost) every step


def test_vram_plan_counts_one_cache_per_sequence(smollm2_path):
    """serve --parallel N: the planner reserves N KV caches (and fewer layers stay resident for it)."""
    from qkvgguf.config import ModelConfig
    from qkvgguf.kv_types import kv_cache_bytes
    from qkvgguf.runtime.planner import BudgetTooSmall, plan, specs_of

    gguf = GGUFFile(smollm2_path)
    cfg = ModelConfig.from_gguf(gguf)
    one = plan(specs_of(gguf), cfg, None, 4096, "q4g", "q4g")
    four = plan(specs_of(gguf), cfg, None, 4096, "q4g", "q4g", n_seq=4)
    assert four.kv_bytes == 4 * one.kv_bytes == 4 * kv_cache_bytes(cfg, 4096, "q4g", "q4g")
    assert four.total_bytes - one.total_bytes == 3 * one.kv_bytes
    with pytest.raises(BudgetTooSmall, match="x 4 sequences"):
        plan(specs_of(gguf), cfg, one.total_bytes, 4096, "q4g", "q4g", n_seq=4)
