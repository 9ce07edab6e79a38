"""KV cache types f32, f16, q8_0, q4_0, q4g and q3g (runtime/kv_cache.py, runtime/kv_quant.py).

- the torch Q8_0/Q4_0 quantizers the cache writes with are bit-exact with gguf.quants
- stored q8_0/q4_0 rows are ggml's bytes for the (rotated) keys/values; q4g's and q3g's codes decode
  as documented (3-bit planes, Lloyd-Max levels), their keys computed from scratch
- appending token by token stores the same bytes as writing the whole sequence at once
- attention over each quantized cache equals float64 attention over the dequantized cache (same
  inputs, rotation and q8_0 query included) to float tolerance, and a q4g batch equals the same
  tokens attended one at a time
- close to f32 attention on random and on real activations (SmolLM2 on real prose): stated bounds
- measured cache bytes equal kv_cache_bytes = fixed + per_token * n_ctx (kv_layout_bytes) at every
  context, the sink and tail rows included; bits per value count everything stored (head_dim 64: q4g
  4.82 / 4.49 / 4.40, q3g 3.83 / 3.49 / 3.40 at 512 / 2048 / 8192); kv_max_ctx is the largest
  context that fits
- bad type names: one-line QkvggufError listing the valid types
"""

import math

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from qkvgguf.config import ModelConfig
from qkvgguf.errors import QkvggufError
from qkvgguf.kv_types import (GROUP, KV_TYPES, N_SINK, bits_per_value, kv_bits_per_value, kv_bytes_per_token,
                              kv_cache_bytes, kv_layout_bytes, kv_max_ctx)
from qkvgguf.quants.q4 import quantize_q4_0_torch
from qkvgguf.quants.q8 import quantize_q8_0_torch
from qkvgguf.runtime.kv_cache import KVCache

CACHE_TYPES = tuple(KV_TYPES)

QUANT_TYPES = ["q8_0", "q4_0", "q4g", "q3g"]
GROUP_TYPES = ["q4g", "q3g"]


def config(n_layer=2, n_head=4, n_head_kv=2, head_dim=64) -> ModelConfig:
    return ModelConfig(arch="llama", n_layer=n_layer, n_embd=n_head * head_dim, n_ff=4 * n_head * head_dim,
                       n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, n_ctx_train=4096,
                       vocab_size=256, norm_eps=1e-5, rope_base=10000.0, rope_dim=head_dim, rope_neox=False)


def activations(cfg, T, seed=0, outliers=True):
    """q (n_head, T, d), k, v (n_kv, T, d) float32; keys with a few large fixed channels, like real ones."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(cfg.n_head, T, cfg.head_dim, generator=g)
    k = torch.randn(cfg.n_head_kv, T, cfg.head_dim, generator=g)
    v = torch.randn(cfg.n_head_kv, T, cfg.head_dim, generator=g)
    if outliers:
        k[..., 5] = k[..., 5] * 0.3 + 8.0
        k[..., 40] *= 6.0
    return q, k, v


def run(cache, layer, q, k, v, step=None):
    """Attend q/k/v through `cache` in chunks of `step` positions (all at once when None)."""
    T = q.shape[1]
    step = step or T
    outs = []
    for s in range(0, T, step):
        outs.append(cache.attend(layer, q[:, s:s + step], k[:, s:s + step], v[:, s:s + step]))
        cache.advance(min(step, T - s))
    return torch.cat(outs, dim=1)


# -- reference pieces, independent of the cache code ------------------------------------------------
def hadamard64() -> torch.Tensor:
    i = torch.arange(64)
    bits = torch.bitwise_and(i[:, None], i[None, :])
    parity = torch.zeros_like(bits)
    for b in range(6):
        parity ^= (bits >> b) & 1
    return (1 - 2 * parity).double() / 8.0  # H[i, j] = (-1)^popcount(i & j) / sqrt(64)


def gguf_round_trip(x: torch.Tensor, qtype: T) -> torch.Tensor:
    a = x.reshape(-1, x.shape[-1]).numpy().astype(np.float32)
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(a, qtype), qtype)).view(x.shape)


def attention64(q, k, v, n_past=0):
    """Causal GQA softmax attention in float64."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    s = q @ k.transpose(1, 2) / math.sqrt(q.shape[-1])
    T, S = q.shape[1], k.shape[1]
    s = s.masked_fill(torch.arange(S)[None, :] > torch.arange(T)[:, None] + n_past, -math.inf)
    return torch.softmax(s, -1) @ v


