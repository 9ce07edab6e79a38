"""The decoder forward pass: plain functions over a weights mapping keyed by GGUF names.

One implementation serves llama, qwen2 and qwen3; their differences are `ModelConfig` flags:

    x = token_embd[tokens]                                   # (T, n_embd)
    for each block i:                 (each residual add is fused into the next norm: add_rms_norm)
        h = rms_norm(x) * attn_norm
        q, k, v = h @ attn_q/k/v (+ bias if qkv_bias)        # (T, n_head*hd), (T, n_head_kv*hd) x2
        q, k = rms_norm per head * attn_q/k_norm  (qk_norm)
        q, k = rope(q, k, positions)                         # adjacent pairs, or halves (rope_neox)
        x = x + attention(q, cache(k), cache(v)) @ attn_output
        h = rms_norm(x) * ffn_norm
        x = x + (silu(h @ ffn_gate) * (h @ ffn_up)) @ ffn_down
    logits = (rms_norm(x) * output_norm) @ output            # output = token_embd when tied

All arithmetic is float32 (the reference path). Weights are dequantized per matmul through the
`Weights` cache. The ops come from one backend, chosen once in `Model.__init__`: `ops` (torch) or
`ops_triton` (Triton kernels); the code below calls `ops.<name>` and never branches on the device.
"""

from __future__ import annotations

import torch

from qkvgguf.config import ModelConfig
from qkvgguf.gguf_file import GGUFFile

from . import ops as torch_ops
from .backend import select_backend
from .kv_cache import KVCache
from .planner import OUTPUT_UNIT
from .weights import Weights


