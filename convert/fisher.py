"""Output sensitivity for `--outtype auto`: the diagonal Fisher information of every weight.

Quantizing a weight W to Q(W) changes the model's next-token distribution. To second order the
KL divergence from the original distribution, per token, is

    KL(p || p_Q) ~= 1/2 sum_ij F_ij (W_ij - Q(W)_ij)^2

with F the Fisher information of the model's own distribution. Its diagonal comes from one
backward pass: draw each position's next token from the model (not the text's token: the true
Fisher, whose expectation is the KL's curvature), take L = -sum_t log p(draw_t), and for a
matmul y = x W^T

    F_ij = 1/T sum_t g_ti^2 x_tj^2,    g_t = dL/dy_t      (cross-token products dropped)

For the token embedding, a lookup, row r reaches the model only where token r occurs:
F_rj = P(r) d_j with d_j = 1/T sum_t (dL/de_t)_j^2 (the gradient at the embedding output) and
P(r) the calibration text's token frequency smoothed by `EMBD_ALPHA` (rows the text never used still
appear in real text). A tied embedding that is also the output head gets both terms.

Every tensor's error is thereby in one unit (expected KL, nats per token), so the allocation
(mixed.py) compares tensors by what they do to the output: the output head's error lands on the
logits directly, a late layer's passes through fewer nonlinearities than an early one's, and the
per-tensor importance-weighted error before it (sum_j I_j e_ij^2, I the importance matrix)
weighted all of them alike.

Two forms, chosen by measurement (docs/design.md, benchmarks/mixed_precision.py):
  "full":  F itself, one float32 per weight (the size of the model in float32: small models);
  "rank1": F_ij ~= (a_i / T) (b_j / T) with a_i = sum_t g_ti^2 and b_j = sum_t x_tj^2 (the
           importance matrix's sums; g and x taken as independent): one float per row and per
           column, for any model size.

The pass runs qkvgguf's own runtime (runtime/model.py) with autograd on, over the same temporary
f16 GGUF and chunks as the importance matrix, and collects the importance matrix in the same pass
(its sums are b). Cost: a forward and a backward per chunk, about 3x the importance matrix alone.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .imatrix import Imatrix, chunking

EMBD = "token_embd.weight"
EMBD_ALPHA = 0.1  # add-alpha smoothing of the embedding rows' token counts


@dataclass
class Fisher:
    form: str  # "full" or "rank1"
    n_tokens: int = 0
    out_sq: dict[str, np.ndarray] = field(default_factory=dict)  # name -> float64 (rows,) sum_t g_ti^2
    full: dict = field(default_factory=dict)  # name -> torch float32 (rows, n) sum_t g^2 x^2 ("full")
    embd_grad_sq: Optional[np.ndarray] = None  # float64 (n_embd,) sum_t (dL/de_t)^2
    token_counts: Optional[np.ndarray] = None  # float64 (vocab,)
    imatrix: Imatrix = field(default_factory=Imatrix)  # the same pass's x^2 sums

    def weights(self, name: str, rows: np.ndarray) -> Optional[np.ndarray]:
        """Per-token Fisher F (len(rows), n) float32 of the given rows of weight `name`, or None
        when the pass never saw the tensor."""
        out = self._weights(name, rows)
        return None if out is None else out.astype(np.float32)

    def _weights(self, name: str, rows: np.ndarray) -> Optional[np.ndarray]:
        """`weights` in float64."""
        out = None
        T = max(1, self.n_tokens)
        if name in self.out_sq:
            if self.form == "full":
                out = self.full[name][rows].numpy().astype(np.float64) / T
            else:
                out = np.outer(self.out_sq[name][rows], self.imatrix.sums[name]) / (T * T)
        if name == EMBD and self.embd_grad_sq is not None:
            counts = self.token_counts
            p = (counts[rows] + EMBD_ALPHA) / (counts.sum() + EMBD_ALPHA * len(counts))
            lookup = np.outer(p, self.embd_grad_sq / T)
            out = lookup if out is None else out + lookup
        return out

    def row_scores(self, name: str, values: np.ndarray) -> Optional[np.ndarray]:
        """float64 (rows,): sum_j F_ij W_ij^2 of each row of W = `values` (rows, n), the scale of the
        row's expected error (quantization error grows with the row's magnitude); rows are sampled
        in proportion to it. None when the pass never saw the tensor."""
        if name not in self.out_sq and not (name == EMBD and self.embd_grad_sq is not None):
            return None
        out = np.zeros(len(values))
        for lo in range(0, len(values), 4096):  # bounded temporaries on a vocabulary-sized head
            idx = np.arange(lo, min(lo + 4096, len(values)))
            out[idx] = (self._weights(name, idx) * values[idx].astype(np.float64) ** 2).sum(1)
        return out


def _recording_ops(ops, fisher: Fisher):
    """The backend ops with `linear` multiplying by the dense float32 weight (autograd through it)
    and recording x^2 on the way forward and g^2 (and g^2 x^2) on the way back."""

    rec = types.SimpleNamespace(**{k: getattr(ops, k) for k in dir(ops) if not k.startswith("__")})

    def linear(x, W, name, bias=None):
        x2 = x.detach().float().reshape(-1, x.shape[-1]) ** 2 if fisher.form == "full" else None
        fisher.imatrix.add(name, x.detach())
        y = x @ W.dense(name).T
        if bias is not None:
            y = y + W.dense(bias)

        def backward_hook(g):
            g2 = g.detach().float().reshape(-1, g.shape[-1]) ** 2
            a = g2.sum(0).double().numpy()
            fisher.out_sq[name] = fisher.out_sq[name] + a if name in fisher.out_sq else a
            if fisher.form == "full":
                m = g2.T @ x2
                if name in fisher.full:
                    fisher.full[name] += m
                else:
                    fisher.full[name] = m

        if y.requires_grad:
            y.register_hook(backward_hook)
        return y

    rec.linear = linear
    return rec


def collect_fisher(gguf_path: str, token_ids: list[int], n_ctx: int = 512, n_chunks: Optional[int] = None,
                   bos_id: Optional[int] = None, dataset: str = "", form: str = "rank1", seed: int = 0,
                   progress: Optional[Callable[[int, int], None]] = None, cache_bytes: int = 2 << 30) -> Fisher:
    """Run the runtime with autograd over chunks of n_ctx tokens (BOS first when bos_id is given, as
    collect_imatrix cuts them) and collect the Fisher diagonal and the importance matrix."""
    import torch

    from qkvgguf.gguf_file import GGUFFile
    from qkvgguf.runtime.model import Model

    if form not in ("full", "rank1"):
        raise ValueError(f"Fisher form must be 'full' or 'rank1', got {form!r}")
    model = Model(GGUFFile(str(gguf_path)), cache_bytes=cache_bytes, backend="torch")
    step, total = chunking(len(token_ids), n_ctx, bos_id, n_chunks)
    fisher = Fisher(form, imatrix=Imatrix(datasets=[dataset] if dataset else [], n_chunks=total, chunk_size=n_ctx))
    fisher.token_counts = np.zeros(model.config.vocab_size)
    fisher.embd_grad_sq = np.zeros(model.config.n_embd)
    model.ops = _recording_ops(model.ops, fisher)
    forward = type(model).forward.__wrapped__  # Model.forward without its inference_mode
    gen = torch.Generator().manual_seed(seed)
    for c in range(total):
        chunk = token_ids[c * step:(c + 1) * step]
        if bos_id is not None:
            chunk = [bos_id] + chunk
        ids = torch.tensor(chunk)
        with torch.enable_grad():
            embeds = model.embed(ids).float().requires_grad_()
            logits = forward(model, ids, model.new_cache(n_ctx), logits="all", embeds=embeds)
            logp = torch.log_softmax(logits.float(), dim=-1)
            draw = torch.multinomial(logp.detach().exp(), 1, generator=gen)  # the model's own next tokens
            (-logp.gather(1, draw).sum()).backward()
        fisher.embd_grad_sq += (embeds.grad.double() ** 2).sum(0).numpy()
        np.add.at(fisher.token_counts, ids.numpy(), 1.0)
        fisher.n_tokens += len(chunk)
        if progress is not None:
            progress(c + 1, total)
    return fisher
