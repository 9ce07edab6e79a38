"""`qkvgguf bench`: prompt and decode speed on random tokens, printed as llama-bench prints it.

    qkvgguf bench -m M.gguf -p 512 -n 128 -r 5                    # a markdown table: pp512, tg128 @ d512
    qkvgguf bench -p 128,512 -n 32,128 -ctk f16,q8_0 --csv        # a sweep, one row per test

For every combination of the comma-separated -p, -n, -ctk and -ctv values (K and V types pair up
position by position when both list several, as llama-bench's do not; one list applies to both),
after one warm-up (kernel compilation, autotuning, CUDA graph capture) the prompt of P random tokens
runs from an empty cache, then N tokens are decoded greedily after it. That is -r times; the table
shows the mean tokens/s ± the standard deviation over the repetitions, the test named as llama-bench
names it: `pp512` (prompt), `tg128 @ d512` (decode after 512 tokens of context).

Output: `-o md` (default), `-o csv` / `--csv` (one row per test), `-o json` / `--json` (JSON Lines:
one object per combination, with both rates' samples; a single combination is a single object).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import statistics
import sys
import time

from .errors import QkvggufError
from .units import format_bytes

FORMATS = ("md", "csv", "json")


def int_list(text: str) -> list[int]:
    """'128,512' -> [128, 512] (argparse type for -p and -n)."""
    import argparse

    try:
        return [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def _type_pairs(type_k: str, type_v: str) -> list[tuple[str, str]]:
    ks, vs = type_k.split(","), type_v.split(",")
    if len(ks) > 1 and len(vs) > 1 and len(ks) != len(vs):
        raise QkvggufError(f"bench: -ctk lists {len(ks)} types and -ctv {len(vs)}; give one, or the same number")
    n = max(len(ks), len(vs))
    return [(ks[i] if len(ks) > 1 else ks[0], vs[i] if len(vs) > 1 else vs[0]) for i in range(n)]


def _mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def measure(model, session, ids: list[int], n_gen: int, repetitions: int) -> dict:
    """One combination: warm-up, then `repetitions` of (prompt from an empty cache, n_gen decodes)."""
    import torch

    def sync():
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)

    n_ctx = session.n_ctx
    t0 = time.perf_counter()  # warm-up: compiles and autotunes the kernels, captures the decode graph
    session.cache.reset()
    session.tokens = []
    logits = session.feed(ids[:min(session.n_batch, len(ids))])
    for _ in range(min(2, n_gen, n_ctx - session.cache.pos)):
        logits = session.decode(int(logits.argmax()))
    sync()
    warmup_s = time.perf_counter() - t0
    prompt_s, decode_s = [], []
    for _ in range(repetitions):
        session.cache.reset()
        session.tokens = []
        sync()
        t0 = time.perf_counter()
        logits = session.feed(ids)
        sync()
        prompt_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(n_gen):
            logits = session.decode(int(logits.argmax()))
        sync()
        decode_s.append(time.perf_counter() - t0)
    pp = [len(ids) / s for s in prompt_s]
    tg = [n_gen / s for s in decode_s] if n_gen else []
    p_mean, p_std = _mean_std(pp)
    d_mean, d_std = _mean_std(tg) if tg else (None, None)
    return {"prompt_tokens_per_s": p_mean, "prompt_tokens_per_s_std": p_std,
            "prompt_tokens_per_s_median": statistics.median(pp), "prompt_samples_tokens_per_s": pp,
            "decode_tokens_per_s": d_mean, "decode_tokens_per_s_std": d_std,
            "decode_tokens_per_s_median": statistics.median(tg) if tg else None, "decode_samples_tokens_per_s": tg,
            "warmup_s": warmup_s}


def cmd_bench(args, run_config, load, memory_report) -> int:
    import torch

    fmt = "json" if args.json else "csv" if args.csv else args.output
    if not args.n_prompt or not args.repetitions or min(args.n_prompt) < 1 or \
            min(args.n_gen or [0]) < 0 or args.repetitions < 1:
        raise QkvggufError("bench: -p must be at least 1, -n at least 0, -r at least 1")
    n_gens = args.n_gen or [0]
    pairs = _type_pairs(args.cache_type_k, args.cache_type_v)
    longest = max(args.n_prompt) + max(n_gens)
    records = []
    base = run_config(args, n_ctx=longest)
    for type_k, type_v in pairs:
        cfg = dataclasses.replace(base, type_k=type_k, type_v=type_v)
        model, _, n_ctx = load(cfg)
        if longest > n_ctx:
            raise QkvggufError(f"bench: -p {max(args.n_prompt)} + -n {max(n_gens)} exceed the {n_ctx}-token context (-c)")
        session = cfg.new_session(model, n_ctx)
        g = torch.Generator().manual_seed(0)
        all_ids = torch.randint(3, model.config.vocab_size, (max(args.n_prompt),), generator=g).tolist()
        for n_prompt in args.n_prompt:
            for n_gen in n_gens:
                res = {"model": model.gguf.path, "model_size": model.gguf.tensor_data_bytes,
                       "n_params": sum(t.n_elements for t in model.gguf.tensors.values()),
                       "device": str(model.device), "backend": model.backend, "numerics": model.numerics,
                       "n_prompt": n_prompt, "n_gen": n_gen, "repetitions": args.repetitions,
                       "n_ctx": n_ctx, "n_batch": session.n_batch, "threads": torch.get_num_threads(),
                       "type_k": session.cache.type_k, "type_v": session.cache.type_v,  # from the cache itself
                       "kv_bytes": session.cache.n_bytes}
                res.update(measure(model, session, all_ids[:n_prompt], n_gen, args.repetitions))
                res.update({"cuda_graph": session._graph is not None,
                            "load_s": getattr(model, "load_seconds", None),
                            "plan": model.plan.summary() if model.plan is not None else None})
                if model.device.type == "cuda":
                    res["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(model.device)
                    res["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(model.device)
                records.append(res)
                if fmt == "json":  # one line as each combination finishes
                    print(json.dumps(res), flush=True)
        streaming = model.plan is not None and not model.plan.all_resident
        note = memory_report(model)
        del session, model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if fmt == "csv":
        sys.stdout.write(to_csv(records))
    elif fmt == "md":
        print(to_markdown(records))
        if note:
            print("\n" + note)
        if streaming:
            print("(weights streamed from host memory: see -v for the plan)")
    return 0


def tests(records: list[dict]) -> list[dict]:
    """llama-bench's rows: pp{P} once per (types, P), tg{N} @ d{P} per combination."""
    rows, seen = [], set()
    for r in records:
        key = (r["type_k"], r["type_v"], r["n_prompt"])
        if key not in seen:
            seen.add(key)
            rows.append({**r, "test": f"pp{r['n_prompt']}", "n_tokens": r["n_prompt"],
                         "avg_ts": r["prompt_tokens_per_s"], "stddev_ts": r["prompt_tokens_per_s_std"],
                         "samples_ts": r["prompt_samples_tokens_per_s"]})
    for r in records:
        if r["n_gen"]:
            rows.append({**r, "test": f"tg{r['n_gen']} @ d{r['n_prompt']}", "n_tokens": r["n_gen"],
                         "avg_ts": r["decode_tokens_per_s"], "stddev_ts": r["decode_tokens_per_s_std"],
                         "samples_ts": r["decode_samples_tokens_per_s"]})
    return rows


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


