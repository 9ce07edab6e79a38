"""VRAM planner (runtime/planner.py): a pure function, tested on the CPU over the whole range of budgets.

- unlimited / large budgets: everything resident, no staging
- shrinking budgets: never above the budget; streamed bytes only grow as the budget shrinks; the
  staging pool is two slots of the largest streamed layer
- the smallest budget that runs streams every layer; one byte less: a one-line error with the minimum
- KV and activation bytes are the accounting functions' (kv_cache_bytes, activation_bytes), and the
  KV bytes are what a real KVCache allocates (q4g's sink and tail rows included), and with --kv-budget the ladder's allocation
- max_resident_ctx: the longest context with everything resident, exact at both sides of n_batch
- on the real SmolLM2 file (sizes from the GGUF)
"""

import pytest

from qkvgguf.config import ModelConfig
from qkvgguf.kv_types import kv_bytes_per_token, kv_cache_bytes
from qkvgguf.runtime.kv_cache import KVCache
from qkvgguf.runtime.planner import (CUDA_CONTEXT_BYTES, OUTPUT_UNIT, BudgetTooSmall, TensorSpec,
                                     activation_bytes, full_residency_bytes, max_resident_ctx, minimum_budget,
                                     plan, specs_of)

MiB = 2**20


def cfg7b(n_layer=32):
    return ModelConfig(arch="llama", n_layer=n_layer, n_embd=4096, n_ff=11008, n_head=32, n_head_kv=32,
                       head_dim=128, n_ctx_train=4096, vocab_size=32000, norm_eps=1e-5, rope_base=10000.0,
                       rope_dim=128, rope_neox=False)


