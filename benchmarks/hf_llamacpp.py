"""How close llama.cpp is to us on files written by qkvgguf.hf.quantize + save_gguf, and why not closer.

    python benchmarks/hf_llamacpp.py [--seeds 3 4] [--windows 16] [--out benchmarks/results/hf_llamacpp.json]

Every llama.cpp run here (llama-cpp-python, one thread for the tiny models) and every run of ours uses
an f32 KV cache, so what differs is the matmuls. Tiny checkpoints (tests/test_convert.py's random
models: llama, mistral, qwen2, qwen3; 2 layers, width 64, vocabulary 512, 24 tokens of prose), each
quantized in memory to an outtype and saved. Distances, each max|a - b| / max|b| over a position's
logits (over all positions unless "median"):
  quantized vs ours     llama.cpp on the saved file against the in-memory quantized model;
  f32 vs ours           llama.cpp on an f32 file of the same weights (hf.dequantize, then save_gguf
                        outtype f32) against the same in-memory model: the function, without
                        llama.cpp's quantized matmuls;
  quantized vs f32      llama.cpp against itself: what its quantized matmuls (activations rounded to
                        Q8_0 / Q8_1 / Q8_K blocks) change;
  quantized vs rounded  llama.cpp on the saved file against our runtime on it with --numerics llamacpp
                        (the same rounding: runtime/llamacpp_numerics.py), max and median position.
Then SmolLM2 (30 layers): the README snippet's file (the demo file dequantized, re-quantized to q8_0,
saved) against the in-memory model on 128 tokens of War and Peace; the demo file itself, llama.cpp
against our runtime exact and --numerics llamacpp on the same tokens, and our runtime's prompt path
against its own one-token decode path under each numerics; and perplexity over --windows windows of
512 tokens of War and Peace: llama.cpp, ours exact, ours --numerics llamacpp, with the paired
per-window differences of mean NLL and their standard errors.
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
    ap.add_argument("--windows", type=int, default=16, help="512-token windows of the SmolLM2 perplexity comparison")
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
            q, f = H._llamacpp_logits(saved, ids, H.F32_KV), H._llamacpp_logits(f32, ids, H.F32_KV)
            rounded = H._runtime_logits(saved, ids, numerics="llamacpp")
            per_position = [H._rel(q[t], rounded[t]) for t in range(len(ids))]
            row = {"arch": arch, "outtype": outtype, "seed": seed, "tokens": len(ids),
                   "quantized_vs_ours": H._rel(q, ours), "f32_vs_ours": H._rel(f, ours),
                   "quantized_vs_f32": H._rel(q, f), "quantized_vs_rounded": max(per_position),
                   "quantized_vs_rounded_median": float(np.median(per_position)),
                   "positions_over_1e-4": sum(r > 1e-4 for r in per_position)}
            rows.append(row)
            print(f"{arch:8} {outtype:7} seed {seed}: quantized vs ours {row['quantized_vs_ours']:.4f}  "
                  f"f32 vs ours {row['f32_vs_ours']:.1e}  quantized vs f32 {row['quantized_vs_f32']:.4f}  "
                  f"quantized vs rounded {row['quantized_vs_rounded']:.1e} (median {row['quantized_vs_rounded_median']:.1e})",
                  flush=True)

    path = default_model_path()
    folder, name = os.path.split(path)
    t0 = time.perf_counter()
    hf_tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    smol = quantize(dequantize(from_gguf(path)), "q8_0")
    saved = save_gguf(smol, root / "smollm2-q8_0.gguf", hf_tok)
    ids = torch.tensor(Tokenizer.from_gguf(GGUFFile(path)).encode(texts.war_and_peace()[100_000:101_000])[:128])
    torch.set_num_threads(2)
    ours, theirs = H._logits(smol, ids), H._llamacpp_logits(saved, ids, H.F32_KV)
    base_theirs = H._llamacpp_logits(path, ids, H.F32_KV)
    base_ours, base_rounded = H._runtime_logits(path, ids), H._runtime_logits(path, ids, numerics="llamacpp")

    def decoded(numerics: str) -> torch.Tensor:
        """Our runtime on the demo file, one token per forward (the op-by-op decode path)."""
        from qkvgguf.runtime import Model

        m = Model(GGUFFile(path), numerics=numerics)
        m.decode_block = None  # the exact path's one-call block would differ in float order only
        cache = m.new_cache(len(ids))
        return torch.stack([m.forward(ids[t:t + 1], cache) for t in range(len(ids))])

    def compare(a, b) -> dict:
        a, b = np.asarray(a), np.asarray(b)
        return {"ppl_llamacpp": H._perplexity(a, ids), "ppl_ours": H._perplexity(b, ids),
                "ppl_ratio_minus_1": H._perplexity(a, ids) / H._perplexity(b, ids) - 1,
                "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()), "max_rel": H._rel(a, b),
                "rms_rel": float(np.sqrt(((a - b) ** 2).mean() / (b ** 2).mean()))}

    smollm2 = {"tokens": len(ids), "q8_0_file_vs_in_memory": compare(theirs, ours),
               "demo_file_llamacpp_vs_our_runtime": compare(base_theirs, base_ours),
               "demo_file_llamacpp_vs_our_runtime_llamacpp_numerics": compare(base_theirs, base_rounded),
               "demo_file_our_prompt_vs_decode_exact": compare(base_ours, decoded("exact")),
               "demo_file_our_prompt_vs_decode_llamacpp_numerics": compare(base_rounded, decoded("llamacpp"))}
    smollm2["perplexity"] = _perplexities(path, args.windows)
    smollm2["seconds"] = time.perf_counter() - t0
    for k in [k for k in smollm2 if k.startswith(("q8_0", "demo"))]:
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
    summary["quantized_vs_rounded_max"] = max(r["quantized_vs_rounded"] for r in rows)
    summary["quantized_vs_rounded_median_max"] = max(r["quantized_vs_rounded_median"] for r in rows)
    summary["positions_over_1e-4"] = [sum(r["positions_over_1e-4"] for r in rows), sum(r["tokens"] for r in rows)]
    print(json.dumps(summary, indent=1))
    print(json.dumps(smollm2["perplexity"], indent=1))
    result = {"command": "python benchmarks/hf_llamacpp.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "host": platform.node(), "python": platform.python_version(), "llama_cpp_threads": 1,
              "summary": summary, "tiny": rows, "smollm2": smollm2}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    return 0


def _perplexities(path: str, n_windows: int, n_ctx: int = 512) -> dict:
    """llama.cpp, ours exact and ours --numerics llamacpp on the same windows (every token but the
    first scored, f32 KV caches): perplexity, and each of ours against llama.cpp as the mean over
    windows of the per-window mean NLL difference with its standard error."""
    import math

    import llamacpp
    import numpy as np
    import texts
    import torch

    from qkvgguf import GGUFFile
    from qkvgguf.runtime import Model
    from qkvgguf.tokenizer import Tokenizer

    ids = Tokenizer.from_gguf(GGUFFile(path)).encode(texts.war_and_peace()[200_000:])[: n_windows * n_ctx]
    windows = [ids[i * n_ctx:(i + 1) * n_ctx] for i in range(n_windows)]

    def nll(logits, w) -> float:
        logp = torch.log_softmax(torch.as_tensor(np.asarray(logits), dtype=torch.float64)[:-1], -1)
        return float(-logp.gather(1, torch.tensor(w[1:])[:, None]).mean())

    llm = llamacpp.load(path, n_ctx=n_ctx, n_batch=n_ctx, n_threads=2, logits_all=True, type_k=0, type_v=0)
    runs = {"llamacpp": []}
    for w in windows:
        llm.reset()
        llm.eval(w)
        runs["llamacpp"].append(nll(llm.scores[:n_ctx], w))
    for numerics in ("exact", "llamacpp"):
        m = Model(GGUFFile(path), numerics=numerics)
        runs[f"ours_{numerics}"] = [nll(m.forward(torch.tensor(w), m.new_cache(n_ctx), logits="all"), w)
                                    for w in windows]
    out = {"windows": n_windows, "n_ctx": n_ctx, "kv": "f32",
           "ppl": {k: math.exp(float(np.mean(v))) for k, v in runs.items()}}
    for k in ("ours_exact", "ours_llamacpp"):
        d = np.array(runs[k]) - np.array(runs["llamacpp"])
        out[f"{k}_minus_llamacpp_nll"] = [float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))]
    out["window_nll"] = runs
    return out


if __name__ == "__main__":
    sys.exit(main())
