"""Peak memory of loading a GGUF file into transformers and generating: qkvgguf.hf.from_gguf (blocks
kept, GGUFLinear) against transformers' own `from_pretrained(..., gguf_file=...)` (dequantized to
float32), same file, same prompt, same greedy generate call.

    python benchmarks/hf_memory.py [--model PATH] [--new-tokens 32] [--repeats 3]
                                   [--out benchmarks/results/hf_memory.json]

Each repeat runs both loaders in fresh processes, one after the other (who goes first alternates).
A child imports torch, transformers and qkvgguf.hf and warms the code up on a tiny random llama
(1 layer, width 64: transformers' lazy imports of the llama and generation modules, torch's and
our kernels' library pages; about 150 MB of imports and code either loader would otherwise be
charged with on its first call), then measures its resident set (VmRSS) and resets the kernel's
peak counter (`echo 5 > /proc/self/clear_refs`), then loads the model, generates, and reads the
peak (VmHWM). The figure is that peak minus the resident set before loading: what loading and
generating this model added, including the file's mapped pages once touched. The absolute peak
(imports included) is in the JSON too. Threads: 1 (torch.set_num_threads(1); timings are side information on a
shared machine). Default model: the demo model (SmolLM2-135M-Instruct, Q4_1, Q8_0 embedding).
Writes --out (JSON) and prints a table; the check is ours <= 2x the file size.
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

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "hf_memory.json")
PROMPT = "The old prince said that"
LOADERS = ("qkvgguf", "transformers")


def _status() -> dict[str, int]:
    """VmRSS and VmHWM in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    return out


def warm_up() -> None:
    """Import and run, once, the code both loaders use, on a model of no size."""
    import gc

    import torch
    import transformers
    import transformers.integrations.ggml  # noqa: F401
    import transformers.modeling_gguf_pytorch_utils  # noqa: F401

    from qkvgguf.torch import GGUFLinear

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    with torch.no_grad():
        tiny = transformers.LlamaForCausalLM(cfg).eval()
        tiny.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False, pad_token_id=0)
        q = GGUFLinear.from_linear(torch.nn.Linear(64, 8), "Q4_1")
        q(torch.randn(1, 64)), q(torch.randn(16, 64))
    del tiny, q
    gc.collect()


def worker(loader: str, path: str, new_tokens: int) -> dict:
    import torch
    import transformers

    import qkvgguf.hf
    from qkvgguf import GGUFFile
    from qkvgguf.tokenizer import Tokenizer

    torch.set_num_threads(1)
    tok = Tokenizer.from_gguf(GGUFFile(path))
    ids = torch.tensor([tok.encode(PROMPT, add_special=True, parse_special=True)])
    warm_up()
    before = _status()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    t0 = time.perf_counter()
    if loader == "qkvgguf":
        model = qkvgguf.hf.from_gguf(path)
    else:
        folder, name = os.path.split(os.path.abspath(path))
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    t1 = time.perf_counter()
    after_load = _status()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    t2 = time.perf_counter()
    peak = _status()["VmHWM"]
    return {"loader": loader, "rss_before": before, "rss_after_load": after_load["VmRSS"],
            "peak_after_load": after_load["VmHWM"], "peak": peak, "added_peak": peak - before,
            "load_s": t1 - t0, "generate_s": t2 - t1, "new_tokens": int(out.shape[1] - ids.shape[1]),
            "tokens": out[0, ids.shape[1]:].tolist()}


def run_child(loader: str, path: str, new_tokens: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", loader, "--model", path,
                          "--new-tokens", str(new_tokens)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"{loader} worker failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the demo model)")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--worker", choices=LOADERS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.model is None:
        from qkvgguf.default_model import default_model_path

        args.model = default_model_path()
    if args.worker:
        print(json.dumps(worker(args.worker, args.model, args.new_tokens)))
        return 0

    file_size = os.path.getsize(args.model)
    runs: dict[str, list[dict]] = {name: [] for name in LOADERS}
    for r in range(args.repeats):
        order = LOADERS if r % 2 == 0 else LOADERS[::-1]
        for loader in order:
            res = run_child(loader, args.model, args.new_tokens)
            runs[loader].append(res)
            print(f"repeat {r + 1} {loader}: added peak {res['added_peak'] / 2**20:.1f} MiB, "
                  f"load {res['load_s']:.1f} s, generate {res['generate_s']:.1f} s", flush=True)
    summary = {}
    for loader, rs in runs.items():
        summary[loader] = {
            "added_peak_MiB": statistics.median(x["added_peak"] for x in rs) / 2**20,
            "added_peak_MiB_range": [min(x["added_peak"] for x in rs) / 2**20, max(x["added_peak"] for x in rs) / 2**20],
            "x_file_size": statistics.median(x["added_peak"] for x in rs) / file_size,
            "load_s": statistics.median(x["load_s"] for x in rs),
            "generate_s": statistics.median(x["generate_s"] for x in rs),
            "tokens_per_s": statistics.median(x["new_tokens"] / x["generate_s"] for x in rs),
        }
    same_tokens = runs["qkvgguf"][0]["tokens"] == runs["transformers"][0]["tokens"]
    check = summary["qkvgguf"]["x_file_size"] <= 2.0
    result = {
        "command": "python benchmarks/hf_memory.py " + " ".join(a for a in (argv or sys.argv[1:])),
        "model": os.path.basename(args.model), "file_bytes": file_size, "new_tokens": args.new_tokens,
        "prompt": PROMPT, "repeats": args.repeats, "threads": 1, "host": platform.node(),
        "python": platform.python_version(), "summary": summary, "same_greedy_tokens": same_tokens,
        "check_ours_le_2x_file": check, "runs": runs,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{os.path.basename(args.model)}: {file_size / 2**20:.1f} MiB file, {args.new_tokens} new tokens, "
          f"medians of {args.repeats}")
    print(f"| loader | added peak RSS MiB | x file size | load s | generate tok/s |")
    print(f"|---|---:|---:|---:|---:|")
    for loader, s in summary.items():
        print(f"| {loader} | {s['added_peak_MiB']:.1f} | {s['x_file_size']:.2f} | {s['load_s']:.1f} | "
              f"{s['tokens_per_s']:.1f} |")
    print(f"same greedy tokens: {same_tokens}; ours <= 2x file size: {'PASS' if check else 'FAIL'}")
    return 0 if check else 1


if __name__ == "__main__":
    sys.exit(main())
