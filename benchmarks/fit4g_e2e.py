"""`fit4g.py --e2e`: a synthetic 1B-class checkpoint converted with `--fit` below its Q4_0 size, end to end.

    python benchmarks/fit4g.py --e2e --out benchmarks/results/fit4g_e2e.json [--margin 0.08] [--keep]

1. Writes a llama-shaped Hugging Face folder (SHAPE: 16 layers, n_embd 2048, n_ff 5632, 32 heads,
   4 KV heads, vocabulary 49,152 with SmolLM2's tokenizer from the demo GGUF, untied head; 0.91 B
   parameters, float16 safetensors, 1.8 GB) into a work folder, atomically (a `.partial` folder
   renamed when complete). Weights are random and off any grid (`offgrid`): Gaussian, scaled per row
   and per input column by log-normal factors, 5% of rows Student-t (3 degrees of freedom: heavy
   tails), 1/sqrt(fan-in) overall; RMSNorm gains 1 + 0.05 N(0, 1).
2. The Q4_0 size: the tensor bytes `convert --outtype q4_0` writes (the converter's own planning, as
   `qkvgguf inspect HF_DIR` shows it: Q4_0 matrices, a Q6_K output matrix), and the VRAM the runtime
   planner counts for that file at -c 512 with a q8_0 cache (weights + KV cache + activations +
   CUDA context). The fit budget is that total minus `margin` x the Q4_0 weight bytes, so the
   weights must come out at least that much below Q4_0's.
3. Converts with the user's CLI path, in a subprocess:
   `qkvgguf convert DIR -o OUT --outtype auto --fit SIZE -c 512 -ctk q8_0 -ctv q8_0 --calib-chunks 2
   --vocab-pre smollm` (the tokenizer.json rebuilt from the GGUF has no pre-tokenizer to hash).
4. Checks the written file: the runtime planner's total for it (runtime/planner.py `plan` over
   `specs_of`) within the budget with every weight resident; bits per weight and type histogram
   against Q4_0's; llama.cpp (llama-cpp-python, tests/llamacpp.py: plain CPU buffers, see
   shared/LLAMACPP.md) loads it and evaluates a short prompt with finite logits, with an f16 cache
   and with the fit's q8_0 cache (flash attention); our runtime's logits on the same token ids
   against llama.cpp's (max |a - b| / max |b|, top-1 agreement: a loose check on random weights).

Exit status 1 (after writing the JSON) when the budget is exceeded, llama.cpp fails to load or
evaluate the file, or any logits are not finite.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MiB = 2**20

# layers, hidden, intermediate, heads, kv heads, head dim, vocab (SmolLM2's tokenizer), untied head
SHAPE = dict(n_layer=16, n_embd=2048, n_ff=5632, n_head=32, n_head_kv=4, head_dim=64, vocab=49152,
             qkv_bias=False, rope_base=10000.0, n_ctx_train=2048)
N_CTX, CACHE = 512, "q8_0"
PROMPT = "The quick brown fox jumps over the lazy dog. Once upon a time, in a small village by the sea,"
HEAVY_ROWS, ROW_SIGMA, COL_SIGMA = 0.05, 0.35, 0.25


# -- 1. the checkpoint ----------------------------------------------------------------------------
def hf_tensors(s: dict) -> list[tuple[str, tuple[int, ...], float]]:
    """(Hugging Face name, shape, gain) in file order; gain 0 marks an RMSNorm weight."""
    d, q, kv, ff = s["n_embd"], s["n_head"] * s["head_dim"], s["n_head_kv"] * s["head_dim"], s["n_ff"]
    out = [("model.embed_tokens.weight", (s["vocab"], d), math.sqrt(d))]  # rows of RMS about 1
    for i in range(s["n_layer"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (d,), 0.0),
                (p + "self_attn.q_proj.weight", (q, d), 1.0), (p + "self_attn.k_proj.weight", (kv, d), 1.0),
                (p + "self_attn.v_proj.weight", (kv, d), 1.0), (p + "self_attn.o_proj.weight", (d, q), 1.0),
                (p + "post_attention_layernorm.weight", (d,), 0.0),
                (p + "mlp.gate_proj.weight", (ff, d), 1.0), (p + "mlp.up_proj.weight", (ff, d), 1.0),
                (p + "mlp.down_proj.weight", (d, ff), 1.0)]
    out += [("model.norm.weight", (d,), 0.0), ("lm_head.weight", (s["vocab"], d), 3.0)]
    return out


def offgrid(rng: np.random.Generator, shape: tuple[int, ...], gain: float) -> np.ndarray:
    """float32 weights off any quantization grid (see the module docstring)."""
    if len(shape) == 1:
        return (1.0 + 0.05 * rng.standard_normal(shape)).astype(np.float32)
    rows, cols = shape
    w = rng.standard_normal(shape, dtype=np.float32)
    heavy = np.flatnonzero(rng.random(rows) < HEAVY_ROWS)
    w[heavy] = (rng.standard_t(3, (len(heavy), cols)) / math.sqrt(3.0)).astype(np.float32)  # unit variance
    w *= np.exp(ROW_SIGMA * rng.standard_normal((rows, 1))).astype(np.float32)
    w *= np.exp(COL_SIGMA * rng.standard_normal((1, cols))).astype(np.float32)
    w *= gain / math.sqrt(cols)
    return w


def write_checkpoint(folder: Path, seed: int) -> Path:
    """The Hugging Face folder, written tensor by tensor (one tensor in memory), renamed when complete."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from hf_checkpoint import write_tokenizer_json

    from qkvgguf import GGUFFile
    from qkvgguf.default_model import default_model_path

    s = SHAPE
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    tensors = hf_tensors(s)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, _ in tensors:
        n = 2 * math.prod(shape)
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    rng = np.random.default_rng(seed)
    with open(partial / "model.safetensors", "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        for name, shape, gain in tensors:
            w = offgrid(rng, shape, gain).astype(np.float16)
            assert np.isfinite(w).all(), name
            f.write(w.tobytes())
    md = GGUFFile(str(default_model_path())).metadata
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s["n_embd"],
        "intermediate_size": s["n_ff"], "num_hidden_layers": s["n_layer"], "num_attention_heads": s["n_head"],
        "num_key_value_heads": s["n_head_kv"], "max_position_embeddings": s["n_ctx_train"], "rms_norm_eps": 1e-5,
        "rope_theta": s["rope_base"], "vocab_size": s["vocab"], "tie_word_embeddings": False, "torch_dtype": "float16",
        "bos_token_id": md["tokenizer.ggml.bos_token_id"], "eos_token_id": md["tokenizer.ggml.eos_token_id"],
    }
    (partial / "config.json").write_text(json.dumps(config, indent=1))
    write_tokenizer_json(md, partial)
    os.rename(partial, folder)
    return folder


