"""A tiny random Gemma 3 (transformers `Gemma3ForCausalLM`) written as the float32 GGUF llama.cpp's
converter would write: its tensor names, `*norm.weight` stored as 1 + w (Gemma3RMSNorm multiplies
by 1 + w; the converter folds the 1 in), Q/K rows as they are (NeoX rope), the sliding window and
its 1-in-`pattern` global layers in the metadata. Runtime and Triton tests; the converter for real
checkpoints is convert/arch/ (another file).
"""

from __future__ import annotations

import torch

VOCAB = 320


def hf_model(seed: int = 0, hidden: int = 64, ff: int = 96, layers: int = 4, window: int = 8, pattern: int = 3,
             softcap: float | None = 30.0, head_dim: int = 32):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ff, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=256,
        rms_norm_eps=1e-6, sliding_window=window, sliding_window_pattern=pattern,
        query_pre_attn_scalar=head_dim, final_logit_softcapping=softcap, tie_word_embeddings=True,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
    )
    model = tf.Gemma3ForCausalLM(cfg).float().eval()
    with torch.no_grad():  # random norms (around 0: Gemma stores w for 1 + w), so those paths are exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    return model


PER_LAYER = {
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight", "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def write_gguf(model, path: str, qtypes=None, pattern: int = 3) -> None:
    """qtypes: optional ggml types for the 2-D weights, in turn (our quantizers)."""
    import gguf

    from tiny_models import write_tensors

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(1_000_000.0)
    w.add_sliding_window(cfg.sliding_window)
    w.add_uint32("gemma3.attention.sliding_window_pattern", pattern)
    if cfg.final_logit_softcapping:
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    for i in range(cfg.num_hidden_layers):
        for hf, gg in PER_LAYER.items():
            names[f"model.layers.{i}.{hf}"] = f"blk.{i}.{gg}"
    # GGUF stores Gemma's norms as 1 + w
    write_tensors(w, [(gg, sd[hf] + 1.0 if gg.endswith("norm.weight") else sd[hf]) for hf, gg in names.items()], qtypes)
