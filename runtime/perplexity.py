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


def window_nll(model: Model, window: list[int], n_batch: int = 512) -> tuple[float, int]:
    """Sum of -log p over tokens 1..n-1 of one window, and how many tokens that is."""
    cache = model.new_cache(len(window))
    total, count = 0.0, 0
    prev_logits = None  # logits of the position before the current chunk
    for start in range(0, len(window), n_batch):
        chunk = window[start:start + n_batch]
        logits = model.forward(torch.tensor(chunk), cache, logits="all")  # (T, vocab)
        if prev_logits is not None:
            logits = torch.cat([prev_logits[None], logits])
            targets = torch.tensor(chunk)
        else:
            targets = torch.tensor(chunk[1:])
        predicting = logits[: len(targets)]
        logp = torch.log_softmax(predicting.double(), dim=-1)
        total -= float(logp.gather(1, targets[:, None]).sum())
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
) -> PerplexityResult:
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
        nll, n = window_nll(model, window, n_batch)
        total += nll
        count += n
        if progress is not None:
            progress(w + 1, math.exp(total / count))
    nll = total / count
    return PerplexityResult(nll=nll, ppl=math.exp(nll), n_scored=count, n_windows=n_windows, n_ctx=n_ctx)
