"""Output types, the per-tensor type policy, encoding, and a GGUF file that appears only when complete.

Output types (`--outtype`) and what they mean, as in llama.cpp:

    name    general.file_type   2-D weights                   (elements, bytes per block)
    f32     ALL_F32             F32
    f16     MOSTLY_F16          F16
    bf16    MOSTLY_BF16         BF16
    q8_0    MOSTLY_Q8_0         Q8_0                          (32, 2 + 32)
    q4_0    MOSTLY_Q4_0         Q4_0                          (32, 2 + 16)
    q4_1    MOSTLY_Q4_1         Q4_1                          (32, 2 + 2 + 16)
    q5_0    MOSTLY_Q5_0         Q5_0                          (32, 2 + 4 + 16)
    q5_1    MOSTLY_Q5_1         Q5_1                          (32, 2 + 2 + 4 + 16)
    q4_k    MOSTLY_Q4_K_S *     Q4_K                          (256, 2 + 2 + 12 + 128)
    q5_k    MOSTLY_Q5_K_S *     Q5_K                          (256, 2 + 2 + 12 + 32 + 128)
    q6_k    MOSTLY_Q6_K         Q6_K                          (256, 128 + 64 + 16 + 2)
    q4_k_m  MOSTLY_Q4_K_M       Q4_K, some Q6_K (recipe below)
    q5_k_m  MOSTLY_Q5_K_M       Q5_K, some Q6_K
    q2_k    MOSTLY_Q2_K         Q2_K, some Q3_K / Q4_K        (256, 16 + 64 + 2 + 2)        2.625 bits
    q3_k_s  MOSTLY_Q3_K_S       Q3_K                          (256, 32 + 64 + 12 + 2)       3.4375 bits
    q3_k_m  MOSTLY_Q3_K_M       Q3_K, some Q4_K / Q5_K
    q3_k_l  MOSTLY_Q3_K_L       Q3_K, some Q5_K
    iq4_nl  MOSTLY_IQ4_NL       IQ4_NL, some Q5_K             (32, 2 + 16)                  4.5 bits
    iq4_xs  MOSTLY_IQ4_XS       IQ4_XS, some Q5_K             (256, 2 + 2 + 4 + 128)        4.25 bits
  * llama.cpp has no file type for all-Q4_K (all-Q5_K) weights; the _S label is the nearest.
Names are llama-quantize's, in any case (`Q3_K_M` = `q3_k_m`). The one-type outtypes (f32 .. q6_k) are
the weight-type registry's records (`QuantFormat.outtype`, `file_type`; qkvgguf/quants/), the mixtures
are `RECIPES` here. Q5_0 and Q5_1 (outtypes, and the fallback of Q4_K / Q5_K) are encoded by
`gguf.quants` (the registry's selector: we have only their dequantizers and weighted quantizers);
tests find its bytes equal to llama.cpp's quantizer's.

Policy (`tensor_type`, a pure function of name, shape, outtype and a few model facts), following
llama.cpp's quantizer (`llama_tensor_get_type` in src/llama-quant.cpp, without an imatrix):
1. 1-D tensors, biases and every `*_norm.weight` stay F32; float outtypes give every weight their type.
2. Quantized outtypes:
   - the output tensor (`output.weight`, or `token_embd.weight` when embeddings are tied and there
     is no `output.weight`) is Q6_K, except for q8_0 (stays Q8_0) and where its row length is not
     a multiple of the outtype's block (Q8_0);
   - q4_k_m and q5_k_m: `attn_v` and `ffn_down` are Q6_K in the layers where llama.cpp's
     `use_more_bits(i, n)` holds (the first and last eighth of the layers and every third layer
     between);
   - q2_k: `attn_v` Q3_K (Q4_K where n_head / n_head_kv >= 4), `ffn_down` and `attn_output` Q3_K;
   - q3_k_m: `attn_v` Q5_K in layers 0 and 1, else Q4_K; `ffn_down` Q5_K in the first sixteenth of
     the layers, else Q4_K; `attn_output` Q4_K;   q3_k_l: `attn_v`, `ffn_down`, `attn_output` Q5_K;
   - iq4_nl, iq4_xs: `attn_v` Q5_K where n_head / n_head_kv >= 4; `ffn_down` Q5_K in the first
     eighth of the layers (llama.cpp: only without an importance matrix; `ModelFacts.has_imatrix`);
   - a fused `attn_qkv`: q3_k_m, q3_k_l Q4_K, q4_k_m Q5_K, q5_k_m Q6_K;
   - on a "70B" model (llama.cpp's LLM_TYPE_70B) a Q3_K or Q4_K `attn_v` becomes Q5_K;
   - everything else (token_embd with an output tensor, attn_q/k/output, ffn_gate/up, ...) gets
     the outtype's type.
3. A row length that is not a multiple of the chosen type's block falls back as llama.cpp does
   (`FALLBACK`, the records' `fallback`: Q2_K, Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, IQ4_XS -> IQ4_NL;
   a 32-block type, or a fallback that still does not fit, -> F16), with a warning.

`AtomicOutput` writes to a temporary file beside the target and renames it over the target only
when the file is complete; an error, Ctrl-C or SIGTERM removes the temporary file. A run killed
outright (SIGKILL) cannot clean up: its file's name carries its process id, and the next run on
the same output removes it once that process is gone.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
from gguf import GGMLQuantizationType as T, LlamaFileType as FT

from qkvgguf.errors import QkvggufError, UnsupportedError
from qkvgguf.quants import FORMATS, View, block_sizes, quantize, type_name

log = logging.getLogger(__name__)


class OutputError(QkvggufError):
    """The output path exists (without --force) or cannot be written."""


@dataclass(frozen=True)
class OutType:
    name: str
    file_type: FT  # general.file_type
    weight_type: int  # the ggml type of 2-D weights (the base type of a mixture)
    mixture: bool = False  # llama.cpp's per-tensor recipe for this file type (q4_k_m, q3_k_m, ...)


# llama.cpp's file types that mix types by tensor (the recipes of `_recipe`), and auto; the outtypes that
# give every 2-D weight one type are the registry's records (`QuantFormat.outtype`, qkvgguf/quants/)
RECIPES = [
    OutType("q4_k_m", FT.MOSTLY_Q4_K_M, T.Q4_K, mixture=True),
    OutType("q5_k_m", FT.MOSTLY_Q5_K_M, T.Q5_K, mixture=True),
    OutType("q2_k", FT.MOSTLY_Q2_K, T.Q2_K, mixture=True),
    OutType("q3_k_s", FT.MOSTLY_Q3_K_S, T.Q3_K, mixture=True),
    OutType("q3_k_m", FT.MOSTLY_Q3_K_M, T.Q3_K, mixture=True),
    OutType("q3_k_l", FT.MOSTLY_Q3_K_L, T.Q3_K, mixture=True),
    OutType("iq4_nl", FT.MOSTLY_IQ4_NL, T.IQ4_NL, mixture=True),
    OutType("iq4_xs", FT.MOSTLY_IQ4_XS, T.IQ4_XS, mixture=True),
    # auto: types chosen per tensor by measured sensitivity (convert/mixed.py); llama.cpp has no file
    # type for a free mixture, GUESSED ("not specified") is its label for that
    OutType("auto", FT.GUESSED, T.Q8_0),
]


def _outtypes() -> dict[str, OutType]:
    plain = [OutType(f.outtype, f.file_type, f.type) for f in FORMATS.values() if f.outtype]
    return {o.name: o for o in plain + RECIPES}


OUTTYPES = View(_outtypes)  # read from the registry when used: f32, f16, bf16, q8_0, ..., q6_k, then RECIPES

# llama.cpp's tensor_type_fallback (src/llama-quant.cpp): a 256-block type whose block does not fit
# the row tries a 32-block type (the records' `fallback`); whatever still does not fit becomes F16.
FALLBACK = View(lambda: {t: f.fallback for t, f in FORMATS.items() if f.fallback is not None})


def is_float(qtype: int) -> bool:
    return block_sizes(qtype)[0] == 1


@dataclass(frozen=True)
class ModelFacts:
    """What the policy needs to know about the whole model."""
    n_layer: int = 1
    has_output: bool = True  # an output.weight is written; if not, token_embd is the output (tied)
    is_70b: bool = False  # llama.cpp's LLM_TYPE_70B: llama with 80 layers and GQA, qwen2 with 80 layers
    n_gqa: int = 1  # n_head // n_head_kv (llama.cpp's n_gqa(): q2_k, iq4_nl, iq4_xs give attn_v more bits from 4)
    has_imatrix: bool = False  # llama.cpp's iq4_nl / iq4_xs recipe gives the first ffn_down layers Q5_K only without one


@dataclass(frozen=True)
class TypeChoice:
    type: T
    rule: Optional[str] = None  # the recipe rule that chose a type other than the outtype's
    fallback: Optional[str] = None  # why the row length forced yet another type (logged as a warning)


def get_outtype(name: str) -> OutType:
    """The outtype called `name`, in any case (llama-quantize writes Q4_K_M)."""
    if name.lower() not in OUTTYPES:
        raise UnsupportedError(f"outtype '{name}' is not supported (supported: {', '.join(OUTTYPES)})")
    return OUTTYPES[name.lower()]


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama.cpp's choice of layers for extra bits: first and last eighth, every third between."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


_LAYER = re.compile(r"^blk\.(\d+)\.")


def _recipe(name: str, row: int, outtype: OutType, model: ModelFacts) -> tuple[T, Optional[str]]:
    """The type llama.cpp's recipe picks before the row-length fallback, and the rule that did."""
    base = outtype.weight_type
    if name == "output.weight" or (name == "token_embd.weight" and not model.has_output):
        what = "output tensor" if name == "output.weight" else "tied token_embd (the output tensor)"
        if row % block_sizes(base)[0]:
            return T.Q8_0, f"{what}, row length {row} does not fit {type_name(base)}"
        return (base, None) if base == T.Q8_0 else (T.Q6_K, what)
    if not outtype.mixture:
        return base, None
    m = _LAYER.match(name)
    if m is None:
        return base, None
    layer, kind, n = int(m[1]), name.split(".")[2], model.n_layer
    ft, why = outtype.file_type, f"{outtype.name}: {name.split('.')[2]}"
    new, rule = base, None
    if kind == "attn_v":
        gqa = model.n_gqa >= 4
        new, rule = {
            FT.MOSTLY_Q2_K: (T.Q4_K, f"{why}, n_gqa >= 4") if gqa else (T.Q3_K, why),
            FT.MOSTLY_Q3_K_M: (T.Q5_K if layer < 2 else T.Q4_K, f"{why} in layer {layer}"),
            FT.MOSTLY_Q3_K_L: (T.Q5_K, why),
            FT.MOSTLY_IQ4_NL: (T.Q5_K, f"{why}, n_gqa >= 4") if gqa else (base, None),
            FT.MOSTLY_IQ4_XS: (T.Q5_K, f"{why}, n_gqa >= 4") if gqa else (base, None),
        }.get(ft, (base, None))
        if ft in (FT.MOSTLY_Q4_K_M, FT.MOSTLY_Q5_K_M) and use_more_bits(layer, n):
            new, rule = T.Q6_K, f"{why} in layer {layer} (use_more_bits)"
        if model.is_70b and new in (T.Q3_K, T.Q4_K):
            new, rule = T.Q5_K, f"{outtype.name}: attn_v of a 70B model"
    elif kind == "ffn_down":
        if ft == FT.MOSTLY_Q2_K:
            new, rule = T.Q3_K, why
        elif ft == FT.MOSTLY_Q3_K_M:
            new, rule = (T.Q5_K, f"{why} in layer {layer} (first sixteenth)") if layer < n // 16 else (T.Q4_K, why)
        elif ft == FT.MOSTLY_Q3_K_L:
            new, rule = T.Q5_K, why
        elif ft in (FT.MOSTLY_Q4_K_M, FT.MOSTLY_Q5_K_M) and use_more_bits(layer, n):
            new, rule = T.Q6_K, f"{why} in layer {layer} (use_more_bits)"
        elif ft in (FT.MOSTLY_IQ4_NL, FT.MOSTLY_IQ4_XS) and layer < n // 8 and not model.has_imatrix:
            new, rule = T.Q5_K, f"{why} in layer {layer} (first eighth)"
    elif kind == "attn_output":
        new = {FT.MOSTLY_Q2_K: T.Q3_K, FT.MOSTLY_Q3_K_M: T.Q4_K, FT.MOSTLY_Q3_K_L: T.Q5_K}.get(ft, base)
    elif kind == "attn_qkv":
        new = {FT.MOSTLY_Q3_K_M: T.Q4_K, FT.MOSTLY_Q3_K_L: T.Q4_K, FT.MOSTLY_Q4_K_M: T.Q5_K,
               FT.MOSTLY_Q5_K_M: T.Q6_K}.get(ft, base)
    if new != base and rule is None:
        rule = why
    return new, rule


