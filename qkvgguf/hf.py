"""GGUF files as transformers models without dequantizing, and transformers models as GGUF files.

    model = from_gguf("model.gguf")                    # AutoModelForCausalLM; every projection a GGUFLinear
    model.generate(ids, max_new_tokens=32)             #   over the file's memory-mapped blocks
    quantize(model, "q4_k_m")                          # nn.Linear -> GGUFLinear in place (llama.cpp's recipe)
    quantize(model, "auto", imatrix=collect_imatrix(model, ids), target_bpw=5.0)   # convert/mixed.py's allocation
    dequantize(model)                                  # GGUF modules -> float nn.Linear / nn.Embedding, in place
    save_gguf(model, "out.gguf", tokenizer)            # a GGUF llama.cpp loads, through convert/

transformers is an optional dependency (`pip install 'qkvgguf[hf]'`), imported by these functions,
never at `import qkvgguf`.

from_gguf. The config is the one transformers derives from the file: transformers' own table of GGUF
keys (`integrations.ggml.GGUF_CONFIG_MAPPING`, what `AutoConfig.from_pretrained(..., gguf_file=...)`
applies) read from our parser, with shapes transformers leaves at class defaults (Qwen3's head_dim)
taken from the file; the model is built on the meta device, then:
- every nn.Linear becomes a GGUFLinear (runtime/nn.py) over the file's bytes, zero-copy on the CPU
  (the tensor names come from convert/arch's table, read backwards). Llama's converter permuted
  the rows of Q and K (arch.transform: HF rotate-half -> ggml adjacent pairs); a row permutation
  of a quantized matrix permutes whole rows of blocks, so those two tensors are un-permuted by
  indexing their byte rows (a copy of those two only), never dequantized;
- the token embedding is a GGUFEmbedding over its blocks (a lookup dequantizes the rows it reads);
  a tied head (no output.weight) is a GGUFLinear over the same bytes;
- norms and biases (F32 in the files we write and read) are dequantized into float Parameters;
- buffers computed at construction (rope's inv_freq) are computed again on the real device.
Memory: the file's size (its pages, mapped) plus the norms, not the float32 model.

quantize(model, qtype): every nn.Linear (its GGUF name from convert/arch) gets the ggml type the
converter's policy gives it (`convert.writer.tensor_type`: an outtype such as "q4_k_m" follows
llama.cpp's per-tensor recipe; a ggml type name such as "Q4_K" is that type for every matrix, with
llama.cpp's fallback where the row length does not fit its blocks) and is replaced by
GGUFLinear.from_linear (importance-weighted with `imatrix`: GGUF name -> (in_features,) array, or
an Imatrix from `collect_imatrix`); the embedding becomes a GGUFEmbedding of its policy type (a tied
head shares its blocks), so the model in memory is the file save_gguf writes. "auto" takes
convert/mixed.auto_plan's allocation to `target_bpw`. Llama's Q and K keep Hugging Face's row
order in memory (row-wise quantization does not care); save_gguf permutes their byte rows on the
way out.

save_gguf(model, path, tokenizer): the converter's pieces, in the converter's order: convert/arch
(names, metadata, transform), convert/vocab (the tokenizer saved to a temporary folder, read back
as `tokenizer.ggml.*`), convert/stream.write_metadata and writer.AtomicOutput (no half-written
file). GGUFLinear blocks are written as they are (rows permuted for Q/K); float tensors are encoded
with the converter's policy for `outtype` (default "f16" for float matrices left, F32 norms).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from qkvgguf.convert.arch import ARCHITECTURES, Arch
from qkvgguf.convert.stream import PlannedTensor, _order, model_facts, write_metadata
from qkvgguf.convert.vocab import load_vocab
from qkvgguf.convert.writer import AtomicOutput, OUTTYPES, OutType, encode, get_outtype, n_bytes, tensor_type
from qkvgguf.errors import QkvggufError, UnsupportedError
from qkvgguf.gguf_file import GGUFFile
from qkvgguf.quants import dequantize as dequantize_blocks
from qkvgguf.runtime.nn import GGUFEmbedding, GGUFLinear, _torch_from_numpy, as_qtype

log = logging.getLogger(__name__)

# GGUF general.architecture -> the Hugging Face class whose convert/arch handler names its tensors
HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


class HFInteropError(QkvggufError):
    """A model or file this bridge cannot map (an architecture or tensor it does not know)."""


def _require_transformers():
    try:
        import transformers
    except ImportError:
        raise QkvggufError("transformers is not installed: pip install 'qkvgguf[hf]'") from None
    return transformers


def _arch_for(config, source: str, hf_class: Optional[str] = None) -> Arch:
    """convert/arch's handler for a transformers config (its tensor table and transform)."""
    d = config.to_dict()
    names = d.get("architectures") or [hf_class or HF_CLASSES.get(d.get("model_type"), "")]
    if names[0] not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedError(f"{source}: architecture '{names[0] or d.get('model_type')}' is not supported "
                               f"(supported: {supported})")
    return ARCHITECTURES[names[0]]({**d, "architectures": names}, source)


