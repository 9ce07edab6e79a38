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


# -- ggml's own CPU kernels (libggml-cpu of the llama-cpp-python install), through ctypes -------------
def ggml_cpu():
    """libggml-cpu of the installed llama-cpp-python, initialised (its f16 tables), with
    `ggml_get_type_traits_cpu` typed; None when llama-cpp-python is not installed."""
    global _GGML
    if "_GGML" in globals():
        return _GGML
    import ctypes

    try:
        import llama_cpp
    except ImportError:
        _GGML = None
        return None

    class Traits(ctypes.Structure):  # ggml-cpu.h struct ggml_type_traits_cpu
        _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p),
                    ("vec_dot_type", ctypes.c_int), ("nrows", ctypes.c_int64)]

    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-cpu.so"))
    lib.ggml_cpu_init()
    lib.ggml_get_type_traits_cpu.restype = ctypes.POINTER(Traits)
    lib.ggml_get_type_traits_cpu.argtypes = [ctypes.c_int]
    _GGML = lib
    return lib


def vec_dot_type(qtype: int) -> int:
    """The type ggml's CPU backend converts activations to before multiplying them with qtype."""
    return ggml_cpu().ggml_get_type_traits_cpu(int(qtype)).contents.vec_dot_type


def from_float(qtype: int, x) -> "np.ndarray":
    """ggml's CPU conversion of one float32 row x into blocks of qtype (its from_float) -> the bytes."""
    import ctypes

    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    x = np.ascontiguousarray(x, dtype=np.float32)
    # ggml's block_q8_1 is 36 bytes (f16 d and s); gguf-py still lists the old 40 (float d and s)
    block, size = (32, 36) if qtype == GGMLQuantizationType.Q8_1 else GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    out = np.zeros(len(x) // block * size, dtype=np.uint8)
    fn = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(
        ggml_cpu().ggml_get_type_traits_cpu(int(qtype)).contents.from_float)
    fn(x.ctypes.data, out.ctypes.data, len(x))
    return out


def vec_dot(qtype: int, w_row, x) -> float:
    """ggml's CPU dot product of one weight row (qtype's bytes) with the float32 row x, as its matmul
    computes it: x converted to the vec_dot_type, then the type's vec_dot."""
    import ctypes

    import numpy as np

    w_row = np.ascontiguousarray(w_row, dtype=np.uint8)
    xq = from_float(vec_dot_type(qtype), x)
    s = np.zeros(1, dtype=np.float32)
    fn = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t,
                          ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)(
        ggml_cpu().ggml_get_type_traits_cpu(int(qtype)).contents.vec_dot)
    fn(len(x), s.ctypes.data, 0, w_row.ctypes.data, 0, xq.ctypes.data, 0, 1)
    return float(s[0])
