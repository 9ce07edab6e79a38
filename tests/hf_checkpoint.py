"""Rebuild a Hugging Face checkpoint folder (float32 safetensors, config.json, tokenizer.json) from
the SmolLM2 GGUF, the only real model available offline: the converter's tests and benchmarks
convert it back. Names are written out here (not taken from the converter) to stay independent.

    smollm2_hf_folder(gguf_path, out_dir) -> out_dir
"""

import json
from pathlib import Path

import numpy as np
import torch

from qkvgguf import GGUFFile, quants

SMOL_TENSORS = {  # GGUF name (blk.{i}. stripped) -> Hugging Face name
    "attn_norm.weight": "input_layernorm.weight", "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """ggml adjacent-pair rope rows -> Hugging Face rotate-half rows (the converter's inverse)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def smollm2_hf_folder(gguf_path, out, dither: float = 0.0, seed: int = 0) -> Path:
    """dither > 0 adds Gaussian noise of dither x each row's standard deviation to the 2-D weights:
    the GGUF's weights lie exactly on Q4_1's grid, which a quantizer benchmark must not reward."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    g = GGUFFile(str(gguf_path))
    md = g.metadata
    n_head, n_kv = md["llama.attention.head_count"], md["llama.attention.head_count_kv"]
    state = {}
    for name, t in g.tensors.items():
        w = quants.dequantize(torch.from_numpy(np.array(g.raw(name))), t.type).reshape(t.shape)
        if dither and w.dim() == 2:
            w = w + dither * w.std(dim=1, keepdim=True) * torch.randn(w.shape, generator=gen)
        if name == "token_embd.weight":
            hf = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            hf = "model.norm.weight"
        else:
            _, i, kind = name.split(".", 2)
            hf = f"model.layers.{i}.{SMOL_TENSORS[kind]}"
            if kind == "attn_q.weight":
                w = unpermute(w, n_head)
            elif kind == "attn_k.weight":
                w = unpermute(w, n_kv)
        state[hf] = w.contiguous()
    save_file(state, str(out / "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": md["llama.embedding_length"], "intermediate_size": md["llama.feed_forward_length"],
        "num_hidden_layers": md["llama.block_count"], "num_attention_heads": n_head, "num_key_value_heads": n_kv,
        "max_position_embeddings": md["llama.context_length"], "rms_norm_eps": md["llama.attention.layer_norm_rms_epsilon"],
        "rope_theta": md["llama.rope.freq_base"], "vocab_size": md["llama.vocab_size"], "tie_word_embeddings": True,
        "bos_token_id": md["tokenizer.ggml.bos_token_id"], "eos_token_id": md["tokenizer.ggml.eos_token_id"],
    }
    (out / "config.json").write_text(json.dumps(config))
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    tokenizer = {
        "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)}, "merges": md["tokenizer.ggml.merges"]},
        "added_tokens": [{"id": i, "content": t, "special": True} for i, (t, k) in enumerate(zip(tokens, types)) if k == 3],
    }
    (out / "tokenizer.json").write_text(json.dumps(tokenizer))
    return out
