"""Token generation: chunked prompt processing, sampling, streaming, prefix reuse.

`Session` owns a model and its KV cache and remembers which tokens the cache holds, so a chat turn
re-runs only the new suffix of the conversation. `generate` yields token ids as they are sampled.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from qkvgguf.errors import QkvggufError

from .cuda_graph import GraphDecoder, graph_supported
from .model import Model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """llama.cpp's defaults. temperature <= 0 is greedy (argmax)."""

    temperature: float = 0.8
    top_k: int = 40  # 0 = off
    top_p: float = 0.95  # 1.0 = off
    min_p: float = 0.05  # 0.0 = off; keeps tokens with p >= min_p * p_max
    seed: Optional[int] = None


class Sampler:
    def __init__(self, params: SamplingParams = SamplingParams()):
        self.params = params
        self.generator: Optional[torch.Generator] = None  # made on the device of the first logits

    def _generator(self, device: torch.device) -> torch.Generator:
        """The random stream, on the probabilities' device (torch.multinomial refuses a generator on
        another device: a CPU generator with CUDA probabilities fails every sampled token)."""
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device)
            if self.params.seed is not None:
                self.generator.manual_seed(self.params.seed)
            else:
                self.generator.seed()
        return self.generator

    def __call__(self, logits: torch.Tensor) -> int:
        """logits (vocab,) float32 -> token id."""
        p = self.params
        if p.temperature <= 0:
            return int(torch.argmax(logits))
        logits = logits.float()
        if p.top_k > 0 and p.top_k < logits.numel():
            values, ids = torch.topk(logits, p.top_k)
        else:
            values, ids = torch.sort(logits, descending=True)
        probs = torch.softmax(values / p.temperature, dim=-1)  # sorted, descending
        keep = torch.ones_like(probs, dtype=torch.bool)
        if p.top_p < 1.0:
            before = torch.cumsum(probs, 0) - probs  # mass of the tokens ranked above
            keep &= before < p.top_p
        if p.min_p > 0.0:
            keep &= probs >= p.min_p * probs[0]
        keep[0] = True
        probs = torch.where(keep, probs, torch.zeros_like(probs))
        choice = torch.multinomial(probs / probs.sum(), 1, generator=self._generator(probs.device))
        return int(ids[choice])


@dataclass
class Stats:
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0

    def summary(self) -> str:
        def rate(n, s):
            return f"{n / s:.1f} tok/s" if s > 0 else "-"

        return (
            f"prompt: {self.prompt_tokens} tokens, {rate(self.prompt_tokens, self.prompt_seconds)}; "
            f"decode: {self.decode_tokens} tokens, {rate(self.decode_tokens, self.decode_seconds)}"
        )


@dataclass
class Session:
    model: Model
    n_ctx: int
    n_batch: int = 512
    type_k: str = "f16"  # llama.cpp's default cache type
    type_v: str = "f16"
    tokens: list[int] = field(default_factory=list)  # what the cache holds, in order
    cuda_graph: bool = True  # decode by replaying a captured CUDA graph where supported (runtime/cuda_graph.py)
    paged_graph: bool = False  # also capture a model whose weights stream (experimental)

    def __post_init__(self):
        self.cache = self.model.new_cache(self.n_ctx, self.type_k, self.type_v)
        self._graph = None

    def decode(self, token: int) -> torch.Tensor:
        """Run one token after what the cache holds; return its logits (valid until the next call)."""
        if (self._graph is None and self.cuda_graph
                and graph_supported(self.model, self.cache, self.paged_graph) is None):
            try:
                self._graph = GraphDecoder(self.model, self.cache, paged=self.paged_graph)
            except RuntimeError as e:  # a capture the driver refused: decode eagerly, say so once
                log.warning("CUDA graph capture failed (%s); decoding with ordinary launches", str(e).splitlines()[0])
                self.cuda_graph = False
                if self.model.weights.streamer is not None:
                    self.model.weights.streamer.reset()  # host bookkeeping ran ahead of the copies
        if self._graph is not None:
            logits = self._graph.step(token)
        else:
            logits = self.model.forward(torch.tensor([token]), self.cache)
        self.tokens.append(token)
        return logits

    def feed(self, ids: list[int]) -> torch.Tensor:
        """Run `ids` after what the cache holds (reusing the longest common prefix); return last logits.

        Sets `self.n_fed` to the number of tokens actually evaluated.
        """
        if not ids:
            raise QkvggufError("nothing to evaluate: the prompt has no tokens")
        common = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            common += 1
        if common == len(ids):  # everything cached: recompute the last token for its logits
            common -= 1
        if not self.cache.can_reset(common):  # a sliding-window ring overwrote what the suffix needs
            common = 0
        self.cache.reset(common)
        self.tokens = self.tokens[:common]
        new = ids[common:]
        self.n_fed = len(new)
        if len(self.tokens) + len(new) > self.n_ctx:
            raise QkvggufError(f"{len(ids)} tokens do not fit the {self.n_ctx}-token context (-c)")
        logits = None
        for start in range(0, len(new), self.n_batch):
            chunk = new[start:start + self.n_batch]
            last = start + self.n_batch >= len(new)
            logits = self.model.forward(torch.tensor(chunk), self.cache, logits="last" if last else "none")
            self.tokens.extend(chunk)
        return logits

    def generate(
        self,
        prompt: list[int],
        n_predict: int,
        sampler: Sampler,
        is_eog: Callable[[int], bool] = lambda _: False,
        stats: Optional[Stats] = None,
    ) -> Iterator[int]:
        """Yield up to n_predict sampled tokens (stops at end-of-generation or a full context)."""
        stats = stats if stats is not None else Stats()
        t0 = time.perf_counter()
        logits = self.feed(prompt)
        stats.prompt_tokens += self.n_fed
        stats.prompt_seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(n_predict):
            tok = sampler(logits)
            if is_eog(tok):
                break
            stats.decode_tokens += 1
            yield tok
            if i + 1 == n_predict or len(self.tokens) >= self.n_ctx:
                break
            logits = self.decode(tok)
        stats.decode_seconds += time.perf_counter() - t0
