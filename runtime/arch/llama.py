"""The llama-shaped block (llama, Mistral, SmolLM, qwen2, qwen3): differences are ModelConfig flags.

    h = rms_norm(x) * attn_norm                               (fused into the previous block's add)
    q, k, v = h @ attn_q/k/v (+ bias if qkv_bias)             # (T, n_head*hd), (T, n_head_kv*hd) x2
    q, k = rms_norm per head * attn_q/k_norm  (qk_norm)
    q, k = rope(q, k, positions)                              # adjacent pairs, or halves (rope_neox)
    x = x + attention(q, cache(k), cache(v)) @ attn_output
    h = rms_norm(x) * ffn_norm
    x = x + (silu(h @ ffn_gate) * (h @ ffn_up)) @ ffn_down
"""

from __future__ import annotations

import torch

from . import register


@register("llama")
def block(m, i: int, h: torch.Tensor, x: torch.Tensor, ropes, cache, next_norm: str):
    cfg, W, ops = m.config, m.weights, m.ops
    # each residual add is fused into the norm that follows it: (norm(x + a), x + a)
    h, x = ops.add_rms_norm(attention(m, i, h, ropes[bool(cfg.window(i))], cache), x,
                            W.dense(f"blk.{i}.ffn_norm.weight"), cfg.norm_eps)
    return ops.add_rms_norm(feed_forward(m, i, h), x, W.dense(next_norm), cfg.norm_eps)


def attention(m, i: int, h: torch.Tensor, rope, cache) -> torch.Tensor:
    """h: the normed residual stream (T, n_embd) -> the attention block's output (T, n_embd)."""
    cfg, W, ops = m.config, m.weights, m.ops
    cos, sin = rope
    p = f"blk.{i}."
    T = h.shape[0]
    q = ops.linear(h, W, p + "attn_q.weight", p + "attn_q.bias" if cfg.qkv_bias else None)
    k = ops.linear(h, W, p + "attn_k.weight", p + "attn_k.bias" if cfg.qkv_bias else None)
    v = ops.linear(h, W, p + "attn_v.weight", p + "attn_v.bias" if cfg.qkv_bias else None)
    q = q.view(T, cfg.n_head, cfg.head_dim).transpose(0, 1)  # (n_head, T, hd)
    k = k.view(T, cfg.n_head_kv, cfg.head_dim).transpose(0, 1)  # (n_head_kv, T, hd)
    v = v.view(T, cfg.n_head_kv, cfg.head_dim).transpose(0, 1)
    if cfg.qk_norm:
        q = ops.rms_norm(q, W.dense(p + "attn_q_norm.weight"), cfg.norm_eps)
        k = ops.rms_norm(k, W.dense(p + "attn_k_norm.weight"), cfg.norm_eps)
    q = ops.rope(q, cos, sin, cfg.rope_neox)
    k = ops.rope(k, cos, sin, cfg.rope_neox)
    if cfg.attn_scale:  # the attention scales q . k by 1/sqrt(hd); a family's own scale goes into q
        q = q * (cfg.attn_scale * cfg.head_dim ** 0.5)
    out = cache.attend(i, q, k, v)  # (n_head, T, hd) over the positions the layer sees
    out = out.transpose(0, 1).reshape(T, cfg.q_dim)
    return ops.linear(out, W, p + "attn_output.weight")


def feed_forward(m, i: int, h: torch.Tensor) -> torch.Tensor:
    """h: the normed residual stream -> the gated feed-forward block's output (silu or gelu_tanh gate)."""
    W, ops = m.weights, m.ops
    p = f"blk.{i}."
    gate = ops.linear(h, W, p + "ffn_gate.weight")
    up = ops.linear(h, W, p + "ffn_up.weight")
    act = ops.geglu if m.config.ffn_act == "gelu_tanh" else ops.swiglu
    return ops.linear(act(gate, up), W, p + "ffn_down.weight")
