"""Weight paging under a VRAM budget: a synthetic Llama-2-7B at 4 GiB, 6 GiB and unlimited.

    python benchmarks/paging.py                      # needs a CUDA GPU; writes benchmarks/paging.json

Models: synthetic Llama-2-7B-shaped GGUFs, Q4_0 and Q4_K (random blocks with sane scales, written on
the GPU machine by benchmarks/synthetic.py; speed does not depend on values).
Per (model, budget): the planner's plan at 4096 context with a q4_0 K/V cache (runtime/planner.py),
the allocator capped at the budget (minus the CUDA context allowance), then a 512-token prompt and
--decode-tokens greedy steps. Reported: resident/streamed layers, prompt and decode tokens/s, peak
allocated/reserved memory (must stay under the budget), the measured pinned host-to-device copy
bandwidth, the decode tokens/s the planner predicts from it (PCIe bound: streamed bytes per token
/ bandwidth) and the achieved fraction of that prediction.
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

from qkvgguf.config import ModelConfig  # noqa: E402
from qkvgguf.gguf_file import GGUFFile  # noqa: E402
from qkvgguf.runtime import Model  # noqa: E402
from qkvgguf.runtime.planner import plan, specs_of  # noqa: E402
from qkvgguf.units import format_bytes, parse_size  # noqa: E402


def h2d_bandwidth(device, n_bytes=512 * 2**20, reps=5) -> float:
    """Pinned host -> device copy bandwidth, bytes/s (median of reps)."""
    src = torch.empty(n_bytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    del src, dst
    return n_bytes / statistics.median(times)


def run_one(path, device, budget, n_ctx, n_prompt, n_decode, h2d):
    gguf = GGUFFile(path)
    cfg = ModelConfig.from_gguf(gguf)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    p = plan(specs_of(gguf), cfg, budget, n_ctx, "q4_0", "q4_0", n_batch=n_prompt)
    total = torch.cuda.get_device_properties(device).total_memory
    frac = 1.0 if budget is None else (budget - p.context_bytes) / total
    torch.cuda.set_per_process_memory_fraction(min(1.0, frac), device)
    model = Model(gguf, device=device, backend="triton", plan=p)
    cache = model.new_cache(n_ctx, "q4_0", "q4_0")
    ids = torch.randint(3, cfg.vocab_size, (n_prompt,), generator=torch.Generator().manual_seed(0))
    model.forward(ids[:16], cache)  # compile
    cache.reset()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    logits = model.forward(ids, cache)
    torch.cuda.synchronize(device)
    prompt_tps = n_prompt / (time.perf_counter() - t0)
    tok, times = int(logits.argmax()), []
    for _ in range(n_decode):
        t0 = time.perf_counter()
        tok = int(model.forward(torch.tensor([tok]), cache).argmax())
        times.append(time.perf_counter() - t0)
    decode_tps = 1.0 / statistics.median(times)
    predicted = p.predicted_tokens_per_s(h2d) if not p.all_resident else None
    row = {"budget_bytes": budget, "plan": p.summary(), "prompt_tps": prompt_tps, "decode_tps": decode_tps,
           "peak_allocated_bytes": torch.cuda.max_memory_allocated(device),
           "peak_reserved_bytes": torch.cuda.max_memory_reserved(device),
           "predicted_decode_tps": predicted,
           "achieved_fraction": None if predicted is None else decode_tps / predicted}
    del model, cache
    torch.cuda.set_per_process_memory_fraction(1.0, device)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budgets", default="4GiB,6GiB,none", help="comma list of sizes; none = unlimited")
    ap.add_argument("--synthetic", default="7b-q4_0,7b-q4_k_m", help="benchmarks/synthetic.py recipes")
    ap.add_argument("--ctx-size", type=int, default=4096)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--workdir", default="/tmp/qkvgguf-bench")
    ap.add_argument("--out", default=os.path.join(HERE, "paging.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("paging: needs a CUDA GPU (the planner itself is tested on the CPU: tests/test_planner.py)")
        return 0
    device = torch.device(args.device)
    os.makedirs(args.workdir, exist_ok=True)
    h2d = h2d_bandwidth(device)
    budgets = [None if b == "none" else parse_size(b) for b in args.budgets.split(",")]
    rows = []
    for kind in args.synthetic.split(","):
        path = synthetic.ensure(kind, args.workdir)
        for b in budgets:
            r = {"model": f"synthetic {kind}", **run_one(path, device, b, args.ctx_size, args.prompt_tokens,
                                                            args.decode_tokens, h2d)}
            rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "plan"}), flush=True)
    name = torch.cuda.get_device_name(device)
    print(f"\n{name}, {time.strftime('%Y-%m-%d')}, -c {args.ctx_size} K/V q4_0, pinned H2D {h2d / 1e9:.1f} GB/s")
    print(f"{'model':18} {'budget':>9} {'streamed':>9} {'peak resv':>10} {'prompt t/s':>11} {'decode t/s':>11} "
          f"{'predicted':>10} {'achieved':>9}")
    for r in rows:
        p = r["plan"]
        n_str = len(p["streamed_layers"]) + (0 if p["output_resident"] else 1)
        pred = f"{r['predicted_decode_tps']:.2f}" if r["predicted_decode_tps"] else "-"
        ach = f"{100 * r['achieved_fraction']:.0f}%" if r["achieved_fraction"] else "-"
        budget = format_bytes(r["budget_bytes"]) if r["budget_bytes"] else "unlimited"
        print(f"{r['model']:18} {budget:>9} {n_str:>9} {format_bytes(r['peak_reserved_bytes']):>10} "
              f"{r['prompt_tps']:>11.1f} {r['decode_tps']:>11.2f} {pred:>10} {ach:>9}")
    with open(args.out, "w") as f:
        json.dump({"device": name, "date": time.strftime("%Y-%m-%d"), "h2d_bytes_per_s": h2d, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
