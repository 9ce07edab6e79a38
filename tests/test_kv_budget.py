"""--kv-budget: the adaptive cache (qkvgguf/kv_budget.py, runtime/kv_ladder.py).

- the schedule: the most precision the budget buys (no schedule with more groups at a higher level
  fits), its allocation <= the budget, a one-line error below the 3-bit floor
- the store: allocated once (the same tensors, the same bytes, after a whole context: peak = the
  allocation), token-by-token stores what a whole batch stores, and what it reads back is each
  group at its level, requantized only from stored values (computed here from scratch)
- attention over it equals float64 attention over its dequantized contents
- SmolLM2 on real prose through the CLI: a context whose q8_0 cache does not fit the budget runs,
  and its perplexity lies between the q8_0 and the q3g cache's on the same windows
"""

import json

import pytest
import torch

from qkvgguf.errors import QkvggufError
from qkvgguf.kv_budget import LEVELS, ladder_bytes, plan_budget
from qkvgguf.kv_types import GROUP, N_SINK, kv_cache_bytes
from qkvgguf.runtime.kv_cache import KVCache
from qkvgguf.runtime.kv_lowbit import (dequantize_channels, dequantize_q3_64, dequantize_q4_64, quantize_channels,
                                       quantize_q3_64, quantize_q4_64)
from qkvgguf.runtime.kv_quant import dequantize_rows, fwht
from qkvgguf.quants.q8 import dequantize_q8_0, quantize_q8_0_torch

from test_kv_cache import activations, attention64, config, hadamard64, run