def _hf_row_order(arch: Arch, gguf_name: str, rows: int) -> Optional[torch.Tensor]:
    """Indices that put a GGUF tensor's rows back in Hugging Face order (None: same order).
    arch.transform maps HF rows to GGUF rows; applied to 0..rows-1 it names the HF row of each
    GGUF row, and its inverse permutation undoes it."""
    perm = arch.transform(gguf_name, torch.arange(rows))
    if torch.equal(perm, torch.arange(rows)):
        return None
    return torch.argsort(perm)


def _set(model: torch.nn.Module, qualified: str, module: torch.nn.Module) -> None:
    parent, _, leaf = qualified.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


# -- from_gguf -------------------------------------------------------------------------------------
def from_gguf(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
              backend: str = "auto"):
    """A transformers causal LM over the GGUF file at `path`, weights kept as GGUF blocks.

    dtype: the activations' and norms' dtype (float32: the CPU kernels compute in float32; float16
    on a GPU halves the activations). backend: GGUFLinear's ("auto": Triton on CUDA, C++ on the CPU).
    """
    transformers = _require_transformers()
    path = Path(path)
    gf = GGUFFile(path)
    if gf.architecture not in HF_CLASSES:
        raise UnsupportedError(f"{path}: architecture '{gf.architecture}' is not supported "
                               f"(supported: {', '.join(HF_CLASSES)})")
    config = _config(gf, transformers)
    _reconcile(config, gf)
    arch = _arch_for(config, str(path))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)

    def raw(name: str) -> torch.Tensor:
        if name not in gf.tensors:
            raise HFInteropError(f"{path}: tensor '{name}' is missing")
        return _torch_from_numpy(gf.raw(name))  # a view of the map: nothing read yet

    def dense(name: str, shape) -> torch.Tensor:
        return dequantize_blocks(raw(name), gf.tensor(name).type).reshape(shape).to(dtype)

    embed_name = model.get_input_embeddings()
    embed_path = next(n for n, m in model.named_modules() if m is embed_name)
    info = gf.tensor("token_embd.weight")
    _set(model, embed_path, GGUFEmbedding.from_raw(raw("token_embd.weight"), info.type, dtype=dtype))

    for qualified, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear):
            continue
        hf_name = f"{qualified}.weight"
        name = arch.gguf_name(hf_name) or ("token_embd.weight" if hf_name == "lm_head.weight" else None)
        if name is None:
            raise HFInteropError(f"{path}: no GGUF tensor for '{hf_name}'")
        info = gf.tensor(name) if name in gf.tensors else None
        if info is None:
            raise HFInteropError(f"{path}: tensor '{name}' (for '{hf_name}') is missing")
        if info.shape != tuple(module.weight.shape):
            raise HFInteropError(f"{path}: tensor '{name}' is {info.shape}, {hf_name} needs {tuple(module.weight.shape)}")
        blocks, order = raw(name), _hf_row_order(arch, name, info.shape[0])
        if order is not None:
            blocks = blocks[order]  # whole rows of blocks: a copy of this tensor, never dequantized
        bias = None
        if module.bias is not None:
            bias_name = arch.gguf_name(f"{qualified}.bias")
            bias = dense(bias_name, module.bias.shape)
            if order is not None:
                bias = bias[order]
        _set(model, qualified, GGUFLinear.from_raw(blocks, info.type, bias, backend=backend))

    for hf_name, p in list(model.named_parameters()):
        if not p.is_meta:
            continue
        name = arch.gguf_name(hf_name)
        if name is None:
            raise HFInteropError(f"{path}: no GGUF tensor for parameter '{hf_name}'")
        qualified, _, leaf = hf_name.rpartition(".")
        model.get_submodule(qualified)._parameters[leaf] = torch.nn.Parameter(dense(name, p.shape),
                                                                              requires_grad=False)
    _rebuild_meta_buffers(model)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise HFInteropError(f"{path}: no values for {', '.join(left[:5])}{' ...' if len(left) > 5 else ''}")
    model.requires_grad_(False)
    model.eval()
    model._qkvgguf_file = gf  # keeps the map (and its path) with the model
    return model.to(device)


