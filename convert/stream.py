"""One pass over a checkpoint: plan every tensor's type, then stream them into a GGUF file.

    planned = plan(ckpt, arch, outtype)      # names, shapes, types, bytes: from the headers alone
    write(output, ckpt, arch, vocab, outtype, planned, imatrix=None, extra_metadata=None)

`write` puts header, metadata and tensor infos into the AtomicOutput's temporary file, then for each
tensor: load, float32, transform (llama's Q/K permutation), encode (importance-weighted when an
imatrix is given), write, drop; so peak memory is one tensor. convert/pipeline.py decides the
order of the passes (a temporary f16 file for calibration, the allocation of `auto`) and calls
this for each file it writes.

Metadata: what llama.cpp's converter writes for these families (see arch/base.py, vocab.py) plus
general.name, general.file_type (uint32), general.quantization_version (uint32, 2), and our
`qkvgguf.*` keys (docs/gguf-metadata.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from qkvgguf import __version__
from qkvgguf.errors import shown

from .arch import Arch
from .checkpoint import Checkpoint, CheckpointError
from .vocab import Vocab
from .writer import AtomicOutput, ModelFacts, OutType, encode, n_bytes, tensor_type

log = logging.getLogger(__name__)

# progress(bytes just written, total bytes of tensor data): the CLI turns this into a tqdm bar
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class PlannedTensor:
    hf_name: str
    name: str  # GGUF name
    shape: tuple[int, ...]  # PyTorch order
    type: T
    n_bytes: int
    reason: Optional[str]  # why the row length forced a fallback type, if it did (a warning)
    rule: Optional[str] = None  # the recipe rule that chose this type, if not the outtype's (-v log)


def _order(arch: Arch, name: str) -> tuple[int, int, int]:
    """token_embd, then blocks in order (table order inside a block), then output_norm, output."""
    templates = list(arch.TENSORS.values())
    parts = name.split(".")
    if parts[0] == "blk":
        return 1, int(parts[1]), templates.index(".".join(["blk", "{i}", *parts[2:]]))
    return (0 if name == "token_embd.weight" else 2), 0, templates.index(name)


def model_facts(arch: Arch, names: set[str]) -> ModelFacts:
    """What the type policy needs about the whole model. "70B" is llama.cpp's LLM_TYPE_70B, which
    its quantizer consults: llama with 80 layers and grouped-query attention, qwen2 with 80 layers."""
    h = arch.hparams
    is_70b = h.n_layer == 80 and (arch.GGUF_ARCH == "qwen2" or (arch.GGUF_ARCH == "llama" and h.n_head_kv != h.n_head))
    return ModelFacts(n_layer=h.n_layer, has_output="output.weight" in names, is_70b=is_70b, n_gqa=h.n_head // h.n_head_kv)


def plan(ckpt: Checkpoint, arch: Arch, outtype: OutType) -> list[PlannedTensor]:
    names = {hf_name: arch.gguf_name(hf_name) for hf_name in ckpt.tensors}
    facts = model_facts(arch, {n for n in names.values() if n is not None})
    planned = []
    for hf_name, ref in ckpt.tensors.items():
        name = names[hf_name]
        if name is None:
            continue
        c = tensor_type(name, ref.shape, outtype, facts)
        planned.append(PlannedTensor(hf_name, name, ref.shape, c.type, n_bytes(ref.shape, c.type), c.fallback, c.rule))
    planned.sort(key=lambda p: _order(arch, p.name))
    _check_complete(ckpt, arch, planned)
    return planned


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "torch.float64", "torch.float32", "torch.float16", "torch.bfloat16")


def _check_shapes(ckpt: Checkpoint, arch: Arch, planned: list[PlannedTensor]) -> None:
    """Every tensor the runtime will read exists with the shape config.json implies (the table of
    qkvgguf/validate.py, which checks the written file again at load), in a float dtype."""
    from qkvgguf.config import ARCHITECTURES, ModelConfig
    from qkvgguf.validate import expected_tensors

    h, by_name = arch.hparams, {p.name: p for p in planned}
    spec = ARCHITECTURES[arch.GGUF_ARCH]
    if not h.tied and "output.weight" not in by_name:
        raise CheckpointError(f"{ckpt.folder}: no 'lm_head.weight', and config.json's tie_word_embeddings is false")
    cfg = ModelConfig(arch=arch.GGUF_ARCH, n_layer=h.n_layer, n_embd=h.n_embd, n_ff=h.n_ff, n_head=h.n_head,
                      n_head_kv=h.n_head_kv, head_dim=h.head_dim, n_ctx_train=h.n_ctx_train, vocab_size=h.vocab_size,
                      norm_eps=h.norm_eps, rope_base=h.rope_theta, rope_dim=h.head_dim, rope_neox=spec.rope_neox,
                      qkv_bias=spec.qkv_bias and "blk.0.attn_q.bias" in by_name, qk_norm=spec.qk_norm,
                      tied_embeddings="output.weight" not in by_name)
    expected = expected_tensors(cfg)
    for name, (shape, required) in expected.items():
        p = by_name.get(name)
        if p is None:
            if required:
                raise CheckpointError(f"{ckpt.folder}: the tensor written as {name} is missing "
                                      "(config.json implies it)")
            continue
        if tuple(p.shape) != shape:
            raise CheckpointError(f"{ckpt.folder}: tensor {shown(p.hf_name)} has shape {tuple(p.shape)}, "
                                  f"expected {shape} from config.json")
    for p in planned:  # (names outside the arch's table were refused by Arch.gguf_name)
        if ckpt.tensors[p.hf_name].dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{ckpt.folder}: tensor {shown(p.hf_name)} has dtype "
                                  f"{shown(ckpt.tensors[p.hf_name].dtype)}, expected a float type")


def _check_complete(ckpt: Checkpoint, arch: Arch, planned: list[PlannedTensor]) -> None:
    h, by_name = arch.hparams, {p.name: p for p in planned}
    embd = by_name.get("token_embd.weight")
    if embd is not None and len(embd.shape) == 2 and embd.shape[1] == h.n_embd:
        _check_shapes(ckpt, arch, planned)  # (a wrong embedding gets the message below)
    if embd is None:
        raise CheckpointError(f"{ckpt.folder}: no token embedding ('model.embed_tokens.weight')")
    if embd.shape != (h.vocab_size, h.n_embd):
        raise CheckpointError(f"{ckpt.folder}: 'model.embed_tokens.weight' is {embd.shape}, config.json says "
                              f"vocab_size {h.vocab_size} x hidden_size {h.n_embd}")
    layer0 = sorted(n.split(".", 2)[2] for n in by_name if n.startswith("blk.0."))
    for i in range(h.n_layer):
        have = sorted(n.split(".", 2)[2] for n in by_name if n.startswith(f"blk.{i}."))
        if have != layer0 or not have:
            missing = sorted(set(layer0) - set(have)) or ["all tensors"]
            raise CheckpointError(f"{ckpt.folder}: layer {i} lacks {', '.join(missing)}")


def write_metadata(w: gguf.GGUFWriter, ckpt: Checkpoint, arch: Arch, vocab: Vocab, outtype: OutType,
                   planned: list[PlannedTensor]) -> None:
    name = ckpt.config.get("_name_or_path") or ckpt.folder.resolve().name
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(Path(str(name)).name or str(name))
    w.add_file_type(outtype.file_type)  # uint32
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)  # uint32 2, as llama.cpp writes for every file
    arch.write_metadata(w)
    vocab.write(w)
    w.add_string("qkvgguf.version", __version__)
    w.add_string("qkvgguf.source", f"{arch.hf_arch} {ckpt.folder.resolve().name}")
    w.add_string("qkvgguf.outtype", outtype.name)
    w.add_array("qkvgguf.tensor_types", [f"{p.name}={p.type.name}" for p in planned])


def count_nonfinite(t: torch.Tensor, chunk: int = 1 << 22) -> int:
    """How many NaN or infinite values `t` holds, in chunks: torch.isfinite on a whole tensor makes
    an abs() copy plus two masks (~1.8x the tensor), which doubled convert's peak memory."""
    flat = t.reshape(-1)
    return sum(int(c.numel() - torch.isfinite(c).sum()) for c in flat.split(chunk))


