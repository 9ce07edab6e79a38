"""A tiny random Gemma 3 checkpoint folder, laid out like Google's (config.json, model.safetensors,
tokenizer.model, tokenizer_config.json, tokenizer.json), for the converter's tests (the runtime's
tests use tests/tiny_gemma3.py, which writes the GGUF directly).

    folder = gemma3_folder(out_dir)            # Gemma3ForCausalLM, random weights, vocab 512
    model = load(folder)                       # the transformers model, float32, eval

The model: 7 layers (layer 5 global, the others sliding, as Gemma 3's every-6th pattern), window 6
so that windows matter on a short sequence, 4 query heads of 32 over 2 KV heads, QK-norms, random
norm weights (Gemma stores them as offsets from 1: around 0), a final logit soft-cap, tied
embeddings, distinct rope bases for local and global layers. Hidden sizes are multiples of 32 so
that 32-element quantization blocks fit every row.

The tokenizer: a SentencePiece BPE model trained here on Sherlock Holmes with Gemma's options (byte
fallback, no dummy prefix, digits split, whitespace-only pieces, ids pad 0 / eos 1 / bos 2 / unk 3,
a few user-defined control tokens), plus the tokenizer_config.json Gemma ships (add BOS, not EOS,
a chat template) and the tokenizer.json transformers derives from them.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

import texts

VOCAB = 512
SPECIALS = ["<mask>", "<start_of_turn>", "<end_of_turn>"]  # ids 4, 5, 6 (after pad, eos, bos, unk)
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n"
            "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
CONFIG = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=7, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, max_position_embeddings=256,
              sliding_window=6, rms_norm_eps=1e-6, final_logit_softcapping=30.0, tie_word_embeddings=True,
              pad_token_id=0, eos_token_id=1, bos_token_id=2,
              rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
                               "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}})


def prose_lines() -> list[str]:
    return [line for line in texts.sherlock()[:60000].splitlines() if line.strip()]


def write_tokenizer(folder: Path) -> None:
    import sentencepiece as spm
    import transformers as tf

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(prose_lines()), model_writer=buf, vocab_size=VOCAB, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=False, split_digits=True,
        allow_whitespace_only_pieces=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
        eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", user_defined_symbols=SPECIALS, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", *SPECIALS]
    config = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<bos>", "eos_token": "<eos>",
        "pad_token": "<pad>", "unk_token": "<unk>", "chat_template": TEMPLATE, "tokenizer_class": "GemmaTokenizer",
        "added_tokens_decoder": {str(i): {"content": p, "special": True, "normalized": False, "lstrip": False,
                                          "rstrip": False, "single_word": False} for i, p in enumerate(pieces)},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    tok = tf.AutoTokenizer.from_pretrained(str(folder))  # derives tokenizer.json from the two files above
    tok.save_pretrained(str(folder))
    # save_pretrained rewrites tokenizer_config.json in its own words; keep Google's (the converter reads it)
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def model(seed: int = 0, **overrides):
    import transformers as tf

    torch.manual_seed(seed)
    m = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**{**CONFIG, **overrides})).float().eval()
    with torch.no_grad():  # random norms (offsets from 1) and larger embeddings, so every path shows
        for name, p in m.named_parameters():
            if "norm" in name:
                p.copy_(torch.randn_like(p) * 0.3)
            elif "embed_tokens" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    return m


def gemma3_folder(out, seed: int = 0, tokenizer_from: Path | None = None, **overrides) -> Path:
    """Save a tiny random Gemma3ForCausalLM with its tokenizer (copied from `tokenizer_from`, a folder
    made by this function, to save the training)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model(seed, **overrides).save_pretrained(str(out))
    if tokenizer_from is None:
        write_tokenizer(out)
    else:
        for name in ("tokenizer.model", "tokenizer_config.json", "tokenizer.json"):
            (out / name).write_bytes((Path(tokenizer_from) / name).read_bytes())
    return out


def load(folder):
    import transformers as tf

    return tf.Gemma3ForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
