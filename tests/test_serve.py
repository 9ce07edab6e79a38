"""`qkvgguf serve` end to end: the real CLI in a subprocess on a free loopback port, SmolLM2, and the
official `openai` client (issue 21's done-when 1-4).

One server (-np 4, an API key) serves most tests; a second (-np 1 --max-queue 1) shows the 503.
Greedy replies are compared with `qkvgguf run --temp 0` on the same prompt and -c.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

KEY = "test-key-123"
CTX = 512
PROMPTS = ["The capital of France is", "Once upon a time, a small dog", "The best way to learn to code is",
           "Water boils at"]
CHAT = "What is the capital of France?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(model: str, *flags: str):
    port = free_port()
    cmd = [sys.executable, "-m", "qkvgguf", "serve", "-m", model, "-c", str(CTX), "--port", str(port), *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited ({proc.returncode}): {proc.stdout.read()}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                raise AssertionError("the server did not come up in 120 s")
            time.sleep(0.3)
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def srv(smollm2_path):
    with server(smollm2_path, "-np", "4", "--api-key", KEY) as (base, proc):
        yield base, proc


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=srv[0] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def cli_run(model: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "qkvgguf", "run", "-m", model, "-c", str(CTX), "--temp", "0", *args],
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    assert out.stdout.endswith("\n")
    return out.stdout[:-1]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# -- done-when 1: the openai client ---------------------------------------------------------------

def test_models(client, smollm2_path):
    models = client.models.list().data
    assert [m.id for m in models] == [os.path.basename(smollm2_path)]


def test_chat_greedy_equals_cli_run(client, smollm2_path):
    model = os.path.basename(smollm2_path)
    expect = cli_run(smollm2_path, "-n", "24", "--chat", "-p", CHAT)
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": CHAT}],
                                       max_tokens=24, temperature=0)
    assert r.choices[0].message.content == expect
    assert r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    pieces, finish = [], None
    stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": CHAT}],
                                            max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert len([p for p in pieces if p]) > 3  # streamed in pieces, not in one
    assert "".join(pieces) == expect
    assert finish == r.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == r.usage.completion_tokens


def test_completion_greedy_equals_cli_run(client, smollm2_path):
    prompt = PROMPTS[0]
    expect = cli_run(smollm2_path, "-n", "20", "-p", prompt)
    r = client.completions.create(model=os.path.basename(smollm2_path), prompt=prompt, max_tokens=20, temperature=0)
    assert prompt + r.choices[0].text == expect
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 20
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=os.path.basename(smollm2_path), prompt=prompt, max_tokens=20, temperature=0, stream=True))
    assert prompt + text == expect


def test_stop_strings(client, smollm2_path):
    model = os.path.basename(smollm2_path)
    full = client.chat.completions.create(model=model, messages=[{"role": "user", "content": CHAT}],
                                          max_tokens=24, temperature=0).choices[0].message.content
    assert "Paris" in full
    for stop in (["Paris"], ["of Fr", "nothing like this"]):  # one token; across token boundaries
        cut = full[:full.index(stop[0])]
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": CHAT}],
                                           max_tokens=24, temperature=0, stop=stop)
        assert r.choices[0].message.content == cut
        assert r.choices[0].finish_reason == "stop"
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": CHAT}], max_tokens=24, temperature=0, stop=stop,
            stream=True) if c.choices)
        assert streamed == cut


def test_seed_reproducible(client, smollm2_path):
    model = os.path.basename(smollm2_path)

    def sample(seed):
        return client.completions.create(model=model, prompt="My favourite animal is", max_tokens=16,
                                         temperature=1.0, top_p=1.0, seed=seed).choices[0].text

    a = sample(7)
    assert sample(7) == a
    assert len({a, sample(8), sample(9)}) > 1  # the seed, not the prompt, decides


def test_logprobs_and_penalties(client, smollm2_path):
    model = os.path.basename(smollm2_path)
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": CHAT}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=3)
    lp = r.choices[0].logprobs.content
    assert len(lp) == 5 and "".join(t.token for t in lp) == r.choices[0].message.content
    for t in lp:  # greedy: the chosen token is the most likely one
        assert len(t.top_logprobs) == 3 and t.logprob == pytest.approx(t.top_logprobs[0].logprob) and t.logprob <= 0

    def repeats(**kw):  # tokens of the reply that it already used
        r = client.completions.create(model=model, prompt="one one one one one", max_tokens=12, temperature=0,
                                      logprobs=0, **kw)
        tokens = r.choices[0].logprobs.tokens
        assert "".join(tokens) == r.choices[0].text
        return len(tokens) - len(set(tokens))

    plain = repeats()
    assert plain >= 4  # greedy SmolLM2 loops here ('-to-many-to-many, one-to')
    assert repeats(frequency_penalty=1.0, presence_penalty=1.0) < plain / 2
    assert repeats(extra_body={"repeat_penalty": 1.5}) < plain / 2  # llama.cpp's name, outside the SDK's


def test_ignore_eos(client, smollm2_path):
    model = os.path.basename(smollm2_path)
    msgs = [{"role": "user", "content": CHAT}]
    short = client.chat.completions.create(model=model, messages=msgs, max_tokens=24, temperature=0)
    assert short.choices[0].finish_reason == "stop" and short.usage.completion_tokens < 24  # the model ends it
    full = client.chat.completions.create(model=model, messages=msgs, max_tokens=24, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 24
    assert full.choices[0].message.content.startswith(short.choices[0].message.content)


# -- done-when 2: a bounded load test --------------------------------------------------------------

def test_load_16_streams_and_4_disconnects(srv, client, smollm2_path):
    base, proc = srv
    model = os.path.basename(smollm2_path)
    n_tok = 16
    alone = {p: client.completions.create(model=model, prompt=p, max_tokens=n_tok, temperature=0).choices[0].text
             for p in PROMPTS}  # one at a time: also warms the server up
    idle = rss_bytes(proc.pid)

    async def one(i: int, aclient) -> tuple[int, str, str | None]:
        prompt = PROMPTS[i % len(PROMPTS)]
        stream = await aclient.completions.create(model=model, prompt=prompt, max_tokens=n_tok, temperature=0,
                                                  stream=True)
        text, finish = [], None
        async for chunk in stream:
            text.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        return i, "".join(text), finish

    async def leaver(i: int) -> int:
        """Reads three events of a long stream, then hangs up."""
        async with httpx.AsyncClient(timeout=120) as h:
            async with h.stream("POST", base + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                                json={"prompt": PROMPTS[i % 4], "max_tokens": 400, "stream": True}) as r:
                assert r.status_code == 200
                seen = 0
                async for line in r.aiter_lines():
                    seen += line.startswith("data:")
                    if seen == 3:
                        return seen
        raise AssertionError("the stream ended before the client left")

    async def main():
        aclient = openai.AsyncOpenAI(base_url=base + "/v1", api_key=KEY, max_retries=0, timeout=300)
        jobs = [one(i, aclient) for i in range(16)] + [leaver(i) for i in range(4)]
        return await asyncio.gather(*jobs)

    t0 = time.time()
    results = asyncio.run(main())
    wall = time.time() - t0
    done = results[:16]
    assert sorted(i for i, _, _ in done) == list(range(16))  # none lost
    for i, text, finish in done:
        assert finish == "length", (i, finish)
        assert text == alone[PROMPTS[i % len(PROMPTS)]], (i, text)
    # the leavers' 400-token requests must not hold their slots: all idle at once, not after 400 tokens
    deadline = time.time() + 10
    while (h := httpx.get(base + "/health").json())["slots_busy"] or h["queued"]:
        assert time.time() < deadline, h
        time.sleep(0.1)
    after = rss_bytes(proc.pid)
    print(f"load: 16 streams of {n_tok} tokens + 4 leavers in {wall:.1f} s; RSS idle {idle / 2**20:.1f} MiB, "
          f"after {after / 2**20:.1f} MiB; {h['steps']} engine steps")
    assert after - idle < 48 * 2**20  # caches are allocated once; nothing per request stays behind
    assert alone[PROMPTS[0]] == client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=n_tok,
                                                          temperature=0).choices[0].text  # still serving


# -- done-when 3: bad requests ----------------------------------------------------------------------

def test_bad_requests(srv, client, smollm2_path):
    base, _ = srv
    model = os.path.basename(smollm2_path)
    auth = {"Authorization": f"Bearer {KEY}"}
    chat = base + "/v1/chat/completions"
    good = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    cases = [  # (what, url, headers, body bytes or json, status, code)
        ("malformed JSON", chat, auth, b'{"messages": [', 400, "invalid_json"),
        ("not an object", chat, auth, b"[1, 2]", 400, None),
        ("messages not a list", chat, auth, {**good, "messages": "Hi"}, 400, None),
        ("content a number", chat, auth, {**good, "messages": [{"role": "user", "content": 5}]}, 400, None),
        ("temperature a string", chat, auth, {**good, "temperature": "hot"}, 400, None),
        ("max_tokens a string", chat, auth, {**good, "max_tokens": "5"}, 400, None),
        ("negative max_tokens", chat, auth, {**good, "max_tokens": -1}, 400, None),
        ("stream not a bool", chat, auth, {**good, "stream": "yes"}, 400, None),
        ("n = 2", chat, auth, {**good, "n": 2}, 400, None),
        ("huge prompt", chat, auth, {**good, "messages": [{"role": "user", "content": "word " * 2000}]}, 400,
         "context_length_exceeded"),
        ("huge completion prompt", base + "/v1/completions", auth, {"model": model, "prompt": "word " * 2000}, 400,
         "context_length_exceeded"),
        ("token id out of range", base + "/v1/completions", auth, {"model": model, "prompt": [1, 10**9]}, 400, None),
        ("unknown model", chat, auth, {**good, "model": "gpt-4o"}, 404, "model_not_found"),
        ("wrong key", chat, {"Authorization": "Bearer nope"}, good, 401, "invalid_api_key"),
        ("no key", base + "/v1/models", {}, None, 401, "invalid_api_key"),
        ("unknown path", base + "/v1/nothing", auth, good, 404, None),
    ]
    for what, url, headers, body, status, code in cases:
        if body is None:
            r = httpx.get(url, headers=headers)
        elif isinstance(body, bytes):
            r = httpx.post(url, headers={**headers, "Content-Type": "application/json"}, content=body)
        else:
            r = httpx.post(url, headers=headers, json=body)
        assert r.status_code == status, (what, r.status_code, r.text)
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and "type" in err, what
        if code is not None:
            assert err["code"] == code, (what, err)
        assert httpx.get(base + "/health").json()["status"] == "ok"  # still serving
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hi"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "word " * 2000}])
    assert client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=2).choices[0].message.content  # and serves after all that


def test_busy_queue_503(smollm2_path):
    with server(smollm2_path, "-np", "1", "--max-queue", "1") as (base, _):
        body = {"prompt": "Once upon a time", "max_tokens": 300, "stream": True}

        async def main():
            async with httpx.AsyncClient(timeout=120) as h:
                async with h.stream("POST", base + "/v1/completions", json=body) as first:
                    lines = first.aiter_lines()  # kept open: the first holds the slot while it streams
                    await lines.__anext__()
                    waiting = asyncio.create_task(h.post(base + "/v1/completions", json={**body, "stream": False,
                                                                                        "max_tokens": 2}))
                    for _ in range(200):
                        if (await h.get(base + "/health")).json()["queued"] == 1:
                            break
                        await asyncio.sleep(0.05)
                    else:
                        raise AssertionError("the second request never queued")
                    third = await h.post(base + "/v1/completions", json=body)
                assert third.status_code == 503, third.text
                assert third.json()["error"]["code"] == "server_busy"
                second = await waiting  # the queued one is served once the first stream is gone
                assert second.status_code == 200 and second.json()["usage"]["completion_tokens"] == 2

        asyncio.run(main())


@pytest.mark.parametrize("flags, says", [
    (["--host", "0.0.0.0"], "--api-key"),  # bound beyond this machine without a key
    (["-np", "0"], "--parallel"),
    (["--port", "70000"], "--port"),
    (["--max-queue", "-1"], "--max-queue"),
])
def test_bad_flags_one_line(smollm2_path, flags, says):
    out = subprocess.run([sys.executable, "-m", "qkvgguf", "serve", "-m", smollm2_path, *flags],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and says in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("qkvgguf: error: ")


# -- done-when 4: the chat page in headless Chromium ------------------------------------------------

CHROMIUM = [p for p in ("/usr/bin/chromium-headless-shell", "/usr/bin/chromium") if os.path.exists(p)]


def test_chat_page_in_chromium(srv, smollm2_path, tmp_path):
    base, _ = srv
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM:
        pytest.skip("no Chromium here (apt-get install chromium-headless-shell)")
    expect = cli_run(smollm2_path, "-n", "24", "--chat", "-p", CHAT)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM[0], args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(base + "/")
            page.fill("#key", KEY)
            page.dispatch_event("#key", "change")
            page.wait_for_function("document.getElementById('model').textContent.endsWith('.gguf')")
            page.fill("#temp", "0")
            page.fill("#max", "24")
            # count the reply's updates: a streamed reply grows in several steps
            page.evaluate("""() => { window.updates = 0; new MutationObserver(() => window.updates++)
                .observe(document.getElementById('log'), {subtree: true, characterData: true, childList: true}); }""")
            page.fill("#input", CHAT)
            page.press("#input", "Enter")
            page.wait_for_selector(".assistant[data-done='1']", timeout=120_000)
            reply = page.inner_text(".assistant")
            shot = tmp_path / "chat_page.png"
            page.screenshot(path=str(shot))
            updates = page.evaluate("window.updates")
        finally:
            browser.close()
    print(f"chat page screenshot: {shot} ({updates} DOM updates)")
    assert reply == expect.strip()  # inner_text trims the bubble's text
    assert updates > 4
    assert shot.stat().st_size > 5000


def test_page_is_self_contained():
    from importlib import resources

    page = resources.files("qkvgguf.serve").joinpath("static/chat.html").read_text()
    assert "<script src" not in page and "http://" not in page and "https://" not in page
    assert json.dumps("/v1/chat/completions")[1:-1] in page and "stream: true" in page
