"""inspect --tensor NAME: the block layout of one tensor, its first blocks decoded, value statistics,
a histogram of its quant codes, and (with --ref) its quantization error against another copy.

The block layouts and decoders are the weight-type registry's (qkvgguf/quants: each record's
`layout` and `decode`); `LAYOUTS` and `DECODERS` read it when used. A layout lists the fields of one
block in byte order, with their sizes, so the arithmetic is visible (`Q4_1: d 2 + m 2 + qs 16 = 20
bytes for 32 weights`); tests check each layout's sizes against `gguf.GGML_QUANT_SIZES` and each
decoder against `gguf.quants.dequantize`.

A decoder (numpy blocks in, `Codes` out) turns blocks of bytes into what they store, in one form for every type:

    q      (n, block_size)  the quant codes as stored (Q4_0: 0..15, Q8_0: -128..127, Q6_K: 0..63)
    scale  (n, n_sub)       per sub-block (Q4_K: 8 of 32, Q6_K: 16 of 16, the 32-blocks: 1)
    bias   (n, n_sub)
    x = scale * (q - zero) + bias        in float32, the same operations as gguf.quants
                                         (IQ4_NL, IQ4_XS: scale * levels[q] + bias, a 16-level table)

so `Q4_K`'s `x = (d * sc) * q - dmin * m` is scale = d * sc, bias = -(dmin * m), zero 0; `Q4_0`'s
`x = d * (q - 8)` is scale = d, bias 0, zero 8. The values themselves come from the quant registry's
dequantizer (what the runtime computes); types it lacks fall back to `gguf.quants.dequantize`, and
the report says so.

Statistics, the histogram and the error are accumulated over chunks of rows, so a tensor costs
about one chunk of float32 memory however large it is (a `--ref` Hugging Face tensor is loaded whole).
"""

from __future__ import annotations

import difflib
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from gguf import GGMLQuantizationType as T

from ..errors import QkvggufError, UnsupportedError
from ..gguf_file import GGUFFile, TensorInfo
from ..quants import FORMATS, Codes, Field, View, block_sizes, type_name
from .views import ggml_shape

OUTLIER_STD = 6.0  # a value is an outlier when |x - mean| > OUTLIER_STD * std
CHUNK_ELEMENTS = 1 << 22  # rows are processed about 4M values (16 MB of float32) at a time
DEFAULT_BLOCKS = 3  # blocks decoded in the text view
FLOAT_VALUES = 16  # values shown for float types, whose blocks are single values


# -- the block layouts and decoders: the weight-type registry's -------------------------------------

@dataclass(frozen=True)
class BlockLayout:
    """A registry record's `Layout` with its type and sizes (qkvgguf/quants)."""
    type: int
    block_size: int  # elements per block
    fields: tuple[Field, ...]  # in byte order, back to back
    formula: str
    q_range: Optional[tuple[int, int]] = None  # stored quant codes, inclusive; None for float types
    sub_block: int = 1  # elements sharing one scale

    @property
    def type_size(self) -> int:
        return self.fields[-1].end

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size


def _layouts() -> dict[int, BlockLayout]:
    return {t: BlockLayout(t, f.block_size, f.layout.fields, f.layout.formula, f.layout.q_range,
                           f.layout.sub_block or f.block_size)
            for t, f in FORMATS.items() if f.layout is not None}


# read from the registry when used: a type registered later (a test's throw-away type) shows up
LAYOUTS = View(_layouts)
DECODERS = View(lambda: {t: f.decode for t, f in FORMATS.items() if f.decode is not None})
Decoded = Codes


# -- finding tensors ----------------------------------------------------------------------------------