def _stream(w: gguf.GGUFWriter, ckpt: Checkpoint, arch: Arch, planned: list[PlannedTensor],
            progress: Optional[Progress], verbose: bool, imatrix=None, allow_nonfinite: bool = False) -> None:
    total = sum(p.n_bytes for p in planned)
    level = logging.INFO if verbose else logging.DEBUG
    width = max(len(p.name) for p in planned)
    for p in planned:
        source = ckpt.load(p.hf_name)
        bad = 0 if allow_nonfinite else count_nonfinite(source)
        if bad:
            raise CheckpointError(f"{ckpt.folder}: tensor {shown(p.hf_name)} holds {bad:,} NaN or infinite "
                                  "values (--allow-nonfinite converts it anyway)")
        values = arch.transform(p.name, source.to(torch.float32)).numpy()
        importance = imatrix.mean(p.name) if imatrix is not None else None
        data = encode(values, p.type, importance)  # importance-weighted where the type has it
        if data.nbytes != p.n_bytes:  # a bug in an encoder, never a user error
            raise AssertionError(f"tensor '{p.name}': encoded {data.nbytes} bytes, planned {p.n_bytes} for {p.type.name}")
        w.write_tensor_data(data)
        notes = "; ".join(n for n in (p.rule, p.reason) if n)
        log.log(level, "%-*s %-9s -> %-4s %s%s", width, p.name, str(source.dtype).removeprefix("torch."),
                p.type.name, "x".join(map(str, p.shape[::-1])), f"  ({notes})" if notes else "")
        del source, values, data
        if progress is not None:
            progress(p.n_bytes, total)


def write(output: AtomicOutput, ckpt: Checkpoint, arch: Arch, vocab: Vocab, outtype: OutType,
          planned: list[PlannedTensor], imatrix=None, extra_metadata: Optional[dict] = None,
          progress: Optional[Progress] = None, verbose: bool = False, allow_nonfinite: bool = False) -> None:
    """Write the GGUF file: metadata (plus `extra_metadata`, e.g. `auto`'s allocation), tensor infos,
    then every planned tensor in order; `imatrix` (an Imatrix) weights the rounding. A tensor holding
    NaN or infinity is refused, naming it, unless `allow_nonfinite`."""
    with output as tmp:
        w = gguf.GGUFWriter(tmp, arch.GGUF_ARCH)
        try:
            write_metadata(w, ckpt, arch, vocab, outtype, planned)
            for key, value in (extra_metadata or {}).items():
                if isinstance(value, str):
                    w.add_string(key, value)
                elif isinstance(value, float):
                    w.add_float32(key, value)
                elif isinstance(value, int):
                    w.add_uint64(key, value)
                else:
                    w.add_array(key, value)
            for p in planned:
                # shape in PyTorch order; non-uint8 dtype so the writer takes it as elements
                w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.n_bytes, raw_dtype=p.type)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            _stream(w, ckpt, arch, planned, progress, verbose, imatrix, allow_nonfinite)
        finally:
            w.close()


__all__ = ["PlannedTensor", "plan", "write", "write_metadata"]
