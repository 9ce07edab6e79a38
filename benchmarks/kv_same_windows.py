"""Our low-bit KV caches next to llama.cpp's, on the windows both runs scored (no model is run).

    python benchmarks/kv_same_windows.py [--ours benchmarks/results/kv_lowbit_2048.json]
                                         [--llamacpp benchmarks/results/kv_quality.json]
                                         [--json benchmarks/results/kv_same_windows_2048.json]

kv_lowbit.py (ours, through the CLI) and kv_quality.py (llama.cpp through llama-cpp-python, and
ours in-process) cut the same text into windows of -c tokens from its start. This reads both
results, checks that the windows are the same (our f16 window NLLs of both runs agree to 1e-4,
which different windows would not), and over the windows both scored gives each row's perplexity
change over its own engine's f16 cache, with the standard error from the per-window differences.
Bits per value: everything stored counted (ours: as allocated; ggml's types have no fixed rows).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def change(nll: list[float], base: list[float]) -> tuple[float, float]:
    """Perplexity change in percent over the base and its standard error from per-window differences."""
    d = [a - b for a, b in zip(nll, base)]
    m = sum(d) / len(d)
    se = math.sqrt(sum((x - m) ** 2 for x in d) / (len(d) - 1) / len(d)) if len(d) > 1 else float("nan")
    return 100.0 * (math.exp(m) - 1.0), 100.0 * se


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ours", default=os.path.join(HERE, "results", "kv_lowbit_2048.json"))
    p.add_argument("--llamacpp", default=os.path.join(HERE, "results", "kv_quality.json"))
    p.add_argument("--json", default=os.path.join(HERE, "results", "kv_same_windows_2048.json"))
    args = p.parse_args(argv)
    ours, ref = json.load(open(args.ours)), json.load(open(args.llamacpp))
    n_ctx = ours["n_ctx"]
    lrows = [r for r in ref["rows"] if r["n_ctx"] == n_ctx]
    if not lrows:
        raise SystemExit(f"{args.llamacpp} has no rows at -c {n_ctx}")
    n = min(len(ours["rows"][0]["window_nll"]), lrows[0]["n_windows"])
    our_f16 = ours["rows"][0]["window_nll"][:n]
    ref_f16 = next(r for r in lrows if r["type_k"] == r["type_v"] == "f16")
    if any(abs(a - b) > 1e-4 for a, b in zip(our_f16, ref_f16["window_nll_qkvgguf"][:n])):
        raise SystemExit("the two runs did not score the same windows (their f16 window NLLs differ)")
    llama_f16 = ref_f16["window_nll_llamacpp"][:n]
    rows = []
    for r in ours["rows"][1:]:
        pct, se = change(r["window_nll"][:n], our_f16)
        rows.append(dict(engine="qkvgguf", cache=r["label"], bits_per_value=r["bits_per_value"], change_pct=pct,
                         stderr_pct=se))
    for r in lrows:
        if r["window_nll_llamacpp"] is None or (r["type_k"], r["type_v"]) == ("f16", "f16"):
            continue
        pct, se = change(r["window_nll_llamacpp"][:n], llama_f16)
        label = r["type_k"] if r["type_k"] == r["type_v"] else f"K {r['type_k']} V {r['type_v']}"
        if not r["llamacpp_rotation"]:
            label += " (rotation off)"
        rows.append(dict(engine="llama.cpp", cache=label, bits_per_value=r["bits_per_value_llamacpp"], change_pct=pct,
                         stderr_pct=se))
    rows.sort(key=lambda r: r["bits_per_value"])
    table = [f"| engine | cache | bits/value at -c {n_ctx} | PPL vs own f16 (± s.e., {n} windows) |",
             "|---|---|---:|---:|"]
    table += [f"| {r['engine']} | {r['cache']} | {r['bits_per_value']:.2f} | {r['change_pct']:+.2f}% (± {r['stderr_pct']:.2f}) |"
              for r in rows]
    print("\n".join(table))
    with open(args.json, "w") as f:
        json.dump(dict(ours=os.path.relpath(args.ours, os.path.join(HERE, "..")),
                       llamacpp=os.path.relpath(args.llamacpp, os.path.join(HERE, "..")),
                       n_ctx=n_ctx, windows=n, rows=rows, table="\n".join(table)), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
