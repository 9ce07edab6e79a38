"""qkvgguf: run and make GGUF LLMs on small GPUs.

Public API (all lazy, nothing touches CUDA at import):

    from qkvgguf import GGUFFile, ModelConfig
    from qkvgguf.runtime import load_model, generate
"""

__version__ = "0.1.0"

from .config import ModelConfig  # noqa: E402
from .errors import GGUFError, QkvggufError, UnsupportedError  # noqa: E402
from .gguf_file import GGUFFile, TensorInfo  # noqa: E402

__all__ = ["GGUFFile", "TensorInfo", "ModelConfig", "QkvggufError", "GGUFError", "UnsupportedError", "__version__"]
