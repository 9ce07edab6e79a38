"""`qkvgguf convert HF_DIR [-o OUT.gguf] --outtype TYPE`: a thin layer over `convert()`.

Wiring (in qkvgguf/cli.py):

    p = sub.add_parser("convert", help="convert a Hugging Face checkpoint to GGUF")
    add_arguments(p)
    p.set_defaults(func=run)

`run` returns 0; user errors raise `QkvggufError` (the main CLI prints one line and exits 2).
Flag names follow llama.cpp's convert_hf_to_gguf.py where the concept is the same
(`--outfile`, `--outtype`); `-o` is a short form, and without it the file goes where llama.cpp puts
it: HF_DIR/NAME-OUTTYPE.gguf. Fallback warnings come once per kind (pipeline.warn_fallbacks); each
stage (an f16 copy and calibration for an importance matrix, measuring for `auto`, writing) is
announced as it starts and its bar closed when it ends (qkvgguf/progress.py, which also prints a
line every few seconds when stderr is not a terminal).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys

from .writer import OUTTYPES

LOGGER = "qkvgguf.convert"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="HF_DIR", help="Hugging Face model folder (config.json, weights, tokenizer)")
    p.add_argument("-o", "--outfile", default=None,
                   help="GGUF file to write (default, as llama.cpp: HF_DIR/NAME-OUTTYPE.gguf, NAME the folder's name)")
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
    p.add_argument("--sensitivity", choices=["fisher", "fisher-full", "weighted"], default="fisher",
                   help="with --outtype auto: how each tensor's error is measured: fisher (default; expected KL "
                        "divergence from the Fisher pass, one number per row and column), fisher-full (one per "
                        "weight: memory of the model in float32), weighted (the importance-weighted squared "
                        "error, the earlier proxy)")
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


def default_outfile(hf_dir: str, outtype: str) -> str:
    """llama.cpp's default name: the file goes into the model folder as NAME-OUTTYPE.gguf."""
    folder = os.path.abspath(hf_dir)
    return os.path.join(folder, f"{os.path.basename(folder)}-{outtype.upper()}.gguf")


STAGES = {  # what each stage of pipeline.convert does, for its announcement
    "f16 copy": "a temporary f16 copy of the weights for the calibration runs",
    "calibrating": "importance matrix: the model over {calib} chunks of 512 calibration tokens",
    "fisher": "the model forward and backward over {calib} chunks of 512 calibration tokens (importance "
              "matrix and each weight's effect on the output)",
    "measuring": "each tensor's error at each candidate type",
    "converting": "writing {out}",
}


def run(args: argparse.Namespace) -> int:
    from qkvgguf.errors import QkvggufError
    from qkvgguf.progress import Progress, Stages
    from qkvgguf.units import parse_size

    from .mixed import Target
    from .pipeline import convert

    _setup_logging(args.verbose)
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
    outfile = args.outfile
    if outfile is None:
        if not os.path.isdir(args.model):
            raise QkvggufError(f"{args.model}: not a directory")
        outfile = default_outfile(args.model, args.outtype)
    # the stages this run goes through, announced as they start ("stage 2/4: calibrating: ...")
    names = []
    fisher_pass = args.outtype == "auto" and args.sensitivity != "weighted"
    if args.outtype == "auto" or args.imatrix is not None:
        if fisher_pass or args.imatrix is None or not os.path.exists(args.imatrix):
            names += ["f16 copy", "calibrating"]
    if args.outtype == "auto":
        names.append("measuring")
    names.append("converting")

    def announce(name: str, total: int) -> None:
        if len(names) > 1:
            k = names.index(name) + 1 if name in names else 0
            what = STAGES.get("fisher" if fisher_pass and name == "calibrating" else name,
                              name).format(calib=args.calib_chunks, out=outfile)
            print(f"qkvgguf: stage {k}/{len(names)}: {name}: {what}", file=sys.stderr, flush=True)

    stages = Stages(announce, {"f16 copy": "bytes", "calibrating": "chunk", "measuring": "tensor"})
    bar = None

    def progress(n: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            stages.close()
            announce("converting", total)
            bar = Progress("converting", total, unit="bytes")
        bar.update(n)

    previous = signal.signal(signal.SIGTERM, _terminated)  # a kill cleans up as Ctrl-C does
    try:
        result = convert(args.model, outfile, args.outtype, force=args.force, vocab_pre=args.vocab_pre,
                         verbose=args.verbose, progress=progress, target=target, imatrix=args.imatrix,
                         calib=args.calib, calib_chunks=args.calib_chunks, stage=stages,
                         allow_nonfinite=args.allow_nonfinite, sensitivity=args.sensitivity)
    finally:
        signal.signal(signal.SIGTERM, previous)
        stages.close()
        if bar is not None:
            bar.close()
    n_fallback = sum(1 for t in result.tensors if t.reason)
    n_elements = sum(math.prod(t.shape) for t in result.tensors)
    bpw = 8 * result.n_bytes / n_elements if n_elements else 0.0
    print(f"qkvgguf: wrote {result.path} ({result.outtype}, {len(result.tensors)} tensors, "
          f"{result.n_bytes / 2**20:.1f} MiB of weights, {bpw:.2f} bits per weight, {result.seconds:.1f} s"
          + (f", {n_fallback} tensors fell back" if n_fallback else "") + ")", file=sys.stderr)
    return 0
