"""inspect --vram SIZE: the VRAM plan for this file (runtime/planner.py), as data and as text.

    total = resident weights + staging slots + KV cache + activations + CUDA context

- weights: tensor bytes as stored (the kernels read quantized weights in place); when the whole
  model does not fit, the planner streams layers from host memory through two device slots of the
  largest streamed layer and says how many bytes cross PCIe per decode token;
- KV cache: `kv_types.kv_cache_bytes(cfg, n_ctx, type_k, type_v)`, exact: a fixed part
  (q4g's/q3g's f16 sinks and q8_0 newest group) plus a rate per token (`kv_layout_bytes`), and the
  bits per value that makes at this context (for SmolLM2 q4g 4.82 at 512, 4.49 at 2048);
- with `--kv-budget SIZE` the cache is the adaptive ladder (qkvgguf/kv_budget.py): its allocation
  (<= SIZE), the bits per value it makes at this context, and its schedule (which context lengths
  run at which precision: `Schedule.lines`);
- activations: `planner.activation_bytes` for a batch of `n_batch` prompt tokens (float16
  intermediates on the GPU, float32 logits);
- CUDA context: a fixed allowance of 0.5 GiB (`CUDA_CONTEXT_BYTES`).

The verdict: "fits" (everything resident), "streams" (a plan within SIZE that pages layers), or
"does not fit" with the minimum SIZE that runs; `max_ctx` is the longest context with everything
resident (capped at the model's training context), solved with the cache's fixed part and rate
(`planner.max_resident_ctx`): dividing the room by the rate alone overstates it for q4g.
"""

from __future__ import annotations

from typing import Optional

from ..config import ModelConfig
from ..errors import QkvggufError
from ..gguf_file import GGUFFile
from ..kv_budget import plan_budget
from ..kv_types import kv_bits_per_value, kv_bytes_per_token, kv_layout_bytes
from ..runtime.planner import PLACEMENTS, BudgetTooSmall, Costs, max_resident_ctx, minimum_budget, plan, specs_of, unit_of
from ..units import format_bytes

DEFAULT_CACHE_TYPE = "f16"  # the default of kv_bytes_per_token and of llama.cpp's -ctk/-ctv
DEFAULT_BATCH = 512  # as `run -b`


def _costs(gguf: GGUFFile, specs) -> Costs:
    """The cost model `run` would plan with on this machine: its cached measurement (runtime/machine.py)
    where one exists, the labelled assumed figures elsewhere; inspect itself never measures."""
    import torch

    from ..runtime import machine

    tied = "output.weight" not in gguf.tensors
    types = {t.type for t in specs if unit_of(t.name, tied) is not None}
    return machine.costs("cuda" if torch.cuda.is_available() else "cpu", types, measure=False)


