"""Serving throughput: `qkvgguf serve --parallel P` under K concurrent streaming clients, for each P.

    python benchmarks/serve_load.py [--parallel 1,4] [--clients 8] [--tokens 32] [--threads 1]
                                    [--repeats 2] [-m FILE] [--out benchmarks/results/serve_load.json]

For each repeat and each P (the order of the P values alternates between repeats, so a shared
machine's load falls on all alike), the script starts the real CLI, `qkvgguf serve -m FILE -c 512
-np P -t T --port (free)`, in a fresh process, sends one warm-up request, then K clients at once, each
a streamed /v1/completions request for exactly N greedy tokens (`max_tokens` N, `temperature` 0,
`ignore_eos`: llama.cpp's request flag, so every reply is exactly N tokens; checked)
over K different prompts. Measured per run:

    wall_s             first request sent -> last stream closed
    tokens_per_s       K * N / wall_s (aggregate decode throughput, prompts included in the time)
    ttft_s             each client's time to its first text chunk (median, max)
    latency_s          each client's whole request (median, max)

Figures are medians over the repeats. The texts are compared across P too: greedy replies must not
depend on how many sequences share a step. Writes --out (JSON) and prints a table. The 2-core
development machine is shared and loaded: the load average at the start of each run is recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import httpx

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "serve_load.json")
PROMPTS = ["The capital of France is", "Once upon a time, a small dog", "The best way to learn to code is",
           "Water boils at", "My favourite book is", "In the year 1900, the city of", "The recipe starts with",
           "A good night's sleep", "The history of the bicycle", "To fix a flat tyre, first",
           "The ocean is home to", "Mathematics is the study of", "The old lighthouse keeper",
           "Photosynthesis is the process", "On Monday morning, the office", "The rules of chess say"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(model: str | None, parallel: int, threads: int, ctx: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "qkvgguf", "serve", "-c", str(ctx), "-np", str(parallel), "-t", str(threads),
           "--port", str(port), "--device", "cpu"] + (["-m", model] if model else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("the server did not come up in 300 s")


async def client(h: httpx.AsyncClient, base: str, prompt: str, n: int) -> dict:
    t0 = time.perf_counter()
    first, text, usage = None, [], None
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    async with h.stream("POST", base + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk["choices"]:
                if c["text"] and first is None:
                    first = time.perf_counter() - t0
                text.append(c["text"])
    return {"ttft_s": first, "latency_s": time.perf_counter() - t0, "text": "".join(text),
            "completion_tokens": usage["completion_tokens"]}


async def load(base: str, prompts: list[str], n: int) -> tuple[float, list[dict]]:
    async with httpx.AsyncClient(timeout=3600) as h:
        await client(h, base, "Hello", 4)  # warm-up: first-call costs (kernel build, allocations)
        t0 = time.perf_counter()
        res = await asyncio.gather(*(client(h, base, p, n) for p in prompts))
        return time.perf_counter() - t0, res


def one_run(args, parallel: int) -> dict:
    load_avg = os.getloadavg()[0]
    proc, base = start(args.model, parallel, args.threads, args.ctx)
    try:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.clients)]
        wall, res = asyncio.run(load(base, prompts, args.tokens))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    short = [r["completion_tokens"] for r in res if r["completion_tokens"] != args.tokens]
    if short:
        raise SystemExit(f"replies ended before {args.tokens} tokens ({short}) despite ignore_eos")
    return {"parallel": parallel, "wall_s": wall, "tokens_per_s": args.clients * args.tokens / wall,
            "ttft_s_median": statistics.median(r["ttft_s"] for r in res), "ttft_s_max": max(r["ttft_s"] for r in res),
            "latency_s_median": statistics.median(r["latency_s"] for r in res),
            "latency_s_max": max(r["latency_s"] for r in res), "load_average_1min": load_avg,
            "texts": [r["text"] for r in res]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=None, help="GGUF file (default: the demo model)")
    ap.add_argument("--parallel", default="1,4", help="comma-separated -np values (default 1,4)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent streaming clients (default 8)")
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens per request (default 32)")
    ap.add_argument("--threads", type=int, default=1, help="server threads, -t (default 1: steadier on a shared machine)")
    ap.add_argument("--ctx", type=int, default=512, help="-c per sequence (default 512)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args()
    ps = [int(x) for x in args.parallel.split(",")]
    runs = []
    for rep in range(args.repeats):
        for p in (ps if rep % 2 == 0 else ps[::-1]):
            r = one_run(args, p)
            r["repeat"] = rep
            runs.append(r)
            print(f"repeat {rep} -np {p}: {r['tokens_per_s']:.1f} tok/s, wall {r['wall_s']:.1f} s, "
                  f"load {r['load_average_1min']:.1f}", flush=True)
    summary = {}
    for p in ps:
        mine = [r for r in runs if r["parallel"] == p]
        summary[str(p)] = {k: statistics.median(r[k] for r in mine) for k in
                           ("tokens_per_s", "wall_s", "ttft_s_median", "latency_s_median", "latency_s_max")}
        summary[str(p)]["tokens_per_s_range"] = [min(r["tokens_per_s"] for r in mine),
                                                 max(r["tokens_per_s"] for r in mine)]
    texts = {tuple(r["texts"]) for r in runs}
    result = {"command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
              "model": args.model or "default (SmolLM2-135M-Instruct Q4_1)", "clients": args.clients,
              "tokens_per_request": args.tokens, "threads": args.threads, "ctx": args.ctx, "repeats": args.repeats,
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "same_texts_across_runs": len(texts) == 1,
              "summary": summary, "runs": runs}
    if len(ps) > 1:
        result["speedup"] = summary[str(ps[-1])]["tokens_per_s"] / summary[str(ps[0])]["tokens_per_s"]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{'-np':>4} {'tok/s':>8} {'wall s':>8} {'TTFT med':>9} {'latency med':>12}")
    for p in ps:
        s = summary[str(p)]
        print(f"{p:>4} {s['tokens_per_s']:>8.1f} {s['wall_s']:>8.1f} {s['ttft_s_median']:>9.2f} {s['latency_s_median']:>12.2f}")
    print(f"same greedy texts in every run: {result['same_texts_across_runs']}; wrote {args.out}")
    return 0 if result["same_texts_across_runs"] else 1


if __name__ == "__main__":
    sys.exit(main())
