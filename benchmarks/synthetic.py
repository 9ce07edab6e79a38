"""Synthetic GGUF models with the shapes and ggml types of real ones, for speed and memory runs.

    python benchmarks/synthetic.py 8b-q4_k_m /tmp/m.gguf      # writes one file; `--list` shows the recipes

Speed and memory do not depend on the weights' values, only on their formats and shapes, and the
real 7-8B files (4-5 GB) cannot be carried to a GPU machine: so they are written where they run.
Quantized blocks are random bytes with sane f16 scales (|N(0, 0.002)| + 1e-4: never all zero, no
inf/NaN); norms are 1 + 0.1 N(0, 1). The vocabulary is a minimal SentencePiece-style one (byte
tokens plus filler pieces): enough for `qkvgguf bench` (random token ids) and `inspect`.

Recipes (`RECIPES`): a shape (layers, n_embd, n_ff, heads, KV heads, vocab, rope base) and a type
per tensor: the converter's own per-tensor policy for that outtype (`convert.writer.tensor_type`,
llama-quantize's choice, which tests/test_convert.py checks type for type against llama.cpp), e.g.
for q4_k_m Q6_K for the output matrix and for attn_v / ffn_down in the first and last eighth of the
layers and every third layer between, Q4_K elsewhere; for q2_k Q2_K with Q3_K/Q4_K attn_v,
ffn_down and attn_output and a Q6_K output. The `q4_1` rule is the demo file as shipped (Q8_0
embedding), not a converter recipe.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Shape:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    vocab: int
    rope_base: float = 10000.0
    n_ctx: int = 4096


SHAPES = {
    "llama2-7b": Shape(32, 4096, 11008, 32, 32, 32000),
    "llama3-8b": Shape(32, 4096, 14336, 32, 8, 128256, 500000.0, 8192),
    "smollm2-135m": Shape(30, 576, 1536, 9, 3, 49152, 100000.0, 8192),
    "tinyllama-1.1b": Shape(22, 2048, 5632, 32, 4, 32000, 10000.0, 2048),
    "tiny": Shape(2, 256, 512, 4, 2, 512),
}

# recipe -> (shape, file type name, rule (an outtype of the converter, or q4_1), tied embedding)
RECIPES = {
    "7b-q4_0": ("llama2-7b", "MOSTLY_Q4_0", "q4_0", False),
    "8b-q4_k_m": ("llama3-8b", "MOSTLY_Q4_K_M", "q4_k_m", False),
    "8b-q3_k_m": ("llama3-8b", "MOSTLY_Q3_K_M", "q3_k_m", False),
    "8b-q2_k": ("llama3-8b", "MOSTLY_Q2_K", "q2_k", False),  # the size that fits a 4 GiB card whole
    "7b-q4_k_m": ("llama2-7b", "MOSTLY_Q4_K_M", "q4_k_m", False),
    "1b-q4_0": ("tinyllama-1.1b", "MOSTLY_Q4_0", "q4_0", False),
    "1b-q4_k_m": ("tinyllama-1.1b", "MOSTLY_Q4_K_M", "q4_k_m", False),
    "smollm2-q4_1": ("smollm2-135m", "MOSTLY_Q4_1", "q4_1", True),  # the demo model's shapes and types
    "tiny-q4_k_m": ("tiny", "MOSTLY_Q4_K_M", "q4_k_m", False),
    "tiny-q4_0": ("tiny", "MOSTLY_Q4_0", "q4_0", False),
}

F16_FIELDS = {"Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0], "Q4_K": [0, 2],
              "Q5_K": [0, 2], "Q6_K": [208], "Q2_K": [80, 82], "Q3_K": [108], "IQ4_NL": [0],
              "IQ4_XS": [0]}  # byte offsets of the f16 fields in a block


def tensor_type(rule: str, name: str, shape: tuple[int, int], s: Shape, tied: bool) -> str:
    """The ggml type name of tensor `name` (rows, cols) under a rule."""
    if rule == "q4_1":  # SmolLM2-135M-Instruct Q4_1 as shipped: Q8_0 tied embedding
        return "Q8_0" if name == "token_embd.weight" else "Q4_1"
    from qkvgguf.convert.writer import ModelFacts, get_outtype
    from qkvgguf.convert.writer import tensor_type as policy

    facts = ModelFacts(n_layer=s.n_layer, has_output=not tied, n_gqa=s.n_head // s.n_head_kv)
    return policy(name, shape, get_outtype(rule), facts).type.name


def random_blocks(rng: np.random.Generator, type_name: str, rows: int, cols: int) -> np.ndarray:
    """Random quantized bytes (rows, row_bytes) with sane f16 scales."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

    bs, ts = GGML_QUANT_SIZES[T[type_name]]
    nb = cols // bs
    raw = np.frombuffer(bytearray(rng.bytes(rows * nb * ts)), dtype=np.uint8).reshape(rows, nb, ts)
    for off in F16_FIELDS[type_name]:
        scale = (np.abs(rng.standard_normal((rows, nb), dtype=np.float32)) * 0.002 + 1e-4).astype(np.float16)
        raw[:, :, off:off + 2] = scale.view(np.uint8).reshape(rows, nb, 2)
    return raw.reshape(rows, nb * ts)


