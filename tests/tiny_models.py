"""Tiny random Hugging Face decoders written as float32 GGUF files, for graph tests.

`make(arch)` builds a transformers model with random weights (llama, qwen2, qwen3) and writes the
GGUF a converter would: llama's Q/K rows permuted for ggml's adjacent-pair rope, qwen's left as is
(NeoX rope). Both files describe the same function, so logits must agree.
"""

from __future__ import annotations

import numpy as np
import torch

VOCAB = 320


def hf_model(arch: str, tied: bool = False, seed: int = 0, hidden: int = 64, ff: int = 96):
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ff, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied)
    if arch == "llama":
        cfg, cls = tf.LlamaConfig(**common), tf.LlamaForCausalLM
    elif arch == "qwen2":
        cfg, cls = tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
    elif arch == "qwen3":
        cfg, cls = tf.Qwen3Config(head_dim=24, **common), tf.Qwen3ForCausalLM  # head_dim != hidden/heads
    else:
        raise ValueError(arch)
    model = cls(cfg).float().eval()
    with torch.no_grad():  # random biases and norms, so those paths are exercised
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    return model


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF rotate-half rows -> ggml adjacent-pair rows (what llama's converter does to Q and K)."""
    out = w.shape[0]
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, arch: str, path: str, qtypes=None) -> None:
    """qtypes: optional list of ggml types; 2-D weights are quantized with them in turn (our quantizers)."""
    import gguf

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(head_dim)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    per_layer = {
        "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
        "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
        "self_attn.v_proj.bias": "attn_v.bias",
        "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for i in range(cfg.num_hidden_layers):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}"] = f"blk.{i}.{gg}"
    tensors = []
    for hf_name, gg_name in names.items():
        if hf_name not in sd:
            continue
        t = sd[hf_name]
        if arch == "llama" and gg_name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = cfg.num_attention_heads if "attn_q" in gg_name else cfg.num_key_value_heads
            t = _permute(t, heads)
        tensors.append((gg_name, t))
    write_tensors(w, tensors, qtypes)


def write_tensors(w, tensors, qtypes=None) -> None:
    """Add (GGUF name, float tensor) pairs to the GGUFWriter `w` and write the file: the 2-D ones
    take `qtypes` in turn (where the row fits the type's block; else float32), the rest float32."""
    from qkvgguf.quants import get_format, quantize

    n_quantized = 0
    for gg_name, t in tensors:
        values = np.ascontiguousarray(t.numpy(), dtype=np.float32)
        if qtypes and values.ndim == 2:
            qtype = qtypes[n_quantized % len(qtypes)]
            n_quantized += 1
            if values.shape[1] % get_format(qtype).block_size == 0:
                w.add_tensor(gg_name, quantize(values, qtype), raw_dtype=qtype)
                continue
        w.add_tensor(gg_name, values)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
