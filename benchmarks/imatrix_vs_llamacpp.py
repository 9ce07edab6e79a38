"""Our importance matrix (convert/imatrix.py, collected through qkvgguf's runtime) vs llama.cpp's
llama-imatrix on the same model, text and chunking; also checks that Imatrix.load reads
llama.cpp's file. Not part of CI (it needs the llama.cpp tools).

    python benchmarks/imatrix_vs_llamacpp.py [--tools /tmp/lcpp_tools/bin] [--ctx 256] [--chunks 4]

Building the tools: `pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`,
unpack, then in vendor/llama.cpp: cmake -B build -DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF
-DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF && cmake --build build --target llama-imatrix.

llama-imatrix tokenizes the whole text, cuts chunks of n_ctx tokens and, when the model adds BOS
(SmolLM2 does not), overwrites each chunk's first token with it; we feed our collector the same ids.
Both evaluate the Q4_1 SmolLM2 GGUF; llama.cpp's CPU matmuls quantize activations to 8 bits and we
do not, so the statistics agree to about a percent, not bit for bit.
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import texts  # noqa: E402

from qkvgguf import GGUFFile  # noqa: E402
from qkvgguf.convert.imatrix import Imatrix, collect_imatrix  # noqa: E402
from qkvgguf.default_model import default_model_path  # noqa: E402
from qkvgguf.tokenizer import Tokenizer  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tools", default="/tmp/lcpp_tools/bin")
    ap.add_argument("--model", default=None)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=4)
    a = ap.parse_args()
    model = str(a.model or default_model_path())
    text = texts.sherlock()[:40000]
    with tempfile.TemporaryDirectory() as tmp:
        tf, out = Path(tmp) / "calib.txt", Path(tmp) / "lcpp-imatrix.gguf"
        tf.write_text(text, "utf-8")
        t = time.time()
        subprocess.run([f"{a.tools}/llama-imatrix", "-m", model, "-f", str(tf), "-o", str(out), "-c", str(a.ctx),
                        "-b", str(a.ctx), "-ub", str(a.ctx), "--chunks", str(a.chunks), "--no-ppl",
                        "--process-output", "-t", "2"], check=True, capture_output=True)
        t_lcpp = time.time() - t
        theirs = Imatrix.load(out)
    tok = Tokenizer.from_gguf(GGUFFile(model))
    ids = tok.encode(text, add_special=True)
    n = a.ctx
    skip = 1 if tok.add_bos else 0  # llama.cpp overwrites the first token with BOS only if the model adds one
    ours_ids = [i for c in range(a.chunks) for i in ids[c * n + skip:(c + 1) * n]]
    t = time.time()
    ours = collect_imatrix(model, ours_ids, n_ctx=n, n_chunks=a.chunks, bos_id=tok.bos_id if skip else None)
    t_ours = time.time() - t
    names = sorted(set(theirs.values) & set(ours.values))
    rel, cols = [], []
    for name in names:
        o, r = ours.values[name], theirs.values[name]
        rel.append(np.linalg.norm(o - r) / np.linalg.norm(r))
        cols.append(np.abs(o / r - 1))
        assert ours.counts[name] == theirs.counts[name], (name, ours.counts[name], theirs.counts[name])
    rel = np.array(rel)
    worst = names[int(rel.argmax())]
    print(f"tensors compared: {len(names)} (llama.cpp {len(theirs.values)}, ours {len(ours.values)}); "
          f"{a.chunks} chunks of {n}; counts equal")
    first = names.index("blk.0.attn_q.weight")
    print(f"blk.0.attn_q.weight (normed embeddings, checks the tokens line up): {rel[first]:.2e}")
    cols = np.concatenate(cols)
    print(f"relative L2 difference of mean x^2 per tensor: median {np.median(rel):.4f}, "
          f"90th percentile {np.percentile(rel, 90):.4f}, max {rel.max():.4f} ({worst})")
    print(f"per column |ours / llama.cpp - 1|: median {np.median(cols):.4f}, 99th percentile "
          f"{np.percentile(cols, 99):.4f}; within 5%: {np.mean(cols < 0.05):.1%} of {len(cols)} columns")
    print(f"time: llama-imatrix {t_lcpp:.1f} s, ours {t_ours:.1f} s")


if __name__ == "__main__":
    main()
