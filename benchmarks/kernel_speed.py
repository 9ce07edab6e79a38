"""Triton kernel speed on a GPU: each kernel's achieved bandwidth against the copy roofline.

    python benchmarks/kernel_speed.py [--formats Q4_0,Q4_K] [--shapes 4096x4096] [--gemm-m 512] [--quick]

Needs a CUDA GPU (on CPU it says so and exits 0). Every op in every format and the fused ops;
`benchmarks/gpu_suite.py` (kernels stage) runs the decode-relevant subset with torch's int4 kernel
beside it. Measures kernel time by replaying CUDA graphs (median; autotuning happens in the first
call, outside the timing):

- copy: device-to-device bandwidth, (bytes read + bytes written) / time of a 1 GiB `copy_`,
  the roofline of every memory-bound kernel below;
- GEMV (M = 1) for every format and N x K in 4096x4096, 11008x4096, 4096x11008, 14336x4096:
  time and bandwidth = (weight bytes + activation bytes + output bytes) / time, as a fraction of
  copy; cuBLAS fp16 GEMV on the dense weight alongside (2 bytes per weight);
- GEMM (M = 512, fp16 activations): TFLOP/s = 2 M N K / time, and cuBLAS fp16 on the dense weight;
- fused small ops (RMSNorm +- residual, rope, SwiGLU) at T = 1 and T = 512 and attention (split-K
  decode of one token at 4096 context, causal prefill of 512 tokens), bandwidth or TFLOP/s.

Weights are random bytes with sane f16 scales (normal, std 0.01) made on the GPU: never all zero.
Each GEMV is checked against the dense dequantization first. Prints a table, writes
benchmarks/kernels.json with the device name and date.

Time: the first call of each (format, kernel) autotunes ~15 GEMV and ~5 GEMM candidates, each
compiled once per K specialization: plan for a minute or two per format; under a 10-minute limit
per command run the formats in two or three calls (--formats Q4_0,Q4_1,Q5_0 --out a.json ...).
Without a GPU, `python -m qkvgguf.runtime.kernels.aot 80` still compiles every kernel for sm_80
and shows ptxas's registers and spills.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]  # N x K
FORMATS = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q4_K": [0, 2],
              "Q5_K": [0, 2], "Q6_K": [208], "Q2_K": [80, 82], "Q3_K": [108], "IQ4_NL": [0],
              "IQ4_XS": [0]}  # byte offsets of the f16 fields in a block (the last four: --formats only)


def bench(fn) -> float:
    """Median seconds of one fn(), replayed from a CUDA graph of 10 calls (launch.graph_time_ms):
    per-launch event timing would measure the host's launch overhead for microsecond kernels."""
    from qkvgguf.runtime.kernels.launch import graph_time_ms

    return graph_time_ms(fn, calls=10, reps=20) * 1e-3


def random_weight(qtype, n: int, k: int, device) -> torch.Tensor:
    """GGUF bytes (n, k / block * type_size) on the GPU: random quants, f16 scales ~ N(0, 0.01)."""
    from gguf import GGML_QUANT_SIZES

    bs, ts = GGML_QUANT_SIZES[qtype]
    nblk = k // bs
    raw = torch.randint(0, 256, (n, nblk, ts), dtype=torch.uint8, device=device)
    for off in F16_FIELDS[qtype.name]:
        scales = (torch.randn(n, nblk, device=device) * 0.01).half()
        raw[..., off:off + 2] = scales.view(torch.uint8).view(n, nblk, 2)
    return raw.view(n, nblk * ts)


