"""`qkvgguf convert HF_DIR -o OUT.gguf --outtype TYPE`: a thin layer over `convert()`.

Wiring (in qkvgguf/cli.py):

    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint to GGUF")
    add_arguments(p)
    p.set_defaults(func=run)

`run` returns 0; user errors raise `QkvggufError` (the main CLI prints one line and exits 2).
Flag names follow llama.cpp's convert_hf_to_gguf.py where the concept is the same
(`--outfile`, `--outtype`); `-o` is a short form.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .writer import OUTTYPES

LOGGER = "qkvgguf.convert"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="HF_DIR", help="Hugging Face model folder (config.json, weights, tokenizer)")
    p.add_argument("-o", "--outfile", required=True, help="GGUF file to write")
    p.add_argument("--outtype", default="f16", choices=list(OUTTYPES),
                   help="type of 2-D weights (q4_k_m, q5_k_m: llama.cpp's mixtures); norms and 1-D "
                        "tensors stay f32 (default f16)")
    p.add_argument("--force", action="store_true", help="overwrite OUTFILE if it exists")
    p.add_argument("--vocab-pre", metavar="NAME", default=None,
                   help="tokenizer.ggml.pre for a BPE tokenizer whose pre-tokenizer is not recognized "
                        "(e.g. llama-bpe, qwen2, smollm, gpt-2)")
    p.add_argument("-v", "--verbose", action="store_true", help="log one line per tensor")


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at emit time (it may be replaced after setup, e.g. by capture)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def _setup_logging(verbose: bool) -> None:
    log = logging.getLogger(LOGGER)
    if not any(getattr(h, "_qkvgguf", False) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("qkvgguf: %(message)s"))
        handler._qkvgguf = True  # type: ignore[attr-defined]
        log.addHandler(handler)
    log.setLevel(logging.INFO if verbose else logging.WARNING)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .convert import convert

    _setup_logging(args.verbose)
    bar = None

    def progress(n: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="converting",
                       file=sys.stderr, disable=None)  # None: off when stderr is not a terminal
        bar.update(n)

    try:
        result = convert(args.model, args.outfile, args.outtype, force=args.force, vocab_pre=args.vocab_pre,
                         verbose=args.verbose, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    n_fallback = sum(1 for t in result.tensors if t.reason)
    print(f"qkvgguf: wrote {result.path} ({result.outtype}, {len(result.tensors)} tensors, "
          f"{result.n_bytes / 2**20:.1f} MiB of weights, {result.seconds:.1f} s"
          + (f", {n_fallback} tensors fell back" if n_fallback else "") + ")", file=sys.stderr)
    return 0