def q4g_reference_keys(k: torch.Tensor, n_seen: int, name: str = "q4g") -> torch.Tensor:
    """What a query at position n_seen - 1 sees of q4g (q3g) keys k (n_kv, >= n_seen, d), from
    scratch: S f16 sinks, positions past the last whole group through Q8_0 (gguf.quants), each
    complete group per channel from its Q8_0 values with 16 (8) levels."""
    S, top = KV_TYPES[name].n_sink, {"q4g": 15, "q3g": 7}[name]
    out = gguf_round_trip(k[:, :n_seen], T.Q8_0).double()
    out[:, :S] = k[:, :min(S, n_seen)].half().double()
    for g in range((n_seen - S) // GROUP if n_seen > S else 0):
        x = gguf_round_trip(k[:, S + g * GROUP:S + (g + 1) * GROUP], T.Q8_0)  # from the q8_0 tail
        lo, hi = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
        scale = ((hi - lo) / top).half().float()  # both rounded to f16, then float32 arithmetic
        mn = lo.half().float()
        q = torch.clamp(torch.floor((x - mn) * (1 / scale) + 0.5), 0, top)
        out[:, S + g * GROUP:S + (g + 1) * GROUP] = q.double() * scale.double() + mn.double()
    return out


# -- quantizers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype, fn", [(T.Q8_0, quantize_q8_0_torch), (T.Q4_0, quantize_q4_0_torch)], ids=["q8_0", "q4_0"])
def test_torch_quantizers_bit_exact_with_gguf(qtype, fn):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((96, 128)) * rng.uniform(1e-3, 300, (96, 1))).astype(np.float32)
    x[0, :32] = 0  # all-zero block
    x[1, :32] = 0.25  # all equal
    x[2, 32:64] = np.where(np.arange(32) % 2, 3.0, -3.0)  # tie for the largest magnitude
    x[3] = np.round(x[3] * 4) / 4  # many exact halves after scaling
    x[4, :32] = rng.integers(-127, 128, 32) * np.float32(0.5)
    got = fn(torch.from_numpy(x)).numpy()
    assert np.array_equal(got, gguf.quants.quantize(x, qtype))


# -- storage -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", QUANT_TYPES)
def test_token_by_token_equals_whole_sequence(name):
    cfg = config()
    q, k, v = activations(cfg, 200)
    caches = []
    for step in (None, 1, 7, 64):
        cache = KVCache(cfg, 200, name, name)
        run(cache, 1, q, k, v, step)
        caches.append(cache)
    for other in caches[1:]:
        for a, b in ((caches[0].k_store, other.k_store), (caches[0].v_store, other.v_store)):
            for key, t in a.tensors.items():
                assert torch.equal(t[1], b.tensors[key][1]), f"{name} {key}"


@pytest.mark.parametrize("name, qtype", [("q8_0", T.Q8_0), ("q4_0", T.Q4_0)])
def test_block_rows_are_ggml_bytes_of_rotated_values(name, qtype):
    cfg = config()
    q, k, v = activations(cfg, 40)
    cache = KVCache(cfg, 40, name, name)
    run(cache, 0, q, k, v, 5)
    H = hadamard64().float()
    for store, x in ((cache.k_store, k), (cache.v_store, v)):
        rows = (x @ H).reshape(-1, cfg.head_dim).numpy()
        want = gguf.quants.quantize(rows, qtype).reshape(store.blocks[0].shape)
        assert np.array_equal(store.blocks[0].numpy(), want)