# -- 2. the Q4_0 reference and the budget ----------------------------------------------------------
def q4_0_reference(folder: Path) -> dict:
    """What `convert --outtype q4_0` writes (types, bytes) and the planner's total for it."""
    from fit4g import config

    from qkvgguf.convert.arch import for_config
    from qkvgguf.convert.checkpoint import Checkpoint
    from qkvgguf.convert.stream import plan as convert_plan
    from qkvgguf.convert.writer import OUTTYPES
    from qkvgguf.runtime.planner import TensorSpec, plan

    ckpt = Checkpoint(folder)
    try:
        arch = for_config(ckpt.config, str(folder / "config.json"))
        planned = convert_plan(ckpt, arch, OUTTYPES["q4_0"])
    finally:
        ckpt.close()
    specs = [TensorSpec(p.name, p.n_bytes, p.type.name) for p in planned]
    p = plan(specs, config(SHAPE), None, N_CTX, CACHE, CACHE)
    elements = sum(math.prod(t.shape) for t in planned)
    weights = sum(t.n_bytes for t in planned if t.type.name not in ("F32", "F16", "BF16"))
    return {"tensor_bytes": sum(t.n_bytes for t in planned), "quantized_weight_bytes": weights,
            "n_elements": elements, "bpw": 8 * sum(t.n_bytes for t in planned) / elements,
            "types": histogram((t.type.name, t.n_bytes, math.prod(t.shape)) for t in planned),
            "planner_total_bytes": p.total_bytes, "kv_bytes": p.kv_bytes, "activation_bytes": p.activation_bytes,
            "context_bytes": p.context_bytes}


def histogram(rows) -> dict:
    """{type: {tensors, bytes, elements}} from (type name, bytes, elements) rows, most bytes first."""
    out: dict[str, dict] = {}
    for t, n_bytes, n in rows:
        h = out.setdefault(t, {"tensors": 0, "bytes": 0, "elements": 0})
        h["tensors"] += 1
        h["bytes"] += n_bytes
        h["elements"] += n
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["bytes"]))


