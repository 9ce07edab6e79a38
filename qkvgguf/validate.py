"""What a GGUF file may make us do: one validation pass at load, before any allocation or compute.

`gguf_file.py` proves the container is sound (counts, offsets, sizes inside the file). This module
proves the model in it is one we can run without surprises, so that nothing later (a reshape in
the forward pass, a cache allocation, a division by a head count) meets a value it did not expect:

- `check_hparams(gguf, arch)`: every `{arch}.*` hyperparameter we read has the GGUF type we expect
  (integers for counts, numbers for floats; never a string, bool or array where a scalar belongs),
  is finite and within `BOUNDS`; head counts divide the width;
- `check_tensors(gguf, cfg)`: every tensor the forward pass will use exists with the shape the
  config implies (`expected_tensors`, one table) and a ggml type our kernels implement;
- `check_allocation(what, n_bytes)`: a product that sizes an allocation (the KV cache at the
  chosen context), computed in Python ints, against the machine's memory.

Every error is one line naming the file, the key or tensor, what was expected and what was found,
with file-supplied strings escaped (`errors.shown`). A new architecture family adds its keys to
`INT_KEYS`/`FLOAT_KEYS` if it reads new ones, and its tensors to `expected_tensors`.
"""

from __future__ import annotations

import math
import os

from .errors import GGUFError, QkvggufError, shown

# key (after "{arch}.") -> (min, max) inclusive; integer-valued hyperparameters. The maxima are far
# above any published model (405B: 126 layers, width 16,384, 128 heads) and far below what would
# make a product of them overflow or a loop over them hang.
INT_KEYS = {
    "block_count": (1, 4096),
    "embedding_length": (1, 1 << 17),
    "feed_forward_length": (1, 1 << 20),
    "attention.head_count": (1, 4096),
    "attention.head_count_kv": (1, 4096),
    "attention.key_length": (1, 1 << 14),
    "attention.value_length": (1, 1 << 14),
    "context_length": (1, 1 << 26),
    "rope.dimension_count": (1, 1 << 14),
    "vocab_size": (1, 1 << 24),
}
# key -> (lowest allowed, highest allowed, lowest exclusive)
FLOAT_KEYS = {
    "attention.layer_norm_rms_epsilon": (0.0, 1.0, True),
    "rope.freq_base": (0.0, 1e12, True),
    "rope.scaling.factor": (0.0, 1e6, True),
}
STRING_KEYS = ("rope.scaling.type",)
MAX_VOCAB = 1 << 24  # rows of token_embd.weight


