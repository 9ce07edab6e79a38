"""Hugging Face checkpoints -> GGUF files (`qkvgguf convert`).

    from qkvgguf.convert import convert
    convert("path/to/hf_folder", "model-q8_0.gguf", "q8_0")

checkpoint.py reads the folder lazily, arch/ maps each architecture's tensors and metadata,
vocab.py builds the tokenizer keys, writer.py holds the type policy and the atomic output, and
convert.py streams one tensor at a time from one to the other. cli.py is the `convert` subcommand.
"""

from .convert import Converted, convert

__all__ = ["convert", "Converted"]
