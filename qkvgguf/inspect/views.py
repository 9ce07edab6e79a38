"""inspect: what is in a GGUF file, from its header alone (no tensor data is read).

`summarize(gguf)` returns plain data (what `--json` prints); `render(summary)` formats it for people:

    FILE
      GGUF v3, 93.81 MiB, 272 tensors, 134.5M parameters, 5.74 bits per weight
      model: llama, 30 layers, ...                          <- metadata summary
      plan: ...                                             <- `qkvgguf.*` keys, when present
    types:      one row per ggml type: tensors, parameters, bytes, share, bits per weight
    per layer:  one row per block: the type of each of its tensors, bytes, bits per weight
    other:      the tensors outside the blocks (token_embd, output_norm, output)
    total: ...

`--tensors` adds the full tensor table, `--metadata` every metadata key. The views that read data
or other files live beside this module: tensor.py (`--tensor`, `--ref`), memory.py (`--vram`),
diff.py (`--diff`), plot.py (`--plot`).
"""

from __future__ import annotations

import re
from typing import Any, Optional

from gguf import LlamaFileType

from ..gguf_file import GGUFFile
from ..units import format_bytes

ARRAY_PREVIEW = 8  # items of a long metadata array shown in the text view and in --json without --full

# Column order of the per-layer table: the llama family's reading order. Kinds not listed (other
# architectures) follow in order of first appearance; `.weight` comes before `.bias`.
KIND_ORDER = ("attn_norm", "attn_q", "attn_q_norm", "attn_k", "attn_k_norm", "attn_v", "attn_output",
              "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
SUFFIX_ORDER = ("weight", "bias")
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def ggml_shape(shape) -> str:
    """numpy order (rows, row length) -> ggml's order, as gguf-dump prints it: '576, 49152'."""
    return ", ".join(str(d) for d in reversed(list(shape)))


def metadata_type(types: list) -> str:
    """GGUFFile.metadata_types[key] -> 'uint32', 'string', 'array[string]' (gguf's value type names)."""
    names = [t.name.lower() for t in types]
    if not names:
        return "?"
    return f"array[{names[1]}]" if names[0] == "array" and len(names) > 1 else names[0]


def metadata_preview(value: Any) -> Any:
    if isinstance(value, list) and len(value) > ARRAY_PREVIEW:
        return {"array_length": len(value), "head": value[:ARRAY_PREVIEW]}
    return value


def split_block_name(name: str) -> Optional[tuple[int, str]]:
    """'blk.3.attn_q.weight' -> (3, 'attn_q.weight'); None for tensors outside the blocks."""
    m = _BLOCK.match(name)
    return (int(m[1]), m[2]) if m else None


def _kind_key(kind: str, first_seen: dict[str, int]) -> tuple:
    base, _, suffix = kind.rpartition(".")
    if not base:
        base, suffix = kind, ""
    known = KIND_ORDER.index(base) if base in KIND_ORDER else len(KIND_ORDER)
    sfx = SUFFIX_ORDER.index(suffix) if suffix in SUFFIX_ORDER else len(SUFFIX_ORDER)
    return known, first_seen[base] if known == len(KIND_ORDER) else 0, sfx, kind


# -- summary ------------------------------------------------------------------------------------------

def model_summary(gguf: GGUFFile) -> dict:
    """The hyperparameters people ask for first, read leniently (any architecture, missing keys: None)."""
    md = gguf.metadata
    arch = md.get("general.architecture")

    def a(key):
        return md.get(f"{arch}.{key}")

    tokens = md.get("tokenizer.ggml.tokens")
    embd = gguf.tensors.get("token_embd.weight")
    file_type = md.get("general.file_type")
    try:
        file_type_name = LlamaFileType(file_type).name if file_type is not None else None
    except ValueError:
        file_type_name = None
    n_head, n_embd = a("attention.head_count"), a("embedding_length")
    head_dim = a("attention.key_length")
    if head_dim is None and isinstance(n_head, int) and isinstance(n_embd, int) and n_head:
        head_dim = n_embd // n_head
    return {
        "architecture": arch,
        "name": md.get("general.name"),
        "n_layer": a("block_count"),
        "n_embd": n_embd,
        "n_ff": a("feed_forward_length"),
        "n_head": n_head,
        "n_head_kv": a("attention.head_count_kv"),
        "head_dim": head_dim,
        "n_ctx_train": a("context_length"),
        "rope_freq_base": a("rope.freq_base"),
        "vocab_size": len(tokens) if isinstance(tokens, list) else (embd.shape[0] if embd else a("vocab_size")),
        "tokenizer": md.get("tokenizer.ggml.model"),
        "tokenizer_pre": md.get("tokenizer.ggml.pre"),
        "tied_embeddings": "output.weight" not in gguf.tensors if embd else None,
        "file_type": file_type,
        "file_type_name": file_type_name,
    }


def plan_summary(gguf: GGUFFile) -> Optional[dict]:
    """Our converter's `qkvgguf.*` keys (docs/gguf-metadata.md) checked against the tensor records."""
    md = gguf.metadata
    if not any(k.startswith("qkvgguf.") for k in md):
        return None
    plan: dict[str, str] = {}
    malformed = []
    entries = md.get("qkvgguf.tensor_types")
    for entry in entries if isinstance(entries, list) else []:
        name, sep, qtype = str(entry).rpartition("=")
        if sep:
            plan[name] = qtype
        else:
            malformed.append(str(entry))
    counts: dict[str, int] = {}
    for qtype in plan.values():
        counts[qtype] = counts.get(qtype, 0) + 1
    retyped = [{"name": n, "plan": t, "file": gguf.tensors[n].type.name}
               for n, t in plan.items() if n in gguf.tensors and gguf.tensors[n].type.name != t]
    return {
        "version": md.get("qkvgguf.version"),
        "source": md.get("qkvgguf.source"),
        "outtype": md.get("qkvgguf.outtype"),
        "n_planned": len(plan),
        "types": counts,
        "matches_tensors": plan.keys() == gguf.tensors.keys() and not retyped and not malformed,
        "retyped": retyped,  # tensors whose record type differs from the plan
        "not_in_file": [n for n in plan if n not in gguf.tensors],
        "not_in_plan": [n for n in gguf.tensors if n not in plan] if plan else [],
        "malformed": malformed,
        "auto": {k[len("qkvgguf.auto."):]: v for k, v in md.items() if k.startswith("qkvgguf.auto.")} or None,
    }


def data_region(gguf: GGUFFile) -> dict:
    """Where the tensor bytes lie: the data region [data_offset, file_size) is the tensors plus the
    alignment padding between them (and after the last one); overlaps would be a corrupt file."""
    spans = sorted((t.offset, t.offset + t.n_bytes) for t in gguf.tensors.values())
    gaps, overlaps, pos = 0, 0, gguf.data_offset
    for start, end in spans:
        if start < pos:
            overlaps += 1
        else:
            gaps += start - pos
        pos = max(pos, end)
    tail = gguf.file_size - pos
    return {
        "offset": gguf.data_offset,
        "region_bytes": gguf.file_size - gguf.data_offset,
        "tensor_bytes": gguf.tensor_data_bytes,
        "padding_bytes": gaps + tail,
        "overlapping_tensors": overlaps,
    }


def layer_table(gguf: GGUFFile) -> dict:
    """Per block: the type of each tensor kind, bytes, bits per weight; plus the tensors outside blocks."""
    layers: dict[int, dict] = {}
    first_seen: dict[str, int] = {}
    other = []
    for t in gguf.tensors.values():
        split = split_block_name(t.name)
        if split is None:
            other.append({"name": t.name, "type": t.type.name, "n_bytes": t.n_bytes,
                          "bits_per_weight": round(t.bits_per_weight, 4)})
            continue
        i, kind = split
        first_seen.setdefault(kind.rpartition(".")[0] or kind, len(first_seen))
        row = layers.setdefault(i, {"layer": i, "types": {}, "bits": {}, "kind_bytes": {}, "n_bytes": 0,
                                    "n_elements": 0})
        row["types"][kind] = t.type.name
        row["bits"][kind] = round(t.bits_per_weight, 4)
        row["kind_bytes"][kind] = t.n_bytes
        row["n_bytes"] += t.n_bytes
        row["n_elements"] += t.n_elements
    kinds = sorted({k for row in layers.values() for k in row["types"]}, key=lambda k: _kind_key(k, first_seen))
    rows = []
    for i in sorted(layers):
        row = layers[i]
        row["bits_per_weight"] = round(8 * row["n_bytes"] / row["n_elements"], 4) if row["n_elements"] else 0.0
        rows.append(row)
    return {"kinds": kinds, "layers": rows, "other": other}


def summarize(gguf: GGUFFile, full_arrays: bool = False) -> dict:
    tensors = []
    by_type: dict[str, dict] = {}
    for t in gguf.tensors.values():
        tensors.append({
            "name": t.name, "type": t.type.name, "shape": list(t.shape), "ne": list(t.shape)[::-1],
            "n_elements": t.n_elements,
            "n_bytes": t.n_bytes, "bits_per_weight": round(t.bits_per_weight, 4), "offset": t.offset,
        })
        s = by_type.setdefault(t.type.name, {"type": t.type.name, "n_tensors": 0, "n_elements": 0, "n_bytes": 0})
        s["n_tensors"] += 1
        s["n_elements"] += t.n_elements
        s["n_bytes"] += t.n_bytes
    n_elements = sum(t["n_elements"] for t in tensors)
    n_bytes = gguf.tensor_data_bytes
    types = sorted(by_type.values(), key=lambda s: -s["n_bytes"])
    for s in types:
        s["share"] = round(s["n_bytes"] / n_bytes, 6) if n_bytes else 0.0
        s["bits_per_weight"] = round(8 * s["n_bytes"] / s["n_elements"], 4)
    metadata = {k: (v if full_arrays else metadata_preview(v)) for k, v in gguf.metadata.items()}
    metadata_types = {k: metadata_type(gguf.metadata_types.get(k, [])) for k in gguf.metadata}
    return {
        "file": gguf.path,
        "file_size": gguf.file_size,
        "gguf_version": gguf.version,
        "alignment": gguf.alignment,
        "data_offset": gguf.data_offset,
        "architecture": gguf.metadata.get("general.architecture"),
        "name": gguf.metadata.get("general.name"),
        "model": model_summary(gguf),
        "plan": plan_summary(gguf),
        "data": data_region(gguf),
        "metadata": metadata,
        "metadata_types": metadata_types,  # key -> gguf value type: uint32, float32, string, array[string], ...
        "types": types,
        "layers": layer_table(gguf),
        "tensors": tensors,
        "totals": {
            "n_tensors": len(tensors), "n_elements": n_elements, "n_bytes": n_bytes,
            "bits_per_weight": round(8 * n_bytes / n_elements, 4) if n_elements else 0.0,
        },
    }


# -- text ---------------------------------------------------------------------------------------------

def fmt_value(value: Any, width: int = 100) -> str:
    if isinstance(value, dict) and "array_length" in value:
        items: list[str] = []
        for v in value["head"]:
            text = repr(v)
            if items and sum(len(t) + 2 for t in items) + len(text) > width - 20:
                break
            items.append(text if len(text) <= width - 20 else text[:width - 23] + "...")
        return f"[{', '.join(items)}, ...] ({value['array_length']:,} items)"
    if isinstance(value, list) and len(value) > ARRAY_PREVIEW:
        return fmt_value(metadata_preview(value), width)
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _num(v: Any, spec: str) -> str:
    """A metadata number in a format spec; a value of another type (a hostile or careless file: a
    string, an array) is shown as it is instead of breaking the view."""
    return format(v, spec) if _is_number(v) else fmt_value(v, 40)


def _model_lines(summary: dict) -> list[str]:
    m = summary["model"]
    out = []
    if m["architecture"] is not None:
        parts = [str(m["architecture"])]
        if m["n_layer"] is not None:
            parts.append(f"{m['n_layer']} layers")
        for key in ("n_embd", "n_ff"):
            if m[key] is not None:
                parts.append(f"{key} {m[key]}")
        if m["n_head"] is not None:
            heads = f"heads {m['n_head']}"
            if m["n_head_kv"] is not None and m["n_head_kv"] != m["n_head"]:
                heads += f"/{m['n_head_kv']} kv"
            if m["head_dim"]:
                heads += f" x {m['head_dim']}"
            parts.append(heads)
        if m["n_ctx_train"] is not None:
            parts.append(f"context {_num(m['n_ctx_train'], ',')}")
        out.append("  model: " + ", ".join(parts))
        line = []
        if m["vocab_size"] is not None:
            tok = "/".join(str(x) for x in (m["tokenizer"], m["tokenizer_pre"]) if x)
            line.append(f"vocab {_num(m['vocab_size'], ',')}" + (f" ({tok})" if tok else ""))
        if m["tied_embeddings"]:
            line.append("tied embeddings")
        if m["rope_freq_base"] is not None:
            line.append(f"rope base {_num(m['rope_freq_base'], 'g')}")
        if line:
            out.append("         " + ", ".join(line))
    p = summary["plan"]
    if p is not None:
        counts = ", ".join(f"{n} {t}" for t, n in sorted(p["types"].items(), key=lambda kv: -kv[1]))
        src = f" from '{p['source']}'" if p["source"] else ""
        out.append(f"  plan: qkvgguf {p['version']} --outtype {p['outtype']}{src}: {counts or 'no tensor_types'}")
        if p["matches_tensors"]:
            out.append("        matches the tensor records")
        else:
            bad = [f"{r['name']} {r['plan']} -> {r['file']}" for r in p["retyped"][:3]]
            bad += [f"{n} missing" for n in p["not_in_file"][:3]] + [f"{n} not planned" for n in p["not_in_plan"][:3]]
            n_bad = len(p["retyped"]) + len(p["not_in_file"]) + len(p["not_in_plan"]) + len(p["malformed"])
            out.append(f"        differs from the tensor records in {n_bad} place(s): {'; '.join(bad)}"
                       + ("; ..." if n_bad > len(bad) else ""))
        a = p.get("auto")
        if a:
            how = a.get("sensitivity")
            err = (f"predicted KL {_num(a.get('weighted_error'), '.4g')} nats/token ({how})"
                   if isinstance(how, str) and how.startswith("fisher") else
                   f"weighted error {_num(a.get('weighted_error'), '.4g')}")
            out.append(f"        auto: target {a.get('target')}, {_num(a.get('bpw'), '.3f')} bits per weight, {err}")
            out.append(f"        calibration: {a.get('calibration')} ({a.get('calibration_chunks')} chunks)")
            lb = a.get("layer_bpw")
            if isinstance(lb, list) and lb and all(_is_number(x) for x in lb):
                out.append(f"        bits per weight by layer: min {min(lb):.2f}, max {max(lb):.2f} "
                           "(per layer table below)")
    return out


def _layer_lines(layers: dict) -> list[str]:
    kinds, rows = layers["kinds"], layers["layers"]
    if not rows:
        return []
    # header: the group (attn, ffn) on one line, the rest of the kind name below
    groups, labels = [], []
    for k in kinds:
        label = k[:-len(".weight")] if k.endswith(".weight") else k
        group, sep, rest = label.partition("_")
        groups.append(group if sep else "")
        labels.append(rest if sep else label)
    widths = [max(len(lab), *(len(r["types"].get(k, "-")) for r in rows)) for k, lab in zip(kinds, labels)]
    # (a row for a run of blocks is labelled first-last: up to 9 characters)
    top, prev = [], None
    for g, w in zip(groups, widths):
        top.append(f"{(g if g != prev else ''):<{w}}")
        prev = g
    out = ["per layer (type of each tensor):", ("  " + f"{'':>5} " + " ".join(top)).rstrip(),
           "  " + f"{'blk':>5} " + " ".join(f"{lab:<{w}}" for lab, w in zip(labels, widths))
           + f" {'bytes':>10} {'bpw':>6}"]
    for first, last, r in collapse_layers(rows):
        cells = " ".join(f"{r['types'].get(k, '-'):<{w}}" for k, w in zip(kinds, widths))
        label = str(first) if first == last else f"{first}-{last}"
        out.append(f"  {label:>5} {cells} {format_bytes(r['n_bytes']):>10} {r['bits_per_weight']:>6.2f}")
    return out


def collapse_layers(rows: list[dict]) -> list[tuple[int, int, dict]]:
    """Runs of consecutive blocks with the same types and bytes as (first, last, row): 30 identical
    blocks print as one row `0-29`."""
    out: list[tuple[int, int, dict]] = []
    for r in rows:
        if out:
            first, last, prev = out[-1]
            if (r["layer"] == last + 1 and r["types"] == prev["types"] and r["kind_bytes"] == prev["kind_bytes"]):
                out[-1] = (first, r["layer"], prev)
                continue
        out.append((r["layer"], r["layer"], r))
    return out


def render(summary: dict, show_tensors: bool = False, show_metadata: bool = False) -> str:
    out = []
    tot = summary["totals"]
    out.append(f"{summary['file']}" + (f"  '{summary['name']}'" if summary["name"] else ""))
    out.append(
        f"  GGUF v{summary['gguf_version']}, {format_bytes(summary['file_size'])}, {tot['n_tensors']} tensors, "
        f"{tot['n_elements'] / 1e6:.1f}M parameters, {tot['bits_per_weight']:.2f} bits per weight"
        + (f", {summary['model']['file_type_name']}" if summary["model"]["file_type_name"] else "")
    )
    out.extend(_model_lines(summary))
    if show_metadata:
        out.append("")
        out.append("metadata:")
        width = max((len(k) for k in summary["metadata"]), default=0)
        types = summary.get("metadata_types", {})
        tw = max((len(types.get(k, "")) for k in summary["metadata"]), default=0)
        for k, v in summary["metadata"].items():
            n = v["array_length"] if isinstance(v, dict) and "array_length" in v else len(v) if isinstance(v, list) else 0
            vtype = types.get(k, "") + (f" x {n:,}" if types.get(k, "").startswith("array") else "")
            out.append(f"  {k:<{width}}  {vtype:<{tw + 10}}  {fmt_value(v)}")
    out.append("")
    out.append("types:")
    out.append(f"  {'type':<6} {'tensors':>8} {'parameters':>14} {'bytes':>14} {'share':>7} {'bpw':>7}")
    for s in summary["types"]:
        out.append(
            f"  {s['type']:<6} {s['n_tensors']:>8} {s['n_elements']:>14,} {s['n_bytes']:>14,} "
            f"{100 * s['share']:>6.1f}% {s['bits_per_weight']:>7.3f}"
        )
    layer_lines = _layer_lines(summary["layers"])
    if layer_lines:
        out.append("")
        out.extend(layer_lines)
    other = summary["layers"]["other"]
    if other:
        out.append("other: " + ", ".join(f"{t['name']} {t['type']} {format_bytes(t['n_bytes'])}" for t in other))
    if show_tensors:
        out.append("")
        out.append("tensors:")
        nw = max((len(t["name"]) for t in summary["tensors"]), default=4)
        out.append(f"  {'name':<{nw}} {'type':<6} {'shape (ne)':<16} {'bytes':>12} {'bpw':>7} {'offset':>14}")
        for t in summary["tensors"]:
            shape = ggml_shape(t["shape"])
            out.append(f"  {t['name']:<{nw}} {t['type']:<6} {shape:<16} {t['n_bytes']:>12,} "
                       f"{t['bits_per_weight']:>7.3f} {t['offset']:>14,}")
    out.append("")
    d = summary["data"]
    pad = f" + {d['padding_bytes']:,} bytes of padding" if d["padding_bytes"] else ""
    out.append(
        f"total: {tot['n_tensors']} tensors, {tot['n_elements']:,} parameters, "
        f"{tot['n_bytes']:,} bytes ({format_bytes(tot['n_bytes'])}){pad}, {tot['bits_per_weight']:.3f} bits per weight"
    )
    if d["overlapping_tensors"]:
        out.append(f"warning: {d['overlapping_tensors']} tensor(s) overlap the previous one's data")
    return "\n".join(out)