def _int_value(path: str, key: str, value, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise GGUFError(f"{path}: metadata key {shown(key)} should be an integer, found "
                        f"{type(value).__name__} {shown(value)}")
    if not lo <= value <= hi:
        raise GGUFError(f"{path}: metadata key {shown(key)} = {value:,} is outside [{lo:,}, {hi:,}]")


def check_hparams(gguf, arch: str) -> None:
    """Types and ranges of the `{arch}.*` keys a ModelConfig reads (those present; missing required
    keys are ModelConfig's own error)."""
    md, path = gguf.metadata, gguf.path
    for key, (lo, hi) in INT_KEYS.items():
        full = f"{arch}.{key}"
        if full not in md:
            continue
        value = md[full]
        if isinstance(value, list):  # per-layer values (head_count_kv, feed_forward_length)
            if not value:
                raise GGUFError(f"{path}: metadata key {shown(full)} is an empty array")
            for v in value:
                _int_value(path, full, v, lo, hi)
        else:
            _int_value(path, full, value, lo, hi)
    for key, (lo, hi, open_lo) in FLOAT_KEYS.items():
        full = f"{arch}.{key}"
        if full not in md:
            continue
        value = md[full]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise GGUFError(f"{path}: metadata key {shown(full)} should be a number, found "
                            f"{type(value).__name__} {shown(value)}")
        if not math.isfinite(value) or value < lo or (open_lo and value == lo) or value > hi:
            raise GGUFError(f"{path}: metadata key {shown(full)} = {shown(value)} is outside "
                            f"{'(' if open_lo else '['}{lo:g}, {hi:g}]")
    for key in STRING_KEYS:
        full = f"{arch}.{key}"
        if full in md and not isinstance(md[full], str):
            raise GGUFError(f"{path}: metadata key {shown(full)} should be a string, found "
                            f"{type(md[full]).__name__} {shown(md[full])}")
    width, heads = md.get(f"{arch}.embedding_length"), md.get(f"{arch}.attention.head_count")
    if isinstance(width, int) and isinstance(heads, int) and f"{arch}.attention.key_length" not in md \
            and width % heads:
        raise GGUFError(f"{path}: embedding_length {width:,} is not a multiple of head_count {heads:,} "
                        f"(and no attention.key_length gives the head width)")
    n_layer = md.get(f"{arch}.block_count")
    if isinstance(n_layer, int) and n_layer * 2 > len(gguf.tensors):
        raise GGUFError(f"{path}: block_count {n_layer:,} needs more tensors than the file's "
                        f"{len(gguf.tensors):,}")


def expected_tensors(cfg) -> dict[str, tuple[tuple[int, ...], bool]]:
    """name -> (shape in numpy order, required) of every tensor the forward pass reads for `cfg`.
    The vocabulary size is token_embd.weight's row count (ModelConfig.vocab_size)."""
    e, hd = cfg.n_embd, cfg.head_dim
    out = {
        "token_embd.weight": ((cfg.vocab_size, e), True),
        "output_norm.weight": ((e,), True),
        "output.weight": ((cfg.vocab_size, e), not cfg.tied_embeddings),
        "rope_freqs.weight": ((cfg.rope_dim // 2,), False),
    }
    for i in range(cfg.n_layer):
        p = f"blk.{i}."
        out.update({
            p + "attn_norm.weight": ((e,), True),
            p + "attn_q.weight": ((cfg.q_dim, e), True),
            p + "attn_k.weight": ((cfg.kv_dim, e), True),
            p + "attn_v.weight": ((cfg.kv_dim, e), True),
            p + "attn_output.weight": ((e, cfg.q_dim), True),
            p + "ffn_norm.weight": ((e,), True),
            p + "ffn_gate.weight": ((cfg.n_ff, e), True),
            p + "ffn_up.weight": ((cfg.n_ff, e), True),
            p + "ffn_down.weight": ((e, cfg.n_ff), True),
        })
        if cfg.qkv_bias:
            out.update({p + "attn_q.bias": ((cfg.q_dim,), True), p + "attn_k.bias": ((cfg.kv_dim,), True),
                        p + "attn_v.bias": ((cfg.kv_dim,), True)})
        if cfg.qk_norm:
            out.update({p + "attn_q_norm.weight": ((hd,), True), p + "attn_k_norm.weight": ((hd,), True)})
    return out


def check_tensors(gguf, cfg) -> None:
    """Every tensor `cfg` needs exists with its shape and a type our kernels implement."""
    from .quants import FORMATS

    path = gguf.path
    if cfg.vocab_size > MAX_VOCAB:
        raise GGUFError(f"{path}: token_embd.weight has {cfg.vocab_size:,} rows, more than {MAX_VOCAB:,}")
    for name, (shape, required) in expected_tensors(cfg).items():
        info = gguf.tensors.get(name)
        if info is None:
            if required:
                raise GGUFError(f"{path}: tensor {shown(name)} is missing ({cfg.arch} with {cfg.n_layer} layers "
                                f"needs it, shape {shape})")
            continue
        if tuple(info.shape) != shape:
            raise GGUFError(f"{path}: tensor {shown(name)} has shape {tuple(info.shape)}, expected {shape} "
                            f"from the metadata")
        if info.type not in FORMATS:
            raise GGUFError(f"{path}: tensor {shown(name)} has type {info.type.name}, which qkvgguf cannot "
                            f"compute with (supported: {', '.join(sorted(t.name for t in FORMATS))})")


def memory_limit() -> int:
    """Bytes one allocation may take: the machine's physical memory (QKVGGUF_MAX_ALLOC overrides)."""
    env = os.environ.get("QKVGGUF_MAX_ALLOC")
    if env:
        from .units import parse_size

        return parse_size(env)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no bound we can read
        return 1 << 62


def check_allocation(what: str, n_bytes: int, limit: int | None = None) -> None:
    """Refuse an allocation of `n_bytes` (a Python int: no overflow) above `limit` (default: memory_limit())."""
    limit = memory_limit() if limit is None else limit
    if n_bytes > limit:
        from .units import format_bytes

        raise QkvggufError(f"{what} needs {format_bytes(n_bytes)}, more than this machine's "
                           f"{format_bytes(limit)} (a smaller -c, or a quantized -ctk/-ctv)")