# -- the schedule -----------------------------------------------------------------------------------
@pytest.mark.parametrize("n_ctx", [67, 68, 500, 1000])
def test_schedule_is_the_most_precise_that_fits(n_ctx):
    cfg = config(n_layer=2, n_head_kv=2)
    G = (n_ctx - N_SINK) // GROUP
    floor, top = ladder_bytes(cfg, (0, 0, G)), ladder_bytes(cfg, (G, 0, 0))
    for budget in sorted({floor, floor + 1, (floor + top) // 2, max(floor, top - 1), top, 2 * top}):
        s = plan_budget(cfg, n_ctx, budget)
        n8, n4, n3 = s.groups
        assert n8 + n4 + n3 == G and s.n_bytes == ladder_bytes(cfg, s.groups) <= budget
        if n3:  # one more group at 4 bits (and the q8_0 ones at 4 bits too) would not fit
            assert ladder_bytes(cfg, (0, n8 + n4 + 1, n3 - 1)) > budget
        if n4:  # one more at q8_0 would not fit
            assert ladder_bytes(cfg, (n8 + 1, n4 - 1, n3)) > budget
    with pytest.raises(QkvggufError) as e:
        plan_budget(cfg, n_ctx, floor - 1)
    assert "\n" not in str(e.value) and "even at 3 bits" in str(e.value)


# -- the store --------------------------------------------------------------------------------------
def levels_reference(x: torch.Tensor, groups, kind: str) -> torch.Tensor:
    """What a budget store holds for positions [0, n) of x (n_kv, n, d) once all n are written, from
    scratch: f16 sinks, the partial group through q8_0; complete groups newest first n8 at q8_0, n4
    requantized from those q8_0 values to q4g, the rest from the q4g values on to q3g."""
    n = x.shape[1]
    n8, n4, _ = groups
    q8 = lambda t: dequantize_rows(quantize_q8_0_torch(t), dequantize_q8_0)  # noqa: E731
    def channels(t, bits):  # one group: scales (n_kv, 2, d) -> (n_kv, 1 group, 2, d)
        codes, scales = quantize_channels(t, bits)
        return dequantize_channels(codes, scales.unsqueeze(-3), bits)

    if kind == "k":
        low = {4: lambda t: channels(t, 4), 3: lambda t: channels(t, 3)}
    else:
        low = {4: lambda t: dequantize_rows(quantize_q4_64(t), dequantize_q4_64),
               3: lambda t: dequantize_rows(quantize_q3_64(t), dequantize_q3_64)}
    out = q8(x)
    out[:, :N_SINK] = x[:, :N_SINK].half().float()
    n_full = (n - N_SINK) // GROUP
    for g in range(n_full):
        sl = slice(N_SINK + g * GROUP, N_SINK + (g + 1) * GROUP)
        age = n_full - 1 - g  # 0: the newest complete group
        y = q8(x[:, sl])
        if age >= n8:
            y = low[4](y)
        if age >= n8 + n4:
            y = low[3](y)
        out[:, sl] = y
    return out


def budget_for(cfg, n_ctx, groups):
    return ladder_bytes(cfg, groups)


@pytest.mark.parametrize("groups", [(0, 1, 3), (0, 2, 2), (1, 3, 0), (4, 0, 0), (1, 1, 0)])
def test_store_holds_each_group_at_its_level(groups):
    cfg = config(n_head_kv=2)
    n = N_SINK + sum(groups) * GROUP + 11
    budget = budget_for(cfg, n, groups)
    q, k, v = activations(cfg, n)
    cache = KVCache(cfg, n, budget=budget)
    assert cache.schedule.groups == groups and cache.n_bytes == budget
    ptrs = {key: (t.data_ptr(), t.nbytes) for st in (cache.k_store, cache.v_store) for key, t in st.tensors.items()}
    whole = run(cache, 1, q, k, v)
    steps = KVCache(cfg, n, budget=budget)
    out_steps = run(steps, 1, q, k, v, 5)
    assert (whole - out_steps).abs().max() <= 1e-5
    for a, b in ((cache.k_store, steps.k_store), (cache.v_store, steps.v_store)):
        for key in a.tensors:
            assert torch.equal(a.tensors[key][1], b.tensors[key][1]), key
    # allocated once: the same tensors and bytes after the whole context (peak = allocation <= budget)
    assert ptrs == {key: (t.data_ptr(), t.nbytes) for st in (cache.k_store, cache.v_store)
                    for key, t in st.tensors.items()}
    assert cache.n_bytes <= budget
    H = hadamard64()
    want_k = levels_reference(k, groups, "k")
    want_v = levels_reference(fwht(v, 64), groups, "v")  # the rotated values the cache stores (test_kv_cache)
    assert torch.allclose(cache.k_store.read(1, n), want_k, atol=1e-5)
    assert torch.allclose(cache.v_store.read(1, n), want_v, atol=1e-5)
    # the output of the last query: attention over the dequantized contents (V rotated back)
    last = attention64(q[:, -1:], want_k, want_v.double() @ H, n - 1)
    assert (whole[:, -1:].double() - last).abs().max() <= 1e-4


def test_budget_cache_refuses_rewind_past_requantized_groups():
    cfg = config()
    n = N_SINK + 3 * GROUP
    cache = KVCache(cfg, n, budget=budget_for(cfg, n, (0, 1, 2)))
    q, k, v = activations(cfg, n)
    run(cache, 0, q, k, v)
    with pytest.raises(QkvggufError, match="cannot rewind"):
        cache.reset(N_SINK + GROUP)
    cache.reset(2)  # into the sinks: a new start
    assert cache.pos == 2


# -- SmolLM2 through the CLI --------------------------------------------------------------------------
def test_smollm2_budget_runs_between_q8_0_and_q3g(smollm2_path, tmp_path, capsys):
    """-c 512 on two windows of War and Peace: a 3.5 MB budget (q8_0 needs 6.27 MB) holds 4 of the 7
    groups at q4g and 3 at q3g; its perplexity lies between the q8_0 and the q3g cache's. (A budget
    at the 3-bit end, 3.2 MB: 1 group at q4g and 6 at q3g, measured 31.633 against q3g's 31.592 and
    q8_0's 31.113: within the rounding noise of two windows of q3g, so the test takes a real mix.)"""
    import texts
    from qkvgguf.cli import main
    from qkvgguf.runtime import Model
    from qkvgguf import GGUFFile

    text = tmp_path / "wp.txt"
    text.write_text(texts.war_and_peace()[:20_000])
    cfg = Model(GGUFFile(smollm2_path)).config
    budget = 3_500_000
    assert kv_cache_bytes(cfg, 512, "q8_0", "q8_0") > budget
    sched = plan_budget(cfg, 512, budget)
    assert sched.groups == (0, 4, 3)  # both lower levels in use

    def ppl(*extra):
        rc = main(["perplexity", "-m", smollm2_path, "-c", "512", "-f", str(text), "--chunks", "2", "--json",
                   "-t", "2", *extra])
        out, err = capsys.readouterr()
        assert rc == 0, err
        return json.loads(out.strip().splitlines()[-1])

    got = ppl("--kv-budget", str(budget))
    assert got["kv_budget"]["cache_bytes"] == sched.n_bytes <= budget
    p8 = ppl("-ctk", "q8_0", "-ctv", "q8_0")["ppl"]
    p3 = ppl("-ctk", "q3g", "-ctv", "q3g")["ppl"]
    assert p8 < got["ppl"] < p3, (p8, got["ppl"], p3)
