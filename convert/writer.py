"""Output types, the per-tensor type policy, encoding, and a GGUF file that appears only when complete.

Output types (`--outtype`) and what they mean, as in llama.cpp:

    name    general.file_type         type of 2-D weights
    f32     ALL_F32                   F32
    f16     MOSTLY_F16                F16
    bf16    MOSTLY_BF16               BF16
    q8_0    MOSTLY_Q8_0               Q8_0   (32, 2 + 32)       # elements, bytes per block
    q4_0    MOSTLY_Q4_0               Q4_0   (32, 2 + 16)
    q4_1    MOSTLY_Q4_1               Q4_1   (32, 2 + 2 + 16)

Policy (`tensor_type`, a pure function): 1-D tensors and every `*_norm.weight` stay F32; other
tensors get the outtype's type; a row length that is not a multiple of the type's block size falls
back as llama.cpp's quantizer does (`FALLBACK`; a 32-block type goes to F16).

`AtomicOutput` writes to a temporary file beside the target and renames it over the target only
when the file is complete; an error or Ctrl-C removes the temporary file.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T, LlamaFileType as FT

from qkvgguf.errors import QkvggufError, UnsupportedError

log = logging.getLogger(__name__)


class OutputError(QkvggufError):
    """The output path exists (without --force) or cannot be written."""


@dataclass(frozen=True)
class OutType:
    name: str
    file_type: FT  # general.file_type
    weight_type: T  # the type of 2-D weights


OUTTYPES = {o.name: o for o in [
    OutType("f32", FT.ALL_F32, T.F32),
    OutType("f16", FT.MOSTLY_F16, T.F16),
    OutType("bf16", FT.MOSTLY_BF16, T.BF16),
    OutType("q8_0", FT.MOSTLY_Q8_0, T.Q8_0),
    OutType("q4_0", FT.MOSTLY_Q4_0, T.Q4_0),
    OutType("q4_1", FT.MOSTLY_Q4_1, T.Q4_1),
]}

# llama.cpp's tensor_type_fallback (src/llama-quant.cpp): a 256-block type whose block does not fit
# the row tries a 32-block type; whatever still does not fit becomes F16.
FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0}


def get_outtype(name: str) -> OutType:
    if name not in OUTTYPES:
        raise UnsupportedError(f"outtype '{name}' is not supported (supported: {', '.join(OUTTYPES)})")
    return OUTTYPES[name]


def tensor_type(gguf_name: str, shape: tuple[int, ...], outtype: OutType) -> tuple[T, Optional[str]]:
    """(ggml type, why it differs from the outtype's weight type or None). Shape in PyTorch order."""
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return T.F32, None
    wanted = qtype = outtype.weight_type
    row = shape[-1]
    if row % GGML_QUANT_SIZES[qtype][0]:
        qtype = FALLBACK.get(qtype, T.F16)
        if row % GGML_QUANT_SIZES[qtype][0]:
            qtype = T.F16
        return qtype, f"row length {row} is not a multiple of {GGML_QUANT_SIZES[wanted][0]} for {wanted.name}"
    return qtype, None


def n_bytes(shape: tuple[int, ...], qtype: T) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def encode(values: np.ndarray, qtype: T) -> np.ndarray:
    """float32 (..., row) -> the bytes GGUF stores for `qtype` (uint8 (rows, row_bytes), or float arrays).

    The one place that picks a quantizer: ours from the registry (`qkvgguf.quants`) when it has one
    for the type, else `gguf.quants.quantize` (the two are bit-exact where both exist).
    """
    if qtype == T.F32:
        return np.ascontiguousarray(values, dtype=np.float32)
    if qtype == T.F16:
        return np.ascontiguousarray(values.astype(np.float16))
    rows = values.reshape(-1, values.shape[-1])
    from qkvgguf.quants import FORMATS

    fmt = FORMATS.get(qtype)
    if fmt is not None and fmt.quantize is not None:
        return fmt.quantize(rows)
    import gguf.quants

    return gguf.quants.quantize(rows, qtype)


class AtomicOutput:
    """`with AtomicOutput(path, force) as tmp:` write to `tmp`; renamed to `path` on success only."""

    def __init__(self, path: str | os.PathLike, force: bool = False):
        self.path, self.force = Path(path), force
        self.tmp: Optional[Path] = None
        self.check()
        if not self.path.parent.is_dir():
            raise OutputError(f"{self.path}: folder {self.path.parent} does not exist")

    def check(self) -> None:
        if self.path.is_dir():
            raise OutputError(f"{self.path}: is a directory")
        if self.path.exists() and not self.force:
            raise OutputError(f"{self.path}: already exists (use --force to overwrite)")

    def __enter__(self) -> Path:
        try:
            fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        except OSError as e:
            raise OutputError(f"{self.path}: cannot create a file in {self.path.parent} ({e.strerror})") from None
        os.close(fd)
        self.tmp = Path(name)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        assert self.tmp is not None
        try:
            if exc_type is None:
                self.check()  # something may have appeared at the target meanwhile
                os.replace(self.tmp, self.path)
        finally:
            if self.tmp.exists():
                self.tmp.unlink()
        return False
