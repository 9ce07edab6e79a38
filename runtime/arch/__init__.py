"""The architecture registry: one module per block family, looked up by `ModelConfig.block`.

A family is a function that runs one transformer block over the residual stream:

    block(model, i, h, x, ropes, cache, next_norm) -> (h, x)

    h          the normed input of block i (T, n_embd), in the activation dtype
    x          the residual stream before block i (T, n_embd), float32
    ropes      (cos, sin) pairs: ropes[0] for global layers, ropes[1] for sliding-window layers
    next_norm  the GGUF name of the norm that follows the block (the next block's attn_norm, or
               output_norm): each family fuses its last residual add into that norm
    returns    (the next block's normed input, the new residual stream)

`runtime/model.py` does the rest (embedding, rope tables, the output matrix, soft-capping) and
calls `block_for(cfg)` once. A llama-shaped architecture (its differences are `ArchSpec` flags)
reuses "llama"; one with a new kind of block adds a module here, registered with `@register`.
"""

from __future__ import annotations

from typing import Callable

from qkvgguf.config import ModelConfig
from qkvgguf.errors import UnsupportedError

Block = Callable  # (model, i, h, x, ropes, cache, next_norm) -> (h, x)

BLOCKS: dict[str, Block] = {}


def register(name: str) -> Callable[[Block], Block]:
    def deco(fn: Block) -> Block:
        BLOCKS[name] = fn
        return fn
    return deco


def block_for(cfg: ModelConfig) -> Block:
    if cfg.block not in BLOCKS:
        raise UnsupportedError(f"architecture '{cfg.arch}': no runtime block '{cfg.block}' "
                               f"(have: {', '.join(sorted(BLOCKS))})")
    return BLOCKS[cfg.block]


from . import gemma3, llama  # noqa: E402,F401  (each registers itself)

__all__ = ["BLOCKS", "Block", "block_for", "register"]
