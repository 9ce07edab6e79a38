"""Hugging Face checkpoints -> GGUF files (`qkvgguf convert`).

    from qkvgguf.convert import convert
    convert("path/to/hf_folder", "model-q8_0.gguf", "q8_0")

checkpoint.py reads the folder lazily, arch/ maps each architecture's tensors and metadata,
vocab.py builds the tokenizer keys, writer.py holds the type policy and the atomic output, and
convert.py streams one tensor at a time from one to the other. cli.py is the `convert` subcommand.
"""

import sys
import types

__all__ = ["convert", "Converted"]


class _Package(types.ModuleType):
    """This package exports a function named like its submodule `convert`: when the import system
    binds the loaded submodule to the package (`setattr(package, "convert", module)`), keep the
    function there instead, whoever imported the submodule first."""

    def __setattr__(self, name, value):
        if name == "convert" and isinstance(value, types.ModuleType):
            value = value.convert
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name):  # lazy: `qkvgguf --help` and `inspect` must not pay for importing torch
    if name in __all__:
        import importlib

        module = importlib.import_module(f"{__name__}.convert")  # binds `convert` (see _Package)
        globals()["Converted"] = module.Converted
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
