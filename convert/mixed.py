"""`--outtype auto`: measured per-tensor sensitivity and a bit allocation fitted to a size budget.

Sensitivity. For a weight W (rows = output features, n input columns) quantized to Q, with an
importance matrix I (I_j = mean x_j^2 of its calibration inputs, convert/imatrix.py), the expected
squared output error over the calibration inputs is, dropping cross-column terms,

    E(W, Q) = sum_rows sum_j I_j (W_ij - Q(W)_ij)^2

which is comparable across tensors (every tensor's error is measured in its own output space,
and every matmul output feeds the residual stream alike). E is estimated on an evenly spaced
sample of at most `SAMPLE_ROWS` rows, scaled to all rows, for every candidate type valid for the
row length: the registry's records marked `auto` (qkvgguf/quants/): Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
IQ4_NL (32-blocks), Q4_K, Q5_K, Q6_K, Q2_K, Q3_K, IQ4_XS (256-blocks), each quantized by the
registry's selector (importance-weighted where the type has a weighted quantizer and an imatrix is
given). A tensor without statistics (never a matmul input) uses I = 1.

Allocation. Choose one type per tensor minimizing sum E subject to sum bytes <= budget: every
tensor starts at its cheapest type; each tensor's options form a lower convex hull of error
against bytes; repeatedly take the hull step with the largest error reduction per extra byte that
still fits (a greedy on the Lagrangian relaxation, optimal at the hull's breakpoints), then spend
what is left on the best single upgrades that fit. `allocate` is a pure function (unit-tested
against brute force).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Optional

import numpy as np
from gguf import GGMLQuantizationType as T

from qkvgguf.errors import QkvggufError
from qkvgguf.quants import FORMATS, block_sizes, dequantize, quantize

SAMPLE_ROWS = 256


def auto_candidates() -> list[int]:
    """The candidate types of --outtype auto: the registry's records marked `auto`, in registry order."""
    return [t for t, f in FORMATS.items() if f.auto]


class BudgetError(QkvggufError):
    pass


@dataclass(frozen=True)
class Option:
    type: T
    n_bytes: int
    error: float


def candidates(row: int) -> list[int]:
    """The candidate types whose block fits a row of `row` elements."""
    return [t for t in auto_candidates() if row % block_sizes(t)[0] == 0]


def weighted_error(values: np.ndarray, qtype: int, imatrix: Optional[np.ndarray],
                   weights: Optional[np.ndarray] = None) -> float:
    """sum I_j (w - Q(w))^2 over the given rows, Q the registry's quantizer selector (rounding with
    the importance matrix); with `weights` (rows, n), sum weights * (w - Q(w))^2 instead."""
    import torch

    raw = quantize(values, qtype, imatrix)
    back = dequantize(torch.from_numpy(np.ascontiguousarray(raw)), qtype).numpy()
    if weights is None:
        weights = (np.ones(values.shape[1], np.float32) if imatrix is None else imatrix)[None, :]
    return float((((values - back) ** 2) * weights).sum(dtype=np.float64))


