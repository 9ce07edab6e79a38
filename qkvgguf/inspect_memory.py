"""inspect --vram SIZE: will this file run on a card of that size? An estimate until the planner exists.

    total = weights + KV cache + activations + CUDA context

- weights: every tensor's bytes as stored (the kernels read quantized weights in place);
- KV cache: `runtime.kv_cache.kv_bytes_per_token(cfg, type_k, type_v)` x context length, the
  runtime's own accounting (so new cache types count as soon as the runtime knows them);
- activations: float32 intermediates of one layer for a batch of `n_batch` prompt tokens, plus
  the logits of that batch (the largest buffer for small models):
      4 bytes x n_batch x (3 n_embd + q_dim + 2 kv_dim + 3 n_ff + n_vocab)
  residual, norm output and attention output (3 n_embd), q/k/v, gate/up/product (3 n_ff), logits;
  attention itself is flash-style (no n_ctx x n_ctx scores);
- CUDA context: a fixed allowance of 0.5 GiB (`CUDA_CONTEXT_BYTES`) for the driver context, kernel
  images and allocator slack; recent drivers take about 0.3-0.5 GiB before the first allocation.

The verdict is "fits" when the total is at most SIZE, else the shortfall; `max_ctx` is the longest
context that fits with the same cache types (capped at the model's training context).
"""

from __future__ import annotations

from typing import Optional

from .config import ModelConfig
from .errors import QkvggufError
from .gguf_file import GGUFFile
from .units import format_bytes

CUDA_CONTEXT_BYTES = 512 * 2**20
DEFAULT_CACHE_TYPE = "f16"  # the default of kv_bytes_per_token and of llama.cpp's -ctk/-ctv
DEFAULT_BATCH = 512  # as `run -b`


def activation_bytes(cfg: ModelConfig, n_batch: int) -> int:
    per_token = 3 * cfg.n_embd + cfg.q_dim + 2 * cfg.kv_dim + 3 * cfg.n_ff + cfg.vocab_size
    return 4 * n_batch * per_token


def estimate(gguf: GGUFFile, vram: Optional[int], n_ctx: Optional[int] = None, type_k: str = DEFAULT_CACHE_TYPE,
             type_v: str = DEFAULT_CACHE_TYPE, n_batch: int = DEFAULT_BATCH) -> dict:
    """The memory estimate as plain data; `vram` None gives the sizes without a verdict."""
    from .runtime.kv_cache import kv_bytes_per_token

    cfg = ModelConfig.from_gguf(gguf)
    if n_ctx is None:
        n_ctx = min(4096, cfg.n_ctx_train)
    elif n_ctx == 0:
        n_ctx = cfg.n_ctx_train
    if n_ctx < 0:
        raise QkvggufError(f"-c/--ctx-size must be positive, got {n_ctx}")
    if n_ctx > cfg.n_ctx_train:
        raise QkvggufError(f"{gguf.path}: -c {n_ctx} is larger than the model's context length {cfg.n_ctx_train}")
    if n_batch < 1:
        raise QkvggufError(f"-b/--batch-size must be at least 1, got {n_batch}")
    for t in dict.fromkeys((type_k, type_v)):  # name the bad type, whichever way the accounting refuses it
        try:
            kv_bytes_per_token(cfg, t, t)
        except (KeyError, ValueError):
            raise QkvggufError(f"cache type '{t}' is not known to the KV accounting (runtime/kv_cache.py)") from None
    per_token = kv_bytes_per_token(cfg, type_k, type_v)
    weights = gguf.tensor_data_bytes
    kv = per_token * n_ctx
    act = activation_bytes(cfg, min(n_batch, n_ctx))
    total = weights + kv + act + CUDA_CONTEXT_BYTES
    out = {
        "estimate": True,
        "note": "an estimate from the accounting functions until the planner exists",
        "n_ctx": n_ctx, "n_batch": min(n_batch, n_ctx), "type_k": type_k, "type_v": type_v,
        "weights_bytes": weights,
        "kv_bytes_per_token": per_token,
        "kv_bytes": kv,
        "activation_bytes": act,
        "cuda_context_bytes": CUDA_CONTEXT_BYTES,
        "total_bytes": total,
        "vram_bytes": vram,
    }
    if vram is not None:
        room = vram - (weights + act + CUDA_CONTEXT_BYTES)
        out["fits"] = total <= vram
        out["headroom_bytes"] = vram - total
        out["max_ctx"] = max(0, min(cfg.n_ctx_train, room // per_token)) if per_token else cfg.n_ctx_train
    return out


def render_memory(m: dict) -> str:
    rows = [
        ("weights", m["weights_bytes"], "tensor data as stored"),
        ("KV cache", m["kv_bytes"], f"{m['kv_bytes_per_token']:,} B/token x {m['n_ctx']:,} tokens "
                                    f"(K {m['type_k']}, V {m['type_v']})"),
        ("activations", m["activation_bytes"], f"one layer + logits for a batch of {m['n_batch']} tokens, float32"),
        ("CUDA context", m["cuda_context_bytes"], "fixed allowance"),
    ]
    out = [f"memory ({m['note']}):"]
    for label, n, what in rows:
        out.append(f"  {label:<13} {format_bytes(n):>11}  {what}")
    out.append(f"  {'total':<13} {format_bytes(m['total_bytes']):>11}")
    if m["vram_bytes"] is not None:
        if m["fits"]:
            out.append(f"  fits in {format_bytes(m['vram_bytes'])}: {format_bytes(m['headroom_bytes'])} to spare; "
                       f"longest context that fits: {m['max_ctx']:,} tokens")
        else:
            out.append(f"  does not fit in {format_bytes(m['vram_bytes'])}: needs at least "
                       f"{format_bytes(m['total_bytes'])} ({format_bytes(-m['headroom_bytes'])} more)"
                       + (f"; longest context that fits: {m['max_ctx']:,} tokens" if m["max_ctx"] else ""))
    return "\n".join(out)