def _config(gf: GGUFFile, transformers):
    """The transformers config of a GGUF file, by transformers' own table of GGUF keys
    (integrations.ggml.GGUF_CONFIG_MAPPING: `{arch}.*`, `general.*` and the tokenizer's special
    ids), read from our parser's metadata. `AutoConfig.from_pretrained(gguf_file=...)` reads the
    same keys through gguf.GGUFReader, which also parses the whole vocabulary: on SmolLM2 that
    took 5.5 s and left 75 MB of Python objects behind, more than the norms and Q/K copies together."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    arch = gf.architecture
    values: dict[str, Any] = {"tie_word_embeddings": "output.weight" not in gf.tensors}
    for prefix in ("general", arch, "tokenizer"):
        for key, target in GGUF_CONFIG_MAPPING.get(prefix, {}).items():
            value = gf.get(f"{prefix}.{key}")
            if target and value is not None:
                values[target] = value
    values["model_type"] = arch
    values["architectures"] = [HF_CLASSES[arch]]
    if "vocab_size" not in values:
        values["vocab_size"] = gf.tensor("token_embd.weight").shape[0]
    return transformers.AutoConfig.for_model(**values)


def _reconcile(config, gf: GGUFFile) -> None:
    """Where transformers' GGUF mapping leaves a shape at its class default (Qwen3's head_dim: the
    `{arch}.attention.key_length` key is not mapped), take the file's value (ModelConfig.from_gguf)
    and say so."""
    from qkvgguf.config import ModelConfig

    mc = ModelConfig.from_gguf(gf)
    facts = {"hidden_size": mc.n_embd, "intermediate_size": mc.n_ff, "num_hidden_layers": mc.n_layer,
             "num_attention_heads": mc.n_head, "num_key_value_heads": mc.n_head_kv, "head_dim": mc.head_dim,
             "vocab_size": mc.vocab_size}
    if gf.architecture == "llama":
        facts["attention_bias"] = mc.qkv_bias
    for key, value in facts.items():
        if hasattr(config, key) and getattr(config, key) != value:
            log.warning("%s: transformers derived %s = %r, the file says %r: using the file's", gf.path, key,
                        getattr(config, key), value)
            setattr(config, key, value)


def _rebuild_meta_buffers(model: torch.nn.Module) -> None:
    """Modules whose buffers were computed in __init__ (rope's inv_freq) were built on meta: build
    them again on the CPU from their config."""
    for qualified, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            if not hasattr(module, "config"):
                names = [n for n, b in module.named_buffers(recurse=False) if b.is_meta]
                raise HFInteropError(f"cannot compute buffers {names} of '{qualified}' ({type(module).__name__})")
            with torch.device("cpu"):
                _set(model, qualified, type(module)(module.config))


# -- quantize --------------------------------------------------------------------------------------
def _outtype(qtype) -> OutType:
    """An outtype name ("q4_k_m", llama.cpp's recipe) or a ggml type (every matrix that type, the
    output tensor by llama.cpp's rule: Q6_K, or Q8_0 for Q8_0)."""
    from gguf import LlamaFileType as FT

    if isinstance(qtype, str) and qtype.lower() in OUTTYPES:
        return get_outtype(qtype)
    t = as_qtype(qtype)
    return OutType(t.name.lower(), FT.GUESSED, t)


def _weights(model: torch.nn.Module, arch: Arch) -> list[tuple[str, str, torch.nn.Module]]:
    """(qualified module name, GGUF name, module) of the embedding and every Linear, GGUF order;
    a tied head (no GGUF tensor of its own) is left out."""
    out = []
    embed = model.get_input_embeddings()
    for qualified, module in model.named_modules():
        if module is embed or isinstance(module, (torch.nn.Linear, GGUFLinear)):
            name = arch.gguf_name(f"{qualified}.weight")
            if name is not None:
                out.append((qualified, name, module))
    out.sort(key=lambda e: _order(arch, e[1]))
    return out


def _importance(imatrix, name: str) -> Optional[np.ndarray]:
    if imatrix is None:
        return None
    return imatrix.mean(name)  # convert.imatrix.Imatrix


def collect_imatrix(model: torch.nn.Module, ids, n_ctx: int = 512, dataset: str = ""):
    """The importance matrix of a transformers model's nn.Linear inputs (convert.imatrix.Imatrix, keyed
    by GGUF names; `.save(path)` writes llama.cpp's imatrix GGUF): I_j = mean x_j^2 over the tokens
    `ids`, run in chunks of n_ctx tokens each from an empty cache (as llama-imatrix and
    qkvgguf convert do). Forward hooks record each Linear's input; the head is skipped as llama.cpp does."""
    from qkvgguf.convert.imatrix import Imatrix

    arch = _arch_for(model.config, type(model).__name__, type(model).__name__)
    imatrix = Imatrix(datasets=[dataset] if dataset else [], chunk_size=n_ctx)
    hooks = []
    for qualified, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, GGUFLinear)) and qualified != "lm_head":
            name = arch.gguf_name(f"{qualified}.weight")
            hooks.append(module.register_forward_pre_hook(lambda m, args, name=name: imatrix.add(name, args[0])))
    ids = torch.as_tensor(ids).reshape(-1)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, len(ids) - n_ctx + 1, n_ctx):
                model(ids[start:start + n_ctx][None].to(device), use_cache=False)
                imatrix.n_chunks += 1
    finally:
        for h in hooks:
            h.remove()
    if imatrix.n_chunks == 0:
        raise QkvggufError(f"collect_imatrix: {len(ids)} tokens is less than one chunk of {n_ctx}")
    return imatrix


