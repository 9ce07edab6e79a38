"""End-to-end GPU speed: prompt and decode tokens/s, qkvgguf (Triton) vs llama.cpp (CUDA build).

    python benchmarks/gpu_decode.py                        # SmolLM2 + synthetic 7B Q4_0 and Q4_K
    python benchmarks/gpu_decode.py --synthetic tiny-q4_k_m --device cpu --backend torch   # smoke test, no GPU

Models: the default SmolLM2-135M file, and synthetic Llama-2-7B-shaped GGUFs (benchmarks/synthetic.py:
random blocks with realistic f16 scales, written on the machine that runs the benchmark, since they
are too big to carry). Speed does not depend on the values, only on the formats and shapes.

Per model: prompt tokens/s (one pass of --prompt-tokens), decode tokens/s (median per-token time
over --decode-tokens; eager `Model.forward` and, where supported, replaying a captured CUDA graph
(runtime/cuda_graph.py) — decode tokens/s is the faster), and one decode step split into GPU
kernel time and overhead (step wall time - kernel time from torch.profiler). KV cache:
--cache-type (f16 by default, as llama.cpp). llama.cpp runs when llama_cpp imports (build it with CUDA: see shared/GPU.md),
with every layer offloaded. Writes benchmarks/gpu_decode.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import synthetic  # noqa: E402
from qkvgguf.default_model import default_model_path  # noqa: E402
from qkvgguf.gguf_file import GGUFFile  # noqa: E402
from qkvgguf.runtime import Model  # noqa: E402
from qkvgguf.runtime.cuda_graph import GraphDecoder, graph_supported  # noqa: E402

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _decode(step, tok, n):
    """Median seconds per token of n greedy steps; the last token."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        tok = int(step(tok).argmax())  # .argmax() -> int syncs: the step is complete
        times.append(time.perf_counter() - t0)
    return statistics.median(times), tok


def bench_ours(path, device, backend, n_prompt, n_decode, cache_type="f16"):
    model = Model(GGUFFile(path), device=device, backend=backend)
    dev = model.device
    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab, (n_prompt,), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(n_prompt + 2 * n_decode + 8, cache_type, cache_type)
    model.forward(prompt[:16], cache)  # warm-up: compiles the kernels
    cache.reset()
    _sync(dev)
    t0 = time.perf_counter()
    logits = model.forward(prompt, cache)
    _sync(dev)
    prompt_tps = n_prompt / (time.perf_counter() - t0)
    tok = int(logits.argmax())
    eager, tok = _decode(lambda t: model.forward(torch.tensor([t]), cache), tok, n_decode)
    graph = None
    if graph_supported(model, cache) is None:
        g = GraphDecoder(model, cache)
        graph, tok = _decode(g.step, tok, n_decode)
    step = graph if graph is not None else eager
    kernel_s = None
    if dev.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            model.forward(torch.tensor([tok]), cache)
            _sync(dev)
        kernel_s = sum(e.device_time_total for e in prof.key_averages()) / 1e6
    return {"prompt_tps": prompt_tps, "decode_tps": 1.0 / step, "decode_step_ms": 1e3 * step,
            "eager_step_ms": 1e3 * eager, "graph_step_ms": None if graph is None else 1e3 * graph,
            "kernel_ms": None if kernel_s is None else 1e3 * kernel_s,
            "overhead_ms": None if kernel_s is None else 1e3 * (step - kernel_s),
            "cache_type": cache_type,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(dev) / 2**30 if dev.type == "cuda" else None}


def bench_llamacpp(path, n_prompt, n_decode):
    try:
        import llamacpp
        llm = llamacpp.load(path, n_ctx=n_prompt + n_decode + 8, n_batch=512, n_gpu_layers=-1)
    except Exception as e:  # not installed or not loadable: report, don't fail the run
        return {"error": f"{type(e).__name__}: {e}"}
    vocab = llm.n_vocab()
    prompt = torch.randint(3, vocab, (n_prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    llm.eval(prompt[:16])
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    prompt_tps = n_prompt / (time.perf_counter() - t0)
    tok = int(llamacpp.last_logits(llm).argmax())
    times = []
    for _ in range(n_decode):
        t0 = time.perf_counter()
        llm.eval([tok])
        tok = int(llamacpp.last_logits(llm).argmax())
        times.append(time.perf_counter() - t0)
    return {"prompt_tps": prompt_tps, "decode_tps": 1.0 / statistics.median(times)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--synthetic", default="7b-q4_0,7b-q4_k_m",
                    help="comma list of benchmarks/synthetic.py recipes; empty for none")
    ap.add_argument("--workdir", default="/tmp/qkvgguf-bench")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--cache-type", default="f16", help="KV cache type for K and V (default f16, as llama.cpp)")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "gpu_decode.json"))
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_decode: no CUDA GPU here; run on a GPU machine (or --device cpu --backend torch --shape tiny)")
        return
    os.makedirs(args.workdir, exist_ok=True)
    models = [("SmolLM2-135M Q4_1", default_model_path())]
    for recipe in filter(None, args.synthetic.split(",")):
        models.append((f"synthetic {recipe}", synthetic.ensure(recipe, args.workdir)))
    rows = []
    for name, path in models:
        row = {"model": name, "file": path, "ours": bench_ours(path, device, args.backend, args.prompt_tokens,
                                                                args.decode_tokens, args.cache_type)}
        if not args.no_llamacpp:
            row["llamacpp"] = bench_llamacpp(path, args.prompt_tokens, args.decode_tokens)
        rows.append(row)
        print(json.dumps(row))
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n{dev_name}, {time.strftime('%Y-%m-%d')}, prompt {args.prompt_tokens}, decode {args.decode_tokens}")
    print(f"{'model':28} {'prompt t/s':>11} {'decode t/s':>11} {'eager ms':>9} {'graph ms':>9} {'kernel ms':>10} "
          f"{'overhead ms':>12} {'llama.cpp p/d':>16} {'decode ratio':>13}")
    for r in rows:
        o, lc = r["ours"], r.get("llamacpp", {})
        lcs = f"{lc['prompt_tps']:.0f}/{lc['decode_tps']:.1f}" if "decode_tps" in lc else "-"
        ratio = f"{o['decode_tps'] / lc['decode_tps']:.2f}" if "decode_tps" in lc else "-"
        km = f"{o['kernel_ms']:.2f}" if o["kernel_ms"] is not None else "-"
        om = f"{o['overhead_ms']:.2f}" if o["overhead_ms"] is not None else "-"
        gm = f"{o['graph_step_ms']:.2f}" if o["graph_step_ms"] is not None else "-"
        print(f"{r['model']:28} {o['prompt_tps']:>11.1f} {o['decode_tps']:>11.1f} {o['eager_step_ms']:>9.2f} {gm:>9} "
              f"{km:>10} {om:>12} {lcs:>16} {ratio:>13}")
    with open(args.out, "w") as f:
        json.dump({"device": dev_name, "date": time.strftime("%Y-%m-%d"), "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