def estimate(gguf: GGUFFile, vram: Optional[int], n_ctx: Optional[int] = None, type_k: str = DEFAULT_CACHE_TYPE,
             type_v: str = DEFAULT_CACHE_TYPE, n_batch: int = DEFAULT_BATCH, kv_budget: Optional[int] = None) -> dict:
    """The memory estimate as plain data; `vram` None gives the sizes without a verdict; kv_budget
    (bytes): the --kv-budget cache instead of type_k/type_v."""
    cfg = ModelConfig.from_gguf(gguf)
    if n_ctx is None:
        n_ctx = min(4096, cfg.n_ctx_train)
    elif n_ctx == 0:
        n_ctx = cfg.n_ctx_train
    if n_ctx < 0:
        raise QkvggufError(f"-c/--ctx-size must be positive, got {n_ctx}")
    if n_ctx > cfg.n_ctx_train:
        raise QkvggufError(f"{gguf.path}: -c {n_ctx} is larger than the model's context length {cfg.n_ctx_train}")
    if n_batch < 1:
        raise QkvggufError(f"-b/--batch-size must be at least 1, got {n_batch}")
    for t in dict.fromkeys((type_k, type_v)):  # name the bad type, whichever way the accounting refuses it
        try:
            kv_bytes_per_token(cfg, t, t)
        except (KeyError, ValueError):
            raise QkvggufError(f"cache type '{t}' is not known to the KV accounting (qkvgguf/kv_types.py)") from None
    fixed, per_token = kv_layout_bytes(cfg, n_ctx, type_k, type_v)
    schedule = plan_budget(cfg, n_ctx, kv_budget) if kv_budget is not None else None
    if schedule is not None:
        type_k = type_v = "budget"
        fixed, per_token = schedule.n_bytes, 0
    kw = dict(kv_budget=kv_budget)
    specs = specs_of(gguf)
    full = plan(specs, cfg, None, n_ctx, type_k, type_v, n_batch, **kw)
    weights = gguf.tensor_data_bytes
    out = {
        "estimate": False,
        "note": "the runtime's plan (runtime/planner.py)",
        "n_ctx": n_ctx, "n_batch": full.n_batch, "type_k": type_k, "type_v": type_v,
        "weights_bytes": weights,
        "kv_bytes_per_token": per_token,
        "kv_fixed_bytes": fixed,
        "kv_bytes": full.kv_bytes,
        "kv_bits_per_value": (full.kv_bytes * 8 / (2 * cfg.n_layer * cfg.n_head_kv * n_ctx * cfg.head_dim)
                              if schedule is not None else kv_bits_per_value(cfg, n_ctx, type_k, type_v)) if n_ctx else None,
        "activation_bytes": full.activation_bytes,
        "cuda_context_bytes": full.context_bytes,
        "total_bytes": full.total_bytes,
        "vram_bytes": vram,
        "minimum_bytes": minimum_budget(specs, cfg, n_ctx, type_k, type_v, n_batch, **kw),
        # with every layer computed on the CPU: the cache, activations, context and small tensors only
        "minimum_bytes_cpu": full.kv_bytes + full.activation_bytes + full.context_bytes
        + plan(specs, cfg, full.total_bytes - 1, n_ctx, type_k, type_v, n_batch, placement="cpu", **kw).small_bytes
        if full.total_bytes > 1 else full.total_bytes,
    }
    if schedule is not None:
        out["kv_budget"] = {"budget_bytes": kv_budget, "cache_bytes": schedule.n_bytes,
                            "groups_q8_0_q4g_q3g": list(schedule.groups), "schedule": schedule.lines()}
    if vram is not None:
        out["fits"] = full.total_bytes <= vram
        out["headroom_bytes"] = vram - full.total_bytes
        out["max_ctx"] = (max_resident_ctx(specs, cfg, vram, type_k, type_v, n_batch, limit=cfg.n_ctx_train)
                          if schedule is None else _budget_max_ctx(specs, cfg, vram, kv_budget, n_batch))
        costs = _costs(gguf, specs)
        out["costs"] = {"h2d_bytes_per_s": costs.h2d_bytes_per_s, "device_bytes_per_s": costs.device_bytes_per_s,
                        "cpu_bytes_per_s": costs.cpu_bytes_per_s, "source": costs.source}
        out["placements"] = {}
        for how in PLACEMENTS:  # what each choice for the units that do not fit would give
            try:
                out["placements"][how] = plan(specs, cfg, vram, n_ctx, type_k, type_v, n_batch, source=gguf.path,
                                              placement=how, costs=costs, **kw).summary()
            except BudgetTooSmall:
                out["placements"][how] = None
        out["plan"] = out["placements"]["auto"]  # what `run --vram` does by default (--placement auto)
    return out


