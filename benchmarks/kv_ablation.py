"""Which part of q4g earns its quality: per-channel keys, the f16 sinks, the newest group kept apart.

    python benchmarks/kv_ablation.py -t 2 --json benchmarks/results/kv_ablation.json

q4g (qkvgguf/kv_types.py, runtime/kv_lowbit.py) differs from a plain q4_0 cache in four ways: keys
are quantized per channel over groups of 64 positions, values are Hadamard-rotated rows of 64 with
16 levels, the first 4 positions stay in f16 ("sinks"), and the newest partial group of keys (64)
and values (16) stays in q8_0 until it is complete ("tail"). This benchmark registers cache types
that switch parts off one at a time (`qkvgguf.kv_types.register`, the same records `-ctk/-ctv`
read; they exist only in this process) and scores each through `runtime.perplexity`, the function
`qkvgguf perplexity` runs:

    q4g                  per-channel K, sinks, tail        (the shipped type)
    q4g, no sinks        per-channel K, tail
    q4g, per-token K     q4_0 K rows, sinks, tail
    tail only            q4_0 K rows, tail
    q4_0, no rotation    q4_0 K and V rows and nothing else (no Hadamard rotation)
    q4_0                 our q4_0 with llama.cpp's maths (Hadamard rotation), the shipped type

(benchmarks/results/kv_ablation.json and its RESULTS.md table predate the q4g rework: they ablate
the earlier q4g, whose sinks and tail were f16 and whose values were q4_0 rows.)

Same model, text and windows as benchmarks/kv_quality.py (SmolLM2 Q4_1, War and Peace, windows
scored from an empty cache); KLD from our f16 cache's distributions; bits per value are measured
from the bytes the cache actually allocates at that context (every f16 row counted).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import texts  # noqa: E402
from kv_quality import fmt, kld_stats, ours, pct, ratio_stderr_pct, windows_of  # noqa: E402

from qkvgguf import kv_types  # noqa: E402
from qkvgguf.default_model import default_model_path  # noqa: E402
from qkvgguf.gguf_file import GGUFFile  # noqa: E402
from qkvgguf.runtime import Model  # noqa: E402
from qkvgguf.tokenizer import Tokenizer  # noqa: E402

Q4G = kv_types.KV_TYPES["q4g"]
Q4_0 = kv_types.KV_TYPES["q4_0"]
VARIANTS = [  # (cache type name, label, record registered for this run or None for a shipped type)
    ("q4g", "q4g (per-channel K, sinks, tail)", None),
    ("abl-nosink", "q4g, no sinks", dataclasses.replace(Q4G, name="abl-nosink", n_sink=0)),
    ("abl-tokk", "q4g, per-token K (q4_0 rows)", dataclasses.replace(
        Q4G, name="abl-tokk", formats=("q4_0", Q4G.formats[1]), row_bytes=Q4_0.row_bytes)),
    ("abl-tail", "tail only (q4_0 K rows, no sinks)", dataclasses.replace(
        Q4G, name="abl-tail", formats=("q4_0", Q4G.formats[1]), row_bytes=Q4_0.row_bytes, n_sink=0)),
    ("abl-q4_0", "q4_0 rows, no rotation", dataclasses.replace(Q4_0, name="abl-q4_0", llama_maths=False)),
    ("q4_0", "q4_0 (llama.cpp's maths: rotation)", None),
]


def measured_bits(model: Model, n_ctx: int, name: str) -> float:
    """Bits per cached value from the bytes the K and V stores allocate (meta device: nothing real)."""
    cfg = model.config
    t = kv_types.cache_type(name)
    from qkvgguf.runtime.kv_quant import make_store

    shape = (cfg.n_layer, cfg.n_head_kv, n_ctx, cfg.head_dim)
    n = sum(make_store(t, shape, kind, torch.device("meta")).n_bytes for kind in ("k", "v"))
    return n * 8 / (2 * cfg.n_layer * cfg.n_head_kv * n_ctx * cfg.head_dim)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-m", "--model", default=None)
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--windows-512", type=int, default=16)
    p.add_argument("--windows-2048", type=int, default=2)
    p.add_argument("--json", default=os.path.join(HERE, "kv_ablation.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for _, _, record in VARIANTS:
        if record is not None:
            kv_types.register(record)
    path = args.model or default_model_path()
    gguf = GGUFFile(path)
    tok = Tokenizer.from_gguf(gguf)
    model = Model(gguf)
    ids = tok.encode(texts.war_and_peace()[:200_000], add_special=False)
    bos = tok.bos_id if tok.add_bos else None
    rows, t_start = [], time.perf_counter()
    for n_ctx, n_win in ((512, args.windows_512), (2048, args.windows_2048)):
        if n_win <= 0:
            continue
        wins = windows_of(ids, n_ctx, n_win, bos)
        ref = []
        ppl_f16, nll_f16 = ours(model, wins, "f16", "f16", ref)
        rows.append(dict(n_ctx=n_ctx, n_windows=n_win, type="f16", label="f16", bits_per_value=16.0,
                         ppl=ppl_f16, window_nll=nll_f16))
        for name, label, _ in VARIANTS:
            t0 = time.perf_counter()
            got = []
            ppl, nll = ours(model, wins, name, name, got)
            rows.append(dict(n_ctx=n_ctx, n_windows=n_win, type=name, label=label,
                             bits_per_value=measured_bits(model, n_ctx, name), ppl=ppl, window_nll=nll,
                             vs_f16_pct=pct(ppl, ppl_f16), vs_f16_stderr_pct=ratio_stderr_pct(nll, nll_f16),
                             kld=kld_stats(ref, got), seconds=round(time.perf_counter() - t0, 1)))
            del got
            print(f"  -c {n_ctx} {label:42s} PPL {ppl:.4f} ({rows[-1]['seconds']:.0f} s)", file=sys.stderr, flush=True)
    table = ["| -c | cache (K and V) | bits/value | PPL | vs f16 (± s.e.) | KLD vs f16 (± s.e.) | same top |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        k = r.get("kld") or {}
        table.append(f"| {r['n_ctx']} | {r['label']} | {r['bits_per_value']:.2f} | {r['ppl']:.4f} | "
                     + (f"{r['vs_f16_pct']:+.2f}% (± {r['vs_f16_stderr_pct']:.2f})" if "vs_f16_pct" in r else "-") + " | "
                     + (f"{k['kld_mean']:.5f} (± {k['kld_stderr']:.5f})" if k else "-") + " | "
                     + (fmt(k.get("same_top_pct"), ".2f", "%") if k else "-") + " |")
    out = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), machine=platform.machine(),
               threads=args.threads, model=os.path.basename(path), seconds=round(time.perf_counter() - t_start),
               rows=rows, table=table)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
