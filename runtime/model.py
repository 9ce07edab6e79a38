"""The decoder forward pass: plain functions over a weights mapping keyed by GGUF names.

The frame is shared; the blocks come from the architecture registry (runtime/arch/, picked by
`ModelConfig.block`: "llama" for llama/qwen2/qwen3, "gemma3" for Gemma 3):

    x = token_embd[tokens] * embd_scale                      # (T, n_embd); gemma: sqrt(n_embd)
    h = rms_norm(x) * blk.0.attn_norm
    for each block i:
        h, x = block(i, h, x)          # the block's residual adds; h = the next norm of x
    logits = h @ output                                      # output = token_embd when tied
    logits = c * tanh(logits / c)                            # final_logit_softcap c, when set

All arithmetic is float32 (the reference path). Weights are dequantized per matmul through the
`Weights` cache. The ops come from one backend, chosen once in `Model.__init__`: `ops` (torch) or
`ops_triton` (Triton kernels); the code calls `ops.<name>` and never branches on the device.
Sliding-window layers get their own rope table (`rope_base_swa`) and the cache keeps only their
window (runtime/kv_cache.py).
"""

from __future__ import annotations

import torch

from qkvgguf.config import ModelConfig
from qkvgguf.gguf_file import GGUFFile

from . import ops as torch_ops
from .arch import block_for
from .backend import select_backend
from .kv_cache import KVCache
from .numerics import numerics_ops
from .planner import OUTPUT_UNIT
from .weights import Weights


class Model:
    """A GGUF decoder ready to run: config, weights (on `device`), and the ops of one backend.

    backend: "auto" (Triton on a capable CUDA GPU, torch elsewhere), "triton" or "torch".
    numerics: "exact" (float32 activations into every matmul), "llamacpp" (rounded first as llama.cpp's
    CPU backend rounds them: to reproduce its logits) or "bf16" (CPU prompt matmuls in bfloat16: faster
    where the CPU has AMX); runtime/numerics.py.
    Activations are float32 on the CPU and float16 on CUDA with Triton; the residual stream is float32 on both.
    """

    def __init__(self, gguf: GGUFFile, cache_bytes: int = 0, device: str | torch.device = "cpu",
                 backend: str = "auto", plan=None, numerics: str = "exact"):
        self.gguf = gguf
        self.device = torch.device(device)
        self.backend = select_backend(backend, self.device)
        if self.backend == "triton":
            from . import ops_triton as ops
        else:
            ops = torch_ops
        self.dtype = torch.float16 if (self.backend == "triton" and self.device.type == "cuda") else torch.float32
        ops = numerics_ops(ops, numerics, self.dtype)
        self.ops = ops
        self.numerics = numerics
        self.config = ModelConfig.from_gguf(gguf)
        self.plan = plan  # runtime.planner.Plan: what is resident and what streams (None: all resident)
        self.weights = Weights(gguf, cache_bytes, self.device, plan)
        self.output_name = "token_embd.weight" if self.config.tied_embeddings else "output.weight"
        freq_factors = self.weights.dense("rope_freqs.weight") if "rope_freqs.weight" in self.weights else None
        self.inv_freq = ops.rope_inv_freq(self.config, freq_factors).to(self.device)
        # local (sliding-window) layers: their own base, no frequency factors (llama.cpp gemma3)
        self.inv_freq_swa = ops.rope_inv_freq(self.config, None, self.config.rope_base_swa).to(self.device) \
            if self.config.sliding_window else None
        self.block = block_for(self.config)
        # one token through a whole block in one call, where the backend has that (the CPU's; it
        # returns None for what it does not do, and the block above runs)
        self.decode_block = getattr(ops, "decode_block", None)

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
        rope = ops.rope_cos_sin(self.inv_freq, positions, cfg.rope_scale)  # (cos, sin) (T, hd/2) float32
        rope_swa = rope if self.inv_freq_swa is None else \
            ops.rope_cos_sin(self.inv_freq_swa, positions, cfg.rope_scale_swa)
        # (T, n_embd): the residual stream, float32 on every backend (fp16 overflows on outlier
        # channels); h, the normed input of each block's matmuls, is in the activation dtype
        x = (W.rows("token_embd.weight", tokens.to(self.device)) if embeds is None else embeds).to(self.device).float()
        if cfg.embd_scale != 1.0:
            x = x * cfg.embd_scale
        h = ops.rms_norm(x, W.dense("blk.0.attn_norm.weight"), cfg.norm_eps, out_dtype=self.dtype)
        fused = self.decode_block if T == 1 else None
        for i in range(cfg.n_layer):
            W.begin_unit(i)  # a streamed layer's weights arrive (the next one's copy starts)
            after = f"blk.{i + 1}.attn_norm.weight" if i + 1 < cfg.n_layer else "output_norm.weight"
            out = fused(self, i, h, x, rope_swa if cfg.window(i) else rope, cache, after) if fused else None
            h, x = out if out is not None else self.block(self, i, h, x, (rope, rope_swa), cache, after)
            W.end_unit(i)
        cache.advance(T)
        if logits == "none":
            return torch.empty(0)
        if logits == "last":
            h = h[-1:]
        W.begin_unit(OUTPUT_UNIT)
        out = ops.linear(h, W, self.output_name).float()  # (T or 1, vocab)
        W.end_unit(OUTPUT_UNIT)
        if cfg.final_logit_softcap:
            out = torch.tanh(out / cfg.final_logit_softcap) * cfg.final_logit_softcap
        return out[0] if logits == "last" else out

def load_model(path: str, cache_bytes: int | None = None, device: str = "cpu", backend: str = "auto") -> Model:
    """A Model for a GGUF path; cache_bytes None: the CLI's default weights cache (weights.default_cache_bytes:
    none where the compiled CPU kernels read the blocks, else 1 GiB). For everything else, `qkvgguf.LLM`."""
    return Model(GGUFFile(path), cache_bytes, device, backend)
