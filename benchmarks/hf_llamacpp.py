"""How close llama.cpp is to us on files written by qkvgguf.hf.quantize + save_gguf, and why not closer.

    python benchmarks/hf_llamacpp.py [--seeds 3 4] [--out benchmarks/results/hf_llamacpp.json]

Tiny checkpoints (tests/test_convert.py's random models: llama, mistral, qwen2, qwen3; 2 layers,
width 64, vocabulary 512, 24 tokens of prose), each quantized in memory to an outtype, saved, and run
by llama.cpp (llama-cpp-python, one thread). Three distances, each max|a - b| / max|b| over every
position's logits:
  quantized vs ours   llama.cpp on the saved file against the in-memory quantized model;
  f32 vs ours         llama.cpp on an f32 file of the same weights (hf.dequantize, then save_gguf
                      outtype f32) against the same in-memory model: the function, without
                      llama.cpp's quantized matmuls;
  quantized vs f32    llama.cpp against itself: what its quantized matmuls (activations rounded to
                      Q8_0 / Q8_K blocks) change.
Then SmolLM2 (the demo file, dequantized and quantized again to q8_0, as in the README snippet) on
128 tokens of War and Peace: perplexity and top-token agreement, llama.cpp on the saved file against
the in-memory model, and, as a baseline, llama.cpp against our runtime on the demo file itself.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
RESULTS = HERE / "results" / "hf_llamacpp.json"
CASES = [("llama", "q8_0"), ("mistral", "q4_0"), ("qwen2", "q4_k_m"), ("qwen3", "q8_0"), ("qwen2", "f16"),
         ("llama", "q4_k_m"), ("qwen3", "q4_0"), ("mistral", "q5_k_m"), ("llama", "q3_k_m"), ("llama", "q5_1")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    import conftest  # noqa: F401  (TRITON_INTERPRET as the tests set it)
    import test_convert
    import test_hf_interop as H
    import texts
    from transformers import AutoTokenizer

    from qkvgguf import GGUFFile
    from qkvgguf.default_model import default_model_path
    from qkvgguf.hf import dequantize, from_gguf, quantize, save_gguf
    from qkvgguf.tokenizer import Tokenizer

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="hf-llamacpp-"))
    tok = H._tokenizer_folder(root)
    rows = []
    for arch, outtype in CASES:
        for seed in args.seeds:
            d = root / f"{arch}-{outtype}-{seed}"
            d.mkdir()
            model = H._checkpoint(arch, seed, tok, d / "hf")
            ids = test_convert._ids()
            quantize(model, outtype)
            ours = H._logits(model, ids)
            saved = save_gguf(model, d / "q.gguf", tok, vocab_pre=test_convert.BPE_PRE)
            f32 = save_gguf(dequantize(model), d / "f32.gguf", tok, outtype="f32", vocab_pre=test_convert.BPE_PRE)
            q, f = H._llamacpp_logits(saved, ids), H._llamacpp_logits(f32, ids)
            row = {"arch": arch, "outtype": outtype, "seed": seed, "tokens": len(ids),
                   "quantized_vs_ours": H._rel(q, ours), "f32_vs_ours": H._rel(f, ours),
                   "quantized_vs_f32": H._rel(q, f)}
            rows.append(row)
            print(f"{arch:8} {outtype:7} seed {seed}: quantized vs ours {row['quantized_vs_ours']:.4f}  "
                  f"f32 vs ours {row['f32_vs_ours']:.1e}  quantized vs f32 {row['quantized_vs_f32']:.4f}", flush=True)

    path = default_model_path()
    folder, name = os.path.split(path)
    t0 = time.perf_counter()
    hf_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    smol = quantize(dequantize(from_gguf(path)), "q8_0")
    saved = save_gguf(smol, root / "smollm2-q8_0.gguf", hf_tok)
    ids = torch.tensor(Tokenizer.from_gguf(GGUFFile(path)).encode(texts.war_and_peace()[100_000:101_000])[:128])
    ours, theirs = H._logits(smol, ids), H._llamacpp_logits(saved, ids)
    base_ours, base_theirs = H._runtime_logits(path, ids), H._llamacpp_logits(path, ids)

    def compare(a, b) -> dict:
        a, b = np.asarray(a), np.asarray(b)
        return {"ppl_llamacpp": H._perplexity(a, ids), "ppl_ours": H._perplexity(b, ids),
                "ppl_ratio_minus_1": H._perplexity(a, ids) / H._perplexity(b, ids) - 1,
                "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()), "max_rel": H._rel(a, b),
                "rms_rel": float(np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean()))}

    smollm2 = {"tokens": len(ids), "q8_0_file_vs_in_memory": compare(theirs, ours),
               "demo_file_llamacpp_vs_our_runtime": compare(base_theirs, base_ours),
               "seconds": time.perf_counter() - t0}
    for k in ("q8_0_file_vs_in_memory", "demo_file_llamacpp_vs_our_runtime"):
        c = smollm2[k]
        print(f"SmolLM2 {k}: ppl {c['ppl_llamacpp']:.4f} vs {c['ppl_ours']:.4f} ({c['ppl_ratio_minus_1']:+.2%}), "
              f"top-1 {c['top1_agreement']:.1%}, max-rel {c['max_rel']:.4f}, rms-rel {c['rms_rel']:.4f}")

    quantized = [r for r in rows if r["outtype"] != "f16"]
    summary = {
        "quantized_vs_ours_range": [min(r["quantized_vs_ours"] for r in quantized),
                                    max(r["quantized_vs_ours"] for r in quantized)],
        "f32_vs_ours_max": max(r["f32_vs_ours"] for r in rows),
        "max_abs_gap_difference": max(abs(r["quantized_vs_ours"] - r["quantized_vs_f32"]) for r in quantized),
        "f16_quantized_vs_ours_max": max(r["quantized_vs_ours"] for r in rows if r["outtype"] == "f16"),
    }
    print(json.dumps(summary, indent=1))
    result = {"command": "python benchmarks/hf_llamacpp.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "host": platform.node(), "python": platform.python_version(), "llama_cpp_threads": 1,
              "summary": summary, "tiny": rows, "smollm2": smollm2}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