def sample_rows(scores: Optional[np.ndarray], n_rows: int, m: int = SAMPLE_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """(rows, weights): m draws, systematic, with probability q_r = (score share + uniform share) / 2,
    folded into unique rows whose weights (multiplicity / (m q_r)) make sum weights * y_r an
    unbiased estimate of sum_r y_r. Without scores: m evenly spaced rows, each weighing n_rows / m."""
    if n_rows <= m:
        return np.arange(n_rows), np.ones(n_rows)
    if scores is None or not np.isfinite(scores).all() or scores.sum() <= 0:
        pick = np.linspace(0, n_rows - 1, m).astype(np.int64)
        return pick, np.full(m, n_rows / m)
    q = 0.5 * scores / scores.sum() + 0.5 / n_rows
    cum = np.cumsum(q)
    draws = np.minimum(np.searchsorted(cum, (np.arange(m) + 0.5) / m * cum[-1]), n_rows - 1)
    rows, mult = np.unique(draws, return_counts=True)
    return rows, mult / (m * q[rows])


def sensitivity(values: np.ndarray, imatrix: Optional[np.ndarray], types: Optional[list[T]] = None,
                fisher=None, name: Optional[str] = None) -> list[Option]:
    """Options (type, bytes of the whole tensor, estimated error) for a 2-D weight `name`.

    With `fisher` (convert/fisher.py) the error is the expected KL divergence per token,
    1/2 sum F_ij (W_ij - Q(W)_ij)^2, estimated on rows sampled in proportion to their Fisher-weighted
    magnitude; without it, the importance-weighted squared error on evenly spaced rows."""
    return measure(*sample(values, imatrix, types, fisher, name))


def sample(values: np.ndarray, imatrix: Optional[np.ndarray], types: Optional[list[T]] = None,
           fisher=None, name: Optional[str] = None) -> tuple:
    """`measure`'s arguments for a 2-D weight: (sampled rows, imatrix, per-element error weights
    or None, scale, [(type, bytes of the whole tensor)])."""
    rows, n = values.shape
    scores = fisher.row_scores(name, values) if fisher is not None else None
    pick, row_w = sample_rows(scores, rows)
    rows_sample = np.ascontiguousarray(values[pick], dtype=np.float32)
    weights = None
    if scores is not None:
        weights = 0.5 * fisher.weights(name, pick) * row_w[:, None].astype(np.float32)
    scale = 1.0 if weights is not None else rows / len(pick)
    sizes = [(t, rows * n // block_sizes(t)[0] * block_sizes(t)[1]) for t in (types or candidates(n))]
    return rows_sample, imatrix, weights, scale, sizes


def measure(rows_sample, imatrix, weights, scale, sizes) -> list[Option]:
    """The options of one weight from `sample`'s output (runs in a worker process)."""
    return [Option(t, n_bytes, scale * weighted_error(rows_sample, t, imatrix, weights)) for t, n_bytes in sizes]


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def measure_all(jobs, total: int, stage=None, workers: Optional[int] = None) -> dict[str, list[Option]]:
    """name -> options for an iterable of (name, `sample` output), measured by `workers` processes
    (default: the CPU cores, at most 8; 1: in this process). At most 2 x workers samples are held at
    once, so memory stays bounded on large models."""
    import collections
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    workers = workers or min(len(os.sched_getaffinity(0)), 8)
    out = {}

    def done(name, options):
        out[name] = options
        if stage:
            stage("measuring", len(out), total)

    if workers <= 1 or total <= 1:
        for name, args in jobs:
            done(name, measure(*args))
        return out
    # spawned, not forked: the parent has run torch's thread pools, which a fork does not survive
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init) as pool:
        pending = collections.deque()
        for name, args in jobs:
            pending.append((name, pool.submit(measure, *args)))
            while len(pending) >= 2 * workers:
                name0, fut = pending.popleft()
                done(name0, fut.result())
        for name0, fut in pending:
            done(name0, fut.result())
    return out


def _hull(options: list[Option]) -> list[Option]:
    """The lower convex hull of (bytes, error), cheapest first, error strictly decreasing."""
    pts = []
    for o in sorted(options, key=lambda o: (o.n_bytes, o.error)):
        if pts and o.error >= pts[-1].error:
            continue  # dominated: more bytes, no less error
        while len(pts) >= 2:
            a, b = pts[-2], pts[-1]
            # b is above the segment a-o: drop it
            if (b.error - a.error) * (o.n_bytes - a.n_bytes) >= (o.error - a.error) * (b.n_bytes - a.n_bytes):
                pts.pop()
            else:
                break
        pts.append(o)
    return pts


def allocate(options: dict[str, list[Option]], budget: int) -> dict[str, Option]:
    """One option per tensor, total bytes <= budget, total error (near) minimal; BudgetError if
    even the cheapest options exceed the budget."""
    hulls = {name: _hull(opts) for name, opts in options.items()}
    choice = {name: 0 for name in hulls}
    used = sum(h[0].n_bytes for h in hulls.values())
    if used > budget:
        raise BudgetError(f"the size budget {budget:,} bytes is below the smallest possible ({used:,} bytes)")
    heap = []

    def push(name):
        h, i = hulls[name], choice[name]
        if i + 1 < len(h):
            gain = (h[i].error - h[i + 1].error) / max(1, h[i + 1].n_bytes - h[i].n_bytes)
            heapq.heappush(heap, (-gain, name, i))

    for name in hulls:
        push(name)
    while heap:
        _, name, i = heapq.heappop(heap)
        h = hulls[name]
        extra = h[i + 1].n_bytes - h[i].n_bytes
        if used + extra <= budget:
            choice[name], used = i + 1, used + extra
            push(name)
    out = {name: hulls[name][i] for name, i in choice.items()}
    # leftover bytes: the best single upgrades (any option, not only hull steps) that fit
    while True:
        best = None
        for name, opts in options.items():
            cur = out[name]
            for o in opts:
                extra = o.n_bytes - cur.n_bytes
                if o.error < cur.error and 0 < extra <= budget - used:
                    gain = (cur.error - o.error) / extra
                    if best is None or gain > best[0]:
                        best = (gain, name, o, extra)
        if best is None:
            return out
        _, name, o, extra = best
        out[name], used = o, used + extra


# -- the converter's side ------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """What `--outtype auto` fits: bits per weight of the file's tensor data, or a VRAM size that must
    hold every weight plus the KV cache at n_ctx with the given types, activations and the CUDA
    context (the runtime planner's accounting, runtime/planner.py)."""

    bpw: Optional[float] = None
    fit_bytes: Optional[int] = None
    n_ctx: int = 4096
    type_k: str = "f16"
    type_v: str = "f16"
    n_batch: int = 512

    def describe(self) -> str:
        if self.bpw is not None:
            return f"bpw={self.bpw:g}"
        return f"fit={self.fit_bytes} ctx={self.n_ctx} ctk={self.type_k} ctv={self.type_v} batch={self.n_batch}"


def model_config(arch) -> "ModelConfig":  # noqa: F821
    """A runtime ModelConfig from the converter's hparams (the accounting needs shapes only)."""
    from qkvgguf.config import ModelConfig

    h = arch.hparams
    return ModelConfig(arch=arch.GGUF_ARCH, n_layer=h.n_layer, n_embd=h.n_embd, n_ff=h.n_ff, n_head=h.n_head,
                       n_head_kv=h.n_head_kv, head_dim=h.head_dim, n_ctx_train=h.n_ctx_train,
                       vocab_size=h.vocab_size, norm_eps=1e-5, rope_base=10000.0, rope_dim=h.head_dim,
                       rope_neox=False)


def reserve_bytes(arch, target: Target) -> int:
    """VRAM a fit target must keep for everything but the weights: KV cache, activations, context."""
    from qkvgguf.kv_types import kv_cache_bytes
    from qkvgguf.runtime.planner import CUDA_CONTEXT_BYTES, activation_bytes

    cfg = model_config(arch)
    return (kv_cache_bytes(cfg, target.n_ctx, target.type_k, target.type_v)
            + activation_bytes(cfg, min(target.n_batch, target.n_ctx), 2) + CUDA_CONTEXT_BYTES)


def _budget(arch, planned, target: Target) -> tuple[int, int, int]:
    """(bytes the quantized tensors may take, bytes of the float tensors, elements of all tensors)."""
    floats = (T.F32, T.F16, T.BF16)
    fixed = sum(p.n_bytes for p in planned if p.type in floats)
    elements = sum(int(np.prod(p.shape)) for p in planned)
    if target.bpw is not None:
        if target.bpw <= 0:
            raise BudgetError(f"--target-bpw must be positive, got {target.bpw}")
        return int(target.bpw * elements / 8) - fixed, fixed, elements
    return target.fit_bytes - reserve_bytes(arch, target) - fixed, fixed, elements


def check_budget(arch, planned, target: Target) -> tuple[int, int, int]:
    """BudgetError unless the target holds every quantized tensor at its cheapest candidate type;
    else `_budget`'s (quantized bytes allowed, float bytes, elements). Needs only shapes, so
    `convert` calls it before calibrating or measuring anything."""
    floats = (T.F32, T.F16, T.BF16)
    budget, fixed, elements = _budget(arch, planned, target)
    smallest = 0
    for p in planned:
        if p.type in floats:
            continue
        n = int(p.shape[-1])
        rows = int(np.prod(p.shape)) // n
        smallest += min(rows * n // block_sizes(t)[0] * block_sizes(t)[1] for t in candidates(n))
    if budget < smallest:
        if target.bpw is not None:
            raise BudgetError(f"--target-bpw {target.bpw:g} is below the smallest possible: "
                              f"{8 * (smallest + fixed) / elements:,.2f} bits per weight")
        raise BudgetError(f"--fit {target.fit_bytes:,} bytes at -c {target.n_ctx} (K {target.type_k}, "
                          f"V {target.type_v}) is below the smallest possible: "
                          f"{int(smallest + fixed + reserve_bytes(arch, target)):,} bytes")
    return budget, fixed, elements


def auto_plan(ckpt, arch, planned, imatrix, target: Target, stage=None, fisher=None):
    """Types for `--outtype auto`: (planned tensors with chosen types, metadata for the file).
    `imatrix` rounds each candidate; `fisher` (convert/fisher.py), when given, measures its error."""
    import dataclasses
    import re

    import torch

    floats = (T.F32, T.F16, T.BF16)
    quant = [p for p in planned if p.type not in floats]
    budget, fixed, elements = check_budget(arch, planned, target)
    def jobs():  # each tensor's rows are sampled here, then measured in the worker processes
        for p in quant:
            values = arch.transform(p.name, ckpt.load(p.hf_name).to(torch.float32)).numpy()
            yield p.name, sample(values.reshape(-1, values.shape[-1]),
                                 imatrix.mean(p.name) if imatrix is not None else None, fisher=fisher, name=p.name)

    options = measure_all(jobs(), len(quant), stage)
    chosen = allocate(options, budget)
    out = []
    for p in planned:
        if p.name in chosen:
            o = chosen[p.name]
            p = dataclasses.replace(p, type=o.type, n_bytes=o.n_bytes, reason=None, rule="auto")
        out.append(p)
    layers: dict[int, list] = {}
    for p in out:
        m = re.match(r"^blk\.(\d+)\.", p.name)
        if m:
            layers.setdefault(int(m[1]), []).append(p)
    layer_bpw = [8.0 * sum(p.n_bytes for p in ps) / sum(int(np.prod(p.shape)) for p in ps)
                 for _, ps in sorted(layers.items())]
    total = sum(p.n_bytes for p in out)
    meta = {
        "qkvgguf.auto.target": target.describe(),
        "qkvgguf.auto.budget_bytes": int(budget + fixed),
        "qkvgguf.auto.bpw": float(8.0 * total / elements),
        "qkvgguf.auto.sensitivity": f"fisher-{fisher.form}" if fisher is not None else "imatrix-weighted",
        "qkvgguf.auto.weighted_error": float(sum(o.error for o in chosen.values())),
        "qkvgguf.auto.calibration": "; ".join(imatrix.datasets) if imatrix is not None and imatrix.datasets else "none",
        "qkvgguf.auto.calibration_chunks": int(imatrix.n_chunks if imatrix is not None else 0),
        "qkvgguf.auto.layer_bpw": [float(x) for x in layer_bpw],
    }
    return out, meta