COLUMNS = ("model", "size", "params", "backend", "threads", "n_batch", "type_k", "type_v", "test", "t/s")


def _cells(r: dict) -> list[str]:
    return [os.path.basename(r["model"]), format_bytes(r["model_size"]), _params(r["n_params"]),
            f"{r['backend']} ({r['device']})", str(r["threads"]), str(r["n_batch"]), r["type_k"], r["type_v"],
            r["test"], f"{r['avg_ts']:.2f} ± {r['stddev_ts']:.2f}"]


def to_markdown(records: list[dict]) -> str:
    rows = [_cells(r) for r in tests(records)]
    right = {"size", "params", "threads", "n_batch", "t/s"}
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(COLUMNS)]

    def line(cells):
        return "| " + " | ".join(f"{c:>{w}}" if COLUMNS[i] in right else f"{c:<{w}}"
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "| " + " | ".join(("-" * (w - 1) + ":") if c in right else "-" * w
                             for c, w in zip(COLUMNS, widths)) + " |"
    return "\n".join([line(COLUMNS), rule, *(line(r) for r in rows)])


CSV_FIELDS = ("model", "model_size", "n_params", "backend", "device", "threads", "n_batch", "n_ctx", "type_k",
              "type_v", "n_prompt", "n_gen", "test", "n_tokens", "repetitions", "avg_ts", "stddev_ts", "samples_ts",
              "cuda_graph")


def to_csv(records: list[dict]) -> str:
    out = io.StringIO()
    w = csv.DictWriter(out, CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in tests(records):
        w.writerow({**r, "samples_ts": ";".join(f"{x:.3f}" for x in r["samples_ts"])})
    return out.getvalue()
