"""inspect HF_DIR: a Hugging Face checkpoint folder, and what `qkvgguf convert` would make of it.

    summary = describe_hf(folder)       # plain data (what --json prints); headers only, no weights read
    print(render_hf(summary))

The tensors and their dtypes come from the weights files' headers (convert/checkpoint.py); the
architecture, the GGUF name of each tensor and the type each outtype gives it from the converter's
own planning (convert/stream.py `plan`, convert/writer.py `OUTTYPES`), so the sizes shown are the
tensor data `convert --outtype T` writes (the file adds its metadata, mostly the vocabulary).
`auto` is not planned: its types come from measuring the weights (convert --outtype auto).
"""

from __future__ import annotations

import math
import os

from ..errors import QkvggufError
from ..units import format_bytes
from .views import ggml_shape


def is_hf_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))


def describe_hf(folder: str) -> dict:
    from ..convert.arch import for_config
    from ..convert.checkpoint import SAFETENSORS_DTYPES, Checkpoint
    from ..convert.stream import plan
    from ..convert.writer import OUTTYPES

    ckpt = Checkpoint(folder)
    try:
        files = sorted({str(r.file.name) for r in ckpt.tensors.values()})
        dtypes: dict[str, dict] = {}
        tensors = []
        for ref in ckpt.tensors.values():
            n = math.prod(ref.shape)
            size = SAFETENSORS_DTYPES.get(str(ref.dtype).upper().removeprefix("TORCH."), 0) * n
            d = dtypes.setdefault(str(ref.dtype), {"dtype": str(ref.dtype), "n_tensors": 0, "n_elements": 0,
                                                   "n_bytes": 0})
            d["n_tensors"] += 1
            d["n_elements"] += n
            d["n_bytes"] += size
            tensors.append({"name": ref.name, "dtype": str(ref.dtype), "shape": list(ref.shape), "n_elements": n})
        out = {"folder": str(folder), "kind": "huggingface", "config": {
                   k: ckpt.config.get(k) for k in ("architectures", "model_type", "num_hidden_layers", "hidden_size",
                                                   "intermediate_size", "num_attention_heads", "num_key_value_heads",
                                                   "max_position_embeddings", "vocab_size", "tie_word_embeddings",
                                                   "torch_dtype", "rope_theta")},
               "files": files, "dtypes": sorted(dtypes.values(), key=lambda d: -d["n_bytes"]), "tensors": tensors,
               "totals": {"n_tensors": len(tensors), "n_elements": sum(t["n_elements"] for t in tensors),
                          "n_bytes": sum(d["n_bytes"] for d in dtypes.values())},
               "architecture": None, "unsupported": None, "outtypes": []}
        try:
            arch = for_config(ckpt.config, str(ckpt.folder / "config.json"))
            planned_f32 = plan(ckpt, arch, OUTTYPES["f32"])
        except QkvggufError as e:  # describe what is there even when convert would refuse it
            out["unsupported"] = str(e)
            return out
        names = {p.hf_name: p.name for p in planned_f32}
        for t in tensors:
            t["gguf_name"] = names.get(t["name"])
        out["architecture"] = {"hf": arch.hf_arch, "gguf": arch.GGUF_ARCH, "n_layer": arch.hparams.n_layer,
                               "n_tensors_written": len(planned_f32)}
        n_elements = sum(math.prod(p.shape) for p in planned_f32)
        for name, otype in OUTTYPES.items():
            if name == "auto":
                continue
            planned = plan(ckpt, arch, otype)
            n_bytes = sum(p.n_bytes for p in planned)
            counts: dict[str, int] = {}
            for p in planned:
                counts[p.type.name] = counts.get(p.type.name, 0) + 1
            out["outtypes"].append({
                "outtype": name, "file_type": otype.file_type.name, "n_bytes": n_bytes,
                "bits_per_weight": 8 * n_bytes / n_elements if n_elements else 0.0,
                "types": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
                "n_fallback": sum(1 for p in planned if p.reason)})
        return out
    finally:
        ckpt.close()


def render_hf(s: dict, show_tensors: bool = False) -> str:
    c, tot = s["config"], s["totals"]
    out = [f"{s['folder']}  (Hugging Face checkpoint)"]
    arch = s["architecture"]
    parts = [", ".join(c["architectures"] or []) or str(c["model_type"])]
    for label, key in (("layers", "num_hidden_layers"), ("n_embd", "hidden_size"), ("n_ff", "intermediate_size"),
                       ("heads", "num_attention_heads"), ("kv heads", "num_key_value_heads"),
                       ("context", "max_position_embeddings"), ("vocab", "vocab_size")):
        if c.get(key) is not None:
            parts.append(f"{label} {c[key]:,}" if isinstance(c[key], int) else f"{label} {c[key]}")
    out.append("  model: " + ", ".join(parts) + (", tied embeddings" if c.get("tie_word_embeddings") else ""))
    out.append(f"  {len(s['files'])} weights file(s) ({', '.join(s['files'][:3])}{', ...' if len(s['files']) > 3 else ''}), "
               f"{tot['n_tensors']} tensors, {tot['n_elements'] / 1e6:.1f}M parameters, {format_bytes(tot['n_bytes'])}")
    out += ["", "dtypes:", f"  {'dtype':<14} {'tensors':>8} {'parameters':>14} {'bytes':>14}"]
    for d in s["dtypes"]:
        out.append(f"  {d['dtype']:<14} {d['n_tensors']:>8} {d['n_elements']:>14,} {d['n_bytes']:>14,}")
    if s["unsupported"]:
        out += ["", f"convert: {s['unsupported']}"]
    elif arch is not None:
        out += ["", f"convert ({arch['hf']} -> GGUF '{arch['gguf']}', {arch['n_tensors_written']} tensors): "
                    "tensor data each --outtype writes (the file adds its metadata, mostly the vocabulary)",
                f"  {'outtype':<8} {'file type':<16} {'size':>11} {'bpw':>6}  types"]
        for o in s["outtypes"]:
            types = ", ".join(f"{n} {t}" for t, n in o["types"].items())
            fb = f"  ({o['n_fallback']} fall back: row length)" if o["n_fallback"] else ""
            out.append(f"  {o['outtype']:<8} {o['file_type']:<16} {format_bytes(o['n_bytes']):>11} "
                       f"{o['bits_per_weight']:>6.2f}  {types}{fb}")
        out.append("  auto     --target-bpw BITS or --fit SIZE: types chosen by measuring each tensor (not planned here)")
    if show_tensors:
        nw = max((len(t["name"]) for t in s["tensors"]), default=4)
        out += ["", "tensors:", f"  {'name':<{nw}} {'dtype':<6} {'shape (ne)':<16} gguf name"]
        for t in s["tensors"]:
            out.append(f"  {t['name']:<{nw}} {t['dtype']:<6} {ggml_shape(t['shape']):<16} {t.get('gguf_name') or '-'}")
    return "\n".join(out)
