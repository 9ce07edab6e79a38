"""KV cache quality: perplexity per cache type, qkvgguf next to llama.cpp on the same windows.

    python benchmarks/kv_quality.py [-m FILE] [-t 2] [--windows-512 16] [--windows-2048 2] [--windows-8192 0]
                                    [--no-llamacpp] [--only f16,q4g,q3g] [--settings f16/f16,q8_0/q8_0,...]

SmolLM2 (the default model) on War and Peace (tests/texts.py, real prose): the token stream is cut
into non-overlapping windows of -c tokens, each evaluated from an empty cache, every token but the
first of a window scored (llama.cpp's perplexity tool; BOS replaces the first token when the model
adds BOS). qkvgguf runs `runtime.perplexity` with the cache types; llama.cpp (llama-cpp-python,
flash_attn=True, type_k/type_v) scores the same windows the same way in the same run. One extra
llama.cpp row runs q4_0 with LLAMA_ATTN_ROT_DISABLE=1: llama.cpp without its Hadamard rotation.

Rounding flips make a 4-bit cache's perplexity chaotic: two implementations of the same maths
differ window by window (K/V perturbed by 1e-5 moved our 4-window q4_0 figure by ~1%). The
"ours / llama.cpp" column therefore carries the standard error of the ratio from the per-window
NLL differences; 16 windows at -c 512 and 2 at -c 2048 (8,176 and 4,094 scored tokens).

Per row: bits per value with everything stored counted at that context (kv_types.kv_bits_per_value:
q4g's f16 sinks and q8_0 newest group make it 4.82 bits at -c 512 and 4.49 at 2048, q3g's 3.83 and
3.49; llama.cpp's types have no fixed rows), perplexity and its change over the same engine's f16 cache, and the KL
divergence from that engine's f16-cache distributions over the full vocabulary (mean per scored
token with its standard error, same-top-token %). llama.cpp's q5_0 and q4_1 caches (5.5 and 5.0
bits) are the equal-memory comparison for q4g, which we compare against at equal or lower bits.

Prints a table, the issue-5 bars (q8_0 <= +0.3% over f16; our q4_0 within 1% of llama.cpp's q4_0;
q4g's increase over f16 at most a third of q4_0's) and writes --json (default
benchmarks/kv_quality.json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import llamacpp  # noqa: E402
import texts  # noqa: E402

from qkvgguf.default_model import default_model_path, resolve_model  # noqa: E402
from qkvgguf.gguf_file import GGUFFile  # noqa: E402
from qkvgguf.runtime import Model, perplexity  # noqa: E402
from qkvgguf.kv_types import kv_bits_per_value  # noqa: E402
from qkvgguf.runtime.perplexity import kld_summary, token_kld  # noqa: E402
from qkvgguf.tokenizer import Tokenizer  # noqa: E402

# (K, V) rows; llama.cpp has no q4g, we have no q5_0 / q4_1 cache (llama.cpp's rows for the
# equal-memory comparison: 5.5 and 5.0 bits per value, between q4_0's 4.5 and q4g's 4.9-6.1)
SETTINGS = [("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q4g", "q4g"), ("q3g", "q3g"), ("q8_0", "q4_0"),
            ("q5_0", "q5_0"), ("q4_1", "q4_1")]
GGML_TYPES = {"f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q8_0": 8}  # llama_cpp.GGML_TYPE_*
OUR_TYPES = {"f32", "f16", "q8_0", "q4_0", "q4g", "q3g"}
LLAMA_BITS = {"f16": 16.0, "q8_0": 8.5, "q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5}  # ggml block sizes, no fixed rows
N_BATCH = 512


def windows_of(ids: list[int], n_ctx: int, n: int, bos_id) -> list[list[int]]:
    wins = [ids[i * n_ctx:(i + 1) * n_ctx] for i in range(n)]
    if any(len(w) < n_ctx for w in wins):
        raise SystemExit(f"the text has too few tokens for {n} windows of {n_ctx}")
    return [[bos_id] + w[1:] if bos_id is not None else w for w in wins]


def ours(model: Model, wins: list[list[int]], type_k: str, type_v: str, keep=None):
    """Perplexity, the mean NLL of each window (from runtime.perplexity's running figures), and the
    scored positions' log-probabilities (float16, for the KL divergence) when `keep` is a list."""
    stream = [t for w in wins for t in w]
    n = len(wins[0]) - 1
    running = []
    sink = None if keep is None else (lambda lp, targets: keep.append(lp.to(torch.float16).cpu()))
    res = perplexity(model, stream, len(wins[0]), n_batch=N_BATCH, type_k=type_k, type_v=type_v,
                     progress=lambda w, ppl: running.append(math.log(ppl) * w * n), on_logprobs=sink)
    assert res.n_scored == len(wins) * n
    return res.ppl, [(b - a) / n for a, b in zip([0.0] + running[:-1], running)]


def kld_stats(ref: list, got: list) -> dict:
    """KL(ref || got) per scored token over the full vocabulary (both float16 log-probabilities,
    matched chunk by chunk), summarized as the CLI's --kl-divergence does (runtime/perplexity.py)."""
    pairs = [token_kld(a, b) for a, b in zip(ref, got)]
    return kld_summary(torch.cat([k for k, _ in pairs]).numpy(), torch.cat([s for _, s in pairs]).numpy())


def llama(path: str, wins: list[list[int]], type_k: str, type_v: str, threads: int,
          rotate: bool = True, keep=None) -> tuple[float, list[float]]:
    """llama.cpp's perplexity on the same windows; every logit of a window from one llm.eval;
    the log-probabilities (float16) appended to `keep` when it is a list."""
    if rotate:
        os.environ.pop("LLAMA_ATTN_ROT_DISABLE", None)
    else:
        os.environ["LLAMA_ATTN_ROT_DISABLE"] = "1"  # read when the context is created
    try:
        llm = llamacpp.load(path, n_ctx=len(wins[0]), n_batch=N_BATCH, logits_all=True, flash_attn=True,
                            type_k=GGML_TYPES[type_k], type_v=GGML_TYPES[type_v], n_threads=threads,
                            n_threads_batch=threads)
    finally:
        os.environ.pop("LLAMA_ATTN_ROT_DISABLE", None)
    nll = []
    for w in wins:
        llm.reset()
        llm.eval(w)
        logits = torch.tensor(llm.scores[:len(w)], dtype=torch.float64)
        logp = torch.log_softmax(logits[:-1], dim=-1)
        nll.append(-float(logp.gather(1, torch.tensor(w[1:])[:, None]).mean()))
        if keep is not None:
            keep.append(logp.to(torch.float16))
    del llm
    return math.exp(sum(nll) / len(nll)), nll


def ratio_stderr_pct(a: list[float], b: list[float]) -> float:
    """Standard error, in percent of perplexity, of exp(mean NLL a - mean NLL b) from per-window differences."""
    d = [x - y for x, y in zip(a, b)]
    if len(d) < 2:
        return float("nan")
    m = sum(d) / len(d)
    return 100.0 * math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d))