def bench_matmul(fmt: str, shapes, gemm_m: int, copy_bw: float, device) -> tuple[list, list]:
    from gguf import GGMLQuantizationType as T

    from qkvgguf.runtime.kernels import qmatmul
    from qkvgguf.runtime.kernels.dequant import dequantize_rows

    qm = importlib.import_module("qkvgguf.runtime.kernels.qmatmul")
    qtype = T[fmt]
    gemv_rows, gemm_rows = [], []
    for n, k in shapes:
        w = random_weight(qtype, n, k, device)
        dense = dequantize_rows(w, qtype).half()  # (n, k) for the cuBLAS baseline and the check
        x1 = torch.randn(1, k, device=device, dtype=torch.float16)
        y = qmatmul(x1, w, qtype, out_dtype=torch.float32)  # autotunes
        ref = x1.float() @ dense.float().T
        err = ((y - ref).abs().max() / ref.abs().max()).item()
        if not err < 1e-2:
            raise SystemExit(f"{fmt} {n}x{k}: GEMV differs from the dequantized reference (rel {err:.2e})")
        t = bench(lambda: qmatmul(x1, w, qtype))
        t_dense = bench(lambda: x1 @ dense.T)
        moved = w.numel() + x1.numel() * 2 + n * 2
        cfg = qm._tuned("gemv", qtype).best_config
        gemv_rows.append({
            "format": fmt, "N": n, "K": k, "us": t * 1e6, "GBps": moved / t / 1e9, "of_copy": moved / t / copy_bw,
            "cublas_f16_us": t_dense * 1e6, "speedup_vs_f16": t_dense / t,
            "config": {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
        })
        if gemm_m:
            xm = torch.randn(gemm_m, k, device=device, dtype=torch.float16)
            qmatmul(xm, w, qtype)  # autotunes
            t = bench(lambda: qmatmul(xm, w, qtype))
            t_dense = bench(lambda: xm @ dense.T)
            flops = 2 * gemm_m * n * k
            cfg = qm._tuned("gemm", qtype).best_config
            gemm_rows.append({
                "format": fmt, "M": gemm_m, "N": n, "K": k, "us": t * 1e6, "TFLOPs": flops / t / 1e12,
                "cublas_f16_TFLOPs": flops / t_dense / 1e12,
                "config": {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
            })
        del w, dense
    return gemv_rows, gemm_rows


def bench_ops(copy_bw: float, device) -> list:
    from qkvgguf.runtime import ops
    from qkvgguf.runtime.kernels import rms_norm, rope, swiglu

    rows = []
    h = torch.float16

    def add(name, fn, moved, torch_fn=None):
        t = bench(fn)
        row = {"op": name, "us": t * 1e6, "GBps": moved / t / 1e9, "of_copy": moved / t / copy_bw}
        if torch_fn is not None:
            row["torch_us"] = bench(torch_fn) * 1e6
        rows.append(row)

    for T_ in (1, 512):
        x = torch.randn(T_, 4096, device=device, dtype=h)
        r = torch.randn_like(x)
        w = torch.randn(4096, device=device)
        add(f"rms_norm T={T_} D=4096", lambda: rms_norm(x, w, 1e-5), 2 * x.nbytes + w.nbytes,
            lambda: ops.rms_norm(x.float(), w, 1e-5).half())
        add(f"rms_norm+residual T={T_} D=4096", lambda: rms_norm(x, w, 1e-5, residual=r), 4 * x.nbytes + w.nbytes,
            lambda: ops.rms_norm((x + r).float(), w, 1e-5).half())
        q = torch.randn(32, T_, 128, device=device, dtype=h)
        inv = 1.0 / (10000.0 ** (torch.arange(0, 128, 2, device=device).float() / 128))
        cos, sin = ops.rope_cos_sin(inv, torch.arange(T_, device=device))
        add(f"rope 32x{T_}x128", lambda: rope(q, cos, sin, False), 2 * q.nbytes + cos.nbytes + sin.nbytes,
            lambda: ops.rope(q, cos.half(), sin.half(), False))
        g, u = torch.randn(T_, 11008, device=device, dtype=h), torch.randn(T_, 11008, device=device, dtype=h)
        add(f"swiglu {T_}x11008", lambda: swiglu(g, u), 3 * g.nbytes, lambda: ops.swiglu(g, u))
    return rows


def bench_attention(copy_bw: float, device, ctx: int = 4096, T_: int = 512) -> list:
    import torch.nn.functional as F

    from qkvgguf.runtime.kernels import flash_decode, flash_prefill

    rows = []
    d, n_head = 128, 32
    for n_kv in (32, 8):  # Llama-2-7B (MHA), Llama-3-8B (GQA 4)
        k = torch.randn(n_kv, ctx, d, device=device, dtype=torch.float16)
        v = torch.randn_like(k)
        q = torch.randn(n_head, 1, d, device=device, dtype=torch.float16)
        t = bench(lambda: flash_decode(q, k, v, ctx))
        moved = k.nbytes + v.nbytes + 2 * q.nbytes
        t_sdpa = bench(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=n_kv != n_head))
        rows.append({"op": f"flash_decode ctx={ctx} heads={n_head}/{n_kv} d={d}", "us": t * 1e6,
                     "GBps": moved / t / 1e9, "of_copy": moved / t / copy_bw, "torch_sdpa_us": t_sdpa * 1e6})
        qp = torch.randn(n_head, T_, d, device=device, dtype=torch.float16)
        kp, vp = k[:, :T_], v[:, :T_]
        t = bench(lambda: flash_prefill(qp, kp, vp, 0))
        flops = 4 * n_head * d * T_ * T_ / 2  # causal: half of QK^T and PV
        t_sdpa = bench(lambda: F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=n_kv != n_head))
        rows.append({"op": f"flash_prefill T={T_} heads={n_head}/{n_kv} d={d}", "us": t * 1e6,
                     "TFLOPs": flops / t / 1e12, "torch_sdpa_us": t_sdpa * 1e6})
    return rows


