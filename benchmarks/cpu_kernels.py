"""CPU decode matmul speed per block format: the runtime's fused dots against torch's float32 GEMV.

    python benchmarks/cpu_kernels.py [--shapes 5632x2048,2048x5632] [--threads 1] [--repeats 50]
                                     [--out benchmarks/results/cpu_kernels.json]

For every registered quantized type the compiled library multiplies (runtime/cpu), one weight of each
N x K shape (random values quantized with our quantizer; speed does not depend on them) and one x row:
`runtime.cpu.matmul` — the call `ops.linear` makes for a decode token — timed hot (the weight read
repeatedly, as each layer's is once per token), median of --repeats after a warm-up; beside it, in the
same process and alternating, torch's float32 GEMV `x @ W.T` on the dequantized weight (4 bytes per
weight). Reports G weights/s for both and their ratio; a shared machine moves absolute figures, so read
the same-run ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "cpu_kernels.json"


def _time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def quantized_weights(N: int, K: int, rng):
    """(format, QTensor) for every registered quantized type the compiled library multiplies: one N x K
    weight of random values (N(0, 0.02)) quantized by our quantizer (an all-ones importance where the
    type has only the weighted one)."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType as T

    from qkvgguf.quants import FORMATS, quantize
    from qkvgguf.runtime import cpu
    from qkvgguf.runtime.weights import QTensor

    values = rng.standard_normal((N, K)).astype(np.float32) * 0.02
    for fmt in FORMATS.values():
        if fmt.type in (T.F32, T.F16, T.BF16) or K % fmt.block_size or not cpu.supports(fmt.type) \
                or fmt.quantize is None and fmt.quantize_weighted is None:
            continue
        raw = quantize(values, fmt.type) if fmt.quantize is not None else \
            fmt.quantize_weighted(values, np.ones(K, dtype=np.float32))
        yield fmt, QTensor("w", T(fmt.type), (N, K), torch.from_numpy(np.ascontiguousarray(raw)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="5632x2048,2048x5632", help="N x K of the weights (output x input)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from qkvgguf.quants import dequantize
    from qkvgguf.runtime import cpu

    if not cpu.available():
        print("the compiled CPU kernels are unavailable here (no C++ compiler?)", file=sys.stderr)
        return 1
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    rows = []
    for shape in args.shapes.split(","):
        N, K = (int(v) for v in shape.lower().split("x"))
        x = torch.from_numpy(rng.standard_normal((1, K)).astype(np.float32))
        for fmt, w in quantized_weights(N, K, rng):
            dense = dequantize(w.raw, fmt.type).view(N, K)
            ours_t, torch_t = [], []
            for _ in range(3):  # alternate, three rounds
                ours_t.append(_time(lambda: cpu.matmul(x, w), args.repeats))
                torch_t.append(_time(lambda: x @ dense.T, args.repeats))
            ours, ref = min(ours_t), min(torch_t)
            row = {"type": fmt.name, "N": N, "K": K, "weight_bytes": int(w.raw.numel()),
                   "ours_gw_s": N * K / ours / 1e9, "torch_f32_gw_s": N * K / ref / 1e9, "ratio": ref / ours}
            rows.append(row)
            print(f"{fmt.name:7} {N:>5} x {K:<5} ours {row['ours_gw_s']:6.2f} G weights/s   torch float32 "
                  f"{row['torch_f32_gw_s']:6.2f}   {row['ratio']:.2f}x", flush=True)
    result = {"command": "python benchmarks/cpu_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "host": platform.node(), "machine": platform.machine(), "torch": torch.__version__,
              "threads": args.threads, "repeats": args.repeats, "date": time.strftime("%Y-%m-%d"), "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
