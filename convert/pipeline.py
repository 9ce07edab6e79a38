"""Hugging Face folder -> GGUF file: the order of the passes.

    convert(hf_dir, out_path, outtype)   # outtype: see writer.OUTTYPES (f16, q8_0, q4_k_m, ..., auto)

1. check the outtype and the output path (exists without force: error), so that a bad input fails
   before any work;
2. read config.json and the weights' headers (checkpoint.py), pick the architecture (arch/), read
   the vocab (vocab.py);
3. plan every tensor: GGUF name, shape, ggml type and byte size, from the headers alone (stream.plan);
4. with an importance matrix wanted and none given, or for `--outtype auto`: write the weights as
   a temporary f16 GGUF (stream.write), run the runtime over calibration text on it, delete it:
   `auto` runs the Fisher pass (fisher.collect_fisher: forward and backward, the importance matrix
   on the way), other outtypes the importance matrix alone (imatrix.collect_imatrix);
5. `--outtype auto`: measure each tensor's effect on the output (expected KL divergence per
   candidate type) and allocate types to the budget (mixed.auto_plan);
6. write the file (stream.write): a temporary file beside the target, renamed onto it at the end
   (any error or Ctrl-C removes it instead).

Each pass lives in its own module and knows nothing of the others; only this one knows their
order, so nothing calls `convert()` again (the f16 file of step 4 is a plain `stream.write`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from qkvgguf.errors import QkvggufError

from .arch import Arch, for_config
from .checkpoint import Checkpoint
from .fisher import collect_fisher
from .imatrix import Imatrix, ImatrixError, collect_imatrix, default_calibration_text
from .mixed import Target, auto_plan, check_budget
from .stream import PlannedTensor, Progress, plan, write
from .vocab import Vocab, load_vocab
from .writer import AtomicOutput, get_outtype

log = logging.getLogger(__name__)

SENSITIVITY = {"fisher": "rank1", "fisher-full": "full", "weighted": None}  # --sensitivity -> Fisher form
Stage = Callable[[str, int, int], None]  # stage(name, done, total): calibration and sensitivity passes


@dataclass(frozen=True)
class Converted:
    path: Path
    outtype: str
    tensors: list[PlannedTensor]
    n_bytes: int  # tensor data
    seconds: float


def convert(hf_dir: str | os.PathLike, out_path: str | os.PathLike, outtype: str = "f16", force: bool = False,
            vocab_pre: Optional[str] = None, verbose: bool = False,
            progress: Optional[Progress] = None, target: Optional[Target] = None, imatrix=None,
            calib: Optional[str] = None, calib_chunks: int = 24, stage: Optional[Stage] = None,
            allow_nonfinite: bool = False, sensitivity: str = "fisher") -> Converted:
    """Convert a Hugging Face checkpoint folder to a GGUF file at `out_path`.

    outtype "auto" needs `target` (a mixed.Target: bits per weight, or a VRAM size to fit with its
    context and cache types); it measures each tensor's effect on the output with the Fisher pass
    (convert/fisher.py; `sensitivity` "fisher" its rank-1 form, "fisher-full" the full one,
    "weighted" the importance-weighted error without a Fisher pass) over `calib` (a text file; default: the packaged text),
    `calib_chunks` chunks of 512 tokens, which also collects the importance matrix for rounding
    unless `imatrix` names one (an Imatrix, or the path of an imatrix GGUF to reuse, or to write if it
    does not exist yet). Any outtype accepts `imatrix` for importance-weighted rounding. `stage(name, done, total)` reports the
    calibration and sensitivity passes. Weights holding NaN or infinity are refused unless
    `allow_nonfinite`.

    Raises QkvggufError subclasses for bad input (one line, naming the file or tensor); on any
    error or interrupt no file is left at `out_path` (nor a temporary one).
    """
    start = time.perf_counter()
    otype = get_outtype(outtype)
    if (otype.name == "auto") != (target is not None):
        raise QkvggufError("--outtype auto needs a target (--target-bpw or --fit), and a target needs --outtype auto")
    output = AtomicOutput(out_path, force)
    ckpt = Checkpoint(hf_dir)
    try:
        arch = for_config(ckpt.config, str(ckpt.folder / "config.json"))
        vocab = arch.adjust_vocab(load_vocab(ckpt.folder, arch.hparams.vocab_size, vocab_pre))
        planned = plan(ckpt, arch, otype)
        if otype.name != "auto":
            warn_fallbacks(planned)
        if otype.name == "auto":
            check_budget(arch, planned, target)  # before any calibration or measuring
        fisher = None
        if sensitivity not in SENSITIVITY:
            raise QkvggufError(f"sensitivity must be one of {', '.join(SENSITIVITY)}, got {sensitivity!r}")
        if otype.name == "auto" and SENSITIVITY[sensitivity]:
            # the Fisher pass (it collects the importance matrix too, unless one is given)
            imatrix, fisher = get_fisher(ckpt, arch, vocab, imatrix, calib, calib_chunks, stage, allow_nonfinite,
                                         SENSITIVITY[sensitivity])
        elif imatrix is not None or otype.name == "auto":
            imatrix = get_imatrix(ckpt, arch, vocab, imatrix, calib, calib_chunks, stage, allow_nonfinite)
        auto_meta = None
        if otype.name == "auto":
            planned, auto_meta = auto_plan(ckpt, arch, planned, imatrix, target, stage, fisher)
        write(output, ckpt, arch, vocab, otype, planned, imatrix, auto_meta, progress, verbose, allow_nonfinite)
    finally:
        ckpt.close()
    total = sum(p.n_bytes for p in planned)
    seconds = time.perf_counter() - start
    log.info("wrote %s: %d tensors, %.1f MiB, %s, %.1f s", out_path, len(planned), total / 2**20, otype.name, seconds)
    return Converted(Path(out_path), otype.name, planned, total, seconds)


def warn_fallbacks(planned: list[PlannedTensor]) -> None:
    """One warning per kind of fallback (the type wanted and the type used), with how many tensors,
    their row lengths and the first few names."""
    kinds: dict[tuple[str, str], list[PlannedTensor]] = {}
    for p in planned:
        if p.reason:  # (-v logs each tensor with its reason as it is written: stream.py)
            # reason: "row length R is not a multiple of B for TYPE" (writer.tensor_type)
            kinds.setdefault((p.reason.partition(" is not ")[2] or p.reason, p.type.name), []).append(p)
    for (why, tname), ps in kinds.items():
        rows = sorted({p.shape[-1] for p in ps})
        names = ", ".join(p.name for p in ps[:3]) + (", ..." if len(ps) > 3 else "")
        log.warning("%d tensor%s with rows of %s (%s) use %s: not %s (-v lists each)", len(ps),
                    "" if len(ps) == 1 else "s", ", ".join(map(str, rows)), names, tname, why)


def f16_copy(ckpt: Checkpoint, arch: Arch, vocab: Vocab, folder: str, stage: Optional[Stage] = None,
             allow_nonfinite: bool = False) -> str:
    """The checkpoint as an f16 GGUF in `folder` (the runtime's input for calibration); its path.
    `stage("f16 copy", bytes written, total)` reports it."""
    f16 = get_outtype("f16")
    path = os.path.join(folder, "source-f16.gguf")
    done = 0

    def progress(n: int, total: int) -> None:
        nonlocal done
        done += n
        stage("f16 copy", done, total)

    write(AtomicOutput(path, False), ckpt, arch, vocab, f16, plan(ckpt, arch, f16),
          progress=progress if stage is not None else None, allow_nonfinite=allow_nonfinite)
    return path


def calibration_text(calib: Optional[str]) -> tuple[str, str]:
    """(dataset description, text) of a calibration text file, or of the packaged text."""
    if calib is not None:
        if not os.path.isfile(calib):
            raise ImatrixError(f"{calib}: no such calibration text file")
        with open(calib, encoding="utf-8", errors="replace") as f:
            name, text = os.path.basename(calib), f.read()
    else:
        name, text = default_calibration_text()
    return f"{name} sha256:{hashlib.sha256(text.encode()).hexdigest()[:16]}", text


def _calibrate(ckpt: Checkpoint, arch: Arch, vocab: Vocab, calib: Optional[str], calib_chunks: int,
               stage: Optional[Stage], allow_nonfinite: bool, collect: Callable):
    """collect(f16 GGUF path, token ids, bos id or None, dataset, progress) over a temporary f16 copy."""
    from qkvgguf.gguf_file import GGUFFile
    from qkvgguf.tokenizer import Tokenizer

    dataset, text = calibration_text(calib)
    with tempfile.TemporaryDirectory(prefix="qkvgguf-calib-") as tmp:
        src = f16_copy(ckpt, arch, vocab, tmp, stage, allow_nonfinite)
        tok = Tokenizer.from_gguf(GGUFFile(src))
        ids = tok.encode(text, add_special=False)
        progress = (lambda d, t: stage("calibrating", d, t)) if stage else None
        return collect(src, ids, tok.bos_id if tok.add_bos else None, dataset, progress)


def get_imatrix(ckpt: Checkpoint, arch: Arch, vocab: Vocab, imatrix, calib: Optional[str], calib_chunks: int,
                stage: Optional[Stage], allow_nonfinite: bool = False) -> Imatrix:
    """An Imatrix: given, read from a file, or collected (and saved to the given path, if any)."""
    if isinstance(imatrix, Imatrix):
        return imatrix
    if imatrix is not None and os.path.exists(imatrix):
        return Imatrix.load(imatrix)
    result = _calibrate(ckpt, arch, vocab, calib, calib_chunks, stage, allow_nonfinite,
                        lambda src, ids, bos, dataset, progress: collect_imatrix(
                            src, ids, 512, calib_chunks, bos, dataset=dataset, progress=progress))
    if imatrix is not None:
        result.save(imatrix)
    return result


def get_fisher(ckpt: Checkpoint, arch: Arch, vocab: Vocab, imatrix, calib: Optional[str], calib_chunks: int,
               stage: Optional[Stage], allow_nonfinite: bool = False, form: str = "rank1"):
    """(Imatrix, Fisher) for `--outtype auto`: the Fisher pass over the calibration text; the Imatrix
    is the one given (object or existing file) or the pass's own (saved to the given path, if any)."""
    given = imatrix if isinstance(imatrix, Imatrix) else \
        Imatrix.load(imatrix) if imatrix is not None and os.path.exists(imatrix) else None
    fisher = _calibrate(ckpt, arch, vocab, calib, calib_chunks, stage, allow_nonfinite,
                        lambda src, ids, bos, dataset, progress: collect_fisher(
                            src, ids, 512, calib_chunks, bos, dataset=dataset, form=form, progress=progress))
    if given is not None:
        return given, fisher
    if imatrix is not None:
        fisher.imatrix.save(imatrix)
    return fisher.imatrix, fisher


def calibrate_checkpoint(hf_dir: str | os.PathLike, text: str, n_ctx: int = 512, n_chunks: Optional[int] = None,
                         dataset: str = "", progress: Optional[Callable[[int, int], None]] = None,
                         vocab_pre: Optional[str] = None) -> Imatrix:
    """Imatrix of a Hugging Face checkpoint: converted to a temporary f16 GGUF, calibrated, deleted."""
    ckpt = Checkpoint(hf_dir)
    try:
        arch = for_config(ckpt.config, str(ckpt.folder / "config.json"))
        vocab = arch.adjust_vocab(load_vocab(ckpt.folder, arch.hparams.vocab_size, vocab_pre))
        with tempfile.TemporaryDirectory(prefix="qkvgguf-calib-") as tmp:
            src = f16_copy(ckpt, arch, vocab, tmp)
            return collect_imatrix(src, text, n_ctx, n_chunks, dataset=dataset, progress=progress)
    finally:
        ckpt.close()
