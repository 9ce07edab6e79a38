"""VRAM planner: what lives on the GPU under a budget, what streams from host memory, what it costs.

A pure function of (tensor sizes, model shape, budget, context, cache types, batch): no GPU, no
file reads, so every budget from "everything fits" to "too small" is unit-tested on the CPU.

The budget pays for, in this order:

    fixed       KV cache (kv_types.kv_cache_bytes, exact: q4g's f16 sink and tail rows
                included, not just n_ctx times a per-token rate; with --kv-budget the ladder's
                allocation, kv_budget.plan_budget), activations of one prompt batch
                (`activation_bytes`), the CUDA context allowance, and the small tensors every
                step needs (norms, biases: all tensors outside the streaming units)
    staging     when anything streams: two device slots of the largest streamed unit, so unit
                i + 1 is copied in while unit i computes (double buffering; a fixed pool, no
                allocation per token)
    resident    as many streaming units as fit; a unit is one layer's matmul weights, or the
                output matrix

Every matmul weight byte is read once per forward pass, so a resident byte saves one PCIe byte
per decode token wherever it sits: the planner keeps the most bytes resident, trying each
possible largest-streamed-unit size (it sets the staging cost). When anything streams, the token
embedding stays in host memory (a few rows per token are gathered there and copied) unless it is
also the output matrix (tied embeddings); when everything fits it is resident like the rest.

Per decode token, the streamed units cross PCIe once: `pcie_bytes_per_token`. With copies
overlapped with compute, a decode step takes about max(streamed / h2d bandwidth, everything read /
device bandwidth): `predicted_tokens_per_s`. A prompt chunk of T tokens moves the same bytes
once for all T tokens.

A third placement, "computed on the CPU" (`placement="cpu"` or `"auto"`), keeps a unit's weights in
host memory and runs its matmuls there with the CPU kernels (runtime/cpu; the activation row crosses
PCIe, a few KB, instead of the weights); it needs no staging slot. This is llama.cpp's partial
offload, applied per matmul: the layer's attention, norms and KV cache stay on the GPU. Its cost is
the CPU's time to read those weights (`Costs.cpu_bytes_per_s`, per type, measured once per machine
by runtime/machine.py) plus a fixed cost per offloaded matmul (two small copies and a sync), and it
does not overlap with the GPU's work. `placement="auto"` picks, among the plans the budget allows,
the one with the smallest predicted decode step (`Plan.step_seconds`): for each staging size, the
most bytes resident, then each remaining unit streamed or CPU-computed, whichever adds less time.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Iterable, Optional

from qkvgguf.config import ModelConfig
from qkvgguf.errors import QkvggufError
from qkvgguf.kv_budget import plan_budget
from qkvgguf.kv_types import kv_cache_bytes, kv_max_ctx
from qkvgguf.units import format_bytes

ALIGN = 256  # tensors of a streamed unit sit at 256-byte aligned offsets of its slot
CUDA_CONTEXT_BYTES = 512 * 2**20  # driver context, kernel images, allocator slack (0.3-0.5 GiB)
OUTPUT_UNIT = -1  # the unit index of the output matrix
_LAYER = re.compile(r"^blk\.(\d+)\.")
_MATMUL = re.compile(r"\.(attn_q|attn_k|attn_v|attn_output|attn_qkv|ffn_gate|ffn_up|ffn_down)\.weight$")


def packed(sizes) -> tuple[list[int], int]:
    """Offsets of byte blocks packed one after another at ALIGN-byte boundaries, and the total:
    how a streamed unit sits in its slot (paging.py) and resident weights in their arena (weights.py)."""
    offsets, n = [], 0
    for size in sizes:
        offsets.append(n)
        n += -(-size // ALIGN) * ALIGN
    return offsets, n


class BudgetTooSmall(QkvggufError):
    pass


@dataclass(frozen=True)
class TensorSpec:
    name: str
    n_bytes: int
    type: Optional[str] = None  # ggml type name ("Q4_K"): what a CPU matmul over it costs


PLACEMENTS = ("stream", "cpu", "auto")


@dataclass(frozen=True)
class Costs:
    """One machine's bandwidths, as the planner's cost model uses them (bytes per second).

    h2d: pinned host -> device copy; device: device memory read (a decode step reads every resident
    and streamed weight once); cpu: weight bytes per second a one-token CPU matmul of each ggml type
    reads (runtime/cpu kernels, at the run's thread count); cpu_call_s: fixed cost of one offloaded
    matmul (activation to the host and back, a sync). `source` says where the figures come from."""
    h2d_bytes_per_s: float
    device_bytes_per_s: float
    cpu_bytes_per_s: dict = field(default_factory=dict)
    cpu_call_s: float = 40e-6
    source: str = "assumed"

    def cpu_seconds(self, type_name: Optional[str], n_bytes: int) -> float:
        rates = self.cpu_bytes_per_s
        rate = rates.get(type_name) or (min(rates.values()) if rates else 1e9)
        return n_bytes / rate + self.cpu_call_s


DENSE_MIN_M = 64  # from this many rows a GPU matmul dequantizes w to fp16 tiles for cuBLAS ...
DENSE_TILE_BYTES = 32 * 2**20  # ... at most this much at a time (runtime/kernels/qmatmul.py dense_matmul)


def activation_bytes(cfg: ModelConfig, n_batch: int, elt: int = 4) -> int:
    """One layer's intermediates for a batch of n_batch tokens plus the batch's logits:
    residual, norm output, attention output (3 n_embd), q/k/v, gate/up/product (3 n_ff), logits
    (float32); attention is flash-style (no n_ctx x n_ctx scores); and, for batches of at least
    DENSE_MIN_M tokens, the fp16 weight tile the prompt matmul multiplies through cuBLAS."""
    per_token = 3 * cfg.n_embd + cfg.q_dim + 2 * cfg.kv_dim + 3 * cfg.n_ff
    return n_batch * (elt * per_token + 4 * cfg.vocab_size) + (DENSE_TILE_BYTES if n_batch >= DENSE_MIN_M else 0)


def unit_of(name: str, tied: bool) -> Optional[int]:
    """The streaming unit a tensor belongs to: its layer for a layer's matmul weights, OUTPUT_UNIT
    for the output matrix, None for the small always-resident tensors and the host-side embedding."""
    m = _LAYER.match(name)
    if m and _MATMUL.search(name):
        return int(m.group(1))
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        return OUTPUT_UNIT
    return None


@dataclass
class Plan:
    budget: int
    n_ctx: int
    n_batch: int
    type_k: str
    type_v: str
    kv_bytes: int
    activation_bytes: int
    context_bytes: int
    small_bytes: int  # always-resident small tensors
    unit_bytes: dict[int, int]  # unit -> bytes as packed for streaming (256-byte aligned tensors)
    resident_units: list[int] = field(default_factory=list)
    streamed_units: list[int] = field(default_factory=list)
    host_tensors: list[str] = field(default_factory=list)  # the untied embedding: rows gathered on the host
    unit_raw: dict[int, int] = field(default_factory=dict)  # unit -> bytes as stored (resident: no padding)
    cpu_units: list[int] = field(default_factory=list)  # computed on the CPU from host memory
    unit_cpu_s: dict[int, float] = field(default_factory=dict)  # unit -> its CPU matmuls' seconds (Costs)
    costs: Optional[Costs] = None  # the cost model the plan was chosen with (placement "cpu"/"auto")

    @property
    def staging_bytes(self) -> int:
        return 2 * max((self.unit_bytes[u] for u in self.streamed_units), default=0)

    @property
    def resident_weight_bytes(self) -> int:
        raw = self.unit_raw or self.unit_bytes
        return self.small_bytes + sum(raw[u] for u in self.resident_units)

    @property
    def total_bytes(self) -> int:
        return (self.kv_bytes + self.activation_bytes + self.context_bytes + self.resident_weight_bytes
                + self.staging_bytes)

    @property
    def pcie_bytes_per_token(self) -> int:
        return sum(self.unit_bytes[u] for u in self.streamed_units)

    @property
    def all_resident(self) -> bool:
        return not self.streamed_units and not self.cpu_units

    @property
    def cpu_bytes_per_token(self) -> int:
        """Weight bytes the CPU reads per decode token (the CPU-computed units, as stored)."""
        raw = self.unit_raw or self.unit_bytes
        return sum(raw[u] for u in self.cpu_units)

    def step_seconds(self, costs: Costs) -> float:
        """Predicted decode step: the GPU's reads (resident and streamed weights, the whole cache)
        overlapped with the streamed units' copies, then the CPU-computed units' matmuls."""
        raw = self.unit_raw or self.unit_bytes
        device_read = (self.small_bytes + self.kv_bytes + sum(raw[u] for u in self.resident_units)
                       + sum(self.unit_bytes[u] for u in self.streamed_units))
        gpu = device_read / costs.device_bytes_per_s
        pcie = self.pcie_bytes_per_token / costs.h2d_bytes_per_s
        cpu = sum(self.unit_cpu_s.get(u, costs.cpu_seconds(None, raw[u])) for u in self.cpu_units)
        return max(gpu, pcie) + cpu

    def predicted_tokens_per_s(self, h2d_bytes_per_s: float, device_bytes_per_s: Optional[float] = None) -> float:
        """Decode bound: streamed bytes over the host-to-device link, overlapped with the device reading
        every weight and the cache (when its bandwidth is given)."""
        t = self.pcie_bytes_per_token / h2d_bytes_per_s
        if device_bytes_per_s:
            t = max(t, (sum(self.unit_bytes.values()) + self.small_bytes + self.kv_bytes) / device_bytes_per_s)
        return float("inf") if t == 0 else 1.0 / t

    def summary(self) -> dict:
        return {
            "budget_bytes": self.budget, "total_bytes": self.total_bytes, "n_ctx": self.n_ctx,
            "n_batch": self.n_batch, "type_k": self.type_k, "type_v": self.type_v,
            "kv_bytes": self.kv_bytes, "activation_bytes": self.activation_bytes,
            "cuda_context_bytes": self.context_bytes, "resident_weight_bytes": self.resident_weight_bytes,
            "staging_bytes": self.staging_bytes, "streamed_bytes": self.pcie_bytes_per_token,
            "resident_layers": sorted(u for u in self.resident_units if u != OUTPUT_UNIT),
            "streamed_layers": sorted(u for u in self.streamed_units if u != OUTPUT_UNIT),
            "output_resident": OUTPUT_UNIT in self.resident_units, "host_tensors": self.host_tensors,
            "pcie_bytes_per_token": self.pcie_bytes_per_token,
            "cpu_layers": sorted(u for u in self.cpu_units if u != OUTPUT_UNIT),
            "output_placement": ("resident" if OUTPUT_UNIT in self.resident_units else
                                 "cpu" if OUTPUT_UNIT in self.cpu_units else "streamed"),
            "cpu_bytes_per_token": self.cpu_bytes_per_token,
            "predicted_tokens_per_s": None if self.costs is None else 1.0 / self.step_seconds(self.costs),
            "costs_source": None if self.costs is None else self.costs.source,
        }


def kv_bytes(cfg: ModelConfig, n_ctx: int, type_k: str, type_v: str, kv_budget: Optional[int] = None) -> int:
    """What the cache allocates: the K/V types' exact bytes, or with a --kv-budget the ladder's
    allocation (the schedule's, <= the budget; -ctk/-ctv are then ignored, as by the cache)."""
    if kv_budget is not None:
        return plan_budget(cfg, n_ctx, kv_budget).n_bytes
    return kv_cache_bytes(cfg, n_ctx, type_k, type_v)


def _fixed(tensors, cfg, n_ctx, type_k, type_v, n_batch, act_elt, context_bytes, n_seq=1, kv_budget=None):
    tied = not any(t.name == "output.weight" for t in tensors)
    units: dict[int, int] = {}
    raw: dict[int, int] = {}
    small, host = 0, []
    for t in tensors:
        u = unit_of(t.name, tied)
        if u is not None:  # packed for streaming at 256-byte aligned offsets (paging.ALIGN)
            units[u] = units.get(u, 0) + packed([t.n_bytes])[1]
            raw[u] = raw.get(u, 0) + t.n_bytes
        elif t.name == "token_embd.weight":
            host.append(t.name)
        else:
            small += t.n_bytes
    kv = n_seq * kv_bytes(cfg, n_ctx, type_k, type_v, kv_budget)  # one cache per sequence (serve --parallel)
    act = activation_bytes(cfg, min(n_batch, n_ctx), act_elt)
    return units, raw, small, host, kv, act


def _spread(u: int) -> int:
    """Tie-break among equal-sized units: layers in bit-reversed index order (0, 16, 8, 24, 4, ...),
    so the layers kept resident, and those left to stream, are spread through the model instead of
    the last ones all streaming. A streamed layer's copy then runs while the resident layers before
    it compute (the slot pool prefetches one streamed unit ahead), rather than back to back at the
    end of the pass. The bytes, and so the plan's totals and PCIe traffic, do not change."""
    return int(f"{u:016b}"[::-1], 2) if u >= 0 else -1


def plan(tensors: Iterable[TensorSpec], cfg: ModelConfig, budget: Optional[int], n_ctx: int,
         type_k: str = "f16", type_v: str = "f16", n_batch: int = 512, act_elt: int = 2,
         context_bytes: int = CUDA_CONTEXT_BYTES, source: str = "the model",
         n_gpu_layers: Optional[int] = None, placement: str = "stream", costs: Optional[Costs] = None,
         n_seq: int = 1, kv_budget: Optional[int] = None) -> Plan:
    """The plan with the fewest streamed bytes whose total is <= budget (None: unlimited, all
    resident). BudgetTooSmall (one line, with the minimum) when not even streaming fits.

    placement: what happens to the units that do not fit: "stream" (through two device slots),
    "cpu" (computed on the CPU from host memory, no slots), or "auto" (per unit, whichever the cost
    model `costs` predicts faster; costs required). "cpu" and "auto" keep as many bytes resident as
    the budget allows, like "stream".

    n_gpu_layers (llama.cpp's -ngl): the first N layers resident and every other layer streamed
    (placement "stream") or CPU-computed (placement "cpu", exactly llama.cpp's partial offload),
    the output matrix resident only when N > n_layer (as llama.cpp counts it), instead of the
    planner's own choice; BudgetTooSmall when those do not fit.
    n_seq: sequences decoded together, each with its own n_ctx-token KV cache (`serve --parallel`).
    kv_budget (--kv-budget bytes): the cache is the adaptive ladder (qkvgguf/kv_budget.py) and the plan
    pays its allocation."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {', '.join(PLACEMENTS)}, not {placement!r}")
    if placement == "auto" and costs is None:
        raise ValueError("placement 'auto' needs the machine's costs (runtime/machine.py)")
    tensors = list(tensors)
    units, raw, small, host, kv, act = _fixed(tensors, cfg, n_ctx, type_k, type_v, n_batch, act_elt, context_bytes,
                                              n_seq, kv_budget)
    order = sorted(units, key=lambda u: (u == OUTPUT_UNIT, u))
    host_bytes = sum(t.n_bytes for t in tensors if t.name in host)
    everything = Plan(0, n_ctx, min(n_batch, n_ctx), type_k, type_v, kv, act, context_bytes, small + host_bytes,
                      units, resident_units=order, unit_raw=raw)  # all resident, the embedding too
    cpu_s = _unit_cpu_seconds(tensors, costs) if costs is not None else {}
    if n_gpu_layers is not None and n_gpu_layers <= cfg.n_layer:
        p = _forced(everything, order, small, host, n_gpu_layers, budget, source, placement == "cpu")
        p.unit_cpu_s, p.costs = cpu_s, costs
        return p
    if budget is None or everything.total_bytes <= budget:
        everything.budget = budget if budget is not None else everything.total_bytes
        everything.unit_cpu_s, everything.costs = cpu_s, costs
        return everything
    if placement == "cpu":
        return _hybrid(everything, order, small, host, budget, placement, costs, cpu_s, source)
    if placement == "auto":  # the hybrid search, or plain streaming if the model predicts it faster
        best = _hybrid(everything, order, small, host, budget, placement, costs, cpu_s, source)
        try:
            streaming = _streaming(tensors, cfg, everything, order, small, host, budget, source, act_elt, n_seq, kv_budget)
        except BudgetTooSmall:
            return best
        streaming.unit_cpu_s, streaming.costs = cpu_s, costs
        return min(best, streaming, key=lambda p: p.step_seconds(costs))
    p = _streaming(tensors, cfg, everything, order, small, host, budget, source, act_elt, n_seq, kv_budget)
    p.unit_cpu_s, p.costs = cpu_s, costs
    return p


def _streaming(tensors, cfg, everything: Plan, order: list[int], small: int, host: list[str], budget: int,
               source: str, act_elt: int, n_seq: int = 1,
               kv_budget: Optional[int] = None) -> Plan:
    """Placement "stream": the fewest streamed bytes within budget."""
    e = everything
    units, raw, kv, act, context_bytes = e.unit_bytes, e.unit_raw, e.kv_bytes, e.activation_bytes, e.context_bytes
    n_ctx, type_k, type_v = e.n_ctx, e.type_k, e.type_v
    need = minimum_budget(tensors, cfg, n_ctx, type_k, type_v, e.n_batch, act_elt, context_bytes, n_seq, kv_budget)
    if budget < need:
        cache = f"--kv-budget {format_bytes(kv_budget)}" if kv_budget is not None else f"K {type_k} V {type_v}"
        raise BudgetTooSmall(
            f"{source} does not fit in {format_bytes(budget)}: it needs at least {format_bytes(need)} "
            f"(KV cache {format_bytes(kv)} at {n_ctx:,} tokens{f' x {n_seq} sequences' if n_seq > 1 else ''} "
            f"{cache}, activations "
            f"{format_bytes(act)}, CUDA context {format_bytes(context_bytes)}, two slots of the largest layer)")
    best = None
    for m in sorted(set(units.values())):  # m: the largest streamed unit's size
        room = budget - (kv + act + context_bytes + small) - 2 * m
        must = [u for u in order if units[u] > m]  # too big to stream with slots of m
        room -= sum(units[u] for u in must)
        if room < 0:
            continue
        resident = list(must)
        for u in sorted((u for u in order if units[u] <= m), key=lambda u: (-units[u], _spread(u))):
            if units[u] <= room:
                resident.append(u)
                room -= units[u]
        streamed = [u for u in order if u not in resident]
        if not streamed:
            continue
        cand = Plan(budget, n_ctx, e.n_batch, type_k, type_v, kv, act, context_bytes, small, units,
                    sorted(resident, key=order.index), streamed, host, raw)
        if cand.total_bytes <= budget and (best is None or cand.pcie_bytes_per_token < best.pcie_bytes_per_token):
            best = cand
    assert best is not None  # budget >= minimum guarantees the all-streamed plan
    return best


def _forced(everything: Plan, order: list[int], small: int, host: list[str], n_gpu_layers: int,
            budget: Optional[int], source: str, on_cpu: bool = False) -> Plan:
    """`-ngl N`: layers [0, N) resident, the rest (the output matrix included) streamed, or computed
    on the CPU when on_cpu."""
    e = everything
    resident = [u for u in order if u != OUTPUT_UNIT and u < n_gpu_layers]
    rest = [u for u in order if u not in resident]
    p = Plan(0, e.n_ctx, e.n_batch, e.type_k, e.type_v, e.kv_bytes, e.activation_bytes, e.context_bytes, small,
             e.unit_bytes, resident, [] if on_cpu else rest, host, e.unit_raw, cpu_units=rest if on_cpu else [])
    if budget is not None and p.total_bytes > budget:
        raise BudgetTooSmall(
            f"{source}: -ngl {n_gpu_layers} needs {format_bytes(p.total_bytes)} (the first {n_gpu_layers} layers "
            f"resident, the rest {'on the CPU' if on_cpu else 'streamed'}), more than {format_bytes(budget)}; "
            "use a smaller -ngl or leave it out")
    p.budget = budget if budget is not None else p.total_bytes
    return p


def _unit_cpu_seconds(tensors: list[TensorSpec], costs: Costs) -> dict[int, float]:
    """Each unit's CPU time per decode token under `costs`: its matmuls' bytes at their types' rates."""
    tied = not any(t.name == "output.weight" for t in tensors)
    out: dict[int, float] = {}
    for t in tensors:
        u = unit_of(t.name, tied)
        if u is not None:
            out[u] = out.get(u, 0.0) + costs.cpu_seconds(t.type, t.n_bytes)
    return out


def _hybrid(everything: Plan, order: list[int], small: int, host: list[str], budget: int, placement: str,
            costs: Optional[Costs], cpu_s: dict[int, float], source: str) -> Plan:
    """Placement "cpu" or "auto" under a budget everything does not fit.

    For each staging size m (0: nothing streams, so no slots): the most bytes resident (largest
    units first, spread through the model as in "stream"), then each remaining unit, largest first,
    streamed (only if it fits a slot of m) or computed on the CPU, whichever adds less to the
    predicted step (`Plan.step_seconds`). "cpu" allows m = 0 only. Smallest predicted step wins;
    without costs (placement "cpu"), the most resident bytes."""
    e = everything
    units = e.unit_bytes
    fixed = e.kv_bytes + e.activation_bytes + e.context_bytes + small
    if budget < fixed:
        raise BudgetTooSmall(
            f"{source} does not fit in {format_bytes(budget)}: it needs at least {format_bytes(fixed)} "
            f"(KV cache {format_bytes(e.kv_bytes)} at {e.n_ctx:,} tokens K {e.type_k} V {e.type_v}, activations "
            f"{format_bytes(e.activation_bytes)}, CUDA context {format_bytes(e.context_bytes)}, the small tensors)")
    sizes = [0] + (sorted(set(units.values())) if placement == "auto" else [])
    best, best_key = None, None
    for m in sizes:
        room = budget - fixed - 2 * m
        if room < 0:
            continue
        resident = []
        for u in sorted(order, key=lambda u: (-units[u], _spread(u))):
            if units[u] <= room:
                resident.append(u)
                room -= units[u]
        cand = Plan(budget, e.n_ctx, e.n_batch, e.type_k, e.type_v, e.kv_bytes, e.activation_bytes,
                    e.context_bytes, small, units, sorted(resident, key=order.index), [], host, e.unit_raw,
                    unit_cpu_s=cpu_s, costs=costs)
        for u in sorted((u for u in order if u not in resident), key=lambda u: (-units[u], _spread(u))):
            if costs is not None and units[u] <= m:
                as_stream = dataclasses.replace(cand, streamed_units=cand.streamed_units + [u])
                as_cpu = dataclasses.replace(cand, cpu_units=cand.cpu_units + [u])
                cand = min(as_stream, as_cpu, key=lambda p: p.step_seconds(costs))
            else:
                cand.cpu_units.append(u)
        if m and not cand.streamed_units:
            continue  # slots for nothing: the m = 0 plan holds more
        cand.streamed_units.sort(key=order.index)
        cand.cpu_units.sort(key=order.index)
        key = cand.step_seconds(costs) if costs is not None else -cand.resident_weight_bytes
        if cand.total_bytes <= budget and (best is None or key < best_key):
            best, best_key = cand, key
    assert best is not None  # budget >= fixed admits the plan with everything on the CPU
    return best


def minimum_budget(tensors: Iterable[TensorSpec], cfg: ModelConfig, n_ctx: int, type_k: str = "f16",
                   type_v: str = "f16", n_batch: int = 512, act_elt: int = 2,
                   context_bytes: int = CUDA_CONTEXT_BYTES, n_seq: int = 1,
                   kv_budget: Optional[int] = None) -> int:
    """The smallest budget that runs at all: everything streams through two slots of the largest unit."""
    units, _, small, _, kv, act = _fixed(list(tensors), cfg, n_ctx, type_k, type_v, n_batch, act_elt, context_bytes,
                                         n_seq, kv_budget)
    return kv + act + context_bytes + small + 2 * max(units.values(), default=0)


def full_residency_bytes(tensors: Iterable[TensorSpec], cfg: ModelConfig, n_ctx: int, type_k: str = "f16",
                         type_v: str = "f16", n_batch: int = 512, act_elt: int = 2,
                         context_bytes: int = CUDA_CONTEXT_BYTES, kv_budget: Optional[int] = None) -> int:
    """VRAM needed with every weight resident (what `convert --fit` must stay under)."""
    return plan(tensors, cfg, None, n_ctx, type_k, type_v, n_batch, act_elt, context_bytes,
                kv_budget=kv_budget).total_bytes


def max_resident_ctx(tensors: Iterable[TensorSpec], cfg: ModelConfig, budget: int, type_k: str = "f16",
                     type_v: str = "f16", n_batch: int = 512, act_elt: int = 2,
                     context_bytes: int = CUDA_CONTEXT_BYTES, limit: Optional[int] = None) -> int:
    """The longest context (<= limit) at which every weight is resident within budget; 0 if none.

    From n_batch tokens on, only the cache grows, so the cache's room is solved exactly by
    kv_types.kv_max_ctx (q4g's/q3g's fixed rows counted). Shorter contexts also shrink the prompt
    batch, hence the activations: below n_batch the plan totals are bisected instead."""

    tensors = list(tensors)

    def total(n):
        return full_residency_bytes(tensors, cfg, n, type_k, type_v, n_batch, act_elt, context_bytes)

    rest = total(n_batch) - kv_cache_bytes(cfg, n_batch, type_k, type_v)  # weights, context, a full batch
    n = kv_max_ctx(cfg, budget - rest, type_k, type_v)
    if n < n_batch:  # totals never fall as n grows: the largest n < n_batch within budget
        lo, hi = -1, n_batch
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if total(mid) <= budget else (lo, mid)
        n = max(lo, 0)
    return n if limit is None else min(n, limit)


def specs_of(gguf) -> list[TensorSpec]:
    """TensorSpecs of a GGUFFile (sizes as stored: the kernels read the quantized bytes in place)."""
    return [TensorSpec(name, info.n_bytes, info.type.name) for name, info in gguf.tensors.items()]
