"""The weight-type registry: one `QuantFormat` record per ggml type, everything the project knows of it.

A record holds, for one type:

    block_size, type_size    elements and bytes per block (GGUF's facts, checked against gguf-py)
    layout                   the fields of one block in byte order, the formula, the range of the
                             stored codes: what `inspect --tensor` shows (`Layout`)
    dequantize               torch: raw bytes (rows, row_bytes) uint8 -> float32 (rows, row_len)
    decode                   numpy blocks (n, type_size) uint8 -> `Codes` (codes, scales, biases, the
                             header fields as stored): inspect's block decoder
    quantize                 numpy: float32 (rows, row_len) -> bytes, plain (bit-exact with ggml)
    quantize_weighted        numpy: (values, importance (row_len,)) -> bytes, importance-weighted
    gguf_reference           whether gguf.quants (gguf-py's numpy port of ggml) reads the type: the
                             tests' reference; `reference_quantize` is its quantizer where it has one
    tiling                   the Triton kernels' tiling of a block (`Tiling`: groups, bytes per group,
                             values per byte, the kernel's decode branch, autotune tiles that spill)
    outtype, file_type       the converter's `--outtype NAME` that writes every weight in this type
    fallback                 llama.cpp's tensor_type_fallback: the type of a row that is not a multiple of the block
    auto                     a candidate of `--outtype auto` (convert/mixed.py)

Every consumer reads the registry when it runs (not a copy made at import): the dequant kernels
(runtime/kernels/dequant.py `LAYOUTS`, qmatmul's autotune tiles), inspect's layouts and decoders
(qkvgguf/inspect/tensor.py), the converter's outtypes, fallbacks and block sizes (convert/writer.py),
the `auto` candidates (convert/mixed.py). A new weight type is one new module in this folder with one
`register(QuantFormat(...))` line, imported by `__init__.py`; the Triton kernel needs a new branch only
when no existing branch decodes its bytes (`Tiling.branch`).

`quantize` below is the one place that chooses a quantizer: the record's importance-weighted one when
an imatrix is given and it has one, else its plain one, else gguf.quants' (logged once per type);
errors of the chosen quantizer propagate, nothing falls back silently.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import LlamaFileType as FT

from ..errors import UnsupportedError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Field:
    name: str
    start: int  # byte range [start, end) inside one block
    end: int
    what: str


@dataclass(frozen=True)
class Layout:
    """One block as inspect describes it: fields back to back, the formula, the stored codes' range."""
    fields: tuple[Field, ...]
    formula: str
    q_range: Optional[tuple[int, int]] = None  # stored quant codes, inclusive; None for float types
    sub_block: int = 0  # elements sharing one scale; 0: the whole block

    @classmethod
    def of(cls, fields: list[tuple[str, int, str]], formula: str, q_range: Optional[tuple[int, int]] = None,
           sub_block: int = 0) -> "Layout":
        """Fields given as (name, bytes, meaning); their byte ranges are the running sum."""
        out, pos = [], 0
        for name, n, what in fields:
            out.append(Field(name, pos, pos + n, what))
            pos += n
        return cls(tuple(out), formula, q_range, sub_block)

    @property
    def n_bytes(self) -> int:
        return self.fields[-1].end


@dataclass
class Codes:
    """What n blocks store, in one form for every type (inspect's decoder output):

        x = scale * (q - zero) + bias           or, with a level table, scale * levels[q] + bias

    q (n, block_size) int16 as stored; scale, bias (n, n_sub) float32 per sub-block; fields: the
    per-block header fields as stored (d, m, dmin, sc, scales, ...), each (n,) or (n, k)."""
    q: np.ndarray
    scale: np.ndarray
    bias: np.ndarray
    zero: int
    fields: dict[str, np.ndarray]
    levels: Optional[np.ndarray] = None  # float32 (n_codes,): non-linear formats (IQ4_*)

    def values(self) -> np.ndarray:
        """float32 (n, block_size), the same operations as gguf.quants."""
        rep = self.q.shape[1] // self.scale.shape[1]
        scale = np.repeat(self.scale, rep, axis=1)
        bias = np.repeat(self.bias, rep, axis=1)
        q = self.levels[self.q] if self.levels is not None else (self.q - self.zero).astype(np.float32)
        return scale * q + bias


