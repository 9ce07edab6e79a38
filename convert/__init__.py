"""Hugging Face checkpoints -> GGUF files (`qkvgguf convert`).

    from qkvgguf.convert import convert
    convert("path/to/hf_folder", "model-q8_0.gguf", "q8_0")

checkpoint.py reads the folder lazily, arch/ maps each architecture's tensors and metadata,
vocab.py builds the tokenizer keys, writer.py holds the type policy and the atomic output, and
convert.py streams one tensor at a time from one to the other. cli.py is the `convert` subcommand.
"""

__all__ = ["convert", "Converted"]


def __getattr__(name):  # lazy: `qkvgguf --help` and `inspect` must not pay for importing torch
    if name in __all__:
        import importlib

        module = importlib.import_module(f"{__name__}.convert")
        # importing the submodule set this package's `convert` attribute to the module: rebind
        # the public names to the objects they name
        for public in __all__:
            globals()[public] = getattr(module, public)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
