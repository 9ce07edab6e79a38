"""CPU prompt and decode speed: qkvgguf (torch backend) vs llama.cpp (llama-cpp-python), same file, same threads.

    python benchmarks/cpu_decode.py [-m FILE] [-t 2] [--prompt-tokens 512] [--decode-tokens 64] [--repeats 3]

Ours is `qkvgguf bench` run as a user runs it (its JSON; random prompt ids from torch's generator
seeded 0), llama.cpp processes the same ids and then decodes greedily; speed does not depend on
which tokens they are. Each figure is the median over `--repeats` runs after one warm-up. Prints a
table and writes --out (default benchmarks/cpu_decode.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import llamacpp  # noqa: E402

from qkvgguf.config import ModelConfig  # noqa: E402
from qkvgguf.default_model import default_model_path  # noqa: E402
from qkvgguf.gguf_file import GGUFFile  # noqa: E402


def bench_qkvgguf(path, n_prompt, n_decode, repeats, threads, cpu_cache):
    """`qkvgguf bench --json` in its own process: the code path a user's CLI call takes (random token
    ids from torch's generator seeded 0; one warm-up, then the median of `repeats`)."""
    cmd = [sys.executable, "-m", "qkvgguf.cli", "bench", "-m", path, "-p", str(n_prompt), "-n", str(n_decode),
           "-r", str(repeats), "-t", str(threads), "--device", "cpu", "--cpu-cache", str(cpu_cache), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    res = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
    res["cmd"] = "qkvgguf " + " ".join(cmd[3:])
    return res


def bench_prompt_ids(vocab: int, n: int) -> list[int]:
    """The ids `qkvgguf bench` feeds (qkvgguf/cli.py cmd_bench), so llama.cpp processes the same prompt."""
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(0)).tolist()


def bench_llamacpp(path, prompt, n_decode, repeats, threads):
    llm = llamacpp.load(path, n_ctx=len(prompt) + n_decode + 1, n_batch=512, n_threads=threads,
                        n_threads_batch=threads)
    results = []
    for r in range(repeats + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        tok = int(llamacpp.last_logits(llm).argmax())
        for _ in range(n_decode):
            llm.eval([tok])
            tok = int(llamacpp.last_logits(llm).argmax())
        t2 = time.perf_counter()
        if r > 0:
            results.append((len(prompt) / (t1 - t0), n_decode / (t2 - t1)))
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=None)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpu-cache", type=int, default=1 << 30, help="qkvgguf dequant cache bytes")
    ap.add_argument("--out", default=os.path.join(HERE, "cpu_decode.json"))
    args = ap.parse_args()
    path = args.model or default_model_path()

    ours = bench_qkvgguf(path, args.prompt_tokens, args.decode_tokens, args.repeats, args.threads, args.cpu_cache)
    prompt = bench_prompt_ids(ModelConfig.from_gguf(GGUFFile(path)).vocab_size, args.prompt_tokens)
    theirs = bench_llamacpp(path, prompt, args.decode_tokens, args.repeats, args.threads)
    med = lambda rows, i: statistics.median(r[i] for r in rows)  # noqa: E731
    row = {
        "model": os.path.basename(path), "threads": args.threads, "prompt_tokens": len(prompt),
        "decode_tokens": args.decode_tokens, "repeats": args.repeats, "qkvgguf_cmd": ours["cmd"],
        "qkvgguf_prompt_tps": ours["prompt_tokens_per_s"], "qkvgguf_decode_tps": ours["decode_tokens_per_s"],
        "llamacpp_prompt_tps": med(theirs, 0), "llamacpp_decode_tps": med(theirs, 1),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    row["prompt_ratio"] = row["qkvgguf_prompt_tps"] / row["llamacpp_prompt_tps"]
    row["decode_ratio"] = row["qkvgguf_decode_tps"] / row["llamacpp_decode_tps"]
    print(f"{row['model']}, {args.threads} threads, prompt {len(prompt)} tokens, decode {args.decode_tokens} tokens, "
          f"median of {args.repeats}")
    print(f"{'':10} {'qkvgguf':>10} {'llama.cpp':>10} {'ratio':>7}")
    for k in ("prompt", "decode"):
        print(f"{k + ' tok/s':10} {row[f'qkvgguf_{k}_tps']:>10.1f} {row[f'llamacpp_{k}_tps']:>10.1f} "
              f"{row[f'{k}_ratio']:>7.2f}")
    with open(args.out, "w") as f:
        json.dump(row, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
