"""The registry of KV cache types (qkvgguf/kv_types.py) is the only place a cache type is named: a
type registered there (here an f32 copy under a new name) reaches the CLI's help, run validation,
the planner's bytes, the cache's stores and both attention paths with no other edit."""

import dataclasses

import pytest
import torch

from qkvgguf.config import ModelConfig
from qkvgguf.kv_types import KV_TYPES, ROW_FORMATS, cache_type, kv_cache_bytes

NEW = "f32copy"


@pytest.fixture
def new_type(monkeypatch):
    monkeypatch.setitem(KV_TYPES, NEW, dataclasses.replace(KV_TYPES["f32"], name=NEW, help="test copy of f32"))
    return KV_TYPES[NEW]


def config() -> ModelConfig:
    return ModelConfig(arch="llama", n_layer=2, n_embd=128, n_ff=256, n_head=4, n_head_kv=2, head_dim=32,
                       n_ctx_train=512, vocab_size=64, norm_eps=1e-5, rope_base=10000.0, rope_dim=32, rope_neox=False)


def test_unknown_before_registration():
    with pytest.raises(Exception, match=f"cache type '{NEW}' is not supported"):
        cache_type(NEW)


def test_cli_help_lists_it(new_type):
    from qkvgguf.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    help_text = sub.choices["run"].format_help()
    assert NEW in help_text and "q4g" in help_text


def test_run_flags_accept_it(monkeypatch, new_type):
    from qkvgguf.errors import QkvggufError
    from qkvgguf.run_config import RunConfig

    RunConfig(type_k=NEW, type_v=NEW, device="cpu").validate()
    monkeypatch.delitem(KV_TYPES, NEW)
    with pytest.raises(QkvggufError, match=f"-ctk/--cache-type-k: cache type '{NEW}' is not supported"):
        RunConfig(type_k=NEW, device="cpu").validate()


def test_planner_counts_its_bytes(new_type):
    from qkvgguf.runtime.planner import TensorSpec, plan

    cfg = config()
    specs = [TensorSpec("token_embd.weight", 64 * 128 * 4), TensorSpec("blk.0.attn_q.weight", 128 * 128 * 4)]
    p = plan(specs, cfg, None, 256, NEW, NEW)
    assert p.kv_bytes == kv_cache_bytes(cfg, 256, "f32", "f32") == 2 * 2 * 2 * 256 * 32 * 4


@pytest.mark.parametrize("backend", ["ops", "ops_triton"])
def test_cache_stores_and_attends_like_f32(new_type, backend):
    import importlib

    from qkvgguf.runtime.kv_cache import KVCache

    ops = importlib.import_module(f"qkvgguf.runtime.{backend}")
    cfg = config()
    new, ref = (KVCache(cfg, 16, t, t, ops=ops) for t in (NEW, "f32"))
    assert new.n_bytes == ref.n_bytes == kv_cache_bytes(cfg, 16, NEW, NEW)
    g = torch.Generator().manual_seed(0)
    for T in (5, 1):
        q = torch.randn(cfg.n_head, T, cfg.head_dim, generator=g)
        k, v = (torch.randn(cfg.n_head_kv, T, cfg.head_dim, generator=g) for _ in range(2))
        for layer in range(cfg.n_layer):
            assert torch.equal(new.attend(layer, q, k, v), ref.attend(layer, q, k, v))
        new.advance(T)
        ref.advance(T)


def test_row_format_codes_are_the_kernels():
    """The kernels number their formats from the registry, not by hand."""
    import importlib

    attention = importlib.import_module("qkvgguf.runtime.kernels.attention")
    kv_write = importlib.import_module("qkvgguf.runtime.kernels.kv_write")  # the package binds the function
    assert attention.FORMATS == {n: f.code for n, f in ROW_FORMATS.items()}
    assert kv_write.BLOCK_BYTES == {"q8_0": 34, "q4_0": 18}
    assert len(set(attention.FORMATS.values())) == len(ROW_FORMATS)
