"""The high-level Python API: a model loaded once, text in, text out.

    from qkvgguf import LLM

    llm = LLM()                                   # the default model (SmolLM2-135M-Instruct), or LLM("model.gguf")
    print(llm("The capital of France is", max_tokens=16, temperature=0))
    for piece in llm.stream("Once upon a time", max_tokens=32):
        print(piece, end="", flush=True)
    print(llm.chat([{"role": "user", "content": "Name three colours."}], max_tokens=32))

Loading goes through `RunConfig` (the CLI's flags as keyword arguments: n_ctx, type_k, type_v,
device, vram, threads, ...), so the weights cache, threads and VRAM plan are the CLI's. Generation
goes through `runtime.engine.Engine`, the path `qkvgguf serve` uses, so `llm(prompt, temperature=0)`
gives the text `qkvgguf run --temp 0` gives. Sampling defaults are the CLI's (llama.cpp's):
temperature 0.8, top_k 40, top_p 0.95, min_p 0.05.

`parallel=N` gives the engine N sequence slots; `LLM.complete` and friends are then safe to call from
N threads at once once `start()` has started the engine's worker thread (what the server does).
Without it, each call drives the engine itself in the calling thread.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Iterator
from dataclasses import dataclass

from .errors import QkvggufError
from .run_config import RunConfig
from .runtime.engine import DoneEvent, Engine, GenParams, Request, TextEvent, TokenInfo
from .runtime.generate import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (end of generation or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    tokens: list[TokenInfo]  # with logprobs when asked for


def gen_params(max_tokens: int = 128, temperature: float = 0.8, top_k: int = 40, top_p: float = 0.95,
               min_p: float = 0.05, seed: int | None = None, stop: str | list[str] | None = None,
               repeat_penalty: float = 1.0, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
               repeat_last_n: int = 64, logprobs: int | None = None, ignore_eos: bool = False) -> GenParams:
    """Keyword arguments -> GenParams, each checked (one-line QkvggufError naming the argument)."""
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
        raise QkvggufError(f"max_tokens must be an integer >= 0, got {max_tokens!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise QkvggufError(f"top_k must be an integer >= 0, got {top_k!r}")
    for name, v, lo, hi in (("temperature", temperature, 0.0, 100.0), ("top_p", top_p, 0.0, 1.0),
                            ("min_p", min_p, 0.0, 1.0), ("repeat_penalty", repeat_penalty, 0.0, 100.0),
                            ("frequency_penalty", frequency_penalty, -2.0, 2.0),
                            ("presence_penalty", presence_penalty, -2.0, 2.0)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise QkvggufError(f"{name} must be a number in [{lo:g}, {hi:g}], got {v!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise QkvggufError(f"seed must be an integer, got {seed!r}")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(x, str) for x in stop) or len(stop) > 16:
        raise QkvggufError(f"stop must be a string or a list of at most 16 strings, got {stop!r}")
    if not isinstance(repeat_last_n, int) or repeat_last_n < 0:
        raise QkvggufError(f"repeat_last_n must be an integer >= 0, got {repeat_last_n!r}")
    if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool) or not 0 <= logprobs <= 20):
        raise QkvggufError(f"logprobs must be an integer in [0, 20], got {logprobs!r}")
    if not isinstance(ignore_eos, bool):
        raise QkvggufError(f"ignore_eos must be a boolean, got {ignore_eos!r}")
    sampling = SamplingParams(temperature=float(temperature), top_k=top_k, top_p=float(top_p), min_p=float(min_p),
                              seed=seed)
    return GenParams(max_tokens=max_tokens, sampling=sampling, stop=tuple(x for x in stop if x),
                     repeat_penalty=float(repeat_penalty), frequency_penalty=float(frequency_penalty),
                     presence_penalty=float(presence_penalty), repeat_last_n=repeat_last_n, logprobs=logprobs,
                     ignore_eos=ignore_eos)


class LLM:
    """A GGUF model ready to generate; `model` None is the default model."""

    def __init__(self, model: str | None = None, *, parallel: int = 1, max_queue: int = 64, **run_config):
        self._load(RunConfig(model=model, n_seq=parallel, **run_config), max_queue, log.info)

    @classmethod
    def from_config(cls, config: RunConfig, max_queue: int = 64, log=log.info) -> LLM:
        """An LLM for a RunConfig (the CLI's flags); config.n_seq is the number of sequence slots."""
        self = cls.__new__(cls)
        self._load(config, max_queue, log)
        return self

    def _load(self, config: RunConfig, max_queue: int, log) -> None:
        self.config = config
        self.model, self.tokenizer, self.n_ctx = config.load(log=log)
        self.path = self.model.gguf.path
        self.engine = Engine(self.model, self.tokenizer, self.n_ctx, n_slots=config.n_seq, n_batch=config.n_batch,
                             type_k=config.type_k, type_v=config.type_v, max_queue=max_queue,
                             cuda_graph=config.cuda_graph)

    # -- prompts --------------------------------------------------------------------------------

    def encode(self, prompt: str) -> list[int]:
        """A plain prompt as `qkvgguf run` tokenizes it (BOS as the file says, special tokens parsed)."""
        return self.tokenizer.encode(prompt, add_special=True, parse_special=True)

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """The file's chat template over `messages`, with the assistant's turn opened (as `run --chat`)."""
        text = self.tokenizer.render_chat(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special=True, parse_special=True)

    # -- generation -----------------------------------------------------------------------------

    def start(self) -> None:
        """Run the engine in a worker thread (for several callers at once; the server calls this)."""
        self.engine.start()

    def close(self) -> None:
        self.engine.stop()

    def events(self, ids: list[int], params: GenParams) -> Iterator[TextEvent | DoneEvent]:
        """The engine's events for one request, ending with its DoneEvent; closing the iterator early
        cancels the request and frees its slot."""
        q: queue.SimpleQueue = queue.SimpleQueue()
        req = Request(ids, params, q.put)
        self.engine.submit(req)
        threaded = self.engine.running
        try:
            while True:
                if not threaded:
                    while q.empty():
                        self.engine.step()
                ev = q.get()
                yield ev
                if isinstance(ev, DoneEvent):
                    if ev.finish_reason == "error":
                        raise RuntimeError(f"generation failed: {ev.error}")
                    return
        finally:
            if not req.done:
                self.engine.cancel(req)
                if not threaded:
                    while not req.done:
                        self.engine.step()

    def complete(self, ids: list[int], **kw) -> Completion:
        """Generate after prompt ids; keyword arguments as `gen_params`."""
        text, tokens = [], []
        for ev in self.events(ids, gen_params(**kw)):
            if isinstance(ev, TextEvent):
                text.append(ev.text)
                tokens.extend(ev.tokens)
            else:
                return Completion("".join(text), ev.finish_reason, ev.prompt_tokens, ev.completion_tokens, tokens)
        raise AssertionError("the engine ended a request without a DoneEvent")

    def __call__(self, prompt: str, max_tokens: int = 128, **kw) -> str:
        """The continuation of `prompt` (stops: end of generation, max_tokens, a `stop` string)."""
        return self.complete(self.encode(prompt), max_tokens=max_tokens, **kw).text

    def stream(self, prompt: str, max_tokens: int = 128, **kw) -> Iterator[str]:
        """As __call__, piece by piece as tokens are sampled."""
        for ev in self.events(self.encode(prompt), gen_params(max_tokens=max_tokens, **kw)):
            if isinstance(ev, TextEvent) and ev.text:
                yield ev.text

    def chat(self, messages: list[dict], max_tokens: int = 128, stream: bool = False, **kw):
        """The assistant's reply to `messages` ([{"role": "user", "content": ...}, ...]); an iterator
        of pieces with stream=True."""
        ids = self.chat_prompt(messages)
        if stream:
            return (ev.text for ev in self.events(ids, gen_params(max_tokens=max_tokens, **kw))
                    if isinstance(ev, TextEvent) and ev.text)
        return self.complete(ids, max_tokens=max_tokens, **kw).text
