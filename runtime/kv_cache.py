"""KV cache: keys and values of every past position, per layer.

Layout: `k[layer]`, `v[layer]` are (n_head_kv, n_ctx, head_dim) tensors, preallocated for the
whole context so decode never allocates. `pos` counts the filled positions; the model writes
positions [pos, pos + T) and then advances it.

Cache types: f32 and f16 here (llama.cpp's `--cache-type-k/v` names). The model calls only
`attend(layer, q, k, v)`: store the new keys/values, attend over everything stored. A quantized
cache implements the same method over its own storage (and may transform q, e.g. a rotation).
"""

from __future__ import annotations

import torch

from qkvgguf.config import ModelConfig
from qkvgguf.errors import QkvggufError

from . import ops

CACHE_DTYPES = {"f32": torch.float32, "f16": torch.float16}


def kv_bytes_per_token(cfg: ModelConfig, type_k: str = "f16", type_v: str = "f16") -> int:
    """Bytes one position costs across all layers, K and V."""
    per = {name: torch.finfo(dt).bits // 8 for name, dt in CACHE_DTYPES.items()}
    return cfg.n_layer * cfg.kv_dim * (per[type_k] + per[type_v])


class KVCache:
    def __init__(self, cfg: ModelConfig, n_ctx: int, type_k: str = "f32", type_v: str = "f32"):
        for t in (type_k, type_v):
            if t not in CACHE_DTYPES:
                raise QkvggufError(f"cache type '{t}' is not supported (supported: {', '.join(CACHE_DTYPES)})")
        self.n_ctx = n_ctx
        self.pos = 0
        shape = (cfg.n_layer, cfg.n_head_kv, n_ctx, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=CACHE_DTYPES[type_k])
        self.v = torch.zeros(shape, dtype=CACHE_DTYPES[type_v])

    @property
    def n_bytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (n_head_kv, T, head_dim) at [pos, pos+T); return all keys/values so far as float32."""
        T = k.shape[1]
        end = self.pos + T
        self.k[layer, :, self.pos:end] = k
        self.v[layer, :, self.pos:end] = v
        return self.k[layer, :, :end].float(), self.v[layer, :, :end].float()

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Append k, v (n_head_kv, T, hd) at [pos, pos+T); causal attention of q (n_head, T, hd) over all."""
        keys, values = self.append(layer, k, v)
        return ops.attention(q, keys, values, self.pos)

    def advance(self, n: int) -> None:
        self.pos += n

    def reset(self, pos: int = 0) -> None:
        self.pos = pos
