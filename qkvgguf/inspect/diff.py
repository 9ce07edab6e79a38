"""inspect --diff OTHER.gguf: what differs between two GGUF files, from their headers alone.

Metadata: keys only in one file, and keys whose value (or value type) changed; long arrays are
compared whole and shown by length and first differing index. Tensors: every tensor whose type or
shape changed, and the tensors only in one file. No tensor data is read.
"""

from __future__ import annotations

from typing import Any

from ..gguf_file import GGUFFile
from ..units import format_bytes
from .views import fmt_value, ggml_shape, metadata_preview


def _first_difference(a: list, b: list) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def _value_change(key: str, a: Any, b: Any) -> dict:
    change = {"key": key, "a": metadata_preview(a), "b": metadata_preview(b)}
    if isinstance(a, list) and isinstance(b, list):
        i = _first_difference(a, b)
        change["first_difference"] = {"index": i, "a": a[i] if i < len(a) else None, "b": b[i] if i < len(b) else None}
    return change


def diff(a: GGUFFile, b: GGUFFile) -> dict:
    ma, mb = a.metadata, b.metadata
    changed = [_value_change(k, ma[k], mb[k]) for k in ma
               if k in mb and (ma[k] != mb[k] or a.metadata_types[k] != b.metadata_types[k])]
    ta, tb = a.tensors, b.tensors
    tensor_changes = []
    type_changes: dict[str, int] = {}
    for name, x in ta.items():
        y = tb.get(name)
        if y is None or (x.type == y.type and x.shape == y.shape):
            continue
        tensor_changes.append({"name": name, "type_a": x.type.name, "type_b": y.type.name,
                               "shape_a": list(x.shape), "shape_b": list(y.shape),
                               "n_bytes_a": x.n_bytes, "n_bytes_b": y.n_bytes})
        if x.type != y.type:
            key = f"{x.type.name} -> {y.type.name}"
            type_changes[key] = type_changes.get(key, 0) + 1
    return {
        "a": a.path, "b": b.path,
        "metadata": {
            "only_a": {k: metadata_preview(ma[k]) for k in ma if k not in mb},
            "only_b": {k: metadata_preview(mb[k]) for k in mb if k not in ma},
            "changed": changed,
            "n_same": sum(1 for k in ma if k in mb) - len(changed),
        },
        "tensors": {
            "n_a": len(ta), "n_b": len(tb),
            "changed": tensor_changes,
            "type_changes": type_changes,
            "n_type_changed": sum(1 for c in tensor_changes if c["type_a"] != c["type_b"]),
            "n_shape_changed": sum(1 for c in tensor_changes if c["shape_a"] != c["shape_b"]),
            "only_a": [{"name": n, "type": t.type.name, "shape": list(t.shape)} for n, t in ta.items() if n not in tb],
            "only_b": [{"name": n, "type": t.type.name, "shape": list(t.shape)} for n, t in tb.items() if n not in ta],
            "n_same": sum(1 for n in ta if n in tb) - len(tensor_changes),
        },
        "n_bytes_a": a.tensor_data_bytes, "n_bytes_b": b.tensor_data_bytes,
    }


def _shape(s: list) -> str:
    return ggml_shape(s)


def render_diff(d: dict) -> str:
    md, td = d["metadata"], d["tensors"]
    out = [f"--- {d['a']}", f"+++ {d['b']}", ""]
    out.append(f"metadata: {len(md['changed'])} changed, {len(md['only_a'])} only in the first, "
               f"{len(md['only_b'])} only in the second, {md['n_same']} the same")
    width = max((len(k) for k in [*md["only_a"], *md["only_b"], *(c["key"] for c in md["changed"])]), default=0)
    for c in md["changed"]:
        line = f"  ~ {c['key']:<{width}}  {fmt_value(c['a'], 60)} -> {fmt_value(c['b'], 60)}"
        if "first_difference" in c:
            f = c["first_difference"]
            line += f"  (first difference at [{f['index']}]: {f['a']!r} -> {f['b']!r})"
        out.append(line)
    for k, v in md["only_a"].items():
        out.append(f"  - {k:<{width}}  {fmt_value(v, 80)}")
    for k, v in md["only_b"].items():
        out.append(f"  + {k:<{width}}  {fmt_value(v, 80)}")
    out.append("")
    kinds = ", ".join(f"{k}: {n}" for k, n in td["type_changes"].items())
    out.append(f"tensors: {td['n_a']} in the first, {td['n_b']} in the second; {td['n_type_changed']} changed type"
               + (f" ({kinds})" if kinds else "") + f", {td['n_shape_changed']} changed shape, "
               f"{len(td['only_a'])} only in the first, {len(td['only_b'])} only in the second, {td['n_same']} the same")
    nw = max((len(c["name"]) for c in [*td["changed"], *td["only_a"], *td["only_b"]]), default=0)
    for c in td["changed"]:
        types = f"{c['type_a']} -> {c['type_b']}" if c["type_a"] != c["type_b"] else c["type_a"]
        shapes = (f"{_shape(c['shape_a'])} -> {_shape(c['shape_b'])}" if c["shape_a"] != c["shape_b"]
                  else _shape(c["shape_a"]))
        out.append(f"  ~ {c['name']:<{nw}}  {types:<14} {shapes:<16} {c['n_bytes_a']:>12,} -> {c['n_bytes_b']:,} bytes")
    for c in td["only_a"]:
        out.append(f"  - {c['name']:<{nw}}  {c['type']:<14} {_shape(c['shape'])}")
    for c in td["only_b"]:
        out.append(f"  + {c['name']:<{nw}}  {c['type']:<14} {_shape(c['shape'])}")
    out.append("")
    out.append(f"tensor data: {d['n_bytes_a']:,} -> {d['n_bytes_b']:,} bytes "
               f"({format_bytes(d['n_bytes_a'])} -> {format_bytes(d['n_bytes_b'])})")
    return "\n".join(out)
