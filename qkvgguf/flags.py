"""The ranges of the command line's numeric flags, checked in one place before any file is read.

argparse gives the types; this gives the ranges, so `--temp nan`, `--top-p 2`, `-t 100000` or
`--seed 2**70` is a one-line error naming the flag instead of a crash (a thread count of 100,000
made torch segfault) or a silently meaningless run. RunConfig.validate (the model flags every verb
shares) and the verbs call these.
"""

from __future__ import annotations

import math
import os

from .errors import QkvggufError, shown

MAX_THREADS = 1024  # torch's thread pool segfaults far above any machine's core count
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed
MAX_CTX = 1 << 26


def number(flag: str, value, lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> None:
    """A finite number in [lo, hi] ((lo, hi] with lo_open); None (unset) passes."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise QkvggufError(f"{flag} must be a finite number, got {value}")
    if lo is not None and (value < lo or (lo_open and value == lo)):
        raise QkvggufError(f"{flag} must be {'greater than' if lo_open else 'at least'} {lo:g}, got {value:g}")
    if hi is not None and value > hi:
        raise QkvggufError(f"{flag} must be at most {hi:g}, got {value:g}")


def check_sampling(temp: float, top_k: int, top_p: float, min_p: float, seed: int | None) -> None:
    """run's sampling flags, with llama.cpp's meanings: --temp 0 is greedy, --top-k 0 / --top-p 1 /
    --min-p 0 switch that filter off."""
    number("--temp", temp, 0.0, 100.0)
    number("--top-k", top_k, 0)
    number("--top-p", top_p, 0.0, 1.0, lo_open=True)
    number("--min-p", min_p, 0.0, 1.0)
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise QkvggufError(f"--seed must be in [0, 2**64 - 1], got {seed}")


def check_threads(threads: int | None) -> None:
    number("-t/--threads", threads, 1, MAX_THREADS)


def check_output_path(flag: str, path: str) -> None:
    """A file we are about to write: its folder exists and is writable, and it is not a folder."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise QkvggufError(f"{flag} {shown(path)}: is a directory")
    if not os.path.isdir(folder):
        raise QkvggufError(f"{flag} {shown(path)}: folder {shown(folder)} does not exist")
    if not os.access(folder, os.W_OK):
        raise QkvggufError(f"{flag} {shown(path)}: folder {shown(folder)} is not writable")
