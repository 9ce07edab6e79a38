"""llama.cpp (through llama-cpp-python) as the reference implementation, for tests and benchmarks.

`load(path, **kwargs)` returns a `llama_cpp.Llama` with plain CPU weight buffers: a default
llama-cpp-python build targets the build machine's CPU and, where that enables AMX, every forward
pass crashes inside the AMX matmul (see shared/LLAMACPP.md). Turning off the "extra" buffer types
avoids that path whatever the build flags were; results are unchanged.
"""

from __future__ import annotations

import contextlib
import os


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _patch_default_params(llama_cpp) -> None:
    raw = llama_cpp.llama_cpp
    if getattr(raw, "_qkvgguf_patched", False):
        return
    original = raw.llama_model_default_params

    def default_params():
        params = original()
        params.use_extra_bufts = False
        return params

    raw.llama_model_default_params = default_params
    llama_cpp.llama_model_default_params = default_params
    raw._qkvgguf_patched = True


@contextlib.contextmanager
def _quiet():
    """llama.cpp logs to stderr from C; silence it unless QKVGGUF_LLAMA_VERBOSE is set."""
    if os.environ.get("QKVGGUF_LLAMA_VERBOSE"):
        yield
        return
    fd = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(fd, 2)
        os.close(fd)


def load(path: str, **kwargs):
    import llama_cpp

    _patch_default_params(llama_cpp)
    kwargs.setdefault("verbose", False)
    kwargs.setdefault("n_threads", 2)
    with _quiet():
        return llama_cpp.Llama(model_path=str(path), **kwargs)


def tokenize(llm, text: str, add_bos: bool = False, special: bool = False) -> list[int]:
    return list(llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special))


def last_logits(llm):
    """Logits of the last evaluated token (works without logits_all, where `llm.scores` is not filled)."""
    import numpy as np

    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def perplexity(path: str, windows: list[list[int]]) -> float:
    """llama.cpp's perplexity over token windows, each from an empty cache, every token but the
    first scored (as llama-perplexity and `qkvgguf perplexity` cut them)."""
    import math

    import torch

    llm = load(path, n_ctx=len(windows[0]), n_batch=512, logits_all=True)
    total, count = 0.0, 0
    for w in windows:
        llm.reset()
        llm.eval(w)
        logits = torch.tensor(llm.scores[: len(w)], dtype=torch.float64)
        logp = torch.log_softmax(logits[:-1], dim=-1)
        total -= float(logp.gather(1, torch.tensor(w[1:])[:, None]).sum())
        count += len(w) - 1
    return math.exp(total / count)
