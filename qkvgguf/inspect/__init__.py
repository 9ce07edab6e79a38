"""`qkvgguf inspect`: what is in a GGUF file, for people (tables) and machines (`--json`).

    from qkvgguf.inspect import summarize, render      # the summary: header only, no tensor data

views.py      the summary: types, layers, metadata (`summarize`, `render`)
tensor.py     `--tensor NAME [--ref]`: one tensor's blocks decoded, statistics, quantization error
memory.py     `--vram SIZE`: the VRAM plan (runtime/planner.py) as data and text
diff.py       `--diff OTHER`: metadata and tensor changes between two files
plot.py       `--plot FILE`: a bits-per-weight heat map (matplotlib)

This package sits above the runtime and the converter (it shows their plans and reads Hugging Face
folders for `--ref`); nothing below imports it (tests/test_imports.py).
"""

from .views import render, summarize

__all__ = ["render", "summarize"]
