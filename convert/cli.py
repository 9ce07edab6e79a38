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
import signal
import sys

from .writer import OUTTYPES

LOGGER = "qkvgguf.convert"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="HF_DIR", help="Hugging Face model folder (config.json, weights, tokenizer)")
    p.add_argument("-o", "--outfile", required=True, help="GGUF file to write")
    p.add_argument("--outtype", default="f16", choices=list(OUTTYPES), type=str.lower, metavar="TYPE",
                   help=f"type of 2-D weights, as llama-quantize names them, in any case: {', '.join(OUTTYPES)} "
                        "(q2_k, q3_k_s/m/l, q4_k_m, q5_k_m, iq4_nl, iq4_xs: llama.cpp's per-tensor recipes); "
                        "norms and 1-D tensors stay f32 (default f16)")
    p.add_argument("--force", action="store_true", help="overwrite OUTFILE if it exists")
    p.add_argument("--vocab-pre", metavar="NAME", default=None,
                   help="tokenizer.ggml.pre for a BPE tokenizer whose pre-tokenizer is not recognized "
                        "(e.g. llama-bpe, qwen2, smollm, gpt-2)")
    p.add_argument("--target-bpw", type=float, default=None,
                   help="with --outtype auto: bits per weight of the file's tensor data (e.g. 4.8)")
    p.add_argument("--fit", metavar="SIZE", default=None,
                   help="with --outtype auto: VRAM the model must fit whole with its KV cache (e.g. 4GiB; "
                        "see -c, -ctk, -ctv)")
    p.add_argument("-c", "--ctx-size", type=int, default=4096, help="with --fit: context length (default 4096)")
    p.add_argument("-ctk", "--cache-type-k", default="f16", help="with --fit: KV cache type for K (default f16)")
    p.add_argument("-ctv", "--cache-type-v", default="f16", help="with --fit: KV cache type for V (default f16)")
    p.add_argument("--imatrix", metavar="FILE", default=None,
                   help="importance matrix (llama.cpp's imatrix GGUF): reused if FILE exists, else computed "
                        "and saved there; weights the rounding of any quantized outtype")
    p.add_argument("--calib", metavar="FILE", default=None,
                   help="calibration text for the importance matrix (default: the packaged text, "
                        "qkvgguf/data/calibration.txt)")
    p.add_argument("--calib-chunks", type=int, default=24, help="512-token chunks of calibration text (default 24)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="convert weights holding NaN or infinity (refused by default, naming the tensor)")
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


class Terminated(KeyboardInterrupt):
    """SIGTERM during a conversion: unwinds like Ctrl-C, so the temporary output is removed."""


def _terminated(signum, frame):
    raise Terminated()


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .pipeline import convert

    _setup_logging(args.verbose)
    bar = None

    def progress(n: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="converting",
                       file=sys.stderr, disable=None)  # None: off when stderr is not a terminal
        bar.update(n)

    from qkvgguf.errors import QkvggufError
    from qkvgguf.units import parse_size

    from .mixed import Target

    target = None
    if args.target_bpw is not None and args.fit is not None:
        raise QkvggufError("give one of --target-bpw and --fit, not both")
    if args.outtype == "auto":
        if args.target_bpw is None and args.fit is None:
            raise QkvggufError("--outtype auto needs a target: --target-bpw BITS or --fit SIZE")
        target = Target(bpw=args.target_bpw, fit_bytes=parse_size(args.fit) if args.fit else None,
                        n_ctx=args.ctx_size, type_k=args.cache_type_k, type_v=args.cache_type_v)
    elif args.target_bpw is not None or args.fit is not None:
        raise QkvggufError("--target-bpw and --fit need --outtype auto")
    from qkvgguf.flags import number

    number("--target-bpw", args.target_bpw, 0.0, 64.0, lo_open=True)
    number("-c/--ctx-size", args.ctx_size, 1, 1 << 26)
    if args.calib_chunks < 1:
        raise QkvggufError(f"--calib-chunks must be at least 1, got {args.calib_chunks}")
    bars = {}

    def stage(name: str, done: int, total: int) -> None:
        if name not in bars:
            bars[name] = tqdm(total=total, desc=name, file=sys.stderr, disable=None)
        bars[name].update(done - bars[name].n)

    previous = signal.signal(signal.SIGTERM, _terminated)  # a kill cleans up as Ctrl-C does
    try:
        result = convert(args.model, args.outfile, args.outtype, force=args.force, vocab_pre=args.vocab_pre,
                         verbose=args.verbose, progress=progress, target=target, imatrix=args.imatrix,
                         calib=args.calib, calib_chunks=args.calib_chunks, stage=stage,
                         allow_nonfinite=args.allow_nonfinite)
    finally:
        signal.signal(signal.SIGTERM, previous)
        for b in [bar, *bars.values()]:
            if b is not None:
                b.close()
    n_fallback = sum(1 for t in result.tensors if t.reason)
    print(f"qkvgguf: wrote {result.path} ({result.outtype}, {len(result.tensors)} tensors, "
          f"{result.n_bytes / 2**20:.1f} MiB of weights, {result.seconds:.1f} s"
          + (f", {n_fallback} tensors fell back" if n_fallback else "") + ")", file=sys.stderr)
    return 0
