"""Llama and Mistral: the llama-family layout; Q/K rows permuted for ggml's rope.

Hugging Face applies rope to the two halves of each head ("rotate half"); ggml's normal rope
(what llama.cpp uses for `llama`) rotates adjacent pairs. The converter reorders the rows of
`q_proj` (and `k_proj`, with the KV head count) so that both compute the same function:

    (n_head, 2, head_dim / 2, n_embd) -> swap axes 1, 2 -> (n_head, head_dim / 2, 2, n_embd)
"""

from __future__ import annotations

import torch

from . import register
from .base import LLAMA_TENSORS, QKV_BIASES, Arch


def permute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half rows -> ggml adjacent-pair rows (rows first; biases too)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@register("LlamaForCausalLM", "MistralForCausalLM")
class Llama(Arch):
    GGUF_ARCH = "llama"
    TENSORS = {**LLAMA_TENSORS, **QKV_BIASES}  # biases only when `attention_bias` is set

    def transform(self, gguf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        if gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
            return permute_rope_rows(tensor, self.hparams.n_head)
        if gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
            return permute_rope_rows(tensor, self.hparams.n_head_kv)
        return tensor
