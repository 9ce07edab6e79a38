"""What `--numerics` costs in quality and buys in speed: perplexity, KL divergence and time per mode.

    python benchmarks/numerics_quality.py [--models smollm2,gemma3] [--windows smollm2=16,gemma3=4]
                                          [-t 2] [--text war_and_peace] [--out FILE]

For each model, the user's CLI on the same text and windows (-c 512, f32 KV caches on every run, so
only the matmul arithmetic differs):

    qkvgguf perplexity -m M -f TEXT -c 512 --chunks W -t T -ctk f32 -ctv f32 --json --save-logits BASE   (exact)
    qkvgguf perplexity ... --numerics bf16     --kl-divergence BASE --json
    qkvgguf perplexity ... --numerics llamacpp --kl-divergence BASE --json

and reports per mode: perplexity ± its standard error, the paired per-window mean-NLL difference
from exact with its standard error (the windows are the same, so this is far tighter than the two
PPL errors), KL(exact || mode) per scored token over the full vocabulary (mean ± standard error,
99th percentile; base log-probabilities stored as float16, as llama-perplexity stores them), the
same-top-token percentage, and the run's wall time (prompt-only work: W windows of 512 tokens).
`llamacpp` is llama.cpp's own activation rounding (runtime/llamacpp_numerics.py; its logits equal
llama.cpp's to float32 noise on tiny models, benchmarks/hf_llamacpp.py), the yardstick for bf16.

Text: War and Peace from tests/texts.py (real prose; install `cherche==1.0.1 --no-deps`), or the
US history text with --text us_history. Writes --out (JSON, default
benchmarks/results/numerics_quality.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MODES = ("exact", "bf16", "llamacpp")


def cli(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "qkvgguf.cli", *args]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    return json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("{")][-1])


def paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of b - a over windows, and its standard error."""
    from qkvgguf.runtime.perplexity import standard_error

    d = [y - x for x, y in zip(a, b)]
    return sum(d) / len(d), standard_error(d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,gemma3")
    ap.add_argument("--windows", default="smollm2=16,gemma3=4", help="windows of 512 per model (name=N, comma list)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--text", default="war_and_peace", choices=["war_and_peace", "us_history"])
    ap.add_argument("--out", default=os.path.join(HERE, "results", "numerics_quality.json"))
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    import texts

    windows = dict((kv.split("=")[0], int(kv.split("=")[1])) for kv in args.windows.split(","))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        text = os.path.join(tmp, f"{args.text}.txt")
        with open(text, "w", encoding="utf-8") as f:
            f.write(getattr(texts, args.text)())
        for model in args.models.split(","):
            base = os.path.join(tmp, f"{model}.npz")
            common = ["perplexity", "-m", model, "-f", text, "-c", "512", "--chunks", str(windows.get(model, 4)),
                      "-t", str(args.threads), "-ctk", "f32", "-ctv", "f32", "--json"]
            results = {}
            for mode in MODES:
                extra = ["--save-logits", base] if mode == "exact" else ["--numerics", mode, "--kl-divergence", base]
                t0 = time.perf_counter()
                results[mode] = cli(common + extra)
                results[mode]["wall_s"] = time.perf_counter() - t0
                r = results[mode]
                print(f"  {model} {mode:8}: PPL {r['ppl']:.4f} ± {r['ppl_stderr']:.4f}, {r['seconds']:.1f} s", flush=True)
            ex = results["exact"]
            for mode in MODES:
                r = results[mode]
                d, d_se = paired(ex["window_nll"], r["window_nll"])
                kl = r.get("kl_divergence") or {}
                rows.append({"model": model, "numerics": mode, "windows": r["windows"], "tokens_scored": r["tokens_scored"],
                             "ppl": r["ppl"], "ppl_stderr": r["ppl_stderr"], "nll": r["nll"],
                             "nll_diff_vs_exact": d, "nll_diff_stderr": d_se,
                             "kld_mean": kl.get("kld_mean", 0.0), "kld_stderr": kl.get("kld_stderr", 0.0),
                             "kld_p99": kl.get("kld_p99", 0.0), "same_top_pct": kl.get("same_top_pct", 100.0),
                             "seconds": r["seconds"], "tokens_per_s": r["tokens_scored"] / r["seconds"],
                             "cmd": "qkvgguf " + " ".join(common[:4] + ["TEXT"] + common[5:] +
                                                          ([] if mode == "exact" else ["--numerics", mode,
                                                                                       "--kl-divergence", "BASE"]))})
    out = {"date": time.strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
           "threads": args.threads, "text": args.text, "n_ctx": 512,
           "command": "python benchmarks/numerics_quality.py " + " ".join(sys.argv[1:]), "rows": rows}
    print(f"\n{'model':8} {'numerics':9} {'PPL':>17} {'dNLL vs exact':>20} {'KLD mean':>20} {'KLD p99':>9} "
          f"{'same top':>8} {'tok/s':>7}")
    for r in rows:
        print(f"{r['model']:8} {r['numerics']:9} {r['ppl']:9.4f} ± {r['ppl_stderr']:5.3f} "
              f"{r['nll_diff_vs_exact']:+9.5f} ± {r['nll_diff_stderr']:.5f} {r['kld_mean']:.2e} ± {r['kld_stderr']:.1e} "
              f"{r['kld_p99']:9.2e} {r['same_top_pct']:7.2f}% {r['tokens_per_s']:7.1f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
