"""Gemma 3 (text): `Gemma3ForCausalLM`, and the language model of a `Gemma3ForConditionalGeneration`.

What llama.cpp's converter (conversion/gemma.py, `Gemma3Model`, in llama-cpp-python 0.3.36) writes,
and so what we write:
- norms: Gemma's RMSNorm scales by (1 + weight); GGUF stores (1 + weight), so every `*norm.weight`
  (input, post-attention, pre- and post-feed-forward, Q/K and final norms) gets 1 added on the way
  out. We add it in float32. llama.cpp does too for bf16 and f32 checkpoints (same bytes), but
  adds in float16 for f16 ones, so there its norms carry f16 rounding of (1 + w) (up to 4.9e-4 on
  the tiny test checkpoint saved as f16; ours are exact). The norms are written F32 either way;
- tensors: four norms per block (`attn_norm`, `post_attention_norm`, `ffn_norm` before the FFN,
  `post_ffw_norm` after it), Q/K norms, and the usual projections; NeoX rope, so no row permutation;
  the output matrix is the (tied) token embedding unless the checkpoint has its own `lm_head`;
- keys, in llama.cpp's order: block_count, context_length, embedding_length, feed_forward_length,
  head_count, head_count_kv, rope scaling (linear only, from the global layers' parameters),
  rope.freq_base (the global layers' theta), rope.freq_base_swa (the local layers' theta, when the
  config names it), layer_norm_rms_epsilon, key_length, value_length, final_logit_softcapping (when
  set), attention.sliding_window (unless every layer is global). No vocab_size, no rope dimension
  count. Missing hyperparameters take the defaults both transformers' Gemma3TextConfig and
  llama.cpp's converter use (131072 positions, 8 heads, 4 KV heads, head_dim 256, eps 1e-6).
- the vocabulary: SentencePiece (`tokenizer.model`), with add_space_prefix forced to False.

llama.cpp's runtime then assumes what the file does not say: every 6th layer (5, 11, 17, ...) is
global and the others slide (`sliding_window_pattern` is not written), queries are scaled by
1/sqrt(head_dim) (1/sqrt(n_embd / n_head) for its 62-layer 27B), attention logits are not capped,
the FFN is GELU (tanh). A config that says otherwise would convert to a file that computes
something else, so it is refused with the key named. Where every layer is global (layer_types all
`full_attention`, or `sliding_window_pattern` 1) no sliding window is written.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import gguf
import torch

from qkvgguf.errors import UnsupportedError

from . import register
from .base import IGNORED_SUFFIXES, QK_NORMS, Arch, ConfigError, Hparams

GEMMA3_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    **QK_NORMS,
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.post_attention_norm.weight",
    "model.layers.{i}.pre_feedforward_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
    "model.layers.{i}.post_feedforward_layernorm.weight": "blk.{i}.post_ffw_norm.weight",
}
# Gemma3ForConditionalGeneration: the language model's names carry `language_model.` (transformers
# 4: `language_model.model.layers...`, 5: `model.language_model.layers...`); the vision tower and
# the projector are another file's business (llama.cpp's mmproj).
LANGUAGE_PREFIX = "language_model."
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
SWA_PERIOD = 6  # llama.cpp's gemma3: layers il with il % 6 == 5 are global
GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh", "gelu_new")  # transformers' names for GELU, tanh approximation


def llamacpp_layer_types(n_layer: int) -> list[str]:
    return ["full_attention" if i % SWA_PERIOD == SWA_PERIOD - 1 else "sliding_attention" for i in range(n_layer)]


@register("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
class Gemma3(Arch):
    GGUF_ARCH = "gemma3"
    TENSORS = GEMMA3_TENSORS

    def __init__(self, config: dict[str, Any], config_path: str):
        text = config.get("text_config")
        if text is not None and not isinstance(text, dict):
            raise ConfigError(f"{config_path}: 'text_config' should be an object, found {text!r}")
        super().__init__({**config, **(text or {})}, config_path)  # the text model's keys win, as in llama.cpp
        self.rope_theta_swa, self.sliding_window, self.final_logit_softcapping = self._gemma_keys()

    # -- config.json -----------------------------------------------------------------------------

    def _rope_sets(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(global, local) rope parameters: transformers 5 keeps them per layer type in
        `rope_parameters`; 4.x configs have `rope_theta`, `rope_scaling` and `rope_local_base_freq`."""
        params = self.config.get("rope_parameters") or self.config.get("rope_scaling") or {}
        if not isinstance(params, dict):
            raise ConfigError(f"{self.config_path}: 'rope_parameters' should be an object, found {params!r}")
        if "full_attention" in params or "sliding_attention" in params:
            return dict(params.get("full_attention") or {}), dict(params.get("sliding_attention") or {})
        full = dict(params)
        if "rope_theta" not in full and self.config.get("rope_theta") is not None:
            full["rope_theta"] = self.config["rope_theta"]
        local = {}
        if self.config.get("rope_local_base_freq") is not None:
            local["rope_theta"] = self.config["rope_local_base_freq"]
        return full, local

    def _rope(self) -> tuple[float, Optional[tuple[str, float]]]:
        full, _ = self._rope_sets()
        kind = full.get("rope_type", full.get("type", "default"))
        theta = float(full.get("rope_theta", 1_000_000.0))
        if kind in ("default", None):
            return theta, None
        if kind == "linear" and full.get("factor") is not None:
            return theta, ("linear", float(full["factor"]))
        raise UnsupportedError(f"{self.config_path}: rope scaling '{kind}' is not supported (supported: linear)")

    def read_hparams(self) -> Hparams:
        n_embd = self._get("hidden_size")
        n_head = self._get("num_attention_heads", default=8)
        head_dim = self._get("head_dim", default=256)
        theta, scaling = self._rope()
        return Hparams(
            n_layer=self._get("num_hidden_layers"),
            n_ctx_train=self._get("max_position_embeddings", default=131072),
            n_embd=n_embd,
            n_ff=self._get("intermediate_size"),
            n_head=n_head,
            n_head_kv=self._get("num_key_value_heads", default=4),
            head_dim=head_dim,
            head_dim_explicit=True,
            norm_eps=self._get("rms_norm_eps", float, default=1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            vocab_size=self._get("vocab_size"),
            tied=bool(self.config.get("tie_word_embeddings", True)),  # Gemma3TextConfig's default
        )

    def _refuse(self, key: str, found: Any, expected: str) -> None:
        raise UnsupportedError(f"{self.config_path}: '{key}' is {found!r}; llama.cpp's gemma3 assumes {expected}")

    def _gemma_keys(self) -> tuple[Optional[float], Optional[int], Optional[float]]:
        """(local rope theta, sliding window, final logit soft-cap), after checking that the config
        describes the function llama.cpp's gemma3 computes."""
        h, cfg = self.hparams, self.config
        if cfg.get("attn_logit_softcapping") is not None:
            self._refuse("attn_logit_softcapping", cfg["attn_logit_softcapping"], "none (Gemma 3 has none)")
        act = cfg.get("hidden_activation", cfg.get("hidden_act", "gelu_pytorch_tanh"))
        if act not in GELU_TANH:
            self._refuse("hidden_activation", act, "gelu_pytorch_tanh")
        if cfg.get("use_bidirectional_attention"):
            self._refuse("use_bidirectional_attention", True, "causal attention")
        scalar = cfg.get("query_pre_attn_scalar")
        expected = h.n_embd / h.n_head if h.n_layer == 62 else h.head_dim  # llama.cpp: 27B by layer count
        if scalar is not None and not math.isclose(float(scalar), expected):
            self._refuse("query_pre_attn_scalar", scalar, f"{expected:g} for {h.n_layer} layers")
        _, local = self._rope_sets()
        if local.get("rope_type", local.get("type", "default")) not in ("default", None):
            self._refuse("rope_parameters.sliding_attention.rope_type", local.get("rope_type", local.get("type")),
                         "no scaling on the local layers")
        theta_swa = float(local["rope_theta"]) if local.get("rope_theta") is not None else None
        softcap = cfg.get("final_logit_softcapping")
        softcap = float(self._get("final_logit_softcapping", float)) if softcap else None  # 0 or null: none

        layer_types = cfg.get("layer_types")
        all_global = cfg.get("sliding_window_pattern") == 1 or (
            isinstance(layer_types, list) and all(t == "full_attention" for t in layer_types))
        if all_global:
            return theta_swa, None, softcap
        if layer_types is not None and layer_types != llamacpp_layer_types(h.n_layer):
            self._refuse("layer_types", layer_types, f"every {SWA_PERIOD}th layer global, the rest sliding")
        pattern = cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern"))
        if layer_types is None and pattern is not None and pattern != SWA_PERIOD:
            self._refuse("sliding_window_pattern", pattern, str(SWA_PERIOD))
        window = self._get("sliding_window")
        if window <= 0:
            raise ConfigError(f"{self.config_path}: 'sliding_window' should be positive, found {window}")
        return theta_swa, window, softcap

    # -- hooks -----------------------------------------------------------------------------------

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        h = self.hparams
        w.add_block_count(h.n_layer)
        w.add_context_length(h.n_ctx_train)
        w.add_embedding_length(h.n_embd)
        w.add_feed_forward_length(h.n_ff)
        w.add_head_count(h.n_head)
        w.add_head_count_kv(h.n_head_kv)
        if h.rope_scaling is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(h.rope_scaling[1])
        w.add_rope_freq_base(h.rope_theta)
        if self.rope_theta_swa is not None:
            w.add_rope_freq_base_swa(self.rope_theta_swa)
        w.add_layer_norm_rms_eps(h.norm_eps)
        w.add_key_length(h.head_dim)
        w.add_value_length(h.head_dim)
        if self.final_logit_softcapping is not None:
            w.add_final_logit_softcapping(self.final_logit_softcapping)
        if self.sliding_window is not None:
            w.add_sliding_window(self.sliding_window)

    def adjust_vocab(self, vocab):
        if vocab.model != "llama":
            raise UnsupportedError(f"{vocab.source}: Gemma 3 needs its SentencePiece tokenizer.model "
                                   f"(found only a '{vocab.model}' tokenizer.json)")
        vocab.add_space_prefix = False  # as llama.cpp writes for Gemma, whatever the model says
        return vocab

    def gguf_name(self, hf_name: str) -> Optional[str]:
        if hf_name.startswith(VISION_PREFIXES) or hf_name.endswith(IGNORED_SUFFIXES):
            return None
        return super().gguf_name(hf_name.replace(LANGUAGE_PREFIX, ""))

    def transform(self, gguf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        if gguf_name.endswith("norm.weight"):
            return tensor + 1.0  # Gemma's RMSNorm multiplies by (1 + weight)
        return tensor