# -- 3. the user's CLI path ----------------------------------------------------------------------
def convert(folder: Path, out: Path, size: int, chunks: int) -> dict:
    exe = Path(sys.executable).with_name("qkvgguf")
    cli = [str(exe)] if exe.exists() else [sys.executable, "-m", "qkvgguf"]
    args = ["convert", str(folder), "-o", str(out), "--outtype", "auto", "--fit", str(size), "-c", str(N_CTX),
            "-ctk", CACHE, "-ctv", CACHE, "--calib-chunks", str(chunks), "--vocab-pre", "smollm"]
    print("$ qkvgguf " + " ".join(args), file=sys.stderr)
    t0 = time.time()
    stages = []
    proc = subprocess.Popen(cli + args, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        sys.stderr.write("  | " + line)
        if line.startswith("stage "):
            stages.append({"at_s": round(time.time() - t0, 1), "line": line.strip()})
    rc = proc.wait()
    return {"command": "qkvgguf " + " ".join(args).replace(str(folder), "DIR").replace(str(out), "OUT"),
            "returncode": rc, "wall_s": round(time.time() - t0, 1), "stages": stages}


# -- 4. checks on the written file ---------------------------------------------------------------
def check_file(out: Path, budget: int) -> dict:
    from qkvgguf import GGUFFile
    from qkvgguf.config import ModelConfig
    from qkvgguf.runtime.planner import plan, specs_of

    g = GGUFFile(str(out))
    specs = specs_of(g)
    cfg = ModelConfig.from_gguf(g)
    p = plan(specs, cfg, budget, N_CTX, CACHE, CACHE)
    rows = [(i.type.name, i.n_bytes, math.prod(i.shape)) for i in g.tensors.values()]
    tensor_bytes, elements = sum(r[1] for r in rows), sum(r[2] for r in rows)
    auto = {k.removeprefix("qkvgguf.auto."): v for k, v in g.metadata.items() if k.startswith("qkvgguf.auto.")}
    auto.pop("layer_bpw", None)
    return {"file_bytes": out.stat().st_size, "tensor_bytes": tensor_bytes,
            "quantized_weight_bytes": sum(r[1] for r in rows if r[0] not in ("F32", "F16", "BF16")),
            "bpw": 8 * tensor_bytes / elements, "types": histogram(rows),
            "planner": {"budget_bytes": budget, "total_bytes": p.total_bytes, "all_resident": p.all_resident,
                        "resident_weight_bytes": p.resident_weight_bytes, "kv_bytes": p.kv_bytes,
                        "activation_bytes": p.activation_bytes, "context_bytes": p.context_bytes,
                        "headroom_bytes": budget - p.total_bytes},
            "auto_metadata": auto}


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def logits_check(out: Path, threads: int) -> dict:
    """llama.cpp's logits (f16 cache; q8_0 cache with flash attention) and our runtime's, same ids."""
    import llama_cpp
    import torch

    sys.path.insert(0, str(HERE.parent / "tests"))
    import llamacpp

    from qkvgguf import GGUFFile
    from qkvgguf.runtime.model import Model

    res: dict = {"prompt": PROMPT}
    try:
        llm = llamacpp.load(out, n_ctx=64, n_batch=64, n_threads=threads, logits_all=True)
    except Exception as e:  # noqa: BLE001 - the failure is the result: recorded, and the run fails
        return {**res, "llamacpp_loaded": False, "error": f"{type(e).__name__}: {e}"}
    ids = llamacpp.tokenize(llm, PROMPT, add_bos=bool(GGUFFile(str(out)).metadata.get("tokenizer.ggml.add_bos_token")))
    llm.reset()
    llm.eval(ids)
    theirs = np.array(llm.scores[:len(ids)], dtype=np.float32)
    del llm
    res.update(llamacpp_loaded=True, n_tokens=len(ids), llamacpp_finite=bool(np.isfinite(theirs).all()),
               llamacpp_logit_std=float(theirs.std()))
    try:
        q8 = llamacpp.load(out, n_ctx=64, n_batch=64, n_threads=threads, logits_all=True, flash_attn=True,
                           type_k=llama_cpp.GGML_TYPE_Q8_0, type_v=llama_cpp.GGML_TYPE_Q8_0)
        q8.reset()
        q8.eval(ids)
        cached = np.array(q8.scores[:len(ids)], dtype=np.float32)
        del q8
        res.update(llamacpp_q8_0_cache_finite=bool(np.isfinite(cached).all()),
                   llamacpp_q8_0_vs_f16_cache_max_rel=rel(cached, theirs))
    except Exception as e:  # noqa: BLE001
        res.update(llamacpp_q8_0_cache_finite=False, q8_0_cache_error=f"{type(e).__name__}: {e}")
    model = Model(GGUFFile(str(out)))
    t = torch.tensor(ids)
    with torch.no_grad():
        ours = model.forward(t, model.new_cache(64), logits="all").float().numpy()
    res.update(ours_finite=bool(np.isfinite(ours).all()), ours_vs_llamacpp_max_rel=rel(ours, theirs),
               ours_vs_llamacpp_top1=float((ours.argmax(1) == theirs.argmax(1)).mean()))
    return res


# -- the run ---------------------------------------------------------------------------------------
def main(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    t_start = time.time()
    load_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="fit1b-", dir=args.workdir))
    print(f"work folder {work}", file=sys.stderr)
    failures: list[str] = []
    try:
        t0 = time.time()
        folder = write_checkpoint(work / "hf", args.seed)
        gen_s = time.time() - t0
        n_params = sum(math.prod(s) for _, s, _ in hf_tensors(SHAPE))
        print(f"checkpoint: {n_params / 1e9:.3f} B parameters, "
              f"{(folder / 'model.safetensors').stat().st_size / 2**30:.2f} GiB f16, {gen_s:.0f} s", file=sys.stderr)
        q4 = q4_0_reference(folder)
        margin = int(args.margin * q4["quantized_weight_bytes"])
        budget = q4["planner_total_bytes"] - margin
        fixed = q4["planner_total_bytes"] - q4["tensor_bytes"]
        room = budget - fixed - (q4["tensor_bytes"] - q4["quantized_weight_bytes"])
        print(f"Q4_0: {q4['tensor_bytes'] / MiB:.1f} MiB of tensors ({q4['bpw']:.3f} bpw), planner total "
              f"{q4['planner_total_bytes'] / MiB:.1f} MiB at -c {N_CTX} -ctk/-ctv {CACHE}; --fit {budget:,} bytes "
              f"forces the quantized weights <= {room / MiB:.1f} MiB (Q4_0's {q4['quantized_weight_bytes'] / MiB:.1f} "
              f"MiB - {margin / MiB:.1f} MiB)", file=sys.stderr)
        out = work / "fit1b-auto.gguf"
        conv = convert(folder, out, budget, args.calib_chunks)
        result = {
            "command": "python benchmarks/fit4g.py " + " ".join(args.argv),
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {args.threads} threads",
            "load_average_start": [round(x, 2) for x in load_start],
            "shape": SHAPE, "n_parameters": n_params, "seed": args.seed,
            "weights": {"distribution": "N(0,1), 5% of rows Student-t(3)/sqrt(3); x exp(0.35 N) per row, "
                        "x exp(0.25 N) per input column; x gain/sqrt(fan-in); norms 1 + 0.05 N", "dtype": "F16"},
            "generate_s": round(gen_s, 1), "n_ctx": N_CTX, "cache_type": CACHE, "margin": args.margin,
            "budget_bytes": budget, "forced_max_quantized_weight_bytes": room, "q4_0": q4, "convert": conv,
        }
        if conv["returncode"] != 0:
            failures.append(f"convert exited {conv['returncode']}")
        else:
            t0 = time.time()
            result["fit"] = check_file(out, budget)
            pl = result["fit"]["planner"]
            if not (pl["all_resident"] and pl["total_bytes"] <= budget):
                failures.append(f"budget exceeded: planner total {pl['total_bytes']:,} > {budget:,} "
                                f"(all resident: {pl['all_resident']})")
            if result["fit"]["quantized_weight_bytes"] >= q4["quantized_weight_bytes"]:
                failures.append("the weights are not below Q4_0's")
            result["logits"] = lg = logits_check(out, args.threads)
            if not lg.get("llamacpp_loaded"):
                failures.append("llama.cpp failed to load the file: " + lg.get("error", "?"))
            else:
                for key in ("llamacpp_finite", "llamacpp_q8_0_cache_finite", "ours_finite"):
                    if not lg.get(key):
                        failures.append(f"{key} is false" + (f" ({lg['q8_0_cache_error']})" if
                                                             "q8_0" in key and "q8_0_cache_error" in lg else ""))
            result["check_s"] = round(time.time() - t0, 1)
        result["total_s"] = round(time.time() - t_start, 1)
        result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        result["failures"] = failures
        result["passed"] = not failures
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        if "fit" in result:
            f_ = result["fit"]
            lg = result["logits"]
            print(f"fit: {f_['tensor_bytes'] / MiB:.1f} MiB of tensors ({f_['bpw']:.3f} bpw vs Q4_0 {q4['bpw']:.3f}), "
                  f"planner total {f_['planner']['total_bytes'] / MiB:.1f} MiB <= budget {budget / MiB:.1f} MiB: "
                  f"{f_['planner']['total_bytes'] <= budget}; types "
                  + ", ".join(f"{t} {h['tensors']}" for t, h in f_["types"].items()), file=sys.stderr)
            if lg.get("llamacpp_loaded"):
                print(f"llama.cpp loaded, logits finite {lg['llamacpp_finite']} (q8_0 cache "
                      f"{lg.get('llamacpp_q8_0_cache_finite')}); ours vs llama.cpp max-rel "
                      f"{lg['ours_vs_llamacpp_max_rel']:.4f}, top-1 {lg['ours_vs_llamacpp_top1']:.1%}", file=sys.stderr)
        print(f"convert {conv['wall_s']:.0f} s, total {result['total_s']:.0f} s", file=sys.stderr)
        print(args.out)
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    for f_ in failures:
        print("FAIL: " + f_, file=sys.stderr)
    return 1 if failures else 0
