"""Qwen2: the llama-family layout with Q/K/V biases; NeoX rope, so no row permutation."""

from __future__ import annotations

from . import register
from .base import LLAMA_TENSORS, QKV_BIASES, Arch


@register("Qwen2ForCausalLM")
class Qwen2(Arch):
    GGUF_ARCH = "qwen2"
    TENSORS = {**LLAMA_TENSORS, **QKV_BIASES}