@pytest.mark.parametrize("name", GROUP_TYPES)
def test_group_keys_store_documented_layout(name):
    cfg = config(n_head_kv=1)
    S = KV_TYPES[name].n_sink
    q, k, v = activations(cfg, S + 2 * GROUP + 10)
    cache = KVCache(cfg, 256, name, name)
    run(cache, 0, q, k, v)
    st = cache.k_store
    n = k.shape[1]
    ref = q4g_reference_keys(k, n, name)
    codes, scales = st.tensors["codes"][0, 0], st.tensors["scales"][0, 0]  # (rows, d*bits/8), (n_group, 2, d)
    for g in range(2):
        for t in (0, 17, 63):
            row = codes[g * GROUP + t].int()
            if name == "q4g":
                qv = torch.cat([row & 15, row >> 4])  # channels 0..31 low nibbles, 32..63 high
            else:  # 16 bytes of 2-bit parts (channel j + 16k at shift 2k), 8 of high bits (j + 8k at bit k)
                lo = torch.cat([(row[:16] >> (2 * i)) & 3 for i in range(4)])
                hi = torch.cat([(row[16:] >> i) & 1 for i in range(8)])
                qv = lo | (hi << 2)
            x = qv.double() * scales[g, 0].double() + scales[g, 1].double()
            assert torch.equal(x, ref[0, S + g * GROUP + t])
    assert torch.equal(st.sink[0, 0].double(), ref[0, :S])
    tail = torch.from_numpy(gguf.quants.dequantize(st.tail[0, 0, :10].numpy(), T.Q8_0)).double()
    assert torch.equal(tail, ref[0, S + 2 * GROUP:])


@pytest.mark.parametrize("name, levels", [("q4g", [(2 * i - 15) / 15 for i in range(16)]),
                                          ("q3g", [x / 2.1520 for x in (-2.1520, -1.3439, -0.7560, -0.2451,
                                                                        0.2451, 0.7560, 1.3439, 2.1520)])])
def test_group_values_are_rotated_rows_of_documented_levels(name, levels):
    """V rows: Hadamard-rotated values in blocks of 64, an f16 scale s and codes q: x = s * level[q]
    (q4_64 nibbles, q3_64 planes); each within half a level step of the rotated value (as its q8_0
    tail held it) or clipped."""
    cfg = config(n_head_kv=1)
    t = KV_TYPES[name]
    n = t.n_sink + 3 * t.tail_rows[1] + 5
    q, k, v = activations(cfg, n)
    cache = KVCache(cfg, n, "f32", name)
    run(cache, 0, q, k, v, 7)
    # the rotated values, through the q8_0 tail a group of values waits in before its rows are made
    vr = gguf_round_trip((v.double() @ hadamard64()).float(), T.Q8_0).double()[0, t.n_sink:]
    rows = cache.v_store.tensors["blocks"][0, 0, :3 * t.tail_rows[1]]
    s = rows[:, :2].contiguous().view(torch.float16).double()  # (rows, 1)
    c = rows[:, 2:].int()
    if name == "q4g":
        codes = torch.cat([c & 15, c >> 4], dim=1)
    else:
        codes = torch.cat([(c[:, :16] >> (2 * i)) & 3 for i in range(4)], 1) | \
            (torch.cat([(c[:, 16:] >> i) & 1 for i in range(8)], 1) << 2)
    lv = torch.tensor(levels, dtype=torch.float64)
    x = lv[codes.long()] * s
    step = (s * (lv[1:] - lv[:-1]).max()).expand_as(x)
    within = (x - vr[:x.shape[0]]).abs() <= step / 2 + 1e-6
    clipped = vr[:x.shape[0]].abs() >= s * lv.max() - 1e-6
    assert (within | clipped).all()
    assert (x - vr[:x.shape[0]]).norm() / vr[:x.shape[0]].norm() < (0.1 if name == "q4g" else 0.2)


# -- attention -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["q8_0", "q4_0"])
def test_llama_maths_equal_attention_over_dequantized_cache(name):
    """Rotate q, k, v by H; k, v through the format; q through Q8_0; float64 attention; rotate back."""
    qtype = {"q8_0": T.Q8_0, "q4_0": T.Q4_0}[name]
    cfg = config()
    q, k, v = activations(cfg, 96)
    H = hadamard64()
    got = run(KVCache(cfg, 96, name, name), 0, q, k, v, 32)
    kr = gguf_round_trip((k.double() @ H).float(), qtype)
    vr = gguf_round_trip((v.double() @ H).float(), qtype)
    qr = gguf_round_trip((q.double() @ H).float(), T.Q8_0)
    want = attention64(qr, kr, vr) @ H
    assert (got.double() - want).abs().max() <= 1e-4