def specs_7b_q4_0(cfg):
    """Tensor sizes of a Llama-2-7B Q4_0 file (18 bytes per 32 weights, Q6_K output)."""
    q4 = lambda rows, cols: rows * cols // 32 * 18  # noqa: E731
    t = [TensorSpec("token_embd.weight", q4(cfg.vocab_size, cfg.n_embd)),
         TensorSpec("output.weight", cfg.vocab_size * cfg.n_embd // 256 * 210),
         TensorSpec("output_norm.weight", 4 * cfg.n_embd)]
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        t += [TensorSpec(p + n, q4(cfg.n_embd, cfg.n_embd)) for n in ("attn_q.weight", "attn_k.weight",
                                                                        "attn_v.weight", "attn_output.weight")]
        t += [TensorSpec(p + n, q4(cfg.n_ff, cfg.n_embd)) for n in ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight")]
        t += [TensorSpec(p + "attn_norm.weight", 4 * cfg.n_embd), TensorSpec(p + "ffn_norm.weight", 4 * cfg.n_embd)]
    return t


@pytest.fixture(scope="module")
def model():
    cfg = cfg7b()
    return cfg, specs_7b_q4_0(cfg)


def test_unlimited_is_all_resident(model):
    cfg, specs = model
    p = plan(specs, cfg, None, 4096, "q4_0", "q4_0")
    assert p.all_resident and p.staging_bytes == 0 and p.pcie_bytes_per_token == 0
    assert p.host_tensors == []  # everything fits: the embedding too
    weights = sum(t.n_bytes for t in specs)
    assert p.total_bytes == weights + kv_cache_bytes(cfg, 4096, "q4_0", "q4_0") + activation_bytes(cfg, 512, 2) \
        + CUDA_CONTEXT_BYTES
    assert full_residency_bytes(specs, cfg, 4096, "q4_0", "q4_0") == p.total_bytes
    assert plan(specs, cfg, p.total_bytes, 4096, "q4_0", "q4_0").all_resident  # exactly enough


def test_budgets_from_all_to_one_layer(model):
    cfg, specs = model
    full = full_residency_bytes(specs, cfg, 4096, "q4_0", "q4_0")
    low = minimum_budget(specs, cfg, 4096, "q4_0", "q4_0")
    layer = plan(specs, cfg, None, 4096).unit_bytes[0]
    last_streamed = -1
    for budget in range(full - 1, low - 1, -(full - low) // 23):
        p = plan(specs, cfg, budget, 4096, "q4_0", "q4_0")
        assert p.total_bytes <= budget
        assert not p.all_resident
        assert p.staging_bytes == 2 * max(p.unit_bytes[u] for u in p.streamed_units)
        assert sorted(p.resident_units + p.streamed_units) == sorted(p.unit_bytes)
        assert p.pcie_bytes_per_token >= last_streamed  # less budget, never less streaming
        last_streamed = p.pcie_bytes_per_token
        # nothing else would fit: one more layer resident would break the budget
        assert budget - p.total_bytes < layer or p.staging_bytes > 2 * layer
    p = plan(specs, cfg, low, 4096, "q4_0", "q4_0")  # only the two slots: every unit streams
    assert not p.resident_units and p.total_bytes == low
    assert p.pcie_bytes_per_token == sum(p.unit_bytes.values())


def test_4gib_plan_for_7b_q4_0(model):
    cfg, specs = model
    p = plan(specs, cfg, 4 * 2**30, 4096, "q4_0", "q4_0")
    assert p.total_bytes <= 4 * 2**30
    assert 0 < len(p.streamed_units) < cfg.n_layer
    assert p.host_tensors == ["token_embd.weight"]  # untied embedding: rows gathered on the host
    assert p.kv_bytes == kv_cache_bytes(cfg, 4096, "q4_0", "q4_0")  # 576 MiB at 4.5 bits
    assert p.predicted_tokens_per_s(25e9) == pytest.approx(25e9 / p.pcie_bytes_per_token)


def test_too_small_names_the_minimum(model):
    cfg, specs = model
    low = minimum_budget(specs, cfg, 4096, "q4_0", "q4_0")
    with pytest.raises(BudgetTooSmall) as e:
        plan(specs, cfg, low - 1, 4096, "q4_0", "q4_0", source="model.gguf")
    msg = str(e.value)
    assert "\n" not in msg and "model.gguf" in msg and "needs at least" in msg
    from qkvgguf.units import format_bytes
    assert format_bytes(low) in msg


def test_kv_and_activations_follow_the_accounting(model):
    cfg, specs = model
    for n_ctx, tk, tv in ((512, "f16", "f16"), (4096, "q8_0", "q4_0"), (2048, "q4g", "q4g")):
        p = plan(specs, cfg, None, n_ctx, tk, tv, n_batch=256, act_elt=4)
        assert p.kv_bytes == kv_cache_bytes(cfg, n_ctx, tk, tv) == KVCache(cfg, n_ctx, tk, tv, device="meta").n_bytes
        assert p.activation_bytes == activation_bytes(cfg, 256, 4)


def test_kv_budget_pays_the_ladder(model):
    """--kv-budget: the plan's KV bytes are the ladder's allocation (what a real budget cache
    allocates, <= the budget), whatever -ctk/-ctv say; a VRAM budget too small names it."""
    from qkvgguf.kv_budget import plan_budget

    cfg, specs = model
    q8 = kv_cache_bytes(cfg, 2048, "q8_0", "q8_0")
    for kv_budget in (q8 // 2, q8 - 1, 4 * q8):
        p = plan(specs, cfg, None, 2048, "f16", "f16", kv_budget=kv_budget)
        alloc = KVCache(cfg, 2048, device="meta", budget=kv_budget).n_bytes
        assert p.kv_bytes == plan_budget(cfg, 2048, kv_budget).n_bytes == alloc <= kv_budget
        assert p.total_bytes - plan(specs, cfg, None, 2048, "f16", "f16").total_bytes == \
            alloc - kv_cache_bytes(cfg, 2048, "f16", "f16")
    low = minimum_budget(specs, cfg, 2048, kv_budget=q8 // 2)
    with pytest.raises(BudgetTooSmall, match="--kv-budget"):
        plan(specs, cfg, low - 1, 2048, kv_budget=q8 // 2)


@pytest.mark.parametrize("tk, tv", [("f16", "f16"), ("q4_0", "q4_0"), ("q4g", "q4g"), ("q4g", "q8_0")])
def test_max_resident_ctx_is_the_longest_that_fits(model, tk, tv):
    cfg, specs = model
    total = lambda n: full_residency_bytes(specs, cfg, n, tk, tv, n_batch=512)  # noqa: E731
    for n_want in (100, 511, 512, 2048, 3000):  # below, at and above the prompt batch
        for budget in (total(n_want), total(n_want) - 1, total(n_want) + 4096):
            n = max_resident_ctx(specs, cfg, budget, tk, tv, n_batch=512)
            assert total(n) <= budget < total(n + 1), (n_want, budget, n)
    assert max_resident_ctx(specs, cfg, total(2048), tk, tv, limit=1000) == 1000
    assert max_resident_ctx(specs, cfg, total(0) - 1, tk, tv) == 0


def test_max_resident_ctx_counts_q4g_fixed_rows(model):
    """Dividing the cache's room by the rate (the old inspect --vram) overstates a q4g context."""
    cfg, specs = model
    budget = full_residency_bytes(specs, cfg, 2048, "q4g", "q4g")
    n = max_resident_ctx(specs, cfg, budget, "q4g", "q4g")
    by_rate = kv_cache_bytes(cfg, 2048, "q4g", "q4g") // kv_bytes_per_token(cfg, "q4g", "q4g")
    assert n == 2051 < by_rate  # 2,051 positions use the 2,048-position cache's groups
    assert KVCache(cfg, by_rate, "q4g", "q4g", device="meta").n_bytes > kv_cache_bytes(cfg, 2048, "q4g", "q4g")


def test_smollm2_file(smollm2_path):
    from qkvgguf import GGUFFile

    gguf = GGUFFile(smollm2_path)
    cfg = ModelConfig.from_gguf(gguf)
    specs = specs_of(gguf)
    p = plan(specs, cfg, None, 2048)
    assert OUTPUT_UNIT in p.unit_bytes and not p.host_tensors  # tied: token_embd is the output matrix
    assert 0 <= sum(p.unit_bytes.values()) + p.small_bytes - gguf.tensor_data_bytes < 256 * len(specs)  # aligned
    tight = plan(specs, cfg, p.total_bytes - 10 * MiB, 2048)
    assert tight.total_bytes <= p.total_bytes - 10 * MiB and tight.streamed_units


@pytest.mark.parametrize("n_streamed", [4, 13, 24])
def test_streamed_layers_are_spread_through_the_model(model, n_streamed):
    """Equal-sized layers: which ones stream is a free choice, and the planner spreads them, so each
    streamed layer's copy overlaps the resident layers computing before it (no run of streamed
    layers at the end of the pass). Same bytes as any other choice."""
    cfg, specs = model
    full = plan(specs, cfg, None, 4096, "q4_0", "q4_0")
    layer = full.unit_bytes[0]
    budget = full.total_bytes + 2 * layer - n_streamed * layer - 1  # room for two staging slots
    p = plan(specs, cfg, budget, 4096, "q4_0", "q4_0")
    streamed = sorted(u for u in p.streamed_units if u != OUTPUT_UNIT)
    assert abs(len(streamed) - n_streamed) <= 1, streamed  # the embedding moving to the host frees a little
    gaps = [b - a for a, b in zip(streamed, streamed[1:])]
    even = cfg.n_layer / len(streamed)
    assert max(gaps) <= 2 * even and min(gaps) >= even / 2, streamed  # no runs, no long holes
    assert streamed[-1] - streamed[0] >= cfg.n_layer / 2, streamed  # across the model, not its end


@pytest.mark.parametrize("ngl", [0, 1, 20, 31, 32, 33, 99])
def test_n_gpu_layers_forces_the_first_layers_resident(model, ngl):
    """-ngl N (llama.cpp's flag): layers [0, N) resident, every other streamed; the output matrix is
    resident only when N > n_layer (llama.cpp counts it as layer n_layer); totals as accounted."""
    cfg, specs = model
    p = plan(specs, cfg, None, 4096, "q4_0", "q4_0", n_gpu_layers=ngl)
    layers = [u for u in p.resident_units if u != OUTPUT_UNIT]
    assert layers == list(range(min(ngl, cfg.n_layer)))
    assert (OUTPUT_UNIT in p.resident_units) == (ngl > cfg.n_layer)
    assert sorted(p.resident_units + p.streamed_units) == sorted(plan(specs, cfg, None, 4096, "q4_0", "q4_0").resident_units)
    assert p.total_bytes <= p.budget
    if p.streamed_units:
        assert p.host_tensors == ["token_embd.weight"]  # the untied embedding's rows gathered on the host
        big = plan(specs, cfg, 64 * 2**30, 4096, "q4_0", "q4_0", n_gpu_layers=ngl)
        assert big.resident_units == p.resident_units and big.budget == 64 * 2**30  # a budget never adds layers


def test_n_gpu_layers_that_do_not_fit_say_so(model):
    cfg, specs = model
    need = plan(specs, cfg, None, 4096, "q4_0", "q4_0", n_gpu_layers=20).total_bytes
    assert plan(specs, cfg, need, 4096, "q4_0", "q4_0", n_gpu_layers=20).total_bytes == need
    with pytest.raises(BudgetTooSmall, match="-ngl 20 needs .* use a smaller -ngl"):
        plan(specs, cfg, need - 1, 4096, "q4_0", "q4_0", n_gpu_layers=20, source="m.gguf")
