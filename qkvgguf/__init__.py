"""qkvgguf: run and make GGUF LLMs on small GPUs.

Public API (nothing touches CUDA, nor imports torch, at import):

    from qkvgguf import LLM                    # the high-level API (qkvgguf/llm.py), loaded on first use
    llm = LLM()                                # the default model; LLM("model.gguf")
    llm("The capital of France is", max_tokens=16, temperature=0)

    from qkvgguf import GGUFFile, ModelConfig  # the file and its config
    from qkvgguf.runtime import Model, Session # the low-level runtime
"""

__version__ = "0.1.0"

from .config import ModelConfig  # noqa: E402
from .errors import GGUFError, QkvggufError, UnsupportedError  # noqa: E402
from .gguf_file import GGUFFile, TensorInfo  # noqa: E402

__all__ = ["LLM", "GGUFFile", "TensorInfo", "ModelConfig", "QkvggufError", "GGUFError", "UnsupportedError",
           "__version__"]


def __getattr__(name: str):
    """`qkvgguf.LLM` on first use (it imports torch and the runtime; `import qkvgguf` stays light)."""
    if name == "LLM":
        from .llm import LLM

        return LLM
    raise AttributeError(f"module 'qkvgguf' has no attribute '{name}'")
