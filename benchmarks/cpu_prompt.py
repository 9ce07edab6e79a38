"""CPU prompt-path pieces per block format: tile dequantization, the prompt matmul in float32 and bfloat16, attention.

    python benchmarks/cpu_prompt.py [--shape 5632x2048] [--rows 512] [--threads 2] [--repeats 5]
                                    [--out benchmarks/results/cpu_prompt.json]

For every registered quantized type the compiled library has (runtime/cpu), one N x K weight (random
values quantized with our quantizer; speed does not depend on them), in one process:
  - dequant f32 / bf16: `qk_dequant_rows` / `qk_dequant_rows_bf16` of the whole weight (the prompt
    path's tiles), G weights/s
  - matmul exact / bf16: `runtime.cpu.matmul(x, w)` and `runtime.cpu.matmul(x, w, bf16=True)` with
    --rows rows of x (the calls `ops.linear` makes for a prompt, with `--numerics exact` / `bf16`),
    ms and GFLOP/s, and their ratio
and once: prompt attention at --rows x --rows, 32 query heads over 4 KV heads, head_dim 64 (the 1B
shape), float32, causal mask: torch's SDPA called with 3-D tensors (its math path: what
runtime/ops.attention did until 2026-12-06) and with a batch dimension (its CPU flash kernel: what it
does now), ms and the largest difference from a float64 reference.
Medians of --repeats after a warm-up; the variants alternate, best of three rounds each; a shared
machine moves absolute figures, so read the same-run ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "cpu_prompt.json"
sys.path.insert(0, str(HERE))
from cpu_kernels import _time, quantized_weights  # noqa: E402 (the same weights and timer as the decode table)


def _best(fns: dict, repeats: int) -> dict:
    out = {k: [] for k in fns}
    for _ in range(3):
        for k, fn in fns.items():
            out[k].append(_time(fn, repeats))
    return {k: min(v) for k, v in out.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="5632x2048", help="N x K of the weight (output x input)")
    ap.add_argument("--rows", type=int, default=512, help="prompt rows (tokens)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    import torch.nn.functional as F

    from qkvgguf.runtime import cpu

    if not cpu.available():
        print("the compiled CPU kernels are unavailable here (no C++ compiler?)", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    lib = cpu.build.load()
    rng = np.random.default_rng(0)
    N, K = (int(v) for v in args.shape.lower().split("x"))
    x = torch.from_numpy(rng.standard_normal((args.rows, K)).astype(np.float32))
    flop = 2 * args.rows * N * K
    rows = []
    for fmt, w in quantized_weights(N, K, rng):
        f32, b16 = torch.empty(N, K), torch.empty(N, K, dtype=torch.bfloat16)
        nt = torch.get_num_threads()
        t = _best({
            "dequant_f32": lambda: lib.qk_dequant_rows(int(w.type), w.raw.data_ptr(), w.raw.stride(0), 0, N, K,
                                                       f32.data_ptr(), nt),
            "dequant_bf16": lambda: lib.qk_dequant_rows_bf16(int(w.type), w.raw.data_ptr(), w.raw.stride(0), 0, N, K,
                                                             b16.data_ptr(), nt),
            "matmul_exact": lambda: cpu.matmul(x, w),
            "matmul_bf16": lambda: cpu.matmul(x, w, bf16=True),
        }, args.repeats)
        row = {"type": fmt.name, "N": N, "K": K, "rows": args.rows,
               "dequant_f32_gw_s": N * K / t["dequant_f32"] / 1e9, "dequant_bf16_gw_s": N * K / t["dequant_bf16"] / 1e9,
               "matmul_exact_ms": t["matmul_exact"] * 1e3, "matmul_bf16_ms": t["matmul_bf16"] * 1e3,
               "matmul_exact_gflop_s": flop / t["matmul_exact"] / 1e9, "matmul_bf16_gflop_s": flop / t["matmul_bf16"] / 1e9,
               "bf16_speedup": t["matmul_exact"] / t["matmul_bf16"]}
        rows.append(row)
        print(f"{fmt.name:7} dequant f32 {row['dequant_f32_gw_s']:5.2f} bf16 {row['dequant_bf16_gw_s']:5.2f} G weights/s   "
              f"matmul exact {row['matmul_exact_ms']:6.1f} ms ({row['matmul_exact_gflop_s']:4.0f} GFLOP/s)  bf16 "
              f"{row['matmul_bf16_ms']:6.1f} ms ({row['matmul_bf16_gflop_s']:4.0f})  {row['bf16_speedup']:.2f}x", flush=True)

    H, G, d, S = 32, 4, 64, args.rows
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(h, S, d, generator=g) for h in (H, G, G))
    mask = torch.arange(S)[None, :] <= torch.arange(S)[:, None]
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, enable_gqa=True)
    three = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # noqa: E731
    four = lambda: F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, enable_gqa=True)[0]  # noqa: E731
    t = _best({"sdpa_3d": three, "sdpa_4d": four}, args.repeats)
    attention = {"heads": H, "kv_heads": G, "head_dim": d, "tokens": S, "sdpa_3d_ms": t["sdpa_3d"] * 1e3,
                 "sdpa_4d_ms": t["sdpa_4d"] * 1e3, "speedup": t["sdpa_3d"] / t["sdpa_4d"],
                 "sdpa_3d_max_err": float((three().double() - ref).abs().max()),
                 "sdpa_4d_max_err": float((four().double() - ref).abs().max())}
    print(f"attention {S} x {S}, {H}/{G} heads, d={d}: 3-D (math) {attention['sdpa_3d_ms']:.1f} ms, 4-D (flash) "
          f"{attention['sdpa_4d_ms']:.1f} ms ({attention['speedup']:.1f}x); max error vs float64 "
          f"{attention['sdpa_3d_max_err']:.1e} / {attention['sdpa_4d_max_err']:.1e}")
    result = {"command": "python benchmarks/cpu_prompt.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": platform.machine(), "bf16_native": cpu.has_bf16_matmul(), "torch": torch.__version__,
              "threads": args.threads, "repeats": args.repeats, "date": time.strftime("%Y-%m-%d"), "rows": rows,
              "attention": attention}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
