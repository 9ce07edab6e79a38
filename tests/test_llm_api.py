"""The high-level API (`from qkvgguf import LLM`) on the default model: greedy text equals
`qkvgguf run --temp 0`, streaming, chat, stops, argument errors, and the README's snippet as written."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qkvgguf import QkvggufError

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def llm(smollm2_path):
    from qkvgguf import LLM

    return LLM(smollm2_path, n_ctx=256)


def cli_run(model: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-m", "qkvgguf", "run", "-m", model, "-c", "256", "--temp", "0", *args],
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    return out.stdout[:-1]  # run ends with a newline of its own


def test_import_is_lazy():
    """`import qkvgguf` loads neither torch nor the runtime; `qkvgguf.LLM` does on first use."""
    code = ("import sys, qkvgguf; assert 'torch' not in sys.modules and 'qkvgguf.llm' not in sys.modules; "
            "from qkvgguf import LLM; assert LLM.__module__ == 'qkvgguf.llm'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_greedy_equals_cli_run(llm, smollm2_path):
    expect = cli_run(smollm2_path, "-n", "20", "-p", PROMPT)
    assert PROMPT + llm(PROMPT, max_tokens=20, temperature=0) == expect
    pieces = list(llm.stream(PROMPT, max_tokens=20, temperature=0))
    assert len(pieces) > 5 and PROMPT + "".join(pieces) == expect
    question = "What is the capital of France?"
    expect_chat = cli_run(smollm2_path, "-n", "20", "--chat", "-p", question)
    messages = [{"role": "user", "content": question}]
    assert llm.chat(messages, max_tokens=20, temperature=0) == expect_chat
    assert "".join(llm.chat(messages, max_tokens=20, temperature=0, stream=True)) == expect_chat


def test_stop_max_tokens_and_completion(llm):
    full = llm.complete(llm.encode(PROMPT), max_tokens=12, temperature=0)
    assert full.finish_reason == "length" and full.completion_tokens == 12 and full.prompt_tokens == len(llm.encode(PROMPT))
    word = full.text.split()[0]
    cut = llm(PROMPT, max_tokens=12, temperature=0, stop=word)
    assert cut == full.text[:full.text.index(word)]
    assert llm(PROMPT, max_tokens=0) == ""
    seeded = [llm(PROMPT, max_tokens=8, temperature=1.0, seed=11) for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_closing_a_stream_early_frees_the_slot(llm):
    it = llm.stream(PROMPT, max_tokens=200, temperature=0)
    next(it)
    assert llm.engine.status()["slots_busy"] == 1
    it.close()
    assert llm.engine.status()["slots_busy"] == 0
    assert llm(PROMPT, max_tokens=3, temperature=0)  # and it still generates


@pytest.mark.parametrize("kw, match", [
    ({"max_tokens": -1}, "max_tokens"), ({"temperature": "hot"}, "temperature"), ({"top_p": 2.0}, "top_p"),
    ({"stop": 5}, "stop"), ({"seed": 1.5}, "seed"), ({"logprobs": 99}, "logprobs"),
])
def test_bad_arguments(llm, kw, match):
    with pytest.raises(QkvggufError, match=match):
        llm(PROMPT, **kw)


def test_prompt_too_long(llm):
    with pytest.raises(QkvggufError, match="256-token context"):
        llm("word " * 400)


def test_readme_snippet_runs_as_written():
    """The README's high-level snippet (between its markers), run as a user would paste it."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- llm-snippet -->\s*```python\n(.*?)```", text, re.DOTALL)
    assert m, "README.md lost its LLM snippet (marked <!-- llm-snippet -->)"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(m.group(1), "README.md", "exec"), {})
    assert "Paris" in out.getvalue()