@pytest.mark.parametrize("name", GROUP_TYPES)
def test_group_keys_equal_attention_over_dequantized_cache_and_token_by_token(name):
    cfg = config()
    n = N_SINK + 3 * GROUP + 21
    q, k, v = activations(cfg, n)
    batch = run(KVCache(cfg, n, name, "f32"), 0, q, k, v)
    steps = run(KVCache(cfg, n, name, "f32"), 0, q, k, v, 1)
    assert (batch - steps).abs().max() <= 1e-5
    want = torch.cat([attention64(q[:, t:t + 1], q4g_reference_keys(k, t + 1, name), v[:, :t + 1], t)
                      for t in range(0, n, 9)], dim=1)
    assert (batch[:, ::9].double() - want).abs().max() <= 1e-4


def test_q4g_values_and_reset_into_a_quantized_group():
    cfg = config()
    n = N_SINK + 2 * GROUP + 5
    q, k, v = activations(cfg, n)
    batch = run(KVCache(cfg, n, "f32", "q4g"), 0, q, k, v)
    steps = run(KVCache(cfg, n, "f32", "q4g"), 0, q, k, v, 3)
    assert (batch - steps).abs().max() <= 1e-5
    cache = KVCache(cfg, n, "q4g", "q4g")
    run(cache, 0, q, k, v)
    cache.reset(N_SINK + GROUP + 10)  # inside the second group, which was complete
    assert cache.pos == N_SINK + GROUP + 10
    tail = cache.k_store.tail[0, :, :10]
    full = cache.k_store._load_groups(0, 1, 2)[:, :10]
    assert torch.equal(tail, quantize_q8_0_torch(full))