def tensor_type(gguf_name: str, shape: tuple[int, ...], outtype: OutType,
                model: ModelFacts = ModelFacts()) -> TypeChoice:
    """The ggml type of one tensor (shape in PyTorch order, row length last); see the module doc."""
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return TypeChoice(T.F32)
    if is_float(outtype.weight_type):
        return TypeChoice(outtype.weight_type)
    row = shape[-1]
    qtype, rule = _recipe(gguf_name, row, outtype, model)
    wanted = qtype
    if row % block_sizes(qtype)[0]:
        qtype = FALLBACK.get(qtype, T.F16)
        if row % block_sizes(qtype)[0]:
            qtype = T.F16
        why = f"row length {row} is not a multiple of {block_sizes(wanted)[0]} for {type_name(wanted)}"
        return TypeChoice(qtype, rule, why)
    return TypeChoice(qtype, rule)


def n_bytes(shape: tuple[int, ...], qtype: int) -> int:
    block, size = block_sizes(qtype)
    return math.prod(shape) // block * size


def encode(values: np.ndarray, qtype: int, imatrix: Optional[np.ndarray] = None) -> np.ndarray:
    """float32 (..., row) -> the bytes GGUF stores for `qtype` (uint8 (rows, row_bytes), or float arrays).

    F32 and F16 stay float arrays (the GGUF writer stores them as they are); every other type goes
    through the registry's quantizer selector (`qkvgguf.quants.quantize`: ours, importance-weighted
    with an imatrix, else gguf.quants', logged). Float types ignore the imatrix.
    """
    if qtype == T.F32:
        return np.ascontiguousarray(values, dtype=np.float32)
    if qtype == T.F16:
        return np.ascontiguousarray(values.astype(np.float16))
    return quantize(values.reshape(-1, values.shape[-1]), qtype, None if is_float(qtype) else imatrix)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


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

    def stale_temps(self) -> list[Path]:
        """Temporary files of earlier runs on this output whose process is gone (killed: SIGKILL, a
        power cut). Their names carry the writer's process id: `.NAME.qkvgguf-PID-XXXXXXXX.tmp`."""
        pattern = re.compile(rf"^\.{re.escape(self.path.name)}\.qkvgguf-(\d+)-[A-Za-z0-9_]+\.tmp$")
        out = []
        try:
            entries = list(os.scandir(self.path.parent))
        except OSError:
            return out
        for entry in entries:
            m = pattern.match(entry.name)
            if m and not _alive(int(m[1])) and entry.is_file(follow_symlinks=False):
                out.append(Path(entry.path))
        return out

    def __enter__(self) -> Path:
        for stale in self.stale_temps():
            log.warning("removing %s, left by an interrupted conversion", stale)
            try:
                stale.unlink()
            except OSError as e:
                log.warning("cannot remove %s (%s)", stale, e.strerror)
        try:
            fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.qkvgguf-{os.getpid()}-", suffix=".tmp",
                                        dir=self.path.parent)
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
                os.chmod(self.tmp, 0o666 & ~_umask())  # mkstemp made it 0600; an output follows the umask
                os.replace(self.tmp, self.path)
        finally:
            if self.tmp.exists():
                self.tmp.unlink()
        return False


def _alive(pid: int) -> bool:
    """Whether process `pid` exists (a process we may not signal exists too)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True
