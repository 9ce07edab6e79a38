"""Token generation: chunked prompt processing, sampling, streaming, prefix reuse.

`Session` owns a model and its KV cache and remembers which tokens the cache holds, so a chat turn
re-runs only the new suffix of the conversation. `generate` yields token ids as they are sampled.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

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
    repeat_penalty: float = 1.0  # 1.0 = off; llama.cpp's: a repeated token's logit / p if > 0, else * p
    repeat_last_n: int = 64  # the tokens the penalty looks back over (prompt included), as llama.cpp
    banned: frozenset[int] = frozenset()  # never sampled (--ignore-eos bans the end-of-generation tokens)


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

    def __call__(self, logits: torch.Tensor, history: Sequence[int] = ()) -> int:
        """logits (vocab,) float32 -> token id; `history`: the tokens before it (for the repeat penalty)."""
        p = self.params
        if p.banned or (p.repeat_penalty != 1.0 and p.repeat_last_n and history):
            logits = logits.float().clone()
            if p.repeat_penalty != 1.0 and p.repeat_last_n and history:
                seen = torch.tensor(sorted(set(history[-p.repeat_last_n:])), dtype=torch.long, device=logits.device)
                x = logits[seen]
                logits[seen] = torch.where(x > 0, x / p.repeat_penalty, x * p.repeat_penalty)
            if p.banned:
                logits[torch.tensor(sorted(p.banned), dtype=torch.long, device=logits.device)] = float("-inf")
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
    stop: str = ""  # why generation ended: "eog", "length" (n_predict), "context" (full); the caller may set others

    def as_dict(self) -> dict:
        """The numbers as JSON-ready data (run --json's "timings")."""
        return {"prompt_tokens": self.prompt_tokens, "prompt_seconds": self.prompt_seconds,
                "prompt_tokens_per_s": self.prompt_tokens / self.prompt_seconds if self.prompt_seconds > 0 else None,
                "decode_tokens": self.decode_tokens, "decode_seconds": self.decode_seconds,
                "decode_tokens_per_s": self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else None}

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
    kv_budget: int | None = None  # --kv-budget bytes: the adaptive cache (qkvgguf/kv_budget.py)

    def __post_init__(self):
        self.cache = self.model.new_cache(self.n_ctx, self.type_k, self.type_v, budget=self.kv_budget)
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
        """Yield up to n_predict sampled tokens (n_predict < 0: no limit) until end-of-generation or a
        full context; `stats.stop` says which. The sampler sees the cached tokens as its history."""
        stats = stats if stats is not None else Stats()
        t0 = time.perf_counter()
        logits = self.feed(prompt)
        stats.prompt_tokens += self.n_fed
        stats.prompt_seconds += time.perf_counter() - t0
        t0 = time.perf_counter()
        stats.stop = "length"
        try:
            i = 0
            while n_predict < 0 or i < n_predict:
                tok = sampler(logits, self.tokens)
                if is_eog(tok):
                    stats.stop = "eog"
                    break
                stats.decode_tokens += 1
                i += 1
                yield tok
                if i == n_predict:
                    break
                if len(self.tokens) >= self.n_ctx:
                    stats.stop = "context"
                    break
                logits = self.decode(tok)
        finally:  # also when the caller stops early (a stop string, Ctrl-C)
            stats.decode_seconds += time.perf_counter() - t0


class StopStrings:
    """Text stop strings (llama.cpp's -r/--reverse-prompt, --stop) over streamed text pieces.

    `feed(piece)` returns the text that is safe to show: text that could still be the start of a
    stop string is held back until it cannot. Once a stop string appears, `stopped` is True and the
    text before it is returned; the string itself and anything after it are dropped.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.held = ""
        self.stopped: Optional[str] = None

    def feed(self, piece: str) -> str:
        if self.stopped is not None:
            return ""
        text = self.held + piece
        hits = [(text.find(s), s) for s in self.stops if s in text]
        if hits:
            at, self.stopped = min(hits)
            self.held = ""
            return text[:at]
        keep = 0  # the longest tail of text that begins some stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:k]):
                    keep = k
                    break
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


def generate_text(session: Session, ids: list[int], n_predict: int, sampler: Sampler, tok, stops: Sequence[str],
                  ignore_eos: bool, write: Optional[Callable[[str], None]],
                  stats: Stats) -> tuple[str, list[int], Optional[str]]:
    """Generate after `ids` as text: `tok`'s streaming decoder, then the stop strings; `write` gets
    the text as it comes (held back where a stop string may begin). ignore_eos: end-of-generation
    tokens do not stop it (ban them in the sampler too, SamplingParams.banned).
    Returns (text, generated token ids, the stop string that ended it or None); stats.stop names why
    it ended ("stop" for a stop string).
    Ctrl-C propagates after what was generated is recorded in `stats`."""
    stream, stopper = tok.stream(), StopStrings(stops)
    text, out_ids = [], []
    gen = session.generate(ids, n_predict, sampler, (lambda _: False) if ignore_eos else tok.is_eog, stats)

    def emit(piece: str) -> None:
        if piece:
            text.append(piece)
            if write is not None:
                write(piece)

    try:
        for t in gen:
            out_ids.append(t)
            emit(stopper.feed(stream.feed(t)))
            if stopper.stopped is not None:
                stats.stop = "stop"
                break
    finally:
        gen.close()
    if stopper.stopped is None:
        emit(stopper.feed(stream.flush()))
        emit(stopper.flush())
    return "".join(text), out_ids, stopper.stopped
