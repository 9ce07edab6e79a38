"""Serving many requests with one model: a fair queue, N sequence slots, one batched decode step.

    engine = Engine(model, tokenizer, n_ctx=2048, n_slots=4)
    engine.start()                                   # a worker thread runs step() while there is work
    req = Request(ids, GenParams(max_tokens=64), on_event=print)
    engine.submit(req)                               # PromptTooLong / QueueFull: one-line errors
    ...                                              # on_event(TextEvent(...)) ... on_event(DoneEvent(...))
    req.cancel()                                     # e.g. the client went away: its slot is freed

Each slot owns a KV cache of n_ctx tokens (memory for all N is allocated once, at start). Requests
wait in one first-in-first-out queue (at most `max_queue`; more is QueueFull) and take the first free
slot. One `step()`:

    1. admit queued requests into free slots; free the slots of cancelled requests
    2. prefill: one chunk (n_batch tokens) of the prompt of the earliest-admitted slot still reading
       its prompt; its last chunk's logits give its first token
    3. decode: every slot holding a sampled token runs it, all in one forward pass
       (runtime/batch.py: each row attends over its own cache); each samples its next token

so a long prompt delays the others by one chunk per step, not by its whole length. A slot's cache is
emptied when a request takes it (no prompt reuse across requests: a prompt whose prefix was cached
by another request's decode would be computed in different chunks, and greedy text must not depend
on what ran before). With one slot, decode goes through `Session.decode`, which replays a CUDA graph
where the model supports one; batched steps use ordinary launches.

A token's path to text, per request, matches `qkvgguf run`: sample (penalties first) -> stop at an
end-of-generation token, at max_tokens, or when the context is full -> detokenize (specials
skipped, UTF-8 completed across tokens) -> stop strings: text is held back while it could be the
start of one; the first match ends the request and is not returned.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qkvgguf.errors import QkvggufError

from .batch import decode_batch
from .generate import Sampler, SamplingParams, Session
from .model import Model

log = logging.getLogger(__name__)


class PromptTooLong(QkvggufError):
    """The prompt leaves no room in the context for a generated token."""


class QueueFull(QkvggufError):
    """max_queue requests are already waiting."""


@dataclass(frozen=True)
class GenParams:
    """What one request asks for. Penalties follow llama.cpp's sampler:

    repeat_penalty (llama.cpp, 1.0 = off): a logit l of a token among the last `repeat_last_n`
        tokens (prompt and reply) becomes l / p if l > 0 else l * p
    frequency_penalty, presence_penalty (OpenAI, 0.0 = off): l -= count * frequency + (count > 0) * presence,
        count = the token's occurrences among the last `repeat_last_n` tokens
    logprobs: None = off; k >= 0: each token's log-probability and the k most likely alternatives
        (log_softmax of the logits after penalties, before temperature)
    ignore_eos (llama.cpp's): end-of-generation tokens are never sampled (benchmarks: exact lengths)
    """

    max_tokens: int = 128
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repeat_last_n: int = 64
    logprobs: int | None = None
    ignore_eos: bool = False


@dataclass
class TokenInfo:
    id: int
    text: str  # the token's own bytes as text (specials rendered); "" for an end-of-generation token
    logprob: float | None = None
    top: list[tuple[str, float]] = field(default_factory=list)  # (text, logprob), most likely first


@dataclass
class TextEvent:
    text: str  # new reply text, maybe "" when only logprobs arrive
    tokens: list[TokenInfo]  # the tokens behind it (with logprobs when asked)


@dataclass
class DoneEvent:
    finish_reason: str  # "stop" (end of generation or a stop string), "length", "cancelled", "error"
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None


Event = TextEvent | DoneEvent


class Request:
    """One generation: prompt ids, parameters, and where its events go (called from the engine's thread)."""

    _ids = itertools.count()

    def __init__(self, prompt_ids: list[int], params: GenParams, on_event: Callable[[Event], None]):
        self.id = next(Request._ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.on_event = on_event
        self._cancelled = threading.Event()
        self.done = False

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class _Slot:
    """A sequence slot: its own KV cache (in a Session) and the request it serves."""

    def __init__(self, session: Session):
        self.session = session
        self.request: Request | None = None

    def take(self, req: Request, tokenizer) -> None:
        self.request = req
        self.session.cache.reset(0)
        self.session.tokens = []
        self.todo = list(req.prompt_ids)  # prompt tokens not yet run
        self.next_token: int | None = None  # sampled, not yet run
        self.sampler = Sampler(req.params.sampling)
        self.history = list(req.prompt_ids[-req.params.repeat_last_n:]) if req.params.repeat_last_n > 0 else []
        self.n_gen = 0
        self.stream = tokenizer.stream()
        self.held = ""  # text that may be the start of a stop string
        self.infos: list[TokenInfo] = []  # tokens whose text is not yet sent

    def release(self) -> None:
        self.request = None
        self.next_token = None
        self.sampler = self.stream = None
        self.infos = []


class Engine:
    def __init__(self, model: Model, tokenizer, n_ctx: int, n_slots: int = 1, n_batch: int = 512,
                 type_k: str = "f16", type_v: str = "f16", max_queue: int = 64, cuda_graph: bool = True):
        if n_slots < 1:
            raise QkvggufError(f"--parallel must be at least 1, got {n_slots}")
        if max_queue < 0:
            raise QkvggufError(f"--max-queue must be 0 or more, got {max_queue}")
        self.model, self.tokenizer, self.n_ctx = model, tokenizer, n_ctx
        self.n_batch, self.max_queue = n_batch, max_queue
        self.slots = [_Slot(Session(model, n_ctx, n_batch, type_k, type_v, cuda_graph=cuda_graph and n_slots == 1))
                      for _ in range(n_slots)]
        self._queue: collections.deque[Request] = collections.deque()
        self._admitted: list[_Slot] = []  # busy slots in admission order (prefill goes first-come)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0

    # -- requests -------------------------------------------------------------------------------

    def check(self, prompt_ids: list[int]) -> None:
        """PromptTooLong unless the prompt leaves room for at least one generated token."""
        if not prompt_ids:
            raise PromptTooLong("the prompt has no tokens")
        if len(prompt_ids) >= self.n_ctx:
            raise PromptTooLong(f"the prompt has {len(prompt_ids)} tokens, more than the {self.n_ctx}-token "
                                f"context leaves room for (at most {self.n_ctx - 1})")

    def submit(self, req: Request) -> None:
        self.check(req.prompt_ids)
        with self._cond:
            if -self._free_slot_count() >= self.max_queue:  # requests that would wait for a slot
                raise QueueFull(f"{-self._free_slot_count()} requests are already waiting (--max-queue {self.max_queue})")
            self._queue.append(req)
            self._cond.notify()

    def cancel(self, req: Request) -> None:
        req.cancel()
        with self._cond:
            self._cond.notify()

    def status(self) -> dict:
        with self._cond:
            busy = sum(s.request is not None for s in self.slots)
            return {"slots": len(self.slots), "slots_busy": busy, "queued": len(self._queue),
                    "max_queue": self.max_queue, "n_ctx": self.n_ctx, "steps": self.steps}

    def _free_slot_count(self) -> int:
        """Free slots not yet claimed by a queued request (negative when requests wait)."""
        return sum(s.request is None for s in self.slots) - len(self._queue)

    # -- the worker -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="qkvgguf-engine", daemon=True)
            self._thread.start()

    @property
    def running(self) -> bool:
        """Whether the worker thread runs step() (else the caller drives it)."""
        return self._thread is not None

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _has_work(self) -> bool:
        return bool(self._queue) or any(s.request is not None for s in self.slots)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._has_work():
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as e:  # a bug: fail the requests in flight, keep serving the next ones
                log.exception("engine step failed")
                for s in self.slots:
                    if s.request is not None:
                        self._finish(s, "error", error=f"{type(e).__name__}: {e}")

    def step(self) -> bool:
        """One round of work (see the module docstring); False when there was nothing to do."""
        with self._cond:
            for s in self.slots:
                if s.request is not None and s.request.cancelled:
                    self._finish(s, "cancelled")
            for s in self.slots:
                if s.request is None:
                    while self._queue:
                        req = self._queue.popleft()
                        if req.cancelled:
                            self._done(req, DoneEvent("cancelled", len(req.prompt_ids), 0))
                            continue
                        s.take(req, self.tokenizer)
                        self._admitted.append(s)
                        break
        if not self._admitted:
            return False
        self.steps += 1
        for s in [s for s in self._admitted if s.request.params.max_tokens == 0]:
            self._finish(s, "length")  # nothing to generate: the prompt is not even run
        reading = next((s for s in self._admitted if s.todo), None)
        if reading is not None:
            self._prefill_chunk(reading)
        decoding = [s for s in self._admitted if s.next_token is not None]
        if decoding:
            self._decode(decoding)
        return True

    def _prefill_chunk(self, s: _Slot) -> None:
        chunk, s.todo = s.todo[:self.n_batch], s.todo[self.n_batch:]
        logits = self.model.forward(torch.tensor(chunk), s.session.cache, logits="none" if s.todo else "last")
        s.session.tokens.extend(chunk)
        if not s.todo:
            self._sample(s, logits)

    def _decode(self, slots: list[_Slot]) -> None:
        tokens = [s.next_token for s in slots]
        if len(self.slots) == 1:  # Session.decode: the CUDA-graph path where there is one
            logits = self.slots[0].session.decode(tokens[0])[None]
        else:
            logits = decode_batch(self.model, tokens, [s.session.cache for s in slots])
        for b, s in enumerate(slots):
            s.next_token = None
            self._sample(s, logits[b])

    # -- one token ------------------------------------------------------------------------------

    def _sample(self, s: _Slot, logits: torch.Tensor) -> None:
        p = s.request.params
        logits = _penalize(logits, s.history, p)
        if p.ignore_eos:
            logits = logits.float().clone()
            logits[list(self.tokenizer.eog_ids)] = float("-inf")
        tok = s.sampler(logits)
        info = TokenInfo(tok, self.tokenizer.token_to_bytes(tok).decode("utf-8", errors="replace"))
        if p.logprobs is not None:
            lp = torch.log_softmax(logits.float(), -1)
            info.logprob = float(lp[tok])
            if p.logprobs > 0:
                vals, ids = torch.topk(lp, min(p.logprobs, lp.numel()))
                info.top = [(self.tokenizer.token_to_bytes(int(i)).decode("utf-8", errors="replace"), float(v))
                            for v, i in zip(vals, ids)]
        if self.tokenizer.is_eog(tok):
            if p.logprobs is not None:
                info.text = ""
                s.infos.append(info)
            self._finish(s, "stop")
            return
        s.n_gen += 1
        if p.repeat_last_n > 0:
            s.history.append(tok)
            del s.history[:-p.repeat_last_n]
        s.infos.append(info)
        s.held += s.stream.feed(tok)
        if p.stop and self._emit_until_stop(s):
            return
        if s.n_gen >= p.max_tokens or s.session.cache.pos + 1 > self.n_ctx:
            self._finish(s, "length")
            return
        if not p.stop:
            self._emit(s, s.held)
            s.held = ""
        s.next_token = tok

    def _emit_until_stop(self, s: _Slot) -> bool:
        """Send what cannot begin a stop string; True (request finished) when one appeared."""
        stops = s.request.params.stop
        hits = [(s.held.find(x), x) for x in stops if x and x in s.held]
        if hits:
            at = min(h[0] for h in hits)
            s.held = s.held[:at]
            self._finish(s, "stop", flush=False)
            return True
        keep = max((n for x in stops for n in range(min(len(x) - 1, len(s.held)), 0, -1)
                    if s.held.endswith(x[:n])), default=0)
        out, s.held = s.held[:len(s.held) - keep], s.held[len(s.held) - keep:]
        if out:
            self._emit(s, out)
        return False

    def _emit(self, s: _Slot, text: str) -> None:
        if text or s.infos and s.request.params.logprobs is not None:
            infos, s.infos = s.infos, []
            s.request.on_event(TextEvent(text, infos))

    def _finish(self, s: _Slot, reason: str, flush: bool = True, error: str | None = None) -> None:
        req = s.request
        if reason in ("stop", "length"):
            text = s.held + (s.stream.flush() if flush else "")
            if flush and req.params.stop:  # a stop string may end in the flushed bytes
                for x in req.params.stop:
                    if x and x in text:
                        text = text[:text.find(x)]
            s.held = ""
            self._emit(s, text)
        n_gen = s.n_gen
        s.release()
        self._admitted.remove(s)
        self._done(req, DoneEvent(reason, len(req.prompt_ids), n_gen, error))

    def _done(self, req: Request, ev: DoneEvent) -> None:
        req.done = True
        try:
            req.on_event(ev)
        except Exception:  # a consumer's callback must not take the engine down
            log.exception("request %d: the done callback failed", req.id)


def _penalize(logits: torch.Tensor, history: list[int], p: GenParams) -> torch.Tensor:
    """llama.cpp's repetition penalty, then OpenAI's frequency/presence penalties, over `history`."""
    if not history or (p.repeat_penalty == 1.0 and p.frequency_penalty == 0.0 and p.presence_penalty == 0.0):
        return logits
    logits = logits.float().clone()
    ids, counts = torch.unique(torch.tensor(history, device=logits.device), return_counts=True)
    sel = logits[ids]
    if p.repeat_penalty != 1.0:
        sel = torch.where(sel > 0, sel / p.repeat_penalty, sel * p.repeat_penalty)
    sel = sel - counts.to(sel.dtype) * p.frequency_penalty - p.presence_penalty
    logits[ids] = sel
    return logits
