"""One decode step for several sequences in one forward pass, each sequence in its own KV cache.

    caches = [model.new_cache(n_ctx, "f16", "f16") for _ in range(N)]     # one per sequence
    logits = decode_batch(model, [t0, t1, t2], caches[:3])                  # (3, vocab)

`Model.forward` runs B tokens as B rows through every matmul, norm, rope and the feed-forward
(the matmuls read each weight once for all B rows: this is where batching pays). It reaches the
KV cache only through `check_room`, `positions`, `attend` and `advance`; `SequenceBatch` gives it
those over B caches at once, row b being the next token of sequence b:

    positions(B)          (B,)  each row at its own sequence's position
    attend(layer, q, k, v)      q (n_head, B, hd), k, v (n_head_kv, B, hd): row b is stored in
                                caches[b] at its position, and attends over that cache alone
                                (caches[b].attend with one query, the single-sequence decode path)
    advance(B)                  every cache by one position

So a row's arithmetic is the one-sequence decode's, except that its matmuls run with B rows. On the
CPU those are the compiled GEMV kernels (runtime/cpu, up to GEMV_ROWS rows), which dot each x row with
each weight row independently: a row's logits are bit-identical to decoding it alone
(tests/test_serve_engine.py checks this on SmolLM2). Sequences may use different cache types only if
they share the model; `decode_batch` does not capture CUDA graphs (B changes from step to step).
"""

from __future__ import annotations

import torch

from .kv_cache import KVCache
from .model import Model


class SequenceBatch:
    """B KV caches seen by `Model.forward` as one cache holding one new token per sequence."""

    def __init__(self, caches: list[KVCache]):
        if not caches:
            raise ValueError("a batch needs at least one sequence")
        self.caches = caches
        self.device = caches[0].device

    def check_room(self, T: int) -> None:
        if T != len(self.caches):
            raise ValueError(f"a batch of {len(self.caches)} sequences runs one token each, got {T} tokens")
        for b, c in enumerate(self.caches):
            if c.pos + 1 > c.n_ctx:
                raise ValueError(f"sequence {b}: its {c.n_ctx}-token context is full")

    def positions(self, T: int) -> torch.Tensor:
        return torch.tensor([c.pos for c in self.caches], device=self.device)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (n_head, B, hd), k, v (n_head_kv, B, hd) -> (n_head, B, hd), row b over caches[b] only."""
        # each row copied out: a view at an offset into the batch's buffer is not always computed
        # bit-identically to the fresh tensor of a one-sequence step (the rotation matmul of a q8_0/q4_0
        # cache differed in the last bits, and the q8_0 round trip of q made that visible)
        outs = [c.attend(layer, q[:, b:b + 1].clone(), k[:, b:b + 1].clone(), v[:, b:b + 1].clone())
                for b, c in enumerate(self.caches)]
        return torch.cat(outs, dim=1)

    def advance(self, n: int) -> None:
        for c in self.caches:
            c.advance(1)


def decode_batch(model: Model, tokens: list[int], caches: list[KVCache]) -> torch.Tensor:
    """Run token b after what caches[b] holds, for every b, in one forward pass -> logits (B, vocab)."""
    if len(tokens) != len(caches):
        raise ValueError(f"{len(tokens)} tokens for {len(caches)} caches")
    return model.forward(torch.tensor(tokens), SequenceBatch(caches), logits="all")
