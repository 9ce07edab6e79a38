"""Qwen3: the llama-family layout with per-head RMSNorm on Q and K and an explicit head_dim
(which may differ from hidden_size / num_attention_heads); NeoX rope, no biases."""

from __future__ import annotations

from . import register
from .base import LLAMA_TENSORS, QK_NORMS, Arch


@register("Qwen3ForCausalLM")
class Qwen3(Arch):
    GGUF_ARCH = "qwen3"
    TENSORS = {**LLAMA_TENSORS, **QK_NORMS}
