"""inspect: what is in a GGUF file, without reading tensor data.

`summarize(gguf)` returns plain data (what `--json` prints); `render(summary)` formats it for people.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from .gguf_file import GGUFFile
from .units import format_bytes

ARRAY_PREVIEW = 8  # items of a long metadata array shown in the text view


def _metadata_preview(value: Any) -> Any:
    if isinstance(value, list) and len(value) > ARRAY_PREVIEW:
        return {"array_length": len(value), "head": value[:ARRAY_PREVIEW]}
    return value


def summarize(gguf: GGUFFile, full_arrays: bool = False) -> dict:
    tensors = []
    by_type: "OrderedDict[str, dict]" = OrderedDict()
    for t in gguf.tensors.values():
        tensors.append({
            "name": t.name, "type": t.type.name, "shape": list(t.shape), "n_elements": t.n_elements,
            "n_bytes": t.n_bytes, "bits_per_weight": round(t.bits_per_weight, 4), "offset": t.offset,
        })
        s = by_type.setdefault(t.type.name, {"type": t.type.name, "n_tensors": 0, "n_elements": 0, "n_bytes": 0})
        s["n_tensors"] += 1
        s["n_elements"] += t.n_elements
        s["n_bytes"] += t.n_bytes
    n_elements = sum(t["n_elements"] for t in tensors)
    n_bytes = gguf.tensor_data_bytes
    for s in by_type.values():
        s["share"] = round(s["n_bytes"] / n_bytes, 6) if n_bytes else 0.0
        s["bits_per_weight"] = round(8 * s["n_bytes"] / s["n_elements"], 4)
    metadata = {k: (v if full_arrays else _metadata_preview(v)) for k, v in gguf.metadata.items()}
    return {
        "file": gguf.path,
        "file_size": gguf.file_size,
        "gguf_version": gguf.version,
        "alignment": gguf.alignment,
        "data_offset": gguf.data_offset,
        "architecture": gguf.metadata.get("general.architecture"),
        "name": gguf.metadata.get("general.name"),
        "metadata": metadata,
        "types": list(by_type.values()),
        "tensors": tensors,
        "totals": {
            "n_tensors": len(tensors), "n_elements": n_elements, "n_bytes": n_bytes,
            "bits_per_weight": round(8 * n_bytes / n_elements, 4) if n_elements else 0.0,
        },
    }


def _fmt_value(value: Any) -> str:
    if isinstance(value, dict) and "array_length" in value:
        head = ", ".join(repr(v) for v in value["head"])
        return f"[{head}, ...] ({value['array_length']:,} items)"
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def render(summary: dict, show_tensors: bool = True) -> str:
    out = []
    tot = summary["totals"]
    out.append(f"{summary['file']}")
    out.append(
        f"  GGUF v{summary['gguf_version']}, {format_bytes(summary['file_size'])}, "
        f"architecture {summary['architecture']}, {tot['n_tensors']} tensors, "
        f"{tot['n_elements'] / 1e6:.1f}M parameters, {tot['bits_per_weight']:.2f} bits per weight"
    )
    out.append("")
    out.append("metadata:")
    width = max((len(k) for k in summary["metadata"]), default=0)
    for k, v in summary["metadata"].items():
        out.append(f"  {k:<{width}}  {_fmt_value(v)}")
    out.append("")
    out.append("types:")
    out.append(f"  {'type':<6} {'tensors':>8} {'parameters':>14} {'bytes':>14} {'share':>7} {'bpw':>7}")
    for s in summary["types"]:
        out.append(
            f"  {s['type']:<6} {s['n_tensors']:>8} {s['n_elements']:>14,} {s['n_bytes']:>14,} "
            f"{100 * s['share']:>6.1f}% {s['bits_per_weight']:>7.3f}"
        )
    if show_tensors:
        out.append("")
        out.append("tensors:")
        nw = max((len(t["name"]) for t in summary["tensors"]), default=4)
        out.append(f"  {'name':<{nw}} {'type':<6} {'shape':<16} {'bytes':>12} {'bpw':>7}")
        for t in summary["tensors"]:
            shape = "x".join(str(d) for d in t["shape"])
            out.append(f"  {t['name']:<{nw}} {t['type']:<6} {shape:<16} {t['n_bytes']:>12,} {t['bits_per_weight']:>7.3f}")
    out.append("")
    out.append(
        f"total: {tot['n_tensors']} tensors, {tot['n_elements']:,} parameters, "
        f"{tot['n_bytes']:,} bytes ({format_bytes(tot['n_bytes'])}), {tot['bits_per_weight']:.3f} bits per weight"
    )
    return "\n".join(out)