class _ModelCheckpoint:
    """What convert/mixed.auto_plan reads of a checkpoint: `load(hf_name)` -> the float weight."""

    def __init__(self, model: torch.nn.Module):
        self.tensors = dict(model.named_parameters())

    def load(self, hf_name: str) -> torch.Tensor:
        return self.tensors[hf_name].detach().to("cpu", torch.float32)


def _auto_types(model, arch: Arch, entries, imatrix, target_bpw: Optional[float]) -> dict[str, T]:
    """`auto`: convert/mixed.auto_plan's measured allocation to target_bpw over this model's tensors."""
    from qkvgguf.convert.mixed import Target, auto_plan

    if target_bpw is None:
        raise QkvggufError("quantize: 'auto' needs target_bpw (bits per weight of the whole file)")
    outtype, ckpt = get_outtype("auto"), _ModelCheckpoint(model)
    names = {name for _, name, _ in entries}
    facts = model_facts(arch, names)
    planned = []
    for hf_name, p in ckpt.tensors.items():
        name = arch.gguf_name(hf_name)
        if name is not None:
            t = tensor_type(name, tuple(p.shape), outtype, facts).type
            planned.append(PlannedTensor(hf_name, name, tuple(p.shape), t, n_bytes(tuple(p.shape), t), None))
    chosen, _ = auto_plan(ckpt, arch, planned, imatrix, Target(bpw=target_bpw))
    return {p.name: p.type for p in chosen}


