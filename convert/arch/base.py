"""The base of every architecture: hyperparameters from config.json, metadata, tensor renaming.

An architecture is data plus three hooks:
- `TENSORS`: Hugging Face name -> GGUF name, `{i}` standing for the layer number;
- `write_metadata(w)`: the `{arch}.*` keys llama.cpp needs (typed through `gguf.GGUFWriter` helpers);
- `transform(gguf_name, tensor)`: reshaping a tensor on its way out (llama's Q/K row permutation);
- `adjust_vocab(vocab)`: a family's fix-ups of the tokenizer keys (Gemma's add_space_prefix).
The shared llama-family layout (RMSNorm, rope, SwiGLU, grouped-query attention) lives here; the
families differ by a few table rows and flags.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import gguf
import torch

from qkvgguf.errors import QkvggufError, UnsupportedError, shown
from qkvgguf.validate import INT_KEYS


class ConfigError(QkvggufError):
    """config.json lacks a key the architecture needs, or has a value of the wrong kind."""


# The llama family's tensors, shared by every architecture in this folder.
LLAMA_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}
QKV_BIASES = {
    "model.layers.{i}.self_attn.q_proj.bias": "blk.{i}.attn_q.bias",
    "model.layers.{i}.self_attn.k_proj.bias": "blk.{i}.attn_k.bias",
    "model.layers.{i}.self_attn.v_proj.bias": "blk.{i}.attn_v.bias",
}
QK_NORMS = {
    "model.layers.{i}.self_attn.q_norm.weight": "blk.{i}.attn_q_norm.weight",
    "model.layers.{i}.self_attn.k_norm.weight": "blk.{i}.attn_k_norm.weight",
}
# Checkpoint entries that are not weights (buffers some exports include).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")

MAX_INT_HPARAM = 1 << 26  # above every count and width of a real model
# config.json key -> the GGUF key whose bound (qkvgguf/validate.py, what the runtime loads) applies
GGUF_KEYS = {"num_hidden_layers": "block_count", "hidden_size": "embedding_length",
             "intermediate_size": "feed_forward_length", "num_attention_heads": "attention.head_count",
             "num_key_value_heads": "attention.head_count_kv", "head_dim": "attention.key_length",
             "max_position_embeddings": "context_length", "vocab_size": "vocab_size"}

_LAYER = re.compile(r"^(model\.layers)\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Hparams:
    n_layer: int
    n_ctx_train: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    head_dim_explicit: bool  # config.json names head_dim (written as key/value_length)
    norm_eps: float
    rope_theta: float
    rope_scaling: Optional[tuple[str, float]]  # ("linear", factor) or None
    vocab_size: int
    tied: bool


class Arch:
    """One Hugging Face architecture family. Subclasses set `GGUF_ARCH` and `TENSORS`."""

    GGUF_ARCH: ClassVar[str]
    TENSORS: ClassVar[dict[str, str]] = LLAMA_TENSORS

    def __init__(self, config: dict[str, Any], config_path: str):
        self.config, self.config_path = config, config_path
        self.hparams = self.read_hparams()
        self.hf_arch = config["architectures"][0]

    # -- config.json -----------------------------------------------------------------------------

    def _get(self, key: str, kind=int, default: Any = ..., source: Optional[dict] = None) -> Any:
        """A number from config.json: the right kind, finite, positive and within the GGUF reader's
        bounds (qkvgguf/validate.py), so that the file we write is one we will load."""
        value = (self.config if source is None else source).get(key)
        if value is None:
            if default is ...:
                raise ConfigError(f"{self.config_path}: required key '{key}' is missing")
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{self.config_path}: '{key}' should be a number, found {shown(value)}")
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"{self.config_path}: '{key}' should be a positive finite number, found {shown(value)}")
        if kind is int:
            if value != int(value):
                raise ConfigError(f"{self.config_path}: '{key}' should be an integer, found {shown(value)}")
            hi = INT_KEYS[GGUF_KEYS[key]][1] if key in GGUF_KEYS else MAX_INT_HPARAM
            if value > hi:
                raise ConfigError(f"{self.config_path}: '{key}' = {int(value):,} is larger than {hi:,}")
        return kind(value)

    def _rope(self) -> tuple[float, Optional[tuple[str, float]]]:
        """(theta, scaling) from `rope_parameters` (transformers 5) or `rope_theta`/`rope_scaling` (4.x)."""
        for key in ("rope_parameters", "rope_scaling"):
            if self.config.get(key) is not None and not isinstance(self.config[key], dict):
                raise ConfigError(f"{self.config_path}: '{key}' should be an object, found {shown(self.config[key])}")
        params = self.config.get("rope_parameters") or {}
        scaling = self.config.get("rope_scaling") or params
        theta = self._get("rope_theta", float, default=10000.0,
                          source=params if "rope_theta" in params else self.config)
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind in ("default", None):
            return theta, None
        if kind == "linear":
            return theta, ("linear", self._get("factor", float, source=scaling))
        raise UnsupportedError(f"{self.config_path}: rope scaling {shown(kind)} is not supported (supported: linear)")

    def read_hparams(self) -> Hparams:
        n_embd, n_head = self._get("hidden_size"), self._get("num_attention_heads")
        n_head_kv = self._get("num_key_value_heads", default=n_head)
        head_dim = self._get("head_dim", default=None)
        if n_head % n_head_kv:
            raise ConfigError(f"{self.config_path}: num_attention_heads {n_head} is not a multiple of "
                              f"num_key_value_heads {n_head_kv}")
        if head_dim is None and n_embd % n_head:
            raise ConfigError(f"{self.config_path}: hidden_size {n_embd} is not a multiple of "
                              f"num_attention_heads {n_head} (and no head_dim is given)")
        tied = self.config.get("tie_word_embeddings", False)
        if not isinstance(tied, bool):
            raise ConfigError(f"{self.config_path}: 'tie_word_embeddings' should be true or false, found {shown(tied)}")
        theta, scaling = self._rope()
        return Hparams(
            n_layer=self._get("num_hidden_layers"),
            n_ctx_train=self._get("max_position_embeddings"),
            n_embd=n_embd,
            n_ff=self._get("intermediate_size"),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim or n_embd // n_head,
            head_dim_explicit=head_dim is not None,
            norm_eps=self._check_eps(self._get("rms_norm_eps", float)),
            rope_theta=theta,
            rope_scaling=scaling,
            vocab_size=self._get("vocab_size"),
            tied=tied,
        )

    def _check_eps(self, eps: float) -> float:
        if eps >= 1.0:
            raise ConfigError(f"{self.config_path}: 'rms_norm_eps' = {eps} should be below 1")
        return eps

    # -- hooks -----------------------------------------------------------------------------------

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        """The `{arch}.*` keys, as llama.cpp's convert_hf_to_gguf.py writes them for this family."""
        h = self.hparams
        w.add_vocab_size(h.vocab_size)
        w.add_context_length(h.n_ctx_train)
        w.add_embedding_length(h.n_embd)
        w.add_block_count(h.n_layer)
        w.add_feed_forward_length(h.n_ff)
        w.add_head_count(h.n_head)
        w.add_head_count_kv(h.n_head_kv)
        if h.head_dim_explicit:
            w.add_key_length(h.head_dim)
            w.add_value_length(h.head_dim)
        w.add_rope_dimension_count(h.head_dim)
        w.add_rope_freq_base(h.rope_theta)
        if h.rope_scaling is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(h.rope_scaling[1])
        w.add_layer_norm_rms_eps(h.norm_eps)

    def gguf_name(self, hf_name: str) -> Optional[str]:
        """The GGUF name of a checkpoint tensor; None for tensors not written (buffers, tied head)."""
        if hf_name.endswith(IGNORED_SUFFIXES):
            return None
        if hf_name == "lm_head.weight" and self.hparams.tied:
            return None  # llama.cpp reads token_embd.weight when output.weight is absent
        key, layer = hf_name, None
        m = _LAYER.match(hf_name)
        if m:
            key, layer = f"{m[1]}.{{i}}.{m[3]}", int(m[2])
            if layer >= self.hparams.n_layer:
                raise UnsupportedError(f"tensor '{hf_name}': layer {layer} but config.json has "
                                       f"num_hidden_layers = {self.hparams.n_layer}")
        if key not in self.TENSORS:
            raise UnsupportedError(f"tensor '{hf_name}' is not part of {self.hf_arch} as supported here")
        return self.TENSORS[key].format(i=layer)

    def transform(self, gguf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Reshape a tensor for GGUF (same shape out). The default is the identity."""
        return tensor

    def adjust_vocab(self, vocab):
        """The folder's vocab (convert.vocab.Vocab) as this family writes it (Gemma: no space prefix)."""
        return vocab
