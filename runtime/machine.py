"""This machine's bandwidths for the VRAM planner's cost model, measured once and cached.

    costs(device, types, threads) -> planner.Costs

What is measured (each the best of a few repetitions, after a warm-up):

    h2d      a 256 MiB pinned host buffer copied to the device (what a streamed unit's copy is)
    device   a 256 MiB device-to-device copy, read + write bytes over the time: the rate at which
             a decode step can read resident weights
    cpu      per ggml type, a one-token CPU matmul (runtime/cpu kernels, `threads` threads) over a
             2048 x 4096 matrix of quantized Gaussian blocks: weight bytes read per second (a
             type without a CPU kernel is timed on the torch path it would take).

The results go to a JSON file (default ~/.cache/qkvgguf/machine.json, or $QKVGGUF_MACHINE_FILE) under a
key naming the GPU, the CPU count, the thread count and torch's version, so a second run of any
command reads them instead of measuring (about a second per type the first time). Only these
numbers are read back (plain JSON, no code). `ASSUMED` is what a prediction without a measurement
uses (`inspect --vram` on a machine without the GPU in question) and says so.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Iterable, Optional

import numpy as np
import torch

from .planner import Costs

log = logging.getLogger(__name__)

# A 4 GB laptop card on PCIe 4.0 x8 (RTX 3050 Laptop: 192 GB/s memory; ~12 GB/s measured copies)
# and a CPU whose quantized matmuls read ~10 GB/s: labelled "assumed" wherever shown.
ASSUMED = Costs(h2d_bytes_per_s=12e9, device_bytes_per_s=160e9, cpu_bytes_per_s={}, source="assumed")
_ASSUMED_CPU_RATE = 10e9

_MIB = 2**20


def _cache_file() -> str:
    return os.environ.get("QKVGGUF_MACHINE_FILE") or os.path.join(
        os.path.expanduser("~"), ".cache", "qkvgguf", "machine.json")


def _key(device: torch.device, threads: int) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    return f"{gpu}|cpus={os.cpu_count()}|threads={threads}|torch={torch.__version__}"


def _load() -> dict:
    try:
        with open(_cache_file()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save(data: dict) -> None:
    path = _cache_file()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home: measure again next time
        log.warning("could not cache the machine's bandwidths in %s: %s", path, e)


def _best_seconds(fn, reps: int = 5) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_h2d(device: torch.device, n_bytes: int = 256 * _MIB) -> float:
    src = torch.empty(n_bytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(n_bytes, dtype=torch.uint8, device=device)

    def copy():
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(device)

    return n_bytes / _best_seconds(copy)


def measure_device(device: torch.device, n_bytes: int = 256 * _MIB) -> float:
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)

    def copy():
        dst.copy_(src)
        torch.cuda.synchronize(device)

    return 2 * n_bytes / _best_seconds(copy)


def measure_cpu(type_name: str, rows: int = 2048, cols: int = 4096) -> Optional[float]:
    """Weight bytes per second of a one-token CPU matmul of this ggml type, as a CPU-computed unit runs it
    (ops.host_linear: the compiled kernel, or the torch path for a type it lacks); None when the row
    length does not hold the type's blocks."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    from .weights import QTensor

    from qkvgguf.errors import QkvggufError
    from qkvgguf.quants import quantize

    qtype = GGMLQuantizationType[type_name]
    block, size = GGML_QUANT_SIZES[qtype]
    if cols % block:
        return None
    # real blocks (random bytes would hold subnormal and NaN f16 scales, which slow float code down):
    # 64 quantized Gaussian rows, tiled to `rows`
    values = np.random.default_rng(0).standard_normal((64, cols), dtype=np.float32) * 0.02
    try:
        blocks = np.asarray(quantize(values, qtype, None), dtype=np.uint8).reshape(64, -1)
    except QkvggufError:
        import gguf.quants

        blocks = np.asarray(gguf.quants.quantize(values, qtype), dtype=np.uint8).reshape(64, -1)
    raw = torch.from_numpy(np.ascontiguousarray(np.tile(blocks, (rows // 64, 1))))
    w = QTensor("probe", qtype, (rows, cols), raw)
    x = torch.randn(1, cols)
    from .ops import host_linear

    class _One:  # the Weights interface host_linear reads: one tensor, no cache
        cpu_computed = {"probe"}

        def __getitem__(self, name):
            return w

        def dense(self, name):
            return w.dequantize()

    return raw.numel() / _best_seconds(lambda: host_linear(x, _One(), "probe"), reps=3)


def costs(device: torch.device | str, types: Iterable[str] = (), threads: Optional[int] = None,
          measure: bool = True) -> Costs:
    """The cost model of this machine for `device`, with CPU rates for `types` (ggml type names):
    read from the cache file, measured (and cached) where missing. measure=False: only what is
    cached, the assumed figures elsewhere (source says which)."""
    device = torch.device(device)
    threads = threads or torch.get_num_threads()
    data = _load()
    key = _key(device, threads)
    entry = data.get(key) if isinstance(data.get(key), dict) else {}
    changed = False
    if measure and device.type == "cuda" and not {"h2d", "device"} <= entry.keys():
        entry["h2d"], entry["device"] = measure_h2d(device), measure_device(device)
        changed = True
    rates = entry.get("cpu") if isinstance(entry.get("cpu"), dict) else {}
    for t in sorted(set(types)):
        if t not in rates and measure:
            rates[t] = measure_cpu(t)
            changed = True
    entry["cpu"] = rates
    if changed:
        data[key] = entry
        _save(data)
        log.info("measured this machine's bandwidths (cached in %s): %s", _cache_file(), entry)
    measured = "h2d" in entry
    cpu_rates = {t: float(r) for t, r in rates.items() if isinstance(r, (int, float)) and r > 0}
    for t in types:
        cpu_rates.setdefault(t, _ASSUMED_CPU_RATE if not cpu_rates else min(cpu_rates.values()))
    return Costs(h2d_bytes_per_s=float(entry["h2d"]) if measured else ASSUMED.h2d_bytes_per_s,
                 device_bytes_per_s=float(entry["device"]) if measured else ASSUMED.device_bytes_per_s,
                 cpu_bytes_per_s=cpu_rates,
                 source=("measured on this machine" if measured else "assumed GPU figures")
                 + (f", CPU at {threads} threads" + (" measured" if rates else " assumed")))
