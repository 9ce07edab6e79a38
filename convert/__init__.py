"""Hugging Face checkpoints -> GGUF files (`qkvgguf convert`).

    from qkvgguf.convert import convert
    convert("path/to/hf_folder", "model-q8_0.gguf", "q8_0")

checkpoint.py reads the folder lazily, arch/ maps each architecture's tensors and metadata,
vocab.py builds the tokenizer keys, writer.py holds the type policy and the atomic output,
stream.py plans the types and streams one tensor at a time into a file, imatrix.py collects an
importance matrix with the runtime, mixed.py allocates `auto`'s types, and pipeline.py orders those
passes (`convert()`). cli.py is the `convert` subcommand.
"""

__all__ = ["convert", "Converted"]


def __getattr__(name):  # lazy: `qkvgguf --help` and `inspect` must not pay for importing torch
    if name in __all__:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