def print_tables(res: dict) -> None:
    print(f"{res['device']}  {res['date']}  copy {res['copy_GBps']:.0f} GB/s (read + write)")
    print(f"\n{'GEMV M=1':<10} {'N x K':>12} {'us':>8} {'GB/s':>7} {'of copy':>8} {'cuBLAS f16 us':>14}")
    for r in res["gemv"]:
        print(f"{r['format']:<10} {r['N']:>6}x{r['K']:<5} {r['us']:>8.1f} {r['GBps']:>7.0f} {r['of_copy']:>8.1%} "
              f"{r['cublas_f16_us']:>14.1f}")
    if res["gemm"]:
        print(f"\n{'GEMM':<10} {'M x N x K':>18} {'us':>9} {'TFLOP/s':>8} {'cuBLAS f16':>11}")
        for r in res["gemm"]:
            print(f"{r['format']:<10} {r['M']:>5}x{r['N']:>5}x{r['K']:<5} {r['us']:>9.1f} {r['TFLOPs']:>8.1f} "
                  f"{r['cublas_f16_TFLOPs']:>11.1f}")
    print(f"\n{'op':<44} {'us':>8} {'GB/s':>7} {'of copy':>8} {'TFLOP/s':>8} {'torch us':>9}")
    for r in res["ops"] + res["attention"]:
        gbps = f"{r['GBps']:>7.0f} {r['of_copy']:>8.1%}" if "GBps" in r else f"{'':>7} {'':>8}"
        tfl = f"{r['TFLOPs']:>8.1f}" if "TFLOPs" in r else f"{'':>8}"
        base = r.get("torch_us", r.get("torch_sdpa_us"))
        print(f"{r['op']:<44} {r['us']:>8.1f} {gbps} {tfl} {base:>9.1f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="N x K, comma separated")
    ap.add_argument("--gemm-m", type=int, default=512, help="GEMM rows (0: skip the GEMM)")
    ap.add_argument("--quick", action="store_true", help="Q4_0 and Q4_K on 4096x4096 only")
    ap.add_argument("--skip-ops", action="store_true", help="only the GEMV / GEMM of --formats")
    ap.add_argument("--out", default=os.path.join(HERE, "kernel_speed.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernel_speed.py needs a CUDA GPU; none is available here, nothing measured.")
        return 0
    formats = ["Q4_0", "Q4_K"] if args.quick else args.formats.split(",")
    shapes = [(4096, 4096)] if args.quick else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    device = torch.device("cuda")
    import triton

    res = {"device": torch.cuda.get_device_name(device), "capability": ".".join(map(str, torch.cuda.get_device_capability())),
           "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__, "triton": triton.__version__}
    sys.path.insert(0, HERE)
    from gpu_suite import copy_bandwidth  # one definition of the roofline for both

    res["copy_GBps"] = copy_bandwidth(device, 1 << 30) / 1e9
    res["gemv"], res["gemm"] = [], []
    for fmt in formats:
        t0 = time.time()
        gemv, gemm = bench_matmul(fmt, shapes, args.gemm_m, res["copy_GBps"] * 1e9, device)
        res["gemv"] += gemv
        res["gemm"] += gemm
        print(f"{fmt}: {time.time() - t0:.0f} s (autotuning included)", file=sys.stderr, flush=True)
    res["ops"] = [] if args.skip_ops else bench_ops(res["copy_GBps"] * 1e9, device)
    res["attention"] = [] if args.skip_ops else bench_attention(res["copy_GBps"] * 1e9, device)
    gemv_fracs = [r["of_copy"] for r in res["gemv"]]
    res["gemv_of_copy_min"] = min(gemv_fracs) if gemv_fracs else math.nan
    print_tables(res)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