def find_tensor(gguf: GGUFFile, name: str) -> TensorInfo:
    """The tensor, or a one-line error naming the closest names."""
    if name in gguf.tensors:
        return gguf.tensors[name]
    close = difflib.get_close_matches(name, list(gguf.tensors), n=3, cutoff=0.6)
    if not close:  # a layer number or kind alone: match on the parts
        close = [n for n in gguf.tensors if name in n][:3]
    hint = f"; closest: {', '.join(close)}" if close else f" (it has {len(gguf.tensors)}; see --tensors)"
    raise QkvggufError(f"{gguf.path}: no tensor '{name}'{hint}")


# -- values ---------------------------------------------------------------------------------------------

def dequantizer(qtype: T) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """(raw rows uint8 -> float32 rows, which implementation). Ours where we have one."""
    from .. import quants

    if qtype not in FORMATS:
        import gguf.quants

        def fallback(raw: np.ndarray) -> np.ndarray:
            try:
                return gguf.quants.dequantize(raw, qtype).astype(np.float32, copy=False)
            except NotImplementedError:
                raise UnsupportedError(f"ggml type {type_name(qtype)} cannot be dequantized "
                                       f"(neither qkvgguf nor gguf.quants implement it)") from None

        return fallback, f"gguf.quants (qkvgguf has no {type_name(qtype)} dequantizer)"
    import torch

    def run(raw: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():  # read-only map: the dequantizer never writes its input
            warnings.simplefilter("ignore", UserWarning)
            return quants.dequantize(torch.from_numpy(raw), qtype).numpy()

    return run, "qkvgguf.quants"


def _row_chunks(n_rows: int, row_len: int):
    step = max(1, CHUNK_ELEMENTS // max(row_len, 1))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


class _Moments:
    """count, sum, sum of squares (float64), min, max, non-finite count; over chunks."""

    def __init__(self):
        self.n = self.n_nonfinite = 0
        self.s = self.ss = 0.0
        self.lo, self.hi = math.inf, -math.inf

    def add(self, x: np.ndarray) -> None:
        finite = np.isfinite(x)
        if not finite.all():
            self.n_nonfinite += int(x.size - finite.sum())
            x = x[finite]
        if x.size:
            x64 = x.astype(np.float64)
            self.n += x.size
            self.s += float(x64.sum())
            self.ss += float(np.dot(x64.ravel(), x64.ravel()))
            self.lo, self.hi = min(self.lo, float(x.min())), max(self.hi, float(x.max()))

    @property
    def mean(self) -> float:
        return self.s / self.n if self.n else math.nan

    @property
    def std(self) -> float:
        return math.sqrt(max(self.ss / self.n - self.mean ** 2, 0.0)) if self.n else math.nan


# -- the reference copy ---------------------------------------------------------------------------------

def hf_tensor_name(arch, gguf_name: str) -> Optional[str]:
    """GGUF name -> the Hugging Face name, read backwards off the architecture's TENSORS table."""
    for hf, g in arch.TENSORS.items():
        pattern = re.escape(g).replace(re.escape("{i}"), r"(\d+)")
        m = re.fullmatch(pattern, gguf_name)
        if m:
            return hf.format(i=int(m[1])) if m.groups() else hf
    return None


def load_reference(ref: str, info: TensorInfo) -> tuple[Callable[[slice], np.ndarray], dict]:
    """(rows -> float32 values of the reference tensor, a description) for a GGUF file or HF folder."""
    if os.path.isdir(ref):
        from ..convert.arch import for_config
        from ..convert.checkpoint import Checkpoint

        ckpt = Checkpoint(ref)
        try:
            arch = for_config(ckpt.config, os.path.join(ref, "config.json"))
            hf = hf_tensor_name(arch, info.name)
            if hf is None or hf not in ckpt.tensors:
                raise QkvggufError(f"{ref}: no checkpoint tensor for '{info.name}' "
                                   f"(looked for {hf or 'a name in the ' + arch.hf_arch + ' table'})")
            import torch

            values = arch.transform(info.name, ckpt.load(hf).to(torch.float32)).numpy()
            dtype = str(ckpt.tensors[hf].dtype)
        finally:
            ckpt.close()
        if tuple(values.shape) != info.shape:
            raise QkvggufError(f"{ref}: '{hf}' has shape {tuple(values.shape)}, expected {info.shape} "
                               f"for '{info.name}'")
        values = values.reshape(-1, info.shape[-1])
        return (lambda rows: values[rows]), {"ref": ref, "kind": "hf", "tensor": hf, "type": dtype}
    other = GGUFFile(ref)
    t = find_tensor(other, info.name)
    if t.shape != info.shape:
        raise QkvggufError(f"{ref}: tensor '{t.name}' has shape {t.shape}, expected {info.shape} as in the file")
    deq, _ = dequantizer(t.type)
    raw = np.asarray(other.raw(t.name))
    return (lambda rows: deq(raw[rows])), {"ref": ref, "kind": "gguf", "tensor": t.name, "type": type_name(t.type)}


# -- the report -----------------------------------------------------------------------------------------

def _layout_dict(info: TensorInfo) -> dict:
    block, size = block_sizes(info.type)
    lay = LAYOUTS.get(info.type)
    out = {"type": type_name(info.type), "block_size": block, "type_size": size, "bits_per_weight": 8 * size / block,
           "n_blocks": info.n_elements // block, "blocks_per_row": info.shape[-1] // block}
    if lay is not None:
        out.update(formula=lay.formula, sub_block=lay.sub_block, q_range=list(lay.q_range) if lay.q_range else None,
                   fields=[{"name": f.name, "start": f.start, "end": f.end, "bytes": f.end - f.start,
                            "what": f.what} for f in lay.fields])
    return out


def _block_dict(dec: Decoded, i: int, index: int, blocks_per_row: int, block_size: int, values: np.ndarray) -> dict:
    fields = {}
    for k, v in dec.fields.items():
        x = v[i]
        fields[k] = x.tolist() if isinstance(x, np.ndarray) else (float(x) if np.issubdtype(v.dtype, np.floating)
                                                                  else int(x))
    out = {"index": index, "row": index // blocks_per_row, "column": index % blocks_per_row * block_size,
           "fields": fields, "zero": dec.zero, "scale": dec.scale[i].tolist(), "bias": dec.bias[i].tolist(),
           "q": dec.q[i].tolist(), "values": values.tolist()}
    if dec.levels is not None:  # x = scale * levels[q] + bias
        out["levels"] = dec.levels.tolist()
    return out


def tensor_report(gguf: GGUFFile, name: str, n_blocks: int = DEFAULT_BLOCKS, ref: Optional[str] = None) -> dict:
    """Everything `--tensor NAME` shows, as plain data. Reads this tensor's bytes (and the reference's)."""
    info = find_tensor(gguf, name)
    block, size = block_sizes(info.type)
    lay = LAYOUTS.get(info.type)
    decode = DECODERS.get(info.type)
    deq, impl = dequantizer(info.type)
    reference = load_reference(ref, info) if ref is not None else None
    raw = np.asarray(gguf.raw(info.name))  # (rows, row_bytes), a read-only view of the map
    n_rows, row_len = raw.shape[0], info.shape[-1]
    blocks_per_row = row_len // block

    report = {"name": info.name, "type": type_name(info.type), "shape": list(info.shape), "n_elements": info.n_elements,
              "n_bytes": info.n_bytes, "offset": info.offset, "layout": _layout_dict(info), "dequantizer": impl}
    if lay is None:
        report["note"] = f"no block layout table for {type_name(info.type)} (block of {block} elements in {size} bytes)"

    # the first blocks, decoded
    n_show = max(0, min(n_blocks if block > 1 else max(n_blocks, FLOAT_VALUES), info.n_elements // block))
    first = raw.reshape(-1, size)[:n_show] if n_show else raw.reshape(-1, size)[:0]
    shown_values = deq(np.ascontiguousarray(raw.reshape(-1)[:n_show * size]).reshape(1, -1)).reshape(n_show, block) \
        if n_show else np.zeros((0, block), np.float32)
    if decode is not None and n_show:
        dec = decode(first)
        report["blocks"] = [_block_dict(dec, i, i, blocks_per_row, block, shown_values[i]) for i in range(n_show)]
    else:
        report["blocks"] = [{"index": i, "row": i // blocks_per_row, "column": i % blocks_per_row * block,
                             "values": shown_values[i].tolist()} for i in range(n_show)]

    # pass 1: moments, histogram of codes, reference error; pass 2: outliers (needs mean and std)
    moments = _Moments()
    hist = None
    if decode is not None and lay is not None and lay.q_range is not None:
        lo, hi = lay.q_range
        hist = np.zeros(hi - lo + 1, dtype=np.int64)
    err_ss = ref_ss = 0.0
    err_max = 0.0
    for rows in _row_chunks(n_rows, row_len):
        part = raw[rows]
        x = deq(part)
        moments.add(x)
        if hist is not None:
            q = decode(part.reshape(-1, size)).q
            hist += np.bincount((q - lo).ravel(), minlength=len(hist))[:len(hist)]
        if reference is not None:
            r = reference[0](rows).astype(np.float64)
            diff = x.astype(np.float64) - r
            err_ss += float(np.dot(diff.ravel(), diff.ravel()))
            ref_ss += float(np.dot(r.ravel(), r.ravel()))
            err_max = max(err_max, float(np.abs(diff).max()) if diff.size else 0.0)
    mean, std = moments.mean, moments.std
    outliers, max_z = 0, 0.0
    if moments.n and std > 0:
        for rows in _row_chunks(n_rows, row_len):
            x = deq(raw[rows])
            z = np.abs(x[np.isfinite(x)].astype(np.float64) - mean) / std
            outliers += int((z > OUTLIER_STD).sum())
            max_z = max(max_z, float(z.max()) if z.size else 0.0)
    if not moments.n:  # every value NaN/inf: nothing to average (JSON has no NaN)
        mean = std = None
    report["stats"] = {"min": moments.lo if moments.n else None, "max": moments.hi if moments.n else None,
                       "mean": mean, "std": std, "rms": math.sqrt(moments.ss / moments.n) if moments.n else None,
                       "outlier_threshold_std": OUTLIER_STD, "outliers": outliers, "max_abs_z": max_z,
                       "non_finite": moments.n_nonfinite}
    if hist is not None:
        report["histogram"] = {"codes": list(range(lo, hi + 1)), "counts": hist.tolist()}
    if reference is not None:
        n = info.n_elements
        rmse = math.sqrt(err_ss / n)
        ref_rms = math.sqrt(ref_ss / n)
        report["error"] = {**reference[1], "rmse": rmse, "max_abs": err_max,
                           "relative_rmse": rmse / ref_rms if ref_rms else None,  # None: JSON has no inf/nan
                           "snr_db": 20 * math.log10(ref_rms / rmse) if rmse and ref_rms else None}
    return report


# -- text -------------------------------------------------------------------------------------------

def _g(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.6g}"


def _histogram_lines(hist: dict, width: int = 40, max_rows: int = 16) -> list[str]:
    codes, counts = hist["codes"], hist["counts"]
    group = max(1, -(-len(codes) // max_rows))
    bins = [(codes[i], codes[min(i + group, len(codes)) - 1], sum(counts[i:i + group]))
            for i in range(0, len(codes), group)]
    total = max(sum(counts), 1)
    top = max(c for _, _, c in bins) or 1
    out = []
    for a, b, c in bins:
        label = f"{a}" if a == b else f"{a}..{b}"
        out.append(f"  {label:>11} {c:>12,} {100 * c / total:>6.2f}% {'#' * round(width * c / top)}")
    return out


def render_tensor(report: dict) -> str:
    lay = report["layout"]
    shape = f"[{ggml_shape(report['shape'])}]"
    out = [f"{report['name']}: {report['type']} {shape}, {report['n_elements']:,} values, {report['n_bytes']:,} bytes "
           f"at offset {report['offset']:,}"]
    out.append(f"  {lay['n_blocks']:,} blocks of {lay['block_size']} values in {lay['type_size']} bytes "
               f"({lay['bits_per_weight']:.4g} bits per weight), {lay['blocks_per_row']} per row")
    if "fields" in lay:
        out.append(f"  {lay['formula']}")
        out.append("  block bytes:")
        for f in lay["fields"]:
            out.append(f"    [{f['start']:>3}, {f['end']:>3})  {f['name']:<6} {f['bytes']:>3} B  {f['what']}")
    if "note" in report:
        out.append(f"  {report['note']}")
    if report["blocks"] and lay["block_size"] == 1:  # float types: a block is one value
        out.append("")
        out.append(f"first {len(report['blocks'])} values: " + " ".join(_g(b["values"][0]) for b in report["blocks"]))
    elif report["blocks"]:
        out.append("")
        out.append(f"first {len(report['blocks'])} block(s):")
        for b in report["blocks"]:
            out.append(f"  block {b['index']} (row {b['row']}, columns {b['column']}..{b['column'] + lay['block_size'] - 1})")
            if "q" not in b:  # a type without a decoder
                out.append("    x: " + " ".join(_g(v) for v in b["values"][:16]))
                continue
            f = b["fields"]
            scalars = [f"{k} = {_g(v)}" for k, v in f.items() if not isinstance(v, list)]
            out.append("    " + "  ".join(scalars + [f"zero {b['zero']}"]))
            n_sub = len(b["scale"])
            per = len(b["q"]) // n_sub
            if n_sub == 1:
                out.append("    q: " + " ".join(f"{q:>3}" for q in b["q"]))
            else:
                lists = {k: v for k, v in f.items() if isinstance(v, list)}
                head = " ".join(f"{k:>4}" for k in lists)
                has_bias = any(b["bias"])  # Q6_K has none: x = scale * (q - 32)
                out.append(f"    sub {head} {'scale':>11}" + (f" {'bias':>11}" if has_bias else "") + "  q")
                for j in range(n_sub):
                    vals = " ".join(f"{v[j]:>4}" for v in lists.values())
                    qs = " ".join(f"{q:>2}" for q in b["q"][j * per:(j + 1) * per])
                    bias = f" {_g(b['bias'][j]):>11}" if has_bias else ""
                    out.append(f"    {j:>3} {vals} {_g(b['scale'][j]):>11}{bias}  {qs}")
            out.append("    x: " + " ".join(_g(v) for v in b["values"][:8]) + (" ..." if len(b["values"]) > 8 else ""))
    s = report["stats"]
    out.append("")
    out.append(f"values ({report['dequantizer']}): min {_g(s['min'])}, max {_g(s['max'])}, mean {_g(s['mean'])}, "
               f"std {_g(s['std'])}, rms {_g(s['rms'])}")
    out.append(f"  outliers (|x - mean| > {s['outlier_threshold_std']:g} std): {s['outliers']:,} "
               f"({100 * s['outliers'] / max(report['n_elements'], 1):.4f}%), largest {s['max_abs_z']:.2f} std"
               + (f"; {s['non_finite']:,} NaN/inf" if s["non_finite"] else ""))
    if "histogram" in report:
        out.append("")
        out.append("quant codes (as stored):")
        out.extend(_histogram_lines(report["histogram"]))
    if "error" in report:
        e = report["error"]
        out.append("")
        rel = "-" if e["relative_rmse"] is None else _g(e["relative_rmse"])
        snr = "identical" if e["rmse"] == 0 else ("-" if e["snr_db"] is None else f"{e['snr_db']:.2f} dB")
        out.append(f"error vs {e['ref']} ({e['tensor']}, {e['type']}): rmse {_g(e['rmse'])}, "
                   f"max abs {_g(e['max_abs'])}, relative rmse {rel}, SNR {snr}")
    return "\n".join(out)
