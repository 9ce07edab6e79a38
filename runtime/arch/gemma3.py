"""The Gemma 3 block (llama.cpp src/models/gemma3.cpp; transformers Gemma3DecoderLayer).

    h = rms_norm(x) * attn_norm                               (fused into the previous block's add)
    q, k, v = h @ attn_q/k/v                                  # (T, n_head*256), (T, n_head_kv*256) x2
    q, k = rms_norm per head * attn_q/k_norm                  # QK-norm
    q, k = rope_neox(q, k)    local layers: rope_base_swa (10000), global: rope_base (1e6)
    a = attention(q, k, v)    local layers see the last `sliding_window` positions only
    x = x + rms_norm(a @ attn_output) * post_attention_norm
    h = rms_norm(x) * ffn_norm
    x = x + rms_norm((gelu_tanh(h @ ffn_gate) * (h @ ffn_up)) @ ffn_down) * post_ffw_norm

The norm weights are used as the GGUF stores them: llama.cpp's converter added Gemma's "+1" to
every `*norm.weight` (conversion/gemma.py, Gemma3Model.norm_shift). The embedding scale
sqrt(n_embd) and the optional final logit soft-capping are ModelConfig flags applied by model.py;
the attention (q, k, v projections, QK-norm, rope, cache) and the gated FFN are llama.py's.
"""

from __future__ import annotations

import torch

from . import register
from .llama import attention, feed_forward


@register("gemma3")
def block(m, i: int, h: torch.Tensor, x: torch.Tensor, ropes, cache, next_norm: str):
    cfg, W, ops = m.config, m.weights, m.ops
    p = f"blk.{i}."
    a = attention(m, i, h, ropes[bool(cfg.window(i))], cache)  # (T, n_embd)
    a = ops.rms_norm(a, W.dense(p + "post_attention_norm.weight"), cfg.norm_eps)
    h, x = ops.add_rms_norm(a, x, W.dense(p + "ffn_norm.weight"), cfg.norm_eps)
    f = ops.rms_norm(feed_forward(m, i, h), W.dense(p + "post_ffw_norm.weight"), cfg.norm_eps)
    return ops.add_rms_norm(f, x, W.dense(next_norm), cfg.norm_eps)
