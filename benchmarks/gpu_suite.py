"""The GPU suite: everything that needs a CUDA GPU, checked and measured by one command.

    python benchmarks/gpu_suite.py --out DIR            # full: at most 9 minutes (stage limits)
    python benchmarks/gpu_suite.py --out DIR --quick    # at most 4 minutes
    python benchmarks/gpu_suite.py --out DIR --dry-run  # CPU: every stage on tiny shapes (CI runs this)
    python benchmarks/gpu_suite.py --out DIR --stages env,decode

Stages, in order; each runs in its own process under its own time limit, writes DIR/<stage>.json
and DIR/<stage>.md (rows are saved as they are measured, so a stage that fails or runs out of
time still leaves what it measured) and DIR/<stage>.log; DIR/summary.md gathers them all.

    env      device, driver, capability, torch / triton versions, free memory, a C compiler for
             Triton's launcher; device-to-device copy bandwidth (the roofline of every
             memory-bound kernel) and pinned host-to-device bandwidth (the paging bound)
    models   synthetic GGUFs with real models' shapes and types (benchmarks/synthetic.py):
             SmolLM2-135M Q4_1 (the demo model's layout), Llama-3-8B Q4_K_M, Llama-2-7B Q4_0
    tests    pytest on the CUDA device: the kernel, KV-kernel, CUDA-graph, paging and
             CUDA-path tests (the real SmolLM2 file cannot travel: its tests are skipped), with
             QKVGGUF_AUTOTUNE=0 (one compiled config per format: correctness, not speed)
    kernels  quantized GEMV (M = 1) and GEMM (M = 512) at 7-8B shapes: time, bandwidth as a
             fraction of the copy bandwidth, and torch's own kernels on the same shapes in the
             same run: cuBLAS fp16 / bf16 on the dense weight and the int4 weight-only kernel
             (`aten._weight_int4pack_mm`, as gpt-fast and torchao use)
    sweep    every GEMV tile candidate (and some beyond the autotuner's list) at decode shapes
    decode   `qkvgguf bench` (the CLI, as a user runs it) on each model: prompt and decode tok/s,
             CUDA-graph decode vs ordinary launches, warm-up (compile + autotune) time, peak
             memory, and decode's weight bandwidth as a fraction of copy bandwidth; llama.cpp on
             the same files where llama-cpp-python is installed (a CUDA build takes longer than a
             lease to compile, so on the GPU machine this row usually says it is missing)
    kv4k     decode at a 4,096-token context per KV cache type (f16, q8_0, q4_0, q4g)
    paging   the 8B and 7B models under `--vram 4GiB` (and 6 GiB) with a 4,096 context and a
             q4_0 KV cache: the planner's plan, peak reserved memory against the budget, decode
             tok/s against the plan's PCIe bound at the measured pinned bandwidth, and what the
             same plan would give at PCIe 3.0 x8 / 4.0 x16 rates (4 GB laptop cards); each budget
             with the streamed step captured in a CUDA graph (`--paged-cuda-graph`, experimental),
             and with the layers that do not fit computed on the CPU (`--placement cpu`, `auto`)
             and with `--no-cuda-graph`

On the GPU machine (no network; torch, triton, transformers, pytest are there, `gguf` is not),
carry the one missing wheel and a wheel of this package, made on a machine with pip access, in the
repository root (`.whl/` is ignored by git: name it in the device tool's `carry`):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 -d .whl gguf==0.19.0
    pip wheel --no-deps -w .whl .        # rebuild it after every change

then there: `python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl;
export PYTHONPATH=/tmp/site` and run this file (an editable install there needs a build backend
the machine may lack). The suite starts its pytest and CLI processes with `python -P`, so the
checkout's `qkvgguf/` folder cannot shadow the installed package. Set TRITON_CACHE_DIR to a folder
you bring back (tar) to reuse compiled kernels in a later run of the same lease.

`--dry-run` runs every stage's setup and control flow on the CPU (Triton interpreter, tiny model,
a handful of tests) so the suite cannot rot between GPU sessions; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# name, seconds (full), seconds (quick): each stage stops itself at its limit (rows measured so far
# are kept); the limits add up to 9 minutes (full) and 4 minutes (quick)
STAGES = [
    ("env", 30, 15),
    ("models", 60, 35),
    ("tests", 140, 50),
    ("kernels", 90, 35),
    ("sweep", 30, 15),
    ("decode", 90, 45),
    ("kv4k", 45, 25),
    ("paging", 55, 20),
]
GPU_TESTS = ["tests/test_gpu_paths.py", "tests/test_cuda_graph.py", "tests/test_kv_kernels.py",  # fastest first:
             "tests/test_paging.py", "tests/test_backend_triton.py", "tests/test_kernels.py",  # a timeout keeps them
             "tests/test_torch_linear.py"]  # GGUFLinear's Triton path on CUDA
QUICK_TESTS = GPU_TESTS[:4]  # 58 tests, about 100 s on a fresh H200 (most of it compiling)
DRY_TESTS = ["tests/test_gpu_paths.py"]
PCIE_RATES = {"PCIe 3.0 x8": 6.5e9, "PCIe 4.0 x16": 25e9}  # achievable pinned H2D, bytes/s


# -- the stage record ----------------------------------------------------------------------------
class Stage:
    """One stage's results: rows saved to <out>/<name>.json and .md after every change."""

    def __init__(self, name: str, args):
        self.name, self.args = name, args
        self.data: dict = {"stage": name, "rows": []}
        self.md: list[str] = []

    def save(self) -> None:
        with open(os.path.join(self.args.out, f"{self.name}.json"), "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        with open(os.path.join(self.args.out, f"{self.name}.md"), "w") as f:
            f.write("\n".join(self.md) + "\n")

    def row(self, row: dict) -> None:
        self.data["rows"].append(row)
        print(json.dumps(row, default=str), flush=True)
        self.save()


def _device(args):
    import torch

    return torch.device("cpu" if args.dry_run else "cuda")


def _recipes(args) -> list[str]:
    """The synthetic models (benchmarks/synthetic.py recipes) this run uses."""
    # the headline models first (a stage cut short keeps them): 8B Q4_K_M (streams at 4 GiB) and
    # 8B Q2_K (the size that fits a 4 GiB card whole)
    return (["tiny-q4_k_m"] if args.dry_run else
            ["8b-q4_k_m", "8b-q2_k", "smollm2-q4_1"] if args.quick else
            ["8b-q4_k_m", "8b-q2_k", "smollm2-q4_1", "7b-q4_0", "8b-q3_k_m"])


def _models(args) -> dict:
    """recipe -> path (written by the models stage, or here when that stage did not run)."""
    import synthetic

    return {r: synthetic.ensure(r, args.workdir) for r in _recipes(args)}


def _env_json(args) -> dict:
    try:
        with open(os.path.join(args.out, "env.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _fmt(v, spec=".1f"):
    return "-" if v is None else format(v, spec)


# -- env -------------------------------------------------------------------------------------------
def stage_env(st: Stage) -> None:
    import torch
    import triton

    args = st.args
    dev = _device(args)
    d = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "python": platform.python_version(),
         "torch": torch.__version__, "triton": triton.__version__, "cuda_runtime": torch.version.cuda,
         "cc": shutil.which("cc") or shutil.which("gcc"), "nproc": os.cpu_count()}
    try:
        import gguf  # noqa: F401

        d["gguf"] = getattr(gguf, "__version__", "present")
    except ImportError as e:
        d["gguf"] = f"missing: {e}"
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        free, total = torch.cuda.mem_get_info(dev)
        d.update(device=torch.cuda.get_device_name(dev), capability=f"{props.major}.{props.minor}",
                 sm_count=props.multi_processor_count, total_gib=total / 2**30, free_gib=free / 2**30)
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout
            d["nvidia_smi"] = out.strip()
        except (OSError, subprocess.SubprocessError) as e:
            d["nvidia_smi"] = f"unavailable: {e}"
    else:
        d["device"] = "cpu (dry run)"
    st.data["env"] = d
    st.save()
    d["copy_GBps"] = copy_bandwidth(dev, 2**20 if args.dry_run else 2**30) / 1e9
    d["h2d_pinned_GBps"] = h2d_bandwidth(dev, 2**20 if args.dry_run else 2**29) / 1e9
    d["h2d_pageable_GBps"] = h2d_bandwidth(dev, 2**20 if args.dry_run else 2**28, pinned=False) / 1e9
    from qkvgguf.runtime import paging

    d["pinned_by"] = paging.PIN_METHOD  # cudaHostRegister (exact) or torch's pin_memory (power-of-two rounding)
    st.data.update(d)
    st.md = ["## Environment", "", "| key | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in d.items()]
    st.save()


def _time(fn, dev, reps: int = 10, calls: int = 10) -> float:
    """Median seconds of one fn(): on a GPU replayed from a CUDA graph of `calls` calls (kernel time,
    not the host's launch overhead: launch.graph_time_ms), wall clock on the CPU."""
    if dev.type == "cuda":
        from qkvgguf.runtime.kernels.launch import graph_time_ms

        return graph_time_ms(fn, calls=calls, reps=reps) / 1e3
    fn()
    times = []
    for _ in range(min(reps, 3)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _time_long(fn, dev, reps: int = 5) -> float:
    """Median seconds of fn() between two events, for operations long enough (hundreds of
    microseconds and more) that the launch overhead does not count, or that a graph cannot hold."""
    import torch

    if dev.type != "cuda":
        return _time(fn, dev, reps)
    fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def copy_bandwidth(dev, n_bytes: int) -> float:
    """Device-to-device copy, (bytes read + written) / time."""
    import torch

    src = torch.randn(n_bytes // 4, device=dev)
    dst = torch.empty_like(src)
    return 2 * n_bytes / _time_long(lambda: dst.copy_(src), dev, 10)


def h2d_bandwidth(dev, n_bytes: int, pinned: bool = True) -> float:
    """Host-to-device copy bandwidth (pinned: what paging uses; pageable for comparison)."""
    import torch

    if dev.type != "cuda":
        return copy_bandwidth(dev, n_bytes) / 2
    from qkvgguf.runtime.paging import pinned_host_buffer

    src = pinned_host_buffer(n_bytes) if pinned else torch.empty(n_bytes, dtype=torch.uint8)
    src.fill_(1)
    dst = torch.empty(n_bytes, dtype=torch.uint8, device=dev)
    return n_bytes / _time_long(lambda: dst.copy_(src, non_blocking=pinned), dev)  # a pageable copy cannot be captured


# -- models ----------------------------------------------------------------------------------------
def stage_models(st: Stage) -> None:
    import synthetic

    st.md = ["## Synthetic models (benchmarks/synthetic.py)", "", "| recipe | GiB | seconds |", "|---|---:|---:|"]
    for recipe in _recipes(st.args):
        t0 = time.perf_counter()
        path = synthetic.ensure(recipe, st.args.workdir)
        row = {"recipe": recipe, "path": path, "bytes": os.path.getsize(path), "seconds": time.perf_counter() - t0}
        st.md.append(f"| {recipe} | {row['bytes'] / 2**30:.2f} | {row['seconds']:.0f} |")
        st.row(row)


# -- tests -----------------------------------------------------------------------------------------
def stage_tests(st: Stage) -> None:
    import importlib.util

    args = st.args
    files = (args.test_files.split(",") if args.test_files else DRY_TESTS if args.dry_run else
             QUICK_TESTS if args.quick else GPU_TESTS)
    files = [f for f in files if os.path.exists(os.path.join(ROOT, f))]
    cmd = [sys.executable, "-P", "-m", "pytest", "-v", "-p", "no:cacheprovider", "-rfE", *files]
    if importlib.util.find_spec("pytest_timeout") is not None:
        cmd += ["--timeout", "120"]
    # the 98 MB demo file cannot travel here; one kernel config per format, untimed: the 2026-12-04
    # second-session run spent its whole tests stage compiling every autotune candidate of the first test
    env = dict(os.environ, QKVGGUF_NO_DEFAULT_MODEL="1", QKVGGUF_AUTOTUNE="0")
    log = os.path.join(args.out, "tests-pytest.log")
    t0 = time.perf_counter()
    with open(log, "w") as f:
        budget = max(10, args.stage_seconds - 10)
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=budget).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    text = open(log).read()
    counts = {k: len(re.findall(rf"(?m) {k.upper()}( |$)", text)) for k in ("passed", "failed", "error", "skipped")}
    failures = sorted(set(re.findall(r"(?m)^(?:FAILED|ERROR) (\S+)", text)))
    st.data.update(returncode=rc, seconds=time.perf_counter() - t0, files=files, counts=counts, failures=failures)
    st.md = ["## GPU tests", "", f"`{' '.join(cmd[3:])}`: exit {rc}, {counts['passed']} passed, "
             f"{counts['failed']} failed, {counts['error']} errors, {counts['skipped']} skipped "
             f"in {st.data['seconds']:.0f} s", ""] + [f"- {x}" for x in failures]
    st.save()
    tail = text[-4000:]
    print(tail)


# -- kernels ---------------------------------------------------------------------------------------
def int4_reference(x, n: int, k: int, dev):
    """torch's int4 weight-only matmul (groups of 32) on a random (n, k) weight: a callable, or the
    reason it is unavailable on this torch / device."""
    import torch

    try:
        w = torch.randint(0, 16, (n, k), dtype=torch.int32, device=dev)
        packed_u8 = (w[:, ::2] << 4 | w[:, 1::2]).to(torch.uint8)
        wp = torch.ops.aten._convert_weight_to_int4pack(packed_u8, 8)
        sz = torch.randn(k // 32, n, 2, device=dev, dtype=torch.bfloat16) * 0.01
        xb = x.to(torch.bfloat16)
        fn = lambda: torch.ops.aten._weight_int4pack_mm(xb, wp, 32, sz)  # noqa: E731
        fn()
        return fn
    except Exception as e:  # noqa: BLE001 - reported in the table, not fatal
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"


def stage_kernels(st: Stage) -> None:
    import torch
    from gguf import GGMLQuantizationType as T

    import kernel_speed as kb
    from qkvgguf.runtime.kernels import qmatmul
    from qkvgguf.runtime.kernels.dequant import dequantize_rows

    args, t0 = st.args, time.perf_counter()
    dev = _device(args)
    copy = (_env_json(args).get("copy_GBps") or copy_bandwidth(dev, 2**20 if args.dry_run else 2**30) / 1e9) * 1e9
    if args.dry_run:
        formats, shapes, m_gemm = ["Q4_K"], [(64, 256)], 16
    elif args.quick:
        formats, shapes, m_gemm = ["Q4_K", "Q6_K", "Q4_0", "Q8_0"], [(4096, 4096), (14336, 4096)], 512
    else:
        formats = ["Q4_K", "Q6_K", "Q4_0", "Q8_0", "Q5_K", "Q4_1", "Q5_0", "Q5_1"]
        shapes, m_gemm = [(4096, 4096), (14336, 4096), (4096, 14336), (128256, 4096)], 512
    st.data["copy_GBps"] = copy / 1e9
    st.md = [f"## Quantized matmul (copy bandwidth {copy / 1e9:.0f} GB/s)", "",
             "Kernel time from CUDA-graph replays (no launch overhead). M = 1: our GEMV; larger M: qmatmul's "
             "default (w dequantized to fp16 tiles + cuBLAS), with our Triton GEMM alone in the last column.", "",
             "| format | M | N x K | us | GB/s | of copy | cuBLAS f16 us | cuBLAS bf16 us | torch int4 us | vs f16 | vs int4 | TFLOP/s | Triton GEMM us |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for fmt in formats:
        qtype = T[fmt]
        for n, k in shapes:
            if _remaining(st, t0) < 10:
                st.row({"format": fmt, "N": n, "K": k, "skipped": "stage time used up"})
                continue
            w = kb.random_weight(qtype, n, k, dev)
            dense = dequantize_rows(w, qtype).half()
            for m in (1, m_gemm):
                x = torch.randn(m, k, device=dev, dtype=torch.float16 if dev.type == "cuda" else torch.float32)
                t_first = time.perf_counter()
                y = qmatmul(x, w, qtype)  # autotunes on the first call of each key
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                first_s = time.perf_counter() - t_first
                ref = x.float() @ dense.float().T
                err = ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
                t = _time(lambda: qmatmul(x, w, qtype), dev)
                dh = dense.to(x.dtype)
                t16 = _time(lambda: x @ dh.T, dev)
                db, xb = dense.bfloat16(), x.bfloat16()
                tb16 = _time(lambda: xb @ db.T, dev)
                i4 = int4_reference(x, n, k, dev) if dev.type == "cuda" else "cpu"
                t4 = _time(i4, dev) if callable(i4) else None
                t_tri = _time(lambda: qmatmul(x, w, qtype, strategy="gemm"), dev) if m > 8 else None
                moved = w.numel() + x.numel() * x.element_size() + m * n * x.element_size()
                row = {"format": fmt, "M": m, "N": n, "K": k, "us": t * 1e6, "GBps": moved / t / 1e9,
                       "of_copy": moved / t / copy, "rel_err": err, "first_call_s": first_s,
                       "cublas_f16_us": t16 * 1e6, "cublas_bf16_us": tb16 * 1e6,
                       "int4_us": None if t4 is None else t4 * 1e6, "int4_note": None if callable(i4) else i4,
                       "TFLOPs": 2 * m * n * k / t / 1e12, "triton_gemm_us": None if t_tri is None else t_tri * 1e6}
                st.md.append(f"| {fmt} | {m} | {n}x{k} | {t * 1e6:.1f} | {row['GBps']:.0f} | {row['of_copy']:.1%} | "
                             f"{t16 * 1e6:.1f} | {tb16 * 1e6:.1f} | {_fmt(row['int4_us'])} | {t16 / t:.2f} | "
                             f"{'-' if t4 is None else f'{t4 / t:.2f}'} | {row['TFLOPs']:.1f} | {_fmt(row['triton_gemm_us'])} |")
                st.row(row)


def stage_sweep(st: Stage) -> None:
    """Every GEMV candidate (and a few beyond the autotuner's list) timed at decode shapes: where
    the kernel stands against the copy roofline, and which tiles the next tuning should try."""
    import torch
    from gguf import GGMLQuantizationType as T

    import kernel_speed as kb
    from qkvgguf.runtime.kernels import qmatmul
    from qkvgguf.runtime.kernels.dequant import LAYOUTS
    from qkvgguf.runtime.kernels.qmatmul import gemv_configs

    args, t0 = st.args, time.perf_counter()
    dev = _device(args)
    copy = (_env_json(args).get("copy_GBps") or copy_bandwidth(dev, 2**20 if args.dry_run else 2**30) / 1e9) * 1e9
    formats = ["Q4_K"] if args.dry_run else ["Q4_K", "Q4_0"]
    shapes = [(64, 256)] if args.dry_run else [(4096, 4096), (14336, 4096)]
    extras = [(32, 256, 8, 2), (32, 512, 8, 2), (64, 256, 8, 2), (16, 1024, 8, 2), (8, 1024, 4, 2),
              (16, 512, 4, 3), (16, 256, 4, 4), (4, 512, 4, 3), (2, 1024, 4, 2), (32, 128, 4, 2)]
    st.md = [f"## GEMV tile sweep, M = 1 (copy bandwidth {copy / 1e9:.0f} GB/s; CUDA-graph replays)", "",
             "| format | N x K | BLOCK_N | K bytes/step | warps | stages | us | of copy | in autotune list |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for fmt in formats:
        qtype = T[fmt]
        inner = LAYOUTS[qtype].inner
        cands = [(c.kwargs["BLOCK_N"], c.kwargs["GS"] * inner, c.num_warps, c.num_stages, True) for c in gemv_configs(qtype)]
        cands += [(bn, kb_, w, s, False) for bn, kb_, w, s in extras if kb_ >= inner]
        if args.dry_run:
            cands = cands[:2]
        for n, k in shapes:
            w = kb.random_weight(qtype, n, k, dev)
            x = torch.randn(1, k, device=dev, dtype=torch.float16 if dev.type == "cuda" else torch.float32)
            for bn, kbytes, warps, stages, listed in cands:
                if _remaining(st, t0) < 5:
                    st.row({"format": fmt, "skipped": "stage time used up"})
                    return
                cfg = {"BLOCK_N": bn, "GS": kbytes // inner, "num_warps": warps, "num_stages": stages}
                try:
                    t = _time(lambda: qmatmul(x, w, qtype, config=cfg), dev)
                except Exception as e:  # noqa: BLE001 - a tile that does not compile is a finding
                    st.row({"format": fmt, "N": n, "K": k, **cfg, "error": f"{type(e).__name__}: {str(e)[:200]}"})
                    continue
                moved = w.numel() + x.numel() * x.element_size() + n * x.element_size()
                row = {"format": fmt, "N": n, "K": k, **cfg, "k_bytes": kbytes, "us": t * 1e6,
                       "of_copy": moved / t / copy, "listed": listed}
                st.md.append(f"| {fmt} | {n}x{k} | {bn} | {kbytes} | {warps} | {stages} | {t * 1e6:.1f} | "
                             f"{row['of_copy']:.1%} | {'yes' if listed else 'no'} |")
                st.row(row)


# -- decode, kv4k, paging: through the CLI ----------------------------------------------------------
def cli_bench(st: Stage, model: str, extra: list[str], timeout: float) -> dict:
    """`qkvgguf bench --json` in a fresh process (the user's code path); its JSON, or the error."""
    args = st.args
    cmd = [sys.executable, "-P", "-m", "qkvgguf.cli", "bench", "-m", model, "--json", *extra]
    if args.dry_run:
        cmd += ["--device", "cpu", "--backend", "triton"]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(5, timeout))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "cmd": " ".join(cmd[3:])}
    wall = time.perf_counter() - t0
    with open(os.path.join(args.out, f"{st.name}.log"), "a") as f:
        f.write(f"$ {' '.join(cmd[3:])}\n{p.stdout}{p.stderr}\n")
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        err = (p.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {p.returncode}: {err[:300]}", "cmd": " ".join(cmd[3:]), "wall_s": wall}
    res = json.loads(lines[-1])
    res["cmd"] = "qkvgguf " + " ".join(cmd[4:])  # what a user types: qkvgguf bench -m ...
    res["wall_s"] = wall
    return res


def llamacpp_bench(path: str, n_prompt: int, n_decode: int) -> dict:
    """llama.cpp on the same file, every layer offloaded (-ngl all), as the end-to-end reference:
    prompt tok/s (one pass) and decode tok/s (median step). Needs llama-cpp-python built for the
    device (with CUDA on a GPU: see shared/GPU.md); reports why not otherwise."""
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None:
        return {"error": "llama-cpp-python is not installed here"}
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import llamacpp
    import numpy as np

    try:
        llm = llamacpp.load(path, n_ctx=n_prompt + n_decode + 8, n_batch=512, n_gpu_layers=-1, n_threads=os.cpu_count())
    except Exception as e:  # noqa: BLE001 - reported in the table
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}
    ids = np.random.default_rng(0).integers(3, llm.n_vocab(), n_prompt).tolist()
    llm.eval(ids[:16])
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    prompt_tps = n_prompt / (time.perf_counter() - t0)
    tok, times = int(llamacpp.last_logits(llm).argmax()), []
    for _ in range(n_decode):
        t0 = time.perf_counter()
        llm.eval([tok])
        tok = int(llamacpp.last_logits(llm).argmax())
        times.append(time.perf_counter() - t0)
    return {"prompt_tokens_per_s": prompt_tps, "decode_tokens_per_s": 1.0 / statistics.median(times),
            "gpu_offload": bool(getattr(__import__("llama_cpp"), "llama_supports_gpu_offload", lambda: False)())}


def _remaining(st: Stage, t0: float) -> float:
    return st.args.stage_seconds - (time.perf_counter() - t0) - 3


def stage_decode(st: Stage) -> None:
    from qkvgguf.gguf_file import GGUFFile

    args, t0 = st.args, time.perf_counter()
    copy = (_env_json(args).get("copy_GBps") or 0) * 1e9
    p, n = ("8", "2") if args.dry_run else ("512", "64" if args.quick else "128")
    st.md = ["## Decode through `qkvgguf bench`", "",
             "| model | graph | prompt tok/s | decode tok/s | step ms | weight GB/s | of copy | warm-up s | peak reserved GiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for recipe, path in _models(args).items():
        tensors = GGUFFile(path).tensors  # bytes read per decode token: all but an untied embedding's
        weights = sum(t.n_bytes for n, t in tensors.items() if n != "token_embd.weight" or "output.weight" not in tensors)
        for graph in ((True,) if args.dry_run else (True, False)):  # dry run: no graphs on the CPU, one call
            left = _remaining(st, t0)
            if left < 10:
                st.row({"model": recipe, "skipped": "stage time used up"})
                continue
            extra = ["-p", p, "-n", n, "-r", "1"] + ([] if graph else ["--no-cuda-graph"])
            r = cli_bench(st, path, extra, left)
            r.update(model=recipe, graph_asked=graph, weight_bytes=weights)
            d = r.get("decode_tokens_per_s")
            if d:  # every weight byte is read once per decode token
                r["weight_GBps"] = weights * d / 1e9
                r["of_copy"] = weights * d / copy if copy else None
            st.md.append(f"| {recipe} | {'yes' if r.get('cuda_graph') else 'no'} | {_fmt(r.get('prompt_tokens_per_s'))} | "
                         f"{_fmt(d)} | {_fmt(1e3 / d if d else None, '.2f')} | {_fmt(r.get('weight_GBps'), '.0f')} | "
                         f"{_fmt(r.get('of_copy'), '.1%')} | {_fmt(r.get('warmup_s'))} | "
                         f"{_fmt((r.get('peak_reserved_bytes') or 0) / 2**30 or None, '.2f')} |"
                         if "error" not in r else f"| {recipe} | {graph} | error: {r['error'][:150]} |||||||")
            st.row(r)
        if _remaining(st, t0) > 20:  # the reference, in its own process (a crash in C stays there)
            code = (f"import sys, json; sys.path.insert(0, {HERE!r}); import gpu_suite; "
                    f"print(json.dumps(gpu_suite.llamacpp_bench({path!r}, {int(p)}, {int(n)})))")
            try:
                out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                                     timeout=_remaining(st, t0), cwd=args.out)
                lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
                lc = json.loads(lines[-1]) if lines else {"error": f"exit {out.returncode}: {out.stderr[-200:]}"}
            except subprocess.TimeoutExpired:
                lc = {"error": "timed out"}
            lc.update(model=recipe, engine="llama.cpp")
            d = lc.get("decode_tokens_per_s")
            st.md.append(f"| {recipe} (llama.cpp, all layers offloaded) | - | {_fmt(lc.get('prompt_tokens_per_s'))} | "
                         f"{_fmt(d)} | {_fmt(1e3 / d if d else None, '.2f')} | | | | |" if d else
                         f"| {recipe} (llama.cpp) | - | {lc['error'][:120]} |||||||")
            st.row(lc)


def stage_kv4k(st: Stage) -> None:
    args, t0 = st.args, time.perf_counter()
    models = _models(args)
    recipe = next(iter(r for r in models if "8b" in r or "tiny" in r))
    ctx = "8" if args.dry_run else "4096"
    n = "2" if args.dry_run else "32"
    st.md = [f"## Decode at a {ctx}-token context per KV cache type ({recipe})", "",
             "| K / V | decode tok/s | prompt tok/s | graph | peak reserved GiB |", "|---|---:|---:|---|---:|"]
    # dry run: the group layout only (~25 s per interpreted call; the decode stage runs f16, and the block
    # layouts' kernels are tests/test_kv_kernels.py's)
    for t in ("q4g",) if args.dry_run else ("f16", "q8_0", "q4_0", "q4g"):
        left = _remaining(st, t0)
        if left < 10:
            st.row({"type": t, "skipped": "stage time used up"})
            continue
        r = cli_bench(st, models[recipe], ["-p", ctx, "-n", n, "-r", "1", "-c", str(int(ctx) + int(n) + 8), "-ctk", t,
                                           "-ctv", t], left)
        r.update(type=t, model=recipe)
        st.md.append(f"| {t} | {_fmt(r.get('decode_tokens_per_s'))} | {_fmt(r.get('prompt_tokens_per_s'))} | "
                     f"{r.get('cuda_graph', '-')} | {_fmt((r.get('peak_reserved_bytes') or 0) / 2**30 or None, '.2f')} |"
                     if "error" not in r else f"| {t} | error: {r['error'][:150]} ||||")
        st.row(r)


def stage_paging(st: Stage) -> None:
    args, t0 = st.args, time.perf_counter()
    env = _env_json(args)
    h2d = (env.get("h2d_pinned_GBps") or 0) * 1e9
    models = _models(args)
    if args.dry_run:
        runs = [(r, None, True, "stream") for r in models]
    else:  # each budget: streaming with the captured CUDA-graph step and with ordinary launches, then
        # the layers that do not fit computed on the CPU, and the cost model's choice (--placement)
        budgets = ["4GiB"] if args.quick else ["4GiB", "6GiB"]
        ways = [(True, "stream"), (False, "stream"), (False, "cpu"), (False, "auto")]
        runs = [(r, b, g, how) for r in models if "smollm2" not in r for b in budgets for g, how in ways]
    st.data["h2d_pinned_GBps"] = h2d / 1e9
    st.md = [f"## Paging under a VRAM budget (-c 4096, K/V q4_0; pinned H2D {h2d / 1e9:.1f} GB/s)", "",
             "| model | --vram | placement | graph | streamed layers | CPU layers | PCIe MiB/token | peak reserved GiB | cap GiB | "
             "prompt tok/s | decode tok/s | predicted | achieved | at PCIe 4.0 x16 | at PCIe 3.0 x8 |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for recipe, budget, graph, how in runs:
        left = _remaining(st, t0)
        if left < 10:
            st.row({"model": recipe, "vram": budget, "skipped": "stage time used up"})
            continue
        extra = (["-p", "8", "-n", "2", "-c", "64"] if args.dry_run else
                 ["-p", "512", "-n", "16" if args.quick else "32", "-c", "4096"]) + ["-ctk", "q4_0", "-ctv", "q4_0",
                                                                                       "-r", "1"]
        if budget:
            extra += ["--vram", budget]
        extra += ["--paged-cuda-graph"] if graph else ["--no-cuda-graph"]  # paged capture: experimental
        extra += ["--placement", how]
        r = cli_bench(st, models[recipe], extra, left)
        r.update(model=recipe, vram=budget, graph_asked=graph, placement=how)
        plan = r.get("plan") or {}
        pcie = plan.get("pcie_bytes_per_token")
        if pcie and h2d:
            r["predicted_decode_tps"] = h2d / pcie
            r["achieved_fraction"] = (r.get("decode_tokens_per_s") or 0) / r["predicted_decode_tps"]
            r["at_rates"] = {k: v / pcie for k, v in PCIE_RATES.items()}
        if plan:
            r["cap_bytes"] = plan["budget_bytes"] - plan["cuda_context_bytes"]
        if "error" in r:
            st.md.append(f"| {recipe} | {budget} | {how} | {graph} | error: {r['error'][:150]} ||||||||||||")
        else:
            at = r.get("at_rates") or {}
            st.md.append(
                f"| {recipe} | {budget or 'none'} | {how} | {r.get('cuda_graph')} | {len(plan.get('streamed_layers', []))} | "
                f"{len(plan.get('cpu_layers', [])) + (plan.get('output_placement') == 'cpu')} | {_fmt((pcie or 0) / 2**20 or None, '.0f')} | "
                f"{_fmt((r.get('peak_reserved_bytes') or 0) / 2**30 or None, '.2f')} | {_fmt((r.get('cap_bytes') or 0) / 2**30 or None, '.2f')} | "
                f"{_fmt(r.get('prompt_tokens_per_s'))} | {_fmt(r.get('decode_tokens_per_s'), '.2f')} | "
                f"{_fmt(r.get('predicted_decode_tps'), '.2f')} | {_fmt(r.get('achieved_fraction'), '.0%')} | "
                f"{_fmt(at.get('PCIe 4.0 x16'), '.2f')} | {_fmt(at.get('PCIe 3.0 x8'), '.2f')} |")
        st.row(r)


# -- driver ----------------------------------------------------------------------------------------
def run_stage(args) -> int:
    st = Stage(args.stage, args)
    st.save()
    globals()[f"stage_{args.stage}"](st)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for <stage>.json / .md / .log and summary.md")
    ap.add_argument("--quick", action="store_true", help="fewer formats, shapes and models (about 4 minutes)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter: control flow only")
    ap.add_argument("--stages", default=",".join(s for s, _, _ in STAGES), help="comma list of stages to run")
    ap.add_argument("--workdir", default=None, help="where synthetic models are written (default: <out>/models)")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every stage's time limit")
    ap.add_argument("--test-files", default=None, help="comma list of test files for the tests stage")
    ap.add_argument("--limit", action="append", default=[], metavar="STAGE=SECONDS",
                    help="override one stage's time limit (repeatable)")
    ap.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    ap.add_argument("--stage-seconds", type=float, default=60, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    sys.path.insert(0, HERE)  # synthetic.py, kernel_speed.py (only when run as the suite)
    os.makedirs(args.out, exist_ok=True)
    args.workdir = args.workdir or os.path.join(args.out, "models")
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    if args.stage:
        return run_stage(args)

    known = {s for s, _, _ in STAGES}
    wanted = args.stages.split(",")
    unknown = [s for s in wanted if s not in known]
    if unknown:
        print(f"gpu_suite: unknown stage(s) {', '.join(unknown)}; stages: {', '.join(known)}", file=sys.stderr)
        return 2
    results = []
    t_all = time.perf_counter()
    limits = {name: (full, quick) for name, full, quick in STAGES}
    for item in args.limit:
        name, _, secs = item.partition("=")
        if name not in limits or not secs.replace(".", "", 1).isdigit():
            print(f"gpu_suite: --limit wants STAGE=SECONDS with a known stage, got '{item}'", file=sys.stderr)
            return 2
        limits[name] = (float(secs), float(secs))
    for name in wanted:  # in the order asked
        full, quick = limits[name]
        limit = (quick if args.quick else full) * args.scale
        if args.dry_run:  # interpreted Triton: about 25 s per CLI call on 2 cores (kv4k makes 2)
            limit = max(limit, 200)
        cmd = [sys.executable, os.path.abspath(__file__), "--stage", name, "--stage-seconds", str(limit),
               "--out", args.out, "--workdir", args.workdir] + (["--quick"] if args.quick else []) + \
              (["--dry-run"] if args.dry_run else []) + (["--test-files", args.test_files] if args.test_files else [])
        t0 = time.perf_counter()
        with open(os.path.join(args.out, f"{name}.log"), "a") as log:
            try:
                rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=limit + 5).returncode
                status = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                status = f"timed out ({limit:.0f} s)"
        secs = time.perf_counter() - t0
        results.append({"stage": name, "status": status, "seconds": secs, "limit": limit})
        print(f"[gpu_suite] {name:8} {status:22} {secs:6.1f} s (limit {limit:.0f})", flush=True)
    write_summary(args, results, time.perf_counter() - t_all)
    return 0 if all(r["status"] == "ok" for r in results) else 1


def write_summary(args, results: list, total: float) -> None:
    env = _env_json(args)
    head = [f"# GPU suite {'(dry run) ' if args.dry_run else ''}{'(quick) ' if args.quick else ''}— "
            f"{env.get('device', '?')}, {env.get('date', time.strftime('%Y-%m-%d'))}",
            "", f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda_runtime')}, "
            f"driver {env.get('nvidia_smi', '-')}; command: `python benchmarks/gpu_suite.py"
            f"{' --quick' if args.quick else ''}{' --dry-run' if args.dry_run else ''} --out DIR`; total {total:.0f} s", "",
            "| stage | status | seconds | limit |", "|---|---|---:|---:|"]
    head += [f"| {r['stage']} | {r['status']} | {r['seconds']:.0f} | {r['limit']:.0f} |" for r in results]
    parts = ["\n".join(head)]
    for r in results:
        md = os.path.join(args.out, f"{r['stage']}.md")
        if os.path.exists(md):
            parts.append(open(md).read().strip())
    text = "\n\n".join(parts) + "\n"
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"results": results, "total_s": total, "env": env}, f, indent=1)
    print("\n" + text)


if __name__ == "__main__":
    sys.exit(main())