@dataclass(frozen=True)
class Tiling:
    """How the Triton kernels (runtime/kernels/dequant.py) walk one block.

    A block is cut into `groups` groups of `inner` consecutive quant bytes; each byte holds `planes`
    values, so groups * inner * planes == block_size. `branch`: the ggml type whose decode branch in
    dequant.py reads these bytes (default: the record's own type; a new layout adds a branch there).
    `gemv_skip` (BLOCK_N, quant bytes per K step, warps) and `gemm_spills` (BLOCK_M, BLOCK_N): autotune
    candidates left out because ptxas spills registers on them (runtime/kernels/aot.py measures)."""
    groups: int
    inner: int
    planes: int
    branch: Optional[int] = None
    gemv_skip: frozenset = frozenset()
    gemm_spills: frozenset = frozenset()


@dataclass(frozen=True)
class QuantFormat:
    type: int  # the ggml type id (a GGMLQuantizationType, or a plain int for a type gguf-py lacks)
    block_size: int  # elements per block
    type_size: int  # bytes per block
    # raw bytes (rows, row_bytes) uint8 -> values (rows, row_bytes // type_size * block_size) float32
    dequantize: Callable[[torch.Tensor], torch.Tensor]
    layout: Optional[Layout] = None
    # blocks (n, type_size) uint8 -> Codes (inspect's decoder); None for float types
    decode: Optional[Callable[[np.ndarray], Codes]] = None
    # values (rows, row_len) float32 -> bytes (rows, row_len // block_size * type_size) uint8
    quantize: Optional[Callable[[np.ndarray], np.ndarray]] = None
    # values (rows, row_len) float32, importance (row_len,) float32 -> bytes in the same layout
    quantize_weighted: Optional[Callable[[np.ndarray, np.ndarray], np.ndarray]] = None
    tiling: Optional[Tiling] = None
    outtype: Optional[str] = None  # convert --outtype NAME writes every 2-D weight in this type
    file_type: Optional[FT] = None  # general.file_type of such a file
    fallback: Optional[int] = None  # the type a row that is not a multiple of block_size takes
    auto: bool = False  # a candidate type of convert --outtype auto
    # the type llama.cpp's CPU backend rounds the activations to before multiplying them with a
    # weight of this type (ggml's vec_dot_type: Q8_0, Q8_1, Q8_K, F16, BF16); None: they stay float32.
    # The runtime's --numerics llamacpp does the same rounding (runtime/llamacpp_numerics.py)
    act_type: Optional[int] = None
    name: str = field(default="")  # default: gguf-py's name of the type

    def __post_init__(self):
        if not self.name:
            object.__setattr__(self, "name", T(self.type).name)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size

    @property
    def gguf_reference(self) -> bool:
        """Whether gguf.quants reads this type too (the tests' reference for its bytes)."""
        return has_reference(self.type)

    @property
    def kernel_branch(self) -> int:
        assert self.tiling is not None
        return int(self.type if self.tiling.branch is None else self.tiling.branch)


FORMATS: dict[int, QuantFormat] = {}


def _in_gguf_py(qtype: int) -> bool:
    """Whether gguf-py's GGMLQuantizationType has this id."""
    try:
        T(qtype)
    except ValueError:
        return False
    return True


def register(fmt: QuantFormat) -> QuantFormat:
    """Add a type; its facts are checked against each other (and against gguf-py where it knows the type)."""
    from gguf import GGML_QUANT_SIZES

    where = f"quant format {fmt.name}"
    if fmt.type in FORMATS:
        raise ValueError(f"{where}: ggml type {int(fmt.type)} is registered already ({FORMATS[fmt.type].name})")
    known = GGML_QUANT_SIZES.get(T(fmt.type)) if _in_gguf_py(fmt.type) else None
    if known is not None and known != (fmt.block_size, fmt.type_size):
        raise ValueError(f"{where}: (block, bytes) {(fmt.block_size, fmt.type_size)}, gguf-py says {known}")
    if fmt.layout is not None and fmt.layout.n_bytes != fmt.type_size:
        raise ValueError(f"{where}: the layout's fields add up to {fmt.layout.n_bytes} bytes, not {fmt.type_size}")
    t = fmt.tiling
    if t is not None and t.groups * t.inner * t.planes != fmt.block_size:
        raise ValueError(f"{where}: tiling {t.groups} x {t.inner} x {t.planes} does not cover {fmt.block_size}")
    FORMATS[fmt.type] = fmt
    return fmt


