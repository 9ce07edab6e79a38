"""Rebuild a Hugging Face checkpoint folder (float32 safetensors, config.json, tokenizer.json) from
the SmolLM2 GGUF, the only real model available offline: the converter's tests and benchmarks
convert it back. Names are written out here (not taken from the converter) to stay independent.

    smollm2_hf_folder(gguf_path, out_dir) -> out_dir
    write_tokenizer_json(gguf.metadata, out_dir)   # the tokenizer alone (benchmarks/fit4g_e2e.py)
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


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-random n x n orthogonal matrix (float64): QR of a Gaussian, signs fixed by R's diagonal."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def rotate_residual(state: dict, n_layer: int, seed: int) -> dict:
    """The same function with every weight off any quantization grid: the residual stream x becomes
    x Q for a random orthogonal Q. RMSNorm commutes with Q (it divides by the RMS, which Q keeps)
    once its gain is folded into the matrices that read the normed stream; so

        embed  E -> E Q                    readers (q, k, v, gate, up)  W -> W diag(g) Q, g -> 1
        writers (o_proj, down_proj)  W -> Q^T W      lm_head -> E diag(g_final) Q (untied), g_final -> 1

    and the logits are unchanged up to float rounding (computed in float64, stored float32)."""
    d = state["model.embed_tokens.weight"].shape[1]
    q = random_orthogonal(d, seed)
    out = {}
    f64 = {k: v.double() for k, v in state.items()}
    out["model.embed_tokens.weight"] = f64["model.embed_tokens.weight"] @ q
    out["lm_head.weight"] = (f64["model.embed_tokens.weight"] * f64["model.norm.weight"]) @ q
    out["model.norm.weight"] = torch.ones(d, dtype=torch.float64)
    for i in range(n_layer):
        p = f"model.layers.{i}."
        for norm, readers in (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                              ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))):
            g = f64[p + norm + ".weight"]
            for r in readers:
                out[p + r + ".weight"] = (f64[p + r + ".weight"] * g) @ q
            out[p + norm + ".weight"] = torch.ones(d, dtype=torch.float64)
        for w in ("self_attn.o_proj", "mlp.down_proj"):
            out[p + w + ".weight"] = q.T @ f64[p + w + ".weight"]
    assert out.keys() >= state.keys()
    return {k: v.float().contiguous() for k, v in out.items()}


def smollm2_hf_folder(gguf_path, out, dither: float = 0.0, seed: int = 0, rotate: bool = False) -> Path:
    """dither > 0 adds Gaussian noise of dither x each row's standard deviation to the 2-D weights;
    rotate=True rewrites the model with its residual stream rotated by a random orthogonal matrix
    (`rotate_residual`: same logits, untied head). The GGUF's weights lie exactly on Q4_1's grid,
    which a quantizer benchmark must not reward: the rotation moves every weight off every grid
    without changing what the model computes; dithering changes the function a little and leaves
    the weights near the grid."""
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
    if rotate:
        state = rotate_residual(state, md["llama.block_count"], seed)
    save_file(state, str(out / "model.safetensors"))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": md["llama.embedding_length"], "intermediate_size": md["llama.feed_forward_length"],
        "num_hidden_layers": md["llama.block_count"], "num_attention_heads": n_head, "num_key_value_heads": n_kv,
        "max_position_embeddings": md["llama.context_length"], "rms_norm_eps": md["llama.attention.layer_norm_rms_epsilon"],
        "rope_theta": md["llama.rope.freq_base"], "vocab_size": md["llama.vocab_size"], "tie_word_embeddings": not rotate,
        "bos_token_id": md["tokenizer.ggml.bos_token_id"], "eos_token_id": md["tokenizer.ggml.eos_token_id"],
    }
    (out / "config.json").write_text(json.dumps(config))
    write_tokenizer_json(md, out)
    return out


def write_tokenizer_json(md: dict, out) -> None:
    """out/tokenizer.json: the GGUF's BPE vocabulary and merges, its control tokens as added tokens."""
    tokens, types = md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"]
    tokenizer = {
        "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)}, "merges": md["tokenizer.ggml.merges"]},
        "added_tokens": [{"id": i, "content": t, "special": True, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False} for i, (t, k) in enumerate(zip(tokens, types)) if k == 3],
    }
    (Path(out) / "tokenizer.json").write_text(json.dumps(tokenizer))