def _budget_max_ctx(specs, cfg: ModelConfig, vram: int, kv_budget: int, n_batch: int) -> int:
    """With --kv-budget: the longest context (<= the model's) the ladder holds within kv_budget (its
    oldest groups at 3 bits) with every weight resident in vram; 0 if none. Bisected: the budget
    cache's bytes never exceed kv_budget, and whether the ladder holds n tokens is monotone in n."""
    def fits(n: int) -> bool:
        try:
            return plan(specs, cfg, None, n, "f16", "f16", n_batch, kv_budget=kv_budget).total_bytes <= vram
        except QkvggufError:  # the ladder cannot hold n tokens within kv_budget
            return False

    lo, hi = 0, cfg.n_ctx_train + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def render_memory(m: dict) -> str:
    rows = [
        ("weights", m["weights_bytes"], "tensor data as stored (all resident)"),
        ("KV cache", m["kv_bytes"], _kv_line(m)),
        ("activations", m["activation_bytes"], f"one layer (float16) + logits (float32) for a batch of {m['n_batch']} tokens"),
        ("CUDA context", m["cuda_context_bytes"], "fixed allowance"),
    ]
    out = [f"memory ({m['note']}):"]
    for label, n, what in rows:
        out.append(f"  {label:<13} {format_bytes(n):>11}  {what}")
    if "kv_budget" in m:
        out += [f"  {'':<13} {'':>11}  {line}" for line in m["kv_budget"]["schedule"]]
    out.append(f"  {'total':<13} {format_bytes(m['total_bytes']):>11}")
    if m["vram_bytes"] is not None:
        p, vram = m.get("plan"), format_bytes(m["vram_bytes"])
        if m["fits"]:
            out.append(f"  fits in {vram}: {format_bytes(m['headroom_bytes'])} to spare; "
                       f"longest context that fits: {m['max_ctx']:,} tokens")
        elif p is not None:
            n_units = len(p["resident_layers"]) + len(p["streamed_layers"]) + len(p["cpu_layers"]) + 1
            n_str = len(p["streamed_layers"]) + (p["output_placement"] == "streamed")
            n_cpu = len(p["cpu_layers"]) + (p["output_placement"] == "cpu")
            out.append(f"  does not fit in {vram} whole; of {n_units} units it streams {n_str} from host memory and "
                       f"computes {n_cpu} on the CPU (resident: {_units(p, 'resident')}; streamed: "
                       f"{_units(p, 'streamed')}; CPU: {_units(p, 'cpu')}; "
                       f"staging {format_bytes(p['staging_bytes'])}; total {format_bytes(p['total_bytes'])})")
            out.append(f"  PCIe per decode token: {format_bytes(p['pcie_bytes_per_token'])}; CPU reads "
                       f"{format_bytes(p['cpu_bytes_per_token'])}; predicted decode {p['predicted_tokens_per_s']:.1f} tok/s")
            c = m["costs"]
            rates = ", ".join(f"{t} {r / 1e9:.1f}" for t, r in sorted(c["cpu_bytes_per_s"].items()))
            out.append(f"  placements (run --placement; costs {c['source']}: host-to-device "
                       f"{c['h2d_bytes_per_s'] / 1e9:.0f} GB/s, device {c['device_bytes_per_s'] / 1e9:.0f} GB/s, "
                       f"CPU matmul GB/s {rates}):")
            for how, q in m["placements"].items():
                if q is None:
                    out.append(f"    {how:<7} does not fit (streaming needs two slots of the largest unit)")
                    continue
                out.append(f"    {how:<7} resident {len(q['resident_layers']):>3} layers, streamed "
                           f"{len(q['streamed_layers']):>3}, CPU {len(q['cpu_layers']):>3}, output {q['output_placement']:<8} "
                           f"{q['predicted_tokens_per_s']:7.1f} tok/s" + ("  <- default" if how == "auto" else ""))
        else:
            out.append(f"  does not fit in {vram}: needs at least {format_bytes(m['minimum_bytes'])} "
                       f"(streaming every layer; {format_bytes(m['minimum_bytes_cpu'])} computing every layer on the "
                       f"CPU, --placement cpu; {format_bytes(m['total_bytes'])} with everything resident)"
                       + (f"; longest context with everything resident: {m['max_ctx']:,} tokens" if m["max_ctx"] else ""))
    return "\n".join(out)


def _kv_line(m: dict) -> str:
    """'6,300 B/token x 2,048 tokens + 317.81 KiB fixed (K q4g, V q4g; 4.49 bits per value)': the
    fixed part is shown only when there is one (sink and tail rows); the bits count all of it."""
    bits = f"; {m['kv_bits_per_value']:.2f} bits per value" if m["kv_bits_per_value"] is not None else ""
    if "kv_budget" in m:
        return (f"--kv-budget {format_bytes(m['kv_budget']['budget_bytes'])}: the ladder allocates this at "
                f"{m['n_ctx']:,} tokens{bits}")
    fixed = f" + {format_bytes(m['kv_fixed_bytes'])} fixed" if m["kv_fixed_bytes"] else ""
    return (f"{m['kv_bytes_per_token']:,} B/token x {m['n_ctx']:,} tokens{fixed} "
            f"(K {m['type_k']}, V {m['type_v']}{bits})")


def _units(p: dict, where: str) -> str:
    """'layers 0-3,7, output' for one placement of a plan summary."""
    layers = p["resident_layers" if where == "resident" else f"{where}_layers"]
    parts = ([f"layers {_ranges(layers)}"] if layers else []) + (["output"] if p["output_placement"] == where else [])
    return ", ".join(parts) or "none"


def _ranges(xs: list[int]) -> str:
    if not xs:
        return "none"
    out, start = [], xs[0]
    for a, b in zip(xs, xs[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ",".join(out)
