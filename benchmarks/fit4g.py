"""A 7-8B model on a 4 GiB card, on paper: the bit allocation and the placement, from published shapes.

    python benchmarks/fit4g.py [--out benchmarks/results/fit4g.json] [--chunks 4] [--threads 2]
    python benchmarks/fit4g.py --e2e [--out benchmarks/results/fit4g_e2e.json]   # benchmarks/fit4g_e2e.py

For Llama-3-8B and Qwen2.5-7B (shapes from their published config.json, written down in SHAPES),
at 4 GiB and 4,096 tokens of context, for each KV cache type:

1. `--outtype auto`'s allocator (convert/mixed.py `allocate`, the converter's own function) over the
   model's tensor table with sensitivities measured on SmolLM2 (below), fitted to the VRAM that the
   runtime planner leaves for weights; the result is checked with the planner itself
   (runtime/planner.py `plan`: everything resident within 4 GiB, or not), and its bits per weight,
   per-role types and predicted cost are reported.
2. The fixed llama.cpp recipes (q4_k_m, q3_k_m, q2_k, by the converter's type policy) under the same
   budget: what is resident, streamed or computed on the CPU with each placement (stream, cpu,
   auto), and the predicted decode tokens/s with a 4 GB card's memory (192 GB/s: GTX 1650 GDDR6, RTX
   3050 Laptop) on PCIe 3.0 x8 and PCIe 4.0 x16 links, and this machine's CPU matmul rates at
   `--threads` threads (measured here by runtime/machine.py: the kernels a CPU-computed layer runs).

Sensitivity model (what "measured on SmolLM2" means here). For a weight W and a type t, the
converter's error is E = sum_ij I_j (W_ij - Q_t(W)_ij)^2 (convert/mixed.py). We write it as
E = n * s * r_t: n weights; s = sum_ij I_j W_ij^2 / n, the tensor's importance-weighted energy per
weight, measured on SmolLM2's tensors with an importance matrix collected by our runtime on the
packaged calibration text (role and depth: layer i of the 8B model takes SmolLM2's layer at the same
relative depth); r_t = ||W - Q_t(W)||^2 / ||W||^2, the relative error of type t, measured on the same
role's SmolLM2 weights made off-grid (each matrix rotated on its residual-stream side by a random
orthogonal matrix, as the off-grid benchmark model is built; SmolLM2's published weights lie on the
Q4_1 grid) and regrouped into 4,608-wide rows so the 256-blocks of the K-types apply. The
embedding (never a matmul input) uses I = 1. This is an estimate for planning, not a measurement
of an 8B model's quality.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

GiB = 2**30
BUDGET = 4 * GiB
N_CTX = 4096

# published config.json values: layers, hidden, intermediate, heads, kv heads, head dim, vocab, qkv bias
SHAPES = {
    "llama3-8b": dict(n_layer=32, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8, head_dim=128, vocab=128256,
                      qkv_bias=False, rope_base=500000.0, n_ctx_train=8192),
    "qwen2.5-7b": dict(n_layer=28, n_embd=3584, n_ff=18944, n_head=28, n_head_kv=4, head_dim=128, vocab=152064,
                       qkv_bias=True, rope_base=1000000.0, n_ctx_train=32768),
}
CACHE_TYPES = ("f16", "q8_0", "q4_0", "q4g")
CANDIDATES = ("Q2_K", "Q3_K", "IQ4_XS", "Q4_K", "Q5_K", "Q6_K", "Q8_0")
RECIPES = ("q4_k_m", "q3_k_m", "q2_k")
CARD_BYTES_PER_S = 192e9  # a 4 GB card's memory bandwidth (GTX 1650 GDDR6, RTX 3050 Laptop)
LINKS = {"pcie3_x8": 6.5e9, "pcie4_x16": 25e9}  # effective pinned host->device copy rates
ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
RESIDUAL_INPUT = {"attn_q", "attn_k", "attn_v", "ffn_gate", "ffn_up", "output", "token_embd"}


def config(shape: dict):
    from qkvgguf.config import ModelConfig

    s = shape
    return ModelConfig(arch="llama", n_layer=s["n_layer"], n_embd=s["n_embd"], n_ff=s["n_ff"], n_head=s["n_head"],
                       n_head_kv=s["n_head_kv"], head_dim=s["head_dim"], n_ctx_train=s["n_ctx_train"],
                       vocab_size=s["vocab"], norm_eps=1e-5, rope_base=s["rope_base"], rope_dim=s["head_dim"],
                       rope_neox=False)


def tensor_table(shape: dict) -> list[tuple[str, int, int]]:
    """(GGUF name, rows, cols) of every tensor, numpy order; 1-D tensors have rows 1."""
    s = shape
    q, kv, d = s["n_head"] * s["head_dim"], s["n_head_kv"] * s["head_dim"], s["n_embd"]
    out = [("token_embd.weight", s["vocab"], d), ("output.weight", s["vocab"], d), ("output_norm.weight", 1, d)]
    for i in range(s["n_layer"]):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", 1, d), (p + "ffn_norm.weight", 1, d),
                (p + "attn_q.weight", q, d), (p + "attn_k.weight", kv, d), (p + "attn_v.weight", kv, d),
                (p + "attn_output.weight", d, q), (p + "ffn_gate.weight", s["n_ff"], d),
                (p + "ffn_up.weight", s["n_ff"], d), (p + "ffn_down.weight", d, s["n_ff"])]
        if s["qkv_bias"]:
            out += [(p + "attn_q.bias", 1, q), (p + "attn_k.bias", 1, kv), (p + "attn_v.bias", 1, kv)]
    return out


def role_of(name: str) -> str:
    if name.startswith("blk."):
        return name.split(".")[2]
    return name.split(".")[0]


def type_bytes(type_name: str, rows: int, cols: int) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    return rows * cols // block * size


# -- sensitivities measured on SmolLM2 ------------------------------------------------------------
def smollm2_sensitivity(n_chunks: int, seed: int = 1) -> dict:
    """{'energy': {tensor name: s}, 'rel_error': {role: {type: r}}, 'n_layer': 30} (see the docstring)."""
    from qkvgguf.convert.imatrix import collect_imatrix, default_calibration_text
    from qkvgguf.default_model import default_model_path
    from qkvgguf.gguf_file import GGUFFile
    from qkvgguf.quants import dequantize, quantize
    from qkvgguf.runtime.weights import Weights

    path = default_model_path()
    _, text = default_calibration_text()
    t0 = time.time()
    imatrix = collect_imatrix(path, text, n_ctx=512, n_chunks=n_chunks)
    print(f"imatrix: {n_chunks} chunks of 512 in {time.time() - t0:.0f} s", file=sys.stderr)
    g = GGUFFile(path)
    W = Weights(g)
    n_embd = g.tensors["token_embd.weight"].shape[-1]
    rot = torch.linalg.qr(torch.randn(n_embd, n_embd, generator=torch.Generator().manual_seed(seed)))[0]
    energy, rel = {}, {}
    for name, info in g.tensors.items():
        if len(info.shape) != 2:
            continue
        w = W.dense(name).float()
        imp = imatrix.mean(name)  # the tied embedding's is the output matmul's input
        if imp is not None:
            energy["output.weight" if name == "token_embd.weight" else name] = float(
                ((w ** 2) * torch.from_numpy(imp)[None, :]).sum() / w.numel())
        if name == "token_embd.weight":  # as an embedding: no matmul input, I = 1
            energy[name] = float((w ** 2).mean())
        role = role_of(name)
        if role in rel or (name.startswith("blk.") and not name.startswith("blk.15.")):
            continue  # relative errors from one mid-depth layer per role (and the embedding)
        norm = W.dense(f"blk.15.{'attn' if role.startswith('attn') else 'ffn'}_norm.weight") if role != "token_embd" else None
        if role in RESIDUAL_INPUT:  # rotate the input (residual) side, gains folded in
            off = ((w * norm[None, :]) if norm is not None else w) @ rot
        else:  # attn_output / ffn_down write the residual stream: rotate the output side
            off = rot.T @ w
        rows = off.reshape(-1, 4608)[:512].contiguous().numpy().astype(np.float32)
        rel[role] = {}
        for t in CANDIDATES:
            from gguf import GGMLQuantizationType

            qt = GGMLQuantizationType[t]
            back = dequantize(torch.from_numpy(np.ascontiguousarray(quantize(rows, qt, None))), qt).numpy()
            rel[role][t] = float(((rows - back.reshape(rows.shape)) ** 2).sum() / (rows ** 2).sum())
    rel["output"] = rel["token_embd"]  # tied in SmolLM2: one matrix, measured once
    return {"energy": energy, "rel_error": rel, "n_layer": 30, "imatrix_chunks": n_chunks}


def options_8b(shape: dict, sens: dict) -> dict:
    """Allocator options per quantized tensor of the 8B table: (type, bytes, n * s * r)."""
    from gguf import GGMLQuantizationType

    from qkvgguf.convert.mixed import Option

    out = {}
    for name, rows, cols in tensor_table(shape):
        if rows == 1:
            continue
        role = role_of(name)
        if name.startswith("blk."):
            i = int(name.split(".")[1])
            src = f"blk.{round(i * (sens['n_layer'] - 1) / (shape['n_layer'] - 1))}.{role}.weight"
        else:
            src = name  # token_embd.weight (I = 1) or output.weight (the tied matrix, I-weighted)
        s = sens["energy"][src]
        out[name] = [Option(GGMLQuantizationType[t], type_bytes(t, rows, cols), rows * cols * s * sens["rel_error"][role][t])
                     for t in CANDIDATES if cols % (256 if t != "Q8_0" else 32) == 0]
    return out


def specs(shape: dict, types: dict[str, str]):
    from qkvgguf.runtime.planner import TensorSpec

    out = []
    for name, rows, cols in tensor_table(shape):
        t = types.get(name, "F32")
        out.append(TensorSpec(name, type_bytes(t, rows, cols), t))
    return out


def recipe_types(shape: dict, rule: str) -> dict[str, str]:
    from qkvgguf.convert.writer import ModelFacts, get_outtype
    from qkvgguf.convert.writer import tensor_type as policy

    facts = ModelFacts(n_layer=shape["n_layer"], has_output=True, n_gqa=shape["n_head"] // shape["n_head_kv"])
    return {name: policy(name, (rows, cols), get_outtype(rule), facts).type.name
            for name, rows, cols in tensor_table(shape) if rows > 1}


def bpw(shape: dict, types: dict[str, str]) -> float:
    table = tensor_table(shape)
    return 8 * sum(s.n_bytes for s in specs(shape, types)) / sum(r * c for _, r, c in table)


def fit_auto(shape: dict, sens: dict, type_k: str, type_v: str) -> dict:
    """The allocator's choice within what the planner leaves for weights, checked by the planner."""
    from qkvgguf.convert.mixed import BudgetError, allocate
    from qkvgguf.runtime.planner import plan

    cfg = config(shape)
    options = options_8b(shape, sens)
    floats = specs(shape, {})
    small = sum(s.n_bytes for s in floats if s.name not in options)
    probe = plan(floats, cfg, None, N_CTX, type_k, type_v)
    room = BUDGET - probe.kv_bytes - probe.activation_bytes - probe.context_bytes - small
    for _ in range(8):  # the arena pads each tensor to 256 bytes: shrink until the planner agrees
        try:
            chosen = allocate(options, room)
        except BudgetError as e:
            return {"fits": False, "reason": str(e), "weights_room_bytes": room}
        types = {n: o.type.name for n, o in chosen.items()}
        p = plan(specs(shape, types), cfg, BUDGET, N_CTX, type_k, type_v)
        if p.all_resident:
            break
        room -= 16 * 2**20
    by_role: dict[str, dict[str, int]] = {}
    for n, t in types.items():
        by_role.setdefault(role_of(n), {}).setdefault(t, 0)
        by_role[role_of(n)][t] += 1
    return {"fits": p.all_resident, "bpw": bpw(shape, types), "total_bytes": p.total_bytes,
            "weights_bytes": p.resident_weight_bytes, "kv_bytes": p.kv_bytes,
            "predicted_error": sum(o.error for o in chosen.values()),
            "types_by_role": by_role, "weights_room_bytes": room}