def quantize(model: torch.nn.Module, qtype="q8_0", imatrix=None, backend: str = "auto",
             target_bpw: Optional[float] = None) -> torch.nn.Module:
    """Replace the model's embedding and every nn.Linear by GGUF modules, in place; returns model.

    qtype: an outtype of the converter ("q8_0", "q4_k_m", "q3_k_m", ...: llama.cpp's per-tensor
    recipe, the output tensor Q6_K), a ggml type ("Q4_K": every matrix that type but the output
    tensor, as llama-quantize), or "auto" with `target_bpw`: convert/mixed.py's measured allocation
    (the converter's `--outtype auto --target-bpw --sensitivity weighted`: the importance-weighted
    proxy; the converter's default Fisher pass is not run on an in-memory model yet). imatrix: an Imatrix (`collect_imatrix`) or
    {GGUF name: (in_features,) mean x^2} for importance-weighted rounding. The choices are logged
    one line per tensor (INFO)."""
    outtype = _outtype(qtype)
    arch = _arch_for(model.config, type(model).__name__, type(model).__name__)
    entries = _weights(model, arch)
    if imatrix is not None and not hasattr(imatrix, "mean"):  # {name: mean x^2} -> an Imatrix of one row each
        from qkvgguf.convert.imatrix import Imatrix

        imatrix = Imatrix(sums={k: np.asarray(torch.as_tensor(v).cpu(), dtype=np.float64) for k, v in imatrix.items()},
                          counts={k: 1 for k in imatrix})
    for qualified, _, module in entries:
        if isinstance(module, (GGUFLinear, GGUFEmbedding)):
            raise HFInteropError(f"quantize: '{qualified}' is already a GGUF module")
    facts = model_facts(arch, {name for _, name, _ in entries})
    auto = _auto_types(model, arch, entries, imatrix, target_bpw) if outtype.name == "auto" else None
    tied = "output.weight" not in {name for _, name, _ in entries}
    embed_blocks = None
    for qualified, name, module in entries:
        weight = module.weight.detach()
        choice = tensor_type(name, tuple(weight.shape), outtype, facts)
        if auto is not None:
            choice = type(choice)(auto[name], "auto")
        importance = _importance(imatrix, name)
        log.info("%s -> %s%s", name, choice.type.name, "".join(f"  ({n})" for n in (choice.rule, choice.fallback) if n))
        if isinstance(module, torch.nn.Linear):
            new = GGUFLinear.from_linear(module, choice.type, importance, backend=backend)
        else:
            new = GGUFEmbedding.from_embedding(module, choice.type, importance)
            embed_blocks = new.qweight, choice.type
        _set(model, qualified, new)
    if tied and embed_blocks is not None:
        head = model.get_output_embeddings()
        path = next(n for n, m in model.named_modules() if m is head)
        _set(model, path, GGUFLinear.from_raw(*embed_blocks, backend=backend))
    model._qkvgguf_outtype = outtype
    return model


def dequantize(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The inverse of `quantize`, in place: every GGUFLinear becomes an nn.Linear and the GGUFEmbedding
    an nn.Embedding holding the blocks' values in `dtype` (a tied head shares the embedding's
    Parameter again, as transformers ties them); returns model. The float model a checkpoint in these
    values would load as: to fine-tune, to compare, or to quantize again to another type."""
    converted: dict[tuple, torch.nn.Parameter] = {}  # the same blocks (a tied head) -> one Parameter

    def weight(module) -> torch.nn.Parameter:
        key = (module.qweight.data_ptr(), tuple(module.qweight.shape), module.weight_type)
        if key not in converted:
            converted[key] = torch.nn.Parameter(module.dequantize().to(dtype), requires_grad=False)
        return converted[key]

    for qualified, module in list(model.named_modules()):
        if isinstance(module, GGUFLinear):
            new = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                  device="meta")
            new.weight = weight(module)
            if module.bias is not None:
                new.bias = torch.nn.Parameter(module.bias.detach().to(dtype), requires_grad=False)
        elif isinstance(module, GGUFEmbedding):
            new = torch.nn.Embedding(module.num_embeddings, module.embedding_dim, device="meta")
            new.weight = weight(module)
        else:
            continue
        _set(model, qualified, new)
    if hasattr(model, "_qkvgguf_outtype"):  # save_gguf's default outtype came from quantize: no longer
        del model._qkvgguf_outtype
    return model


# -- save_gguf -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Source:
    """What convert/stream.write_metadata reads of a checkpoint: its config and a folder name."""
    config: dict[str, Any]
    folder: Path


def _tokenizer_folder(tokenizer, config: dict, out: Path) -> Path:
    """A folder convert/vocab reads: the tokenizer's own files (a folder given as a path, or what
    save_pretrained writes, plus its SentencePiece model if it has one) and config.json."""
    import shutil

    if isinstance(tokenizer, (str, os.PathLike)):
        src = Path(tokenizer)
        if not src.is_dir():
            raise HFInteropError(f"{src}: not a tokenizer folder")
        for f in src.iterdir():
            if f.is_file() and f.name != "config.json":
                shutil.copy(f, out / f.name)
    else:
        tokenizer.save_pretrained(str(out))
        vocab_file = getattr(tokenizer, "vocab_file", None)
        if isinstance(vocab_file, str) and vocab_file.endswith(".model") and os.path.isfile(vocab_file):
            shutil.copy(vocab_file, out / "tokenizer.model")
    (out / "config.json").write_text(json.dumps(config))
    return out


def _tensors(model: torch.nn.Module, arch: Arch, outtype: OutType):
    """(hf_name, GGUF name, ggml type, bytes or float array in GGUF row order) for every tensor written."""
    named = dict(model.named_modules())
    facts = model_facts(arch, {arch.gguf_name(n) for n, _ in _param_names(model)} - {None})
    for hf_name, kind in _param_names(model):
        name = arch.gguf_name(hf_name)
        if name is None:
            continue
        qualified, _, leaf = hf_name.rpartition(".")
        module = named[qualified]
        if kind == "blocks":
            qtype, data = module.weight_type, module.qweight.detach().cpu()
            perm = arch.transform(name, torch.arange(data.shape[0]))
            yield hf_name, name, qtype, data[perm].numpy(), module.weight_shape
        else:
            values = getattr(module, leaf).detach().to("cpu", torch.float32)
            qtype = tensor_type(name, tuple(values.shape), outtype, facts).type
            values = arch.transform(name, values).numpy()
            yield hf_name, name, qtype, encode(values, qtype), tuple(values.shape)


def _param_names(model: torch.nn.Module):
    """(HF tensor name, "blocks" | "float") of every weight: GGUF modules' blocks, then parameters."""
    for qualified, module in model.named_modules():
        if isinstance(module, (GGUFLinear, GGUFEmbedding)):
            yield f"{qualified}.weight", "blocks"
    for hf_name, _ in model.named_parameters():
        yield hf_name, "float"


