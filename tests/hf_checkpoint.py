"""Rebuild a Hugging Face checkpoint folder (float32 safetensors, config.json, tokenizer files) from
a real GGUF that llama.cpp made: the converter's tests and benchmarks convert it back. Names are
written out here (not taken from the converter) to stay independent.

    smollm2_hf_folder(gguf_path, out_dir) -> out_dir     # SmolLM2 (llama): tokenizer.json
    gemma3_hf_folder(gguf_path, out_dir) -> out_dir      # Gemma 3 270M: tokenizer.model
    write_tokenizer_json(gguf.metadata, out_dir)         # the BPE tokenizer alone (benchmarks/fit4g_e2e.py)
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


# -- Gemma 3 ------------------------------------------------------------------------------------------

GEMMA3_TENSORS = {  # GGUF name (blk.{i}. stripped, .weight dropped) -> Hugging Face name
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_output": "self_attn.o_proj", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "post_ffw_norm": "post_feedforward_layernorm",
}
# what Gemma's tokenizer.json says about special tokens: <bos> before each sequence
GEMMA_POST_PROCESSOR = {
    "type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
    "pair": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
             {"SpecialToken": {"id": "<bos>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
}


def gemma_sentencepiece(md: dict) -> tuple[bytes, dict]:
    """A SentencePiece model (serialized) and tokenizer_config.json's `added_tokens_decoder` that
    llama.cpp's converter turns into this file's tokenizer.ggml.* keys. The file's types and scores
    say which tokens came from added_tokens_decoder (score -1000 with a control or user-defined type,
    or the unknown token: the decoder lists it as special); their SentencePiece types are the
    plain ones (user-defined pieces spell spaces as U+2581)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    kinds = pb.ModelProto.SentencePiece.Type
    tokens, scores, types = (md[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    unk = md["tokenizer.ggml.unknown_token_id"]
    proto, decoder = pb.ModelProto(), {}
    for i, (token, score, kind) in enumerate(zip(tokens, scores, types)):
        piece = proto.pieces.add()
        piece.piece, piece.score = token.replace(" ", "\u2581") if kind == 4 else token, score
        piece.type = kinds.UNKNOWN if i == unk else {1: kinds.NORMAL, 3: kinds.CONTROL, 4: kinds.USER_DEFINED,
                                                     5: kinds.UNUSED, 6: kinds.BYTE}[kind]
        if score == -1000.0 and (kind in (3, 4) or i == unk):
            decoder[str(i)] = {"content": token, "special": kind == 3 or i == unk, "normalized": False}
    spec = proto.trainer_spec
    spec.model_type, spec.vocab_size, spec.byte_fallback = pb.TrainerSpec.BPE, len(tokens), True
    spec.unk_id, spec.bos_id = unk, md["tokenizer.ggml.bos_token_id"]
    spec.eos_id, spec.pad_id = md["tokenizer.ggml.eos_token_id"], md["tokenizer.ggml.padding_token_id"]
    norm = proto.normalizer_spec
    norm.name, norm.add_dummy_prefix = "identity", False
    norm.remove_extra_whitespaces, norm.escape_whitespaces = False, True
    return proto.SerializeToString(), decoder


def gemma3_hf_folder(gguf_path, out) -> Path:
    """A Gemma3ForCausalLM folder (float32 safetensors, a transformers-4 style config.json,
    tokenizer.model, tokenizer_config.json, a tokenizer.json holding only the added tokens and the
    post-processor) from a gemma3 GGUF: weights dequantized, norms stored as w (the GGUF holds 1 + w)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    g = GGUFFile(str(gguf_path))
    md = g.metadata
    state = {}
    for name, t in g.tensors.items():
        w = quants.dequantize(torch.from_numpy(np.array(g.raw(name))), t.type).reshape(t.shape).float()
        if name.endswith("norm.weight"):
            w = w - 1.0
        if name == "token_embd.weight":
            hf = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            hf = "model.norm.weight"
        else:
            _, i, kind = name.split(".", 2)
            hf = f"model.layers.{i}.{GEMMA3_TENSORS[kind.removesuffix('.weight')]}.weight"
        state[hf] = w.contiguous()
    save_file(state, str(out / "model.safetensors"))
    del state
    n, head_dim = md["gemma3.block_count"], md["gemma3.attention.key_length"]
    config = {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "hidden_size": md["gemma3.embedding_length"], "intermediate_size": md["gemma3.feed_forward_length"],
        "num_hidden_layers": n, "num_attention_heads": md["gemma3.attention.head_count"],
        "num_key_value_heads": md["gemma3.attention.head_count_kv"], "head_dim": head_dim,
        "query_pre_attn_scalar": head_dim, "max_position_embeddings": md["gemma3.context_length"],
        "rms_norm_eps": md["gemma3.attention.layer_norm_rms_epsilon"], "rope_theta": md["gemma3.rope.freq_base"],
        "rope_local_base_freq": md.get("gemma3.rope.freq_base_swa", 10000.0), "rope_scaling": None,
        "sliding_window": md["gemma3.attention.sliding_window"], "sliding_window_pattern": 6,
        "final_logit_softcapping": md.get("gemma3.final_logit_softcapping"), "attn_logit_softcapping": None,
        "hidden_activation": "gelu_pytorch_tanh", "vocab_size": len(md["tokenizer.ggml.tokens"]),
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "bos_token_id": md["tokenizer.ggml.bos_token_id"], "eos_token_id": md["tokenizer.ggml.eos_token_id"],
        "pad_token_id": md["tokenizer.ggml.padding_token_id"],
    }
    (out / "config.json").write_text(json.dumps(config, indent=1))
    model, decoder = gemma_sentencepiece(md)
    (out / "tokenizer.model").write_bytes(model)
    tokens = md["tokenizer.ggml.tokens"]
    special = {f"{k}_token": tokens[md[f"tokenizer.ggml.{key}_token_id"]]
               for k, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"), ("unk", "unknown"))}
    tok_config = {"add_bos_token": md["tokenizer.ggml.add_bos_token"],
                  "add_eos_token": md["tokenizer.ggml.add_eos_token"], **special, "added_tokens_decoder": decoder}
    if "tokenizer.chat_template" in md:
        tok_config["chat_template"] = md["tokenizer.chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config))
    added = [{"id": int(i), "content": d["content"], "special": d["special"]} for i, d in decoder.items()]
    (out / "tokenizer.json").write_text(json.dumps({"added_tokens": added, "post_processor": GEMMA_POST_PROCESSOR}))
    return out
