"""Quant formats: one registry keyed by ggml type.

Each format module registers a `QuantFormat` with its block layout, a vectorized torch
dequantizer and, where we write the format, a numpy quantizer. Callers use the functions below and
never branch on the type themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from ..errors import UnsupportedError


@dataclass(frozen=True)
class QuantFormat:
    type: T
    block_size: int  # elements per block
    type_size: int  # bytes per block
    # raw bytes (rows, row_bytes) uint8 -> values (rows, row_bytes // type_size * block_size) float32
    dequantize: Callable[[torch.Tensor], torch.Tensor]
    # values (rows, row_len) float32 -> bytes (rows, row_len // block_size * type_size) uint8
    quantize: Optional[Callable[[np.ndarray], np.ndarray]] = None
    # values (rows, row_len) float32, importance (row_len,) float32 -> bytes in the same layout, with
    # scales (and mins) minimizing the importance-weighted error (weighted.py)
    quantize_weighted: Optional[Callable[[np.ndarray, np.ndarray], np.ndarray]] = None

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size


FORMATS: dict[T, QuantFormat] = {}


def register(fmt: QuantFormat) -> QuantFormat:
    FORMATS[fmt.type] = fmt
    return fmt


def get_format(qtype: T) -> QuantFormat:
    if qtype not in FORMATS:
        names = ", ".join(t.name for t in FORMATS)
        raise UnsupportedError(f"ggml type {T(qtype).name} is not supported (supported: {names})")
    return FORMATS[qtype]


def dequantize(raw: torch.Tensor, qtype: T) -> torch.Tensor:
    """(rows, row_bytes) uint8 -> (rows, row_len) float32."""
    return get_format(qtype).dequantize(raw)


def quantize(values: np.ndarray, qtype: T, imatrix: Optional[np.ndarray] = None) -> np.ndarray:
    """(rows, row_len) float32 -> (rows, row_bytes) uint8.

    imatrix None: bit-exact with gguf.quants. imatrix (row_len,) non-negative importance per input
    column: importance-weighted rounding where the format has it (weighted.py), else the plain path.
    """
    fmt = get_format(qtype)
    if imatrix is not None and fmt.quantize_weighted is not None:
        return fmt.quantize_weighted(values, imatrix)
    if fmt.quantize is None:
        raise UnsupportedError(f"quantizing to {T(qtype).name} is not implemented")
    return fmt.quantize(values)


# The format modules register themselves on import (they need `register` defined above).
from . import floats, kquants, q4, q5, q8  # noqa: E402,F401
from . import iq4, q2k_q3k  # noqa: E402,F401  (Q2_K, Q3_K, IQ4_NL, IQ4_XS)
from . import weighted  # noqa: E402

for _t in weighted.TYPES:
    FORMATS[_t] = replace(FORMATS[_t], quantize_weighted=weighted.quantizer(_t))