def save_gguf(model: torch.nn.Module, path: str | os.PathLike, tokenizer, outtype: Optional[str] = None,
              vocab_pre: Optional[str] = None, force: bool = False) -> Path:
    """Write the model as a GGUF file llama.cpp loads; GGUF modules' blocks are written as they are.

    tokenizer: a transformers tokenizer, or the folder of one (tokenizer.json / tokenizer.model).
    outtype: the converter's policy for tensors still in float (default: what `quantize` used, else
    "f16"; norms stay F32). vocab_pre: as convert's --vocab-pre. The file appears only complete."""
    import gguf

    otype = get_outtype(outtype) if outtype else getattr(model, "_qkvgguf_outtype", None)
    if otype is None:  # not from quantize: float tensors f16; a file of blocks from elsewhere says "mixed"
        from gguf import LlamaFileType as FT

        mixed = any(isinstance(m, (GGUFLinear, GGUFEmbedding)) for m in model.modules())
        otype = OutType("mixed", FT.GUESSED, T.F16) if mixed else get_outtype("f16")
    arch = _arch_for(model.config, str(path), type(model).__name__)
    config = {**model.config.to_dict(), "architectures": [arch.hf_arch]}
    output = AtomicOutput(path, force)
    with tempfile.TemporaryDirectory(prefix="qkvgguf-tok-") as tmp:
        vocab = load_vocab(_tokenizer_folder(tokenizer, config, Path(tmp)), arch.hparams.vocab_size, vocab_pre)
    tensors = sorted(_tensors(model, arch, otype), key=lambda e: _order(arch, e[1]))
    planned = [PlannedTensor(hf, name, shape, qtype, int(data.nbytes), None) for hf, name, qtype, data, shape in tensors]
    for p in planned:
        if p.n_bytes != n_bytes(p.shape, p.type):
            raise HFInteropError(f"tensor '{p.name}': {p.n_bytes} bytes, expected {n_bytes(p.shape, p.type)} for "
                                 f"{p.type.name} {p.shape}")
    source = _Source(config, Path(str(config.get("_name_or_path") or type(model).__name__)))
    with output as tmp:
        w = gguf.GGUFWriter(tmp, arch.GGUF_ARCH)
        try:
            write_metadata(w, source, arch, vocab, otype, planned)
            for p in planned:
                w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.n_bytes, raw_dtype=p.type)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for *_, data, _ in tensors:
                w.write_tensor_data(data)
        finally:
            w.close()
    log.info("wrote %s: %d tensors, %s", path, len(planned), otype.name)
    return Path(path)


__all__ = ["HF_CLASSES", "HFInteropError", "collect_imatrix", "dequantize", "from_gguf", "quantize", "save_gguf"]
