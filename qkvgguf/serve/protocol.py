"""The OpenAI API's request and response shapes, without any web framework.

Requests (JSON objects) become (prompt ids, GenParams, options); engine events become OpenAI's
response objects and stream chunks. Everything a client can get wrong raises `APIError`, which the
app turns into OpenAI's error body `{"error": {"message", "type", "param", "code"}}` with its status:

    400 invalid_request_error   malformed JSON, a wrong type or range, a prompt the context cannot hold
    401 authentication_error    a missing or wrong API key
    404 not_found_error         an unknown model or path
    503 server_error            the queue is full (`--max-queue`)

Parameters: max_tokens (chat also max_completion_tokens), temperature, top_p, top_k, min_p, seed,
stop, presence_penalty, frequency_penalty, llama.cpp's repeat_penalty, repeat_last_n and ignore_eos, logprobs
(chat: a bool with top_logprobs; completions: an int), stream (with stream_options.include_usage),
n (only 1). Unset sampling parameters take llama.cpp's defaults (temperature 0.8, top_k 40, top_p
0.95, min_p 0.05), as `qkvgguf run` does; max_tokens defaults to the rest of the context for chat
and to 16 for completions (OpenAI's defaults). Other fields are ignored, as llama-server does.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from qkvgguf.errors import QkvggufError
from qkvgguf.llm import gen_params
from qkvgguf.runtime.engine import DoneEvent, GenParams, TextEvent, TokenInfo


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", code, param)


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "presence_penalty", "frequency_penalty",
             "repeat_penalty", "repeat_last_n", "ignore_eos")


@dataclass
class Options:
    params: GenParams
    stream: bool
    include_usage: bool
    logprobs: bool


def options(body: dict, default_max_tokens: int, chat: bool) -> Options:
    """The generation parameters of a request body (see the module docstring)."""
    kw = {k: body[k] for k in _SAMPLING if body.get(k) is not None}
    max_tokens = body.get("max_completion_tokens") if chat and body.get("max_completion_tokens") is not None \
        else body.get("max_tokens")
    kw["max_tokens"] = default_max_tokens if max_tokens is None else max_tokens
    if body.get("stop") is not None:
        kw["stop"] = body["stop"]
    n = body.get("n", 1)
    if n is not None and n != 1:
        raise bad_request(f"n must be 1 (one choice per request), got {n!r}", "n")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request(f"stream must be a boolean, got {stream!r}", "stream")
    so = body.get("stream_options") or {}
    if not isinstance(so, dict):
        raise bad_request("stream_options must be an object", "stream_options")
    logprobs = False
    if chat:
        lp, top = body.get("logprobs"), body.get("top_logprobs")
        if lp is not None and not isinstance(lp, bool):
            raise bad_request(f"logprobs must be a boolean, got {lp!r}", "logprobs")
        if lp:
            kw["logprobs"] = 0 if top is None else top
            logprobs = True
    elif body.get("logprobs") is not None:
        kw["logprobs"] = body["logprobs"]
        logprobs = True
    try:
        params = gen_params(**kw)
    except QkvggufError as e:
        raise bad_request(str(e), str(e).split(" ")[0]) from None
    return Options(params, stream, bool(so.get("include_usage")), logprobs)


def chat_messages(body: dict) -> list[dict]:
    """`messages`, checked: a non-empty list of {role: str, content: str | [{type: text, text}] | null}."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad_request(f"messages[{i}] must be an object with a string role", "messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad_request(f"messages[{i}].content: only text parts are supported", "messages")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise bad_request(f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append({"role": m["role"], "content": content})
    return out


def completion_prompt(body: dict) -> str | list[int]:
    """`prompt`: a string, a list of one string, or a list of token ids."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return p
    raise bad_request("prompt must be a string (or a list of one string, or of token ids)", "prompt")


# -- responses ------------------------------------------------------------------------------------

def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


class Reply:
    """Builds one request's response objects from engine events (chat or text completion)."""

    def __init__(self, model: str, chat: bool, opts: Options):
        self.model, self.chat, self.opts = model, chat, opts
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"
        self.offset = 0  # text offset for completions' logprobs

    def usage(self, done: DoneEvent) -> dict:
        return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                "total_tokens": done.prompt_tokens + done.completion_tokens}

    def logprobs(self, tokens: list[TokenInfo]) -> dict | None:
        if not self.opts.logprobs:
            return None
        tokens = [t for t in tokens if t.logprob is not None]
        if self.chat:
            return {"content": [{"token": t.text, "logprob": t.logprob, "bytes": _bytes(t.text),
                                 "top_logprobs": [{"token": s, "logprob": v, "bytes": _bytes(s)} for s, v in t.top]}
                                for t in tokens]}
        offsets = []
        for t in tokens:
            offsets.append(self.offset)
            self.offset += len(t.text)
        return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
                "top_logprobs": [dict(t.top) for t in tokens], "text_offset": offsets}

    def _base(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, text: str, tokens: list[TokenInfo], done: DoneEvent) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": self.logprobs(tokens), "finish_reason": done.finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": self.logprobs(tokens), "finish_reason": done.finish_reason}
        return {**self._base(self.object), "choices": [choice], "usage": self.usage(done)}

    # streaming: chunks as dicts; the app writes each as one server-sent event, then [DONE]
    def first_chunk(self) -> dict | None:
        if not self.chat:
            return None
        return {**self._base("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]}

    def chunk(self, ev: TextEvent) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": {"content": ev.text}, "logprobs": self.logprobs(ev.tokens),
                      "finish_reason": None}
            return {**self._base("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": ev.text, "logprobs": self.logprobs(ev.tokens), "finish_reason": None}
        return {**self._base("text_completion"), "choices": [choice]}

    def last_chunks(self, done: DoneEvent) -> list[dict]:
        if self.chat:
            choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": done.finish_reason}
            last = {**self._base("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": done.finish_reason}
            last = {**self._base("text_completion"), "choices": [choice]}
        out = [last]
        if self.opts.include_usage:
            out.append({**self._base(last["object"]), "choices": [], "usage": self.usage(done)})
        return out