def pct(a, b):
    return None if a is None or b is None else 100.0 * (a / b - 1.0)


def fmt(x, spec, suffix=""):
    return "-" if x is None else format(x, spec) + suffix


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", default=None)
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--windows-512", type=int, default=16)
    p.add_argument("--windows-2048", type=int, default=2)
    p.add_argument("--windows-8192", type=int, default=0)
    p.add_argument("--no-llamacpp", action="store_true")
    p.add_argument("--only", default=None, help="comma-separated K types of the rows to run (f16 always runs: the reference)")
    p.add_argument("--settings", default=None,
                   help="K/V pairs to run, e.g. f16/f16,q8_0/q8_0 (default: all rows; f16/f16, the KLD reference, first)")
    p.add_argument("--json", default=os.path.join(HERE, "kv_quality.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model) if args.model else default_model_path()  # -m: a file or a demo name (gemma3)
    gguf = GGUFFile(path)
    tok = Tokenizer.from_gguf(gguf)
    model = Model(gguf, cache_bytes=1 << 30)
    cfg = model.config
    ids = tok.encode(texts.war_and_peace()[:200_000], add_special=False)
    bos = tok.bos_id if tok.add_bos else None

    rows, t_start = [], time.perf_counter()
    only = None if args.only is None else {"f16", *args.only.split(",")}
    for n_ctx, n_win in ((512, args.windows_512), (2048, args.windows_2048), (8192, args.windows_8192)):
        if n_win <= 0:
            continue
        wins = windows_of(ids, n_ctx, n_win, bos)
        settings = [(k, v, True) for k, v in SETTINGS] + [("q4_0", "q4_0", False)]
        if args.settings:
            chosen = [tuple(kv.split("/")) for kv in args.settings.split(",")]
            if chosen[0] != ("f16", "f16"):
                raise SystemExit("--settings: f16/f16 (the KL divergence reference) comes first")
            settings = [(k, v, True) for k, v in chosen]
        settings = [s for s in settings if only is None or s[0] in only]
        ref_ours, ref_llama = [], []  # each engine's f16-cache distributions: the KLD reference
        for k, v, rot in settings:
            t0 = time.perf_counter()
            base = (k, v) == ("f16", "f16")
            got_ours, got_llama = (ref_ours, ref_llama) if base else ([], [])
            ppl_ours, nll_ours = (ours(model, wins, k, v, got_ours) if rot and k in OUR_TYPES and v in OUR_TYPES
                                  else (None, None))
            t1 = time.perf_counter()
            ppl_llama, nll_llama = None, None
            if not args.no_llamacpp and k in GGML_TYPES and v in GGML_TYPES:
                ppl_llama, nll_llama = llama(path, wins, k, v, args.threads, rotate=rot, keep=got_llama)
            t2 = time.perf_counter()
            row = dict(n_ctx=n_ctx, n_windows=n_win, type_k=k, type_v=v, llamacpp_rotation=rot,
                       bits_per_value_qkvgguf=(kv_bits_per_value(cfg, n_ctx, k, v)
                                               if k in OUR_TYPES and v in OUR_TYPES else None),
                       bits_per_value_llamacpp=(LLAMA_BITS[k] + LLAMA_BITS[v]) / 2 if k in LLAMA_BITS and v in LLAMA_BITS else None,
                       ppl_qkvgguf=ppl_ours, ppl_llamacpp=ppl_llama,
                       window_nll_qkvgguf=nll_ours, window_nll_llamacpp=nll_llama,
                       seconds_qkvgguf=round(t1 - t0, 1), seconds_llamacpp=round(t2 - t1, 1))
            if not base:
                row["kld_qkvgguf"] = kld_stats(ref_ours, got_ours) if got_ours else None
                row["kld_llamacpp"] = kld_stats(ref_llama, got_llama) if got_llama else None
            del got_ours, got_llama
            rows.append(row)
            print(f"  -c {n_ctx} K {k:5s} V {v:5s}{'' if rot else ' (llama.cpp rotation off)'}: "
                  f"ours {fmt(ppl_ours, '.4f')} ({t1 - t0:.0f} s), llama.cpp {fmt(ppl_llama, '.4f')} "
                  f"({t2 - t1:.0f} s)", file=sys.stderr, flush=True)

    def find(n_ctx, k, v, rot=True):
        return next((r for r in rows if (r["n_ctx"], r["type_k"], r["type_v"], r["llamacpp_rotation"]) == (n_ctx, k, v, rot)), None)

    table = ["| -c | windows | K | V | bits/value ours (llama.cpp) | qkvgguf PPL | vs f16 | KLD vs f16 (± s.e.) | same top | "
             "llama.cpp PPL | vs f16 | KLD vs f16 (± s.e.) | ours / llama.cpp PPL (± s.e.) |",
             "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def kld_cell(x):
        return "-" if not x else f"{x['kld_mean']:.5f} (± {x['kld_stderr']:.5f})"
    checks = []
    for r in rows:
        base = find(r["n_ctx"], "f16", "f16")
        r["increase_pct_qkvgguf"] = pct(r["ppl_qkvgguf"], base["ppl_qkvgguf"])
        r["increase_pct_llamacpp"] = pct(r["ppl_llamacpp"], base["ppl_llamacpp"])
        r["ours_vs_llamacpp_pct"] = pct(r["ppl_qkvgguf"], r["ppl_llamacpp"])
        both = r["window_nll_qkvgguf"] is not None and r["window_nll_llamacpp"] is not None
        r["ours_vs_llamacpp_stderr_pct"] = (ratio_stderr_pct(r["window_nll_qkvgguf"], r["window_nll_llamacpp"])
                                            if both else None)
        label = "q4_0 (llama.cpp, rotation off)" if not r["llamacpp_rotation"] else r["type_k"]
        se = r["ours_vs_llamacpp_stderr_pct"]
        bits = f"{fmt(r['bits_per_value_qkvgguf'], '.2f')} ({fmt(r['bits_per_value_llamacpp'], '.2f')})"
        ko, kl = r.get("kld_qkvgguf"), r.get("kld_llamacpp")
        table.append(f"| {r['n_ctx']} | {r['n_windows']} | {label} | {r['type_v']} | {bits} | {fmt(r['ppl_qkvgguf'], '.4f')} | "
                     f"{fmt(r['increase_pct_qkvgguf'], '+.2f', '%')} | {kld_cell(ko)} | "
                     f"{fmt(ko['same_top_pct'] if ko else None, '.2f', '%')} | {fmt(r['ppl_llamacpp'], '.4f')} | "
                     f"{fmt(r['increase_pct_llamacpp'], '+.2f', '%')} | {kld_cell(kl)} | {fmt(r['ours_vs_llamacpp_pct'], '+.2f', '%')}"
                     f"{'' if se is None else f' (± {se:.2f})'} |")
    for n_ctx in sorted({r["n_ctx"] for r in rows}):
        q8, q4, qg = find(n_ctx, "q8_0", "q8_0"), find(n_ctx, "q4_0", "q4_0"), find(n_ctx, "q4g", "q4g")
        q3 = find(n_ctx, "q3g", "q3g")
        if qg is not None:
            checks.append((f"-c {n_ctx}: q4g costs <= 1.0% over f16", qg["increase_pct_qkvgguf"],
                           qg["increase_pct_qkvgguf"] <= 1.0))
        if q3 is not None:
            checks.append((f"-c {n_ctx}: q3g costs <= 3.0% over f16", q3["increase_pct_qkvgguf"],
                           q3["increase_pct_qkvgguf"] <= 3.0))
        if q8 is None or q4 is None or qg is None:  # --settings/--only without one of them: no bars
            continue
        checks.append((f"-c {n_ctx}: q8_0 costs <= 0.3% over f16", q8["increase_pct_qkvgguf"],
                       q8["increase_pct_qkvgguf"] <= 0.3))
        if q4["ppl_llamacpp"] is not None:
            checks.append((f"-c {n_ctx}: our q4_0 within 1% of llama.cpp's q4_0 "
                           f"(s.e. {q4['ours_vs_llamacpp_stderr_pct']:.2f}%)", q4["ours_vs_llamacpp_pct"],
                           abs(q4["ours_vs_llamacpp_pct"]) <= 1.0))
        cut = q4["increase_pct_qkvgguf"] / max(qg["increase_pct_qkvgguf"], 1e-9)
        checks.append((f"-c {n_ctx}: q4g cuts q4_0's increase over f16 >= 3x", cut, cut >= 3.0))
    result = dict(
        date=datetime.date.today().isoformat(), machine=f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        model=os.path.basename(path), text="War and Peace (tests/texts.py), first 200,000 characters",
        threads=args.threads, n_batch=N_BATCH, seconds=round(time.perf_counter() - t_start),
        rows=rows, checks=[dict(check=c, value=v, ok=ok) for c, v, ok in checks], table="\n".join(table))
    print("\n".join(table))
    print()
    for c, v, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {c}: {v:+.2f}{'x' if 'cuts' in c else '%'}")
    print(f"\n{result['seconds']} s, {result['machine']}")
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