def relative_error(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


# Bounds on ||out - out_f32|| / ||out_f32||, about 1.4x the measured errors (f16 0.0004, q8_0 0.0098,
# q4_0 0.143, q4g 0.096, q3g 0.185: iid Gaussian values are the worst case for low-bit V).
BOUNDS_RANDOM = {"f16": 1e-3, "q8_0": 0.014, "q4_0": 0.2, "q4g": 0.135, "q3g": 0.26}


@pytest.mark.parametrize("name", ["f16", *QUANT_TYPES])
def test_close_to_f32_on_random_activations(name):
    cfg = config()
    q, k, v = activations(cfg, 300, seed=3)
    ref = run(KVCache(cfg, 300), 0, q, k, v)
    got = run(KVCache(cfg, 300, name, name), 0, q, k, v)
    assert relative_error(got, ref) <= BOUNDS_RANDOM[name]


# Real activations, measured (layer 3, layer 20): f16 0.0005, 0.0006; q8_0 0.011, 0.013;
# q4_0 0.152, 0.184; q4g 0.051, 0.074; q3g 0.098, 0.153. Bounds about 1.4x the larger.
BOUNDS_REAL = {"f16": 1e-3, "q8_0": 0.018, "q4_0": 0.26, "q4g": 0.105, "q3g": 0.215}


@pytest.mark.parametrize("name", ["f16", *QUANT_TYPES])
def test_close_to_f32_on_smollm2_activations(smollm2_qkv, name):
    cfg, captured = smollm2_qkv
    for layer, (q, k, v) in captured.items():
        ref = run(KVCache(cfg, 320), layer, q, k, v)
        got = run(KVCache(cfg, 320, name, name), layer, q, k, v, 128)
        err = relative_error(got, ref)
        assert err <= BOUNDS_REAL[name], f"layer {layer}: {err:.4f}"


def test_q4g_beats_q4_0_on_smollm2_activations(smollm2_qkv):
    cfg, captured = smollm2_qkv
    for layer, (q, k, v) in captured.items():
        ref = run(KVCache(cfg, 320), layer, q, k, v)
        e4 = relative_error(run(KVCache(cfg, 320, "q4_0", "q4_0"), layer, q, k, v), ref)
        eg = relative_error(run(KVCache(cfg, 320, "q4g", "q4g"), layer, q, k, v), ref)
        assert eg * 2 <= e4, f"layer {layer}: q4g {eg:.4f}, q4_0 {e4:.4f}"


# -- memory ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_ctx", [1, 2, 4, 19, 20, 67, 68, 131, 132, 512, 1000, 2048])
@pytest.mark.parametrize("type_k, type_v", [(t, t) for t in CACHE_TYPES] + [("q8_0", "q4_0"), ("q4g", "f16"),
                                                                            ("q3g", "q4g")])
def test_measured_bytes_equal_accounting(type_k, type_v, n_ctx):
    cfg = config(n_layer=3, head_dim=128)
    cache = KVCache(cfg, n_ctx, type_k, type_v)
    fixed, per_token = kv_layout_bytes(cfg, n_ctx, type_k, type_v)
    assert cache.n_bytes == kv_cache_bytes(cfg, n_ctx, type_k, type_v) == fixed + per_token * n_ctx
    assert per_token == kv_bytes_per_token(cfg, type_k, type_v)
    heads, d = cfg.n_layer * cfg.n_head_kv, cfg.head_dim
    want = 0
    for t, kind in ((type_k, "k"), (type_v, "v")):
        if t in GROUP_SHAPES:  # the f16 sinks + q8_0 tail rows, less the rate of the positions outside a group
            S, G, rate = GROUP_SHAPES[t][kind]
            n_grouped = G * max(0, (n_ctx - S) // G)
            want += heads * (S * 2 * d + G * (d // 32 * 34) - rate(d) * (n_ctx - n_grouped))
    assert fixed == want


# per kind: (f16 sinks, tail positions = group, bytes per position of a complete group), written out
GROUP_SHAPES = {
    "q4g": {"k": (4, 64, lambda d: d // 2 + 4 * d // 64), "v": (4, 16, lambda d: d // 64 * 34)},
    "q3g": {"k": (2, 64, lambda d: 3 * d // 8 + 4 * d // 64), "v": (2, 16, lambda d: d // 64 * 26)},
}


@pytest.mark.parametrize("name", GROUP_TYPES)
def test_bytes_step_per_complete_group(name):
    """q4g/q3g pay their rate per complete group: 64 keys, 16 values; other positions cost 0 bytes."""
    cfg = config(n_layer=1, n_head_kv=1)
    steps = {n: kv_cache_bytes(cfg, n + 1, name, name) - kv_cache_bytes(cfg, n, name, name) for n in range(300)}
    S, (Gk, Gv), t = KV_TYPES[name].n_sink, KV_TYPES[name].tail_rows, KV_TYPES[name]
    k_ends = {S + Gk * g - 1 for g in range(1, 5)}
    v_ends = {S + Gv * g - 1 for g in range(1, 19)}
    assert {n for n, b in steps.items() if b} == k_ends | v_ends
    for n, b in steps.items():
        assert b == (n in k_ends) * Gk * t.rate(64, "k") + (n in v_ends) * Gv * t.rate(64, "v")


SMOLLM2_BITS = {  # head_dim 64, everything allocated counted: the f16 sinks and q8_0 newest groups too
    "f32": {512: 32, 2048: 32, 8192: 32}, "f16": {512: 16, 2048: 16, 8192: 16},
    "q8_0": {512: 8.5, 2048: 8.5, 8192: 8.5}, "q4_0": {512: 4.5, 2048: 4.5, 8192: 4.5},
    "q4g": {512: 4.81640625, 2048: 4.4853515625, 8192: 4.402587890625},
    "q3g": {512: 3.83203125, 2048: 3.4892578125, 8192: 3.403564453125},
}


def test_bits_per_value():
    cfg = config(n_layer=1, n_head_kv=1, head_dim=64)
    for t, by_ctx in SMOLLM2_BITS.items():
        for n_ctx, bits in by_ctx.items():
            measured = KVCache(cfg, n_ctx, t, t).n_bytes * 8 / (2 * n_ctx * 64)
            assert measured == bits == bits_per_value(t, n_ctx, 64) == kv_bits_per_value(cfg, n_ctx, t, t), (t, n_ctx)
    assert round(bits_per_value("q4g", 10**6, 64), 3) == 4.375  # (36 + 34) bytes per 128 values, the fixed rows amortized
    assert round(bits_per_value("q3g", 10**6, 64), 3) == 3.375  # (28 + 26) bytes per 128 values


def test_smollm2_figures_from_llamacpp_notes():
    """shared/LLAMACPP.md: at 8,192 positions f16 180.00 MiB, q8_0 95.62 MiB, q4_0 50.62 MiB; q4g
    allocates 49.53 MiB (its sink and tail rows), not the 49.22 MiB its rate alone gives; q3g 38.29."""
    cfg = config(n_layer=30, n_head=9, n_head_kv=3, head_dim=64)
    types = ("f16", "q8_0", "q4_0", "q4g", "q3g")
    mib = {t: kv_cache_bytes(cfg, 8192, t, t) / 2**20 for t in types}
    assert [round(mib[t], 2) for t in types] == [180.0, 95.62, 50.62, 49.53, 38.29]
    assert all(kv_cache_bytes(cfg, 8192, t, t) == KVCache(cfg, 8192, t, t, device="meta").n_bytes for t in types)
    assert round(8192 * kv_bytes_per_token(cfg, "q4g", "q4g") / 2**20, 2) == 49.22  # the rate only


@pytest.mark.parametrize("type_k, type_v", [(t, t) for t in CACHE_TYPES] + [("q4g", "f16"), ("q8_0", "q4g")])
def test_max_ctx_is_the_largest_that_fits(type_k, type_v):
    cfg = config(n_layer=30, n_head=9, n_head_kv=3, head_dim=64)
    size = lambda n: kv_cache_bytes(cfg, n, type_k, type_v)  # noqa: E731
    rooms = [0, size(0) - 1, size(1), size(2048), size(2048) - 1, size(2048) + 1, size(5000) + 12345]
    for room in rooms:
        n = kv_max_ctx(cfg, room, type_k, type_v)
        assert (n == 0 and size(0) > room) or size(n) <= room < size(n + 1), (room, n)


def test_max_ctx_counts_q4g_fixed_rows():
    """SmolLM2's q4g cache of 2,048 positions also holds 2,051 (same groups), not the 2,099 that
    room / rate says (its sink and tail rows are not paid per position)."""
    cfg = config(n_layer=30, n_head=9, n_head_kv=3, head_dim=64)
    room = KVCache(cfg, 2048, "q4g", "q4g", device="meta").n_bytes
    assert room // kv_bytes_per_token(cfg, "q4g", "q4g") == 2099
    assert kv_max_ctx(cfg, room, "q4g", "q4g") == 2051
    assert KVCache(cfg, 2051, "q4g", "q4g", device="meta").n_bytes == room
    assert KVCache(cfg, 2052, "q4g", "q4g", device="meta").n_bytes > room
    assert KVCache(cfg, 2099, "q4g", "q4g", device="meta").n_bytes > room


# -- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["q4", "Q8_0", "f64", ""])
def test_bad_type_name_is_one_line_error(bad):
    with pytest.raises(QkvggufError) as e:
        KVCache(config(), 16, "f16", bad)
    msg = str(e.value)
    assert "\n" not in msg and f"'{bad}'" in msg
    assert "f32, f16, q8_0, q4_0, q4g, q3g" in msg
    with pytest.raises(QkvggufError):
        kv_bytes_per_token(config(), bad, "f16")


def test_head_dim_not_a_block_multiple_is_refused():
    with pytest.raises(QkvggufError, match="head_dim a multiple of 32"):
        KVCache(config(head_dim=48), 16, "q4_0", "q4_0")
    KVCache(config(head_dim=48), 16, "f16", "f16")


def test_reset_past_the_end_is_refused():
    cache = KVCache(config(), 16)
    with pytest.raises(ValueError):
        cache.reset(3)