def unregister(qtype: int) -> None:
    """Remove a type (tests register throw-away types)."""
    FORMATS.pop(qtype, None)


def get_format(qtype: int) -> QuantFormat:
    if qtype not in FORMATS:
        names = ", ".join(f.name for f in FORMATS.values())
        raise UnsupportedError(f"ggml type {type_name(qtype)} is not supported (supported: {names})")
    return FORMATS[qtype]


def type_name(qtype: int) -> str:
    """The registered name, gguf-py's, or the number."""
    if qtype in FORMATS:
        return FORMATS[qtype].name
    return T(qtype).name if _in_gguf_py(qtype) else str(int(qtype))


def block_sizes(qtype: int) -> tuple[int, int]:
    """(elements, bytes) per block: the registry's, else gguf-py's for the types we do not read."""
    if qtype in FORMATS:
        return FORMATS[qtype].block_size, FORMATS[qtype].type_size
    from gguf import GGML_QUANT_SIZES

    return GGML_QUANT_SIZES[T(qtype)]


class View(Mapping):
    """A read-only mapping recomputed from the registry on every use, so a type registered later
    (a test's throw-away type) shows up in it: `View(lambda: {...})`."""

    def __init__(self, build: Callable[[], dict]):
        self._build = build

    def __getitem__(self, key):
        return self._build()[key]

    def __iter__(self) -> Iterator:
        return iter(self._build())

    def __len__(self) -> int:
        return len(self._build())

    def __repr__(self) -> str:
        return f"View({self._build()!r})"


# -- the quantizer selector --------------------------------------------------------------------------
_LOGGED: set = set()


def _log_once(qtype: int, message: str) -> None:
    if (qtype, message) not in _LOGGED:
        _LOGGED.add((qtype, message))
        log.info(message)


@functools.lru_cache(maxsize=None)
def has_reference(qtype: int) -> bool:
    """Whether gguf.quants (gguf-py's numpy port of ggml) dequantizes the type."""
    import gguf.quants
    from gguf import GGML_QUANT_SIZES

    if not _in_gguf_py(qtype) or T(qtype) not in GGML_QUANT_SIZES:
        return False
    size = GGML_QUANT_SIZES[T(qtype)][1]
    try:
        gguf.quants.dequantize(np.zeros((1, size), np.uint8), T(qtype))
    except NotImplementedError:
        return False
    return True


def reference_quantize(values: np.ndarray, qtype: int) -> np.ndarray:
    """gguf.quants' quantizer (numpy port of ggml's reference C), or an UnsupportedError."""
    import gguf.quants

    if not has_reference(qtype):
        raise UnsupportedError(f"quantizing to {type_name(qtype)} is not implemented (neither qkvgguf nor gguf.quants)")
    try:
        return gguf.quants.quantize(values, T(qtype))
    except NotImplementedError:
        raise UnsupportedError(f"quantizing to {type_name(qtype)} is not implemented "
                               f"(neither qkvgguf nor gguf.quants)") from None


def quantize(values: np.ndarray, qtype: int, imatrix: Optional[np.ndarray] = None) -> np.ndarray:
    """(rows, row_len) float32 -> (rows, row_bytes) uint8: the one quantizer selector.

    imatrix None: the record's plain quantizer (bit-exact with ggml), or gguf.quants' where it has
    none (Q5_0, Q5_1; logged once). imatrix (row_len,) importance per input column: the record's
    importance-weighted quantizer; a type without one takes the plain path (logged once).
    """
    fmt = FORMATS.get(qtype)
    if fmt is None:
        _log_once(qtype, f"{type_name(qtype)}: not in qkvgguf's registry, quantized by gguf.quants")
        return reference_quantize(values, qtype)
    if imatrix is not None:
        if fmt.quantize_weighted is not None:
            return fmt.quantize_weighted(values, imatrix)
        _log_once(qtype, f"{fmt.name}: no importance-weighted quantizer, the importance matrix is not used")
    if fmt.quantize is not None:
        return fmt.quantize(values)
    _log_once(qtype, f"{fmt.name}: no qkvgguf quantizer, quantized by gguf.quants")
    return reference_quantize(values, qtype)


def dequantize(raw: torch.Tensor, qtype: int) -> torch.Tensor:
    """(rows, row_bytes) uint8 -> (rows, row_len) float32."""
    return get_format(qtype).dequantize(raw)