def write(recipe: str, path: str, seed: int = 0) -> str:
    """Write the recipe's GGUF to `path` (via a temporary file renamed when complete); returns path."""
    import gguf
    from gguf import GGMLQuantizationType as T

    shape_name, file_type, rule, tied = RECIPES[recipe]
    s = SHAPES[shape_name]
    rng = np.random.default_rng(seed)
    tmp = path + ".part"
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name(f"synthetic {recipe}")
    w.add_block_count(s.n_layer)
    w.add_context_length(s.n_ctx)
    w.add_embedding_length(s.n_embd)
    w.add_feed_forward_length(s.n_ff)
    w.add_head_count(s.n_head)
    w.add_head_count_kv(s.n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(s.rope_base)
    w.add_rope_dimension_count(s.n_embd // s.n_head)
    w.add_file_type(getattr(gguf.LlamaFileType, file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"\u2581t{i}" for i in range(s.vocab - len(tokens))]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(s.vocab)])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (s.vocab - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    head_dim = s.n_embd // s.n_head

    def quant(name, rows, cols):
        t = tensor_type(rule, name, (rows, cols), s, tied)
        w.add_tensor(name, random_blocks(rng, t, rows, cols), raw_dtype=T[t])

    def norm(name):
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(s.n_embd)).astype(np.float32))

    quant("token_embd.weight", s.vocab, s.n_embd)
    for i in range(s.n_layer):
        p = f"blk.{i}."
        norm(p + "attn_norm.weight")
        quant(p + "attn_q.weight", s.n_embd, s.n_embd)
        quant(p + "attn_k.weight", s.n_head_kv * head_dim, s.n_embd)
        quant(p + "attn_v.weight", s.n_head_kv * head_dim, s.n_embd)
        quant(p + "attn_output.weight", s.n_embd, s.n_embd)
        norm(p + "ffn_norm.weight")
        quant(p + "ffn_gate.weight", s.n_ff, s.n_embd)
        quant(p + "ffn_up.weight", s.n_ff, s.n_embd)
        quant(p + "ffn_down.weight", s.n_embd, s.n_ff)
    norm("output_norm.weight")
    if not tied:
        quant("output.weight", s.vocab, s.n_embd)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path


def ensure(recipe: str, folder: str) -> str:
    """The recipe's file in `folder`, written if it is not there yet."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"synthetic-{recipe}.gguf")
    if not os.path.exists(path):
        t0 = time.perf_counter()
        write(recipe, path)
        print(f"wrote {path} ({os.path.getsize(path) / 2**30:.2f} GiB) in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe", nargs="?", choices=sorted(RECIPES))
    ap.add_argument("path", nargs="?")
    ap.add_argument("--list", action="store_true", help="list the recipes")
    args = ap.parse_args(argv)
    if args.list or not args.recipe or not args.path:
        for name, (shape, ftype, _, tied) in RECIPES.items():
            print(f"{name:14} {shape:13} {ftype}{' (tied embedding)' if tied else ''}")
        return 0
    write(args.recipe, args.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
