"""`qkvgguf serve`: an OpenAI-compatible HTTP server (needs the `server` extra: starlette, uvicorn).

    qkvgguf serve -m model.gguf --port 8080 --parallel 4

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="unused")
    client.chat.completions.create(model="model.gguf", messages=[{"role": "user", "content": "Hi"}])

The model loads once (`qkvgguf.llm.LLM`, the VRAM plan counting one KV cache per slot); requests
queue first-come-first-served for `--parallel` sequence slots that decode together
(runtime/engine.py); the HTTP layer is app.py, the OpenAI shapes protocol.py.
"""

from __future__ import annotations

import logging
import sys

from qkvgguf.errors import QkvggufError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def check_bind(host: str, api_key: str | None) -> None:
    """Serving beyond this machine needs a key: anyone who can reach the port could use the model."""
    if host not in LOOPBACK and not api_key:
        raise QkvggufError(f"--host {host} would accept connections from other machines: give --api-key KEY "
                           f"(or bind to 127.0.0.1)")


def serve(config, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None, max_queue: int = 64,
          log=None) -> int:
    """Load `config` (a RunConfig; its n_seq is the number of slots), then serve until interrupted."""
    check_bind(host, api_key)
    if not 0 <= port <= 65535:
        raise QkvggufError(f"--port must be in 0..65535, got {port}")
    if max_queue < 0:
        raise QkvggufError(f"--max-queue must be 0 or more, got {max_queue}")
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise QkvggufError(f"qkvgguf serve needs the server extra ({e.name} is missing): "
                           "pip install 'qkvgguf[server]'") from None
    from qkvgguf.llm import LLM

    from .app import create_app, model_id

    config.validate()
    log = log or (lambda m: print(f"qkvgguf: {m}", file=sys.stderr, flush=True))
    llm = LLM.from_config(config, max_queue=max_queue, log=log)
    app = create_app(llm, api_key)
    shown = f"[{host}]" if ":" in host else host
    log(f"serving {model_id(llm)} on http://{shown}:{port} ({config.n_seq} slot(s) of {llm.n_ctx} tokens, "
        f"K {config.type_k} V {config.type_v}; OpenAI base URL http://{shown}:{port}/v1)")
    logging.basicConfig(level=logging.INFO if config.verbose else logging.WARNING)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info" if config.verbose else "warning", access_log=config.verbose)
    finally:
        llm.close()
    return 0