class Model:
    """A GGUF decoder ready to run: config, weights (on `device`), and the ops of one backend.

    backend: "auto" (Triton on a capable CUDA GPU, torch elsewhere), "triton" or "torch".
    Activations are float32 on the CPU and float16 on CUDA with Triton; the residual stream is float32 on both.
    """

    def __init__(self, gguf: GGUFFile, cache_bytes: int = 0, device: str | torch.device = "cpu",
                 backend: str = "auto", plan=None):
        self.gguf = gguf
        self.device = torch.device(device)
        self.backend = select_backend(backend, self.device)
        if self.backend == "triton":
            from . import ops_triton as ops
        else:
            ops = torch_ops
        self.ops = ops
        self.dtype = torch.float16 if (self.backend == "triton" and self.device.type == "cuda") else torch.float32
        self.config = ModelConfig.from_gguf(gguf)
        self.plan = plan  # runtime.planner.Plan: what is resident and what streams (None: all resident)
        self.weights = Weights(gguf, cache_bytes, self.device, plan)
        self.output_name = "token_embd.weight" if self.config.tied_embeddings else "output.weight"
        freq_factors = self.weights.dense("rope_freqs.weight") if "rope_freqs.weight" in self.weights else None
        self.inv_freq = ops.rope_inv_freq(self.config, freq_factors).to(self.device)

    def new_cache(self, n_ctx: int, type_k: str = "f32", type_v: str = "f32", budget: int | None = None) -> KVCache:
        return KVCache(self.config, n_ctx, type_k, type_v, device=self.device, ops=self.ops, budget=budget)

    @property
    def embeds_on_host(self) -> bool:
        """True when the embedding rows are gathered on the host (a host-side or streamed embedding
        on a GPU): a captured CUDA graph then takes the rows as its input, not the token ids."""
        return self.device.type != "cpu" and self.weights.rows_device("token_embd.weight").type == "cpu"

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (T,) -> their embedding rows (T, n_embd) float32, on the device the rows live on."""
        return self.weights.rows("token_embd.weight", tokens.to(self.weights.rows_device("token_embd.weight")))

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache, logits: str = "last",
                embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Run tokens (T,) at positions [cache.pos, cache.pos + T); return logits.

        logits="last": (vocab,) for the last position; "all": (T, vocab); "none": nothing computed.
        embeds: the tokens' rows from `embed` (T, n_embd), used instead of gathering them.
        """
        cfg, W, ops = self.config, self.weights, self.ops
        T = tokens.shape[0] if embeds is None else embeds.shape[0]
        cache.check_room(T)  # ValueError when T more tokens do not fit
        positions = cache.positions(T)  # on the cache's device; a device counter in graph mode
        cos, sin = ops.rope_cos_sin(self.inv_freq, positions, cfg.rope_scale)  # (T, hd/2) float32
        # (T, n_embd): the residual stream, float32 on every backend (fp16 overflows on outlier
        # channels); h, the normed input of each block's matmuls, is in the activation dtype
        x = (W.rows("token_embd.weight", tokens.to(self.device)) if embeds is None else embeds).to(self.device).float()
        h = ops.rms_norm(x, W.dense("blk.0.attn_norm.weight"), cfg.norm_eps, out_dtype=self.dtype)
        for i in range(cfg.n_layer):
            W.begin_unit(i)  # a streamed layer's weights arrive (the next one's copy starts)
            # each residual add is fused into the norm that follows it: (norm(x + a), x + a)
            h, x = ops.add_rms_norm(self._attention(i, h, cos, sin, cache), x,
                                    W.dense(f"blk.{i}.ffn_norm.weight"), cfg.norm_eps)
            after = f"blk.{i + 1}.attn_norm.weight" if i + 1 < cfg.n_layer else "output_norm.weight"
            h, x = ops.add_rms_norm(self._feed_forward(i, h), x, W.dense(after), cfg.norm_eps)
            W.end_unit(i)
        cache.advance(T)
        if logits == "none":
            return torch.empty(0)
        if logits == "last":
            h = h[-1:]
        W.begin_unit(OUTPUT_UNIT)
        out = ops.linear(h, W, self.output_name).float()  # (T or 1, vocab)
        W.end_unit(OUTPUT_UNIT)
        return out[0] if logits == "last" else out

    def _attention(self, i: int, h: torch.Tensor, cos, sin, cache: KVCache) -> torch.Tensor:
        """h: the normed residual stream (T, n_embd) -> the attention block's output (T, n_embd)."""
        cfg, W, ops = self.config, self.weights, self.ops
        p = f"blk.{i}."
        T = h.shape[0]
        q = ops.linear(h, W, p + "attn_q.weight", p + "attn_q.bias" if cfg.qkv_bias else None)
        k = ops.linear(h, W, p + "attn_k.weight", p + "attn_k.bias" if cfg.qkv_bias else None)
        v = ops.linear(h, W, p + "attn_v.weight", p + "attn_v.bias" if cfg.qkv_bias else None)
        q = q.view(T, cfg.n_head, cfg.head_dim).transpose(0, 1)  # (n_head, T, hd)
        k = k.view(T, cfg.n_head_kv, cfg.head_dim).transpose(0, 1)  # (n_head_kv, T, hd)
        v = v.view(T, cfg.n_head_kv, cfg.head_dim).transpose(0, 1)
        if cfg.qk_norm:
            q = ops.rms_norm(q, W.dense(p + "attn_q_norm.weight"), cfg.norm_eps)
            k = ops.rms_norm(k, W.dense(p + "attn_k_norm.weight"), cfg.norm_eps)
        q = ops.rope(q, cos, sin, cfg.rope_neox)
        k = ops.rope(k, cos, sin, cfg.rope_neox)
        out = cache.attend(i, q, k, v)  # (n_head, T, hd) over positions [0, pos+T)
        out = out.transpose(0, 1).reshape(T, cfg.q_dim)
        return ops.linear(out, W, p + "attn_output.weight")

    def _feed_forward(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """h: the normed residual stream -> the feed-forward block's output."""
        W, ops = self.weights, self.ops
        p = f"blk.{i}."
        gate = ops.linear(h, W, p + "ffn_gate.weight")
        up = ops.linear(h, W, p + "ffn_up.weight")
        return ops.linear(ops.swiglu(gate, up), W, p + "ffn_down.weight")


def load_model(path: str, cache_bytes: int | None = None, device: str = "cpu", backend: str = "auto") -> Model:
    """A Model for a GGUF path; cache_bytes None: the CLI's default weights cache (weights.default_cache_bytes:
    none where the compiled CPU kernels read the blocks, else 1 GiB). For everything else, `qkvgguf.LLM`."""
    return Model(GGUFFile(path), cache_bytes, device, backend)
