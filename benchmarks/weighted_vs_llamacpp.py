"""Importance-weighted rounding, ours vs llama-quantize --imatrix, on SmolLM2 tensors.

Both quantize the same f32 weights (the SmolLM2 GGUF dequantized, written back as an f32 GGUF by
our converter) with the same importance matrix (ours, collected on Sherlock Holmes and saved in
llama.cpp's format). For each type we report the importance-weighted error sum_j I_j (w_j - ŵ_j)^2
of: our plain quantizer, ours with the imatrix, llama.cpp without and with the imatrix, summed over
the tensors that type fits (K-quants: the 1536-long ffn_down rows). Not part of CI.

    python benchmarks/weighted_vs_llamacpp.py [--tools /tmp/lcpp_tools/bin] [--types q4_0,q5_k]
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import texts  # noqa: E402
from convert_vs_llamacpp import build_checkpoint  # noqa: E402

from qkvgguf import GGUFFile, quants  # noqa: E402
from qkvgguf.convert import convert  # noqa: E402
from qkvgguf.convert.imatrix import collect_imatrix  # noqa: E402
from qkvgguf.quants.weighted import _plain  # noqa: E402


def _values(f: GGUFFile, name: str) -> np.ndarray:
    info = f.tensors[name]
    return quants.dequantize(torch.from_numpy(np.array(f.raw(name))), info.type).numpy()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tools", default="/tmp/lcpp_tools/bin")
    ap.add_argument("--types", default="q4_0,q4_1,q5_0,q5_1,q8_0,q4_k,q5_k,q6_k")
    ap.add_argument("--layers", default="0,6,12,18,24,29")
    a = ap.parse_args()
    types = [T[t.upper()] for t in a.types.split(",")]
    layers = [int(i) for i in a.layers.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf = build_checkpoint(tmp / "hf")
        f32 = tmp / "f32.gguf"
        convert(hf, f32, "f32")
        im = collect_imatrix(f32, texts.sherlock()[:40000], n_ctx=512, n_chunks=8)
        im.save(tmp / "imatrix.gguf")
        src = GGUFFile(str(f32))
        print(f"{'type':6} {'tensors':>7} {'ours plain':>11} {'ours imat':>10} {'llama.cpp':>10} {'llama.cpp imat':>15}"
              "   (importance-weighted squared error, summed)")
        for qt in types:
            block = quants.get_format(qt).block_size
            names = [f"blk.{i}.{k}.weight" for i in layers
                     for k in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
            names = [n for n in names if src.tensors[n].shape[-1] % block == 0]
            files = {}
            for tag, extra in (("plain", []), ("imat", ["--imatrix", str(tmp / "imatrix.gguf")])):
                out = tmp / f"{qt.name}-{tag}.gguf"
                subprocess.run([f"{a.tools}/llama-quantize", "--pure", *extra, str(f32), str(out), qt.name, "2"],
                               check=True, capture_output=True)
                files[tag] = GGUFFile(str(out))
            sums = np.zeros(4)
            for n in names:
                W, imp = _values(src, n), im.values[n]
                for k, raw in enumerate((_plain(W, qt), quants.quantize(W, qt, imp))):
                    d = quants.dequantize(torch.from_numpy(raw), qt).numpy()
                    sums[k] += float((imp[None] * (W - d) ** 2).sum())
                for k, tag in ((2, "plain"), (3, "imat")):
                    assert files[tag].tensors[n].type == qt, (n, files[tag].tensors[n].type)
                    sums[k] += float((imp[None] * (W - _values(files[tag], n)) ** 2).sum())
            print(f"{qt.name:6} {len(names):7d} {sums[0]:11.4g} {sums[1]:10.4g} {sums[2]:10.4g} {sums[3]:15.4g}")


if __name__ == "__main__":
    main()
