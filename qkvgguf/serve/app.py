"""The HTTP side of `qkvgguf serve`: a Starlette app over one `LLM` whose engine runs in its own thread.

    GET  /                      the chat page (static/chat.html: one file, plain JS, no build step)
    GET  /health                {"status": "ok", slots, slots_busy, queued, ...}
    GET  /v1/models             the one model, as OpenAI lists models
    POST /v1/chat/completions   the file's chat template; "stream": true -> server-sent events
    POST /v1/completions        a plain prompt

Why Starlette on uvicorn: both maintained and small; FastAPI would add pydantic validation whose
error bodies are not OpenAI's, so every body is checked in protocol.py instead. Streams are plain
`StreamingResponse`s of `data: {json}\\n\\n` lines ending in `data: [DONE]`.

Engine events arrive on the engine's thread and are handed to the request's asyncio queue with
`call_soon_threadsafe`. A client that goes away is noticed by Starlette (a stream's task is
cancelled) or by a watcher on `receive` (non-streamed requests); either cancels the request, and
the engine frees its slot before its next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from qkvgguf.errors import QkvggufError
from qkvgguf.llm import LLM
from qkvgguf.runtime.engine import PromptTooLong, QueueFull, TextEvent
from qkvgguf.runtime.engine import Request as EngineRequest

from . import protocol
from .protocol import APIError, Reply, bad_request

log = logging.getLogger(__name__)


def model_id(llm: LLM) -> str:
    return os.path.basename(llm.path)


def create_app(llm: LLM, api_key: str | None = None) -> Starlette:
    """The app for a loaded LLM (its engine thread is started here, on the first request's loop)."""
    mid = model_id(llm)
    names = {mid, mid.removesuffix(".gguf"), llm.path}
    page = resources.files("qkvgguf.serve").joinpath("static/chat.html").read_text(encoding="utf-8")
    llm.start()

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           "authentication_error", "invalid_api_key")

    def check_model(body: dict) -> None:
        m = body.get("model")
        if m is not None and not isinstance(m, str):
            raise bad_request("model must be a string", "model")
        if m and m not in names:
            raise APIError(404, f"the model '{m}' does not exist; this server has '{mid}'", "not_found_error",
                           "model_not_found", "model")

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": mid, **llm.engine.status()})

    async def models(request: Request) -> Response:
        check_key(request)
        return JSONResponse({"object": "list", "data": [{
            "id": mid, "object": "model", "created": int(os.path.getmtime(llm.path)), "owned_by": "qkvgguf",
            "meta": {"n_ctx": llm.n_ctx, "n_vocab": llm.model.config.vocab_size, "parallel": len(llm.engine.slots)}}]})

    async def chat_completions(request: Request) -> Response:
        check_key(request)
        body = protocol.parse_body(await request.body())
        check_model(body)
        messages = protocol.chat_messages(body)
        try:
            ids = llm.chat_prompt(messages)
        except QkvggufError as e:
            raise bad_request(str(e), "messages") from None
        opts = protocol.options(body, max(llm.n_ctx - len(ids), 0), chat=True)
        return await generate(request, ids, Reply(mid, True, opts))

    async def completions(request: Request) -> Response:
        check_key(request)
        body = protocol.parse_body(await request.body())
        check_model(body)
        prompt = protocol.completion_prompt(body)
        if isinstance(prompt, str):
            ids = llm.encode(prompt)
        else:
            bad = [t for t in prompt if not 0 <= t < llm.model.config.vocab_size]
            if bad:
                raise bad_request(f"token id {bad[0]} is outside the vocabulary (0..{llm.model.config.vocab_size - 1})",
                                  "prompt")
            ids = prompt
        if body.get("echo"):
            raise bad_request("echo is not supported", "echo")
        if body.get("suffix"):
            raise bad_request("suffix is not supported", "suffix")
        opts = protocol.options(body, 16, chat=False)
        return await generate(request, ids, Reply(mid, False, opts))

    async def generate(request: Request, ids: list[int], reply: Reply) -> Response:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def on_event(ev):  # on the engine's thread
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:  # the loop is gone (shutdown)
                pass

        req = EngineRequest(ids, reply.opts.params, on_event)
        try:
            llm.engine.submit(req)
        except PromptTooLong as e:
            raise bad_request(f"{e}: shorten it or start the server with a larger -c", "messages" if reply.chat
                              else "prompt", "context_length_exceeded") from None
        except QueueFull as e:
            raise APIError(503, f"the server is busy: {e}; retry later", "server_error", "server_busy") from None

        if reply.opts.stream:
            async def sse():
                try:
                    first = reply.first_chunk()
                    if first is not None:
                        yield _sse(first)
                    while True:
                        ev = await events.get()
                        if isinstance(ev, TextEvent):
                            yield _sse(reply.chunk(ev))
                        else:
                            if ev.finish_reason == "error":
                                yield _sse(APIError(500, f"generation failed: {ev.error}", "server_error").body())
                            else:
                                for c in reply.last_chunks(ev):
                                    yield _sse(c)
                            yield "data: [DONE]\n\n"
                            return
                finally:
                    if not req.done:
                        llm.engine.cancel(req)  # the client went away: free the slot

            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        watcher = asyncio.create_task(_cancel_on_disconnect(request, req, llm))
        text, tokens = [], []
        try:
            while True:
                ev = await events.get()
                if isinstance(ev, TextEvent):
                    text.append(ev.text)
                    tokens.extend(ev.tokens)
                    continue
                if ev.finish_reason == "error":
                    raise APIError(500, f"generation failed: {ev.error}", "server_error")
                return JSONResponse(reply.full("".join(text), tokens, ev))
        finally:
            watcher.cancel()
            if not req.done:
                llm.engine.cancel(req)

    async def api_error(request: Request, exc: APIError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        kind = {401: "authentication_error", 404: "not_found_error"}.get(exc.status_code, "invalid_request_error")
        return JSONResponse(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind).body(),
                            status_code=exc.status_code)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("request failed")
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").body(),
                            status_code=500)

    routes = [Route("/", index), Route("/health", health), Route("/v1/models", models),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"])]
    return Starlette(routes=routes, exception_handlers={APIError: api_error, HTTPException: http_error,
                                                        Exception: server_error})


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _cancel_on_disconnect(request: Request, req: EngineRequest, llm: LLM) -> None:
    """Cancel `req` when the client disconnects (after the body was read, receive() waits for that)."""
    while not req.done:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            llm.engine.cancel(req)
            return
