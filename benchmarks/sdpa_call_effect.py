"""How far the 2026-12-06 prompt-attention change moves published perplexities: SDPA's 3-D call vs its 4-D one.

    python benchmarks/sdpa_call_effect.py [-m smollm2] [--chunks 4] [--types f16,q8_0,q4_0,q4g] [-t 1]

Until 2026-12-06 `runtime/ops.attention` called torch's scaled_dot_product_attention with 3-D tensors,
which on the CPU takes its math path; it now adds a batch dimension, which takes the flash kernel
(benchmarks/cpu_prompt.py times both). The two differ by float32 rounding (9e-7 against a float64
reference at 512 x 512), and perplexity tables computed before the change (the KV cache sections of
benchmarks/RESULTS.md) move by that rounding carried through the model, much more for 4-bit caches,
whose roundings flip. This runs the user's CLI, `qkvgguf perplexity -m M -f TEXT -c 512 --chunks N -t T
-ctk X -ctv X --json`, in-process, once as it is and once with the 3-D call restored (a wrapper around
torch's function), on War and Peace (tests/texts.py), and writes both perplexities per cache type to
--out (default benchmarks/results/sdpa_call_effect.json).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--types", default="f16,q8_0,q4_0,q4g")
    ap.add_argument("-t", "--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "sdpa_call_effect.json"))
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    import texts
    import torch.nn.functional as F

    from qkvgguf.cli import main as cli
    from qkvgguf.runtime import ops

    real = F.scaled_dot_product_attention

    def three_d(q, k, v, attn_mask=None, enable_gqa=False, **kw):  # the call as it was before 2026-12-06
        if q.dim() == 4 and q.shape[0] == 1:
            return real(q[0], k[0], v[0], attn_mask=attn_mask, enable_gqa=enable_gqa, **kw)[None]
        return real(q, k, v, attn_mask=attn_mask, enable_gqa=enable_gqa, **kw)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        text = os.path.join(tmp, "war_and_peace.txt")
        with open(text, "w", encoding="utf-8") as f:
            f.write(texts.war_and_peace())
        for t in args.types.split(","):
            row = {"type": t}
            for call, fn in (("3d", three_d), ("4d", real)):
                ops.F.scaled_dot_product_attention = fn
                out = io.StringIO()
                try:
                    with contextlib.redirect_stdout(out):
                        rc = cli(["perplexity", "-m", args.model, "-f", text, "-c", "512", "--chunks", str(args.chunks),
                                  "-t", str(args.threads), "-ctk", t, "-ctv", t, "--json"])
                finally:
                    ops.F.scaled_dot_product_attention = real
                if rc:
                    raise SystemExit(f"qkvgguf perplexity failed for {t} ({call})")
                row[f"ppl_{call}"] = json.loads(out.getvalue().strip().splitlines()[-1])["ppl"]
            row["relative_change"] = row["ppl_4d"] / row["ppl_3d"] - 1
            rows.append(row)
            print(f"{t:5} 3-D call {row['ppl_3d']:.5f}   4-D call {row['ppl_4d']:.5f}   {row['relative_change']:+.2e}",
                  flush=True)
    result = {"date": time.strftime("%Y-%m-%d"), "model": args.model, "chunks": args.chunks, "n_ctx": 512,
              "threads": args.threads, "command": "python benchmarks/sdpa_call_effect.py " + " ".join(sys.argv[1:]),
              "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
