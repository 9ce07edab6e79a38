"""Perplexity over non-overlapping windows.

The token stream is cut into windows of `n_ctx` tokens (a trailing partial window is dropped).
Each window is evaluated from an empty cache; every token of the window except the first is
scored by the logits of the position before it. With `bos_id`, the first token of every window is
replaced by BOS, as llama.cpp's perplexity tool does for models that add BOS.

    NLL = mean over scored tokens of -log p(token | window prefix);  PPL = exp(NLL)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from qkvgguf.errors import QkvggufError

from .model import Model


@dataclass(frozen=True)
class PerplexityResult:
    nll: float
    ppl: float
    n_scored: int
    n_windows: int
    n_ctx: int


def token_nll(logits: torch.Tensor, targets: list[int]) -> torch.Tensor:
    """-log p(targets[t]) under logits[t] (T, vocab), float32 on the logits' device.

    logsumexp(logits) - logits[target] in float32: no T x vocab float64 copy (the VRAM planner
    budgets one float32 logits matrix); callers sum in float64.
    """
    lp = logits.float()
    ids = torch.tensor(targets, dtype=torch.long, device=lp.device)
    return torch.logsumexp(lp, dim=-1) - lp.gather(1, ids.unsqueeze(1)).squeeze(1)


def window_nll(model: Model, window: list[int], n_batch: int = 512, type_k: str = "f16",
               type_v: str = "f16") -> tuple[float, int]:
    """Sum of -log p over tokens 1..n-1 of one window, and how many tokens that is."""
    cache = model.new_cache(len(window), type_k, type_v)
    total, count = 0.0, 0
    prev_logits = None  # logits of the position before the current chunk
    for start in range(0, len(window), n_batch):
        chunk = window[start:start + n_batch]
        logits = model.forward(torch.tensor(chunk), cache, logits="all")  # (T, vocab)
        if prev_logits is not None:
            logits = torch.cat([prev_logits[None], logits])
            targets = chunk
        else:
            targets = chunk[1:]
        total += float(token_nll(logits[: len(targets)], targets).double().sum())
        count += len(targets)
        prev_logits = logits[-1]
    return total, count


def perplexity(
    model: Model,
    tokens: list[int],
    n_ctx: int,
    bos_id: Optional[int] = None,
    n_batch: int = 512,
    progress: Optional[Callable[[int, float], None]] = None,
    type_k: str = "f16",
    type_v: str = "f16",
) -> PerplexityResult:
    """type_k / type_v: the KV cache types (runtime/kv_cache.py), f16 by default as llama.cpp."""
    if n_ctx < 2:
        raise QkvggufError(f"perplexity needs a context of at least 2 tokens, got -c {n_ctx}")
    n_windows = len(tokens) // n_ctx
    if n_windows == 0:
        raise QkvggufError(f"the text has {len(tokens)} tokens, fewer than one window of -c {n_ctx}")
    total, count = 0.0, 0
    for w in range(n_windows):
        window = tokens[w * n_ctx:(w + 1) * n_ctx]
        if bos_id is not None:
            window = [bos_id] + window[1:]
        nll, n = window_nll(model, window, n_batch, type_k, type_v)
        total += nll
        count += n
        if progress is not None:
            progress(w + 1, math.exp(total / count))
    nll = total / count
    return PerplexityResult(nll=nll, ppl=math.exp(nll), n_scored=count, n_windows=n_windows, n_ctx=n_ctx)