def placements(shape: dict, rule: str, type_k: str, type_v: str, cpu_rates: dict) -> dict:
    from qkvgguf.runtime.planner import BudgetTooSmall, Costs, plan

    cfg = config(shape)
    types = recipe_types(shape, rule)
    sp = specs(shape, types)
    out = {"bpw": bpw(shape, types), "weights_bytes": sum(s.n_bytes for s in sp), "links": {}}
    for link, rate in LINKS.items():
        costs = Costs(rate, CARD_BYTES_PER_S, cpu_rates, source=f"{link}, {CARD_BYTES_PER_S / 1e9:.0f} GB/s card, "
                      "this machine's CPU")
        row = {}
        for how in ("stream", "cpu", "auto"):
            try:
                p = plan(sp, cfg, BUDGET, N_CTX, type_k, type_v, placement=how, costs=costs)
            except BudgetTooSmall as e:
                row[how] = {"fits": False, "reason": str(e)}
                continue
            s = p.summary()
            row[how] = {k: s[k] for k in ("resident_layers", "streamed_layers", "cpu_layers", "output_placement",
                                          "pcie_bytes_per_token", "cpu_bytes_per_token", "total_bytes",
                                          "predicted_tokens_per_s")}
            row[how]["resident_layers"] = len(s["resident_layers"])
            row[how]["streamed_layers"] = len(s["streamed_layers"])
            row[how]["cpu_layers"] = len(s["cpu_layers"])
        out["links"][link] = row
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON to write (default benchmarks/results/fit4g.json, "
                    "with --e2e fit4g_e2e.json)")
    ap.add_argument("--chunks", type=int, default=4, help="imatrix chunks of 512 tokens on SmolLM2")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for the CPU matmul rates")
    e2e = ap.add_argument_group("--e2e: a synthetic 1B checkpoint converted with --fit below its Q4_0 size "
                                "(benchmarks/fit4g_e2e.py)")
    e2e.add_argument("--e2e", action="store_true", help="run the end-to-end check instead of the 8B tables")
    e2e.add_argument("--margin", type=float, default=0.08,
                     help="the budget is Q4_0's VRAM total minus this fraction of its weight bytes (default 0.08)")
    e2e.add_argument("--calib-chunks", type=int, default=2, help="convert --calib-chunks (default 2)")
    e2e.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    e2e.add_argument("--workdir", default=None, help="folder for the checkpoint and the GGUF (default: the temp folder)")
    e2e.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args(argv)
    if args.e2e:
        if not 0 < args.margin < 1:
            ap.error(f"--margin must be between 0 and 1, got {args.margin}")
        if args.calib_chunks < 1:
            ap.error(f"--calib-chunks must be at least 1, got {args.calib_chunks}")
        if args.workdir is not None and not os.path.isdir(args.workdir):
            ap.error(f"--workdir {args.workdir}: not a folder")
        import fit4g_e2e

        args.out = args.out or "benchmarks/results/fit4g_e2e.json"
        args.argv = argv if argv is not None else sys.argv[1:]
        return fit4g_e2e.main(args)
    args.out = args.out or "benchmarks/results/fit4g.json"
    torch.set_num_threads(args.threads)
    from qkvgguf.runtime.machine import measure_cpu

    types_needed = sorted({t for shape in SHAPES.values() for r in RECIPES for t in recipe_types(shape, r).values()})
    cpu_rates = {t: measure_cpu(t) for t in types_needed}
    cpu_rates = {t: r for t, r in cpu_rates.items() if r}
    print("CPU matmul GB/s at", args.threads, "threads:", {t: round(r / 1e9, 2) for t, r in cpu_rates.items()},
          file=sys.stderr)
    sens = smollm2_sensitivity(args.chunks)
    result = {"command": "python benchmarks/fit4g.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} CPUs, {args.threads} threads", "budget_bytes": BUDGET, "n_ctx": N_CTX,
              "card_bytes_per_s": CARD_BYTES_PER_S, "links_bytes_per_s": LINKS,
              "cpu_bytes_per_s": cpu_rates, "rel_error_smollm2_offgrid": sens["rel_error"], "models": {}}
    for model, shape in SHAPES.items():
        m = result["models"][model] = {"auto": {}, "recipes": {}}
        for t in CACHE_TYPES:
            m["auto"][t] = fit_auto(shape, sens, t, t)
            a = m["auto"][t]
            print(f"{model} auto -ctk/-ctv {t}: fits={a['fits']} "
                  + (f"{a['bpw']:.3f} bpw, total {a['total_bytes'] / GiB:.3f} GiB" if a["fits"] else a.get("reason", "")),
                  file=sys.stderr)
        for rule in RECIPES:
            m["recipes"][rule] = {t: placements(shape, rule, t, t, cpu_rates) for t in ("q8_0", "q4_0")}
            for link, row in m["recipes"][rule]["q4_0"]["links"].items():
                print(f"{model} {rule} q4_0 {link}: " + ", ".join(
                    f"{h} {r['predicted_tokens_per_s']:.1f} tok/s" if "predicted_tokens_per_s" in r else f"{h} no fit"
                    for h, r in row.items()), file=sys.stderr)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
