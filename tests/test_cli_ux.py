"""The command line a llama.cpp user expects (issue 20): run, chat, perplexity, inspect, convert, bench.

Every test drives the command as a user does (a subprocess, or a pseudo-terminal for the chat and
the progress bars) and checks the result against a reference: the same model through the Python
API, the file written, or another invocation's output.
"""

import csv
import fcntl
import io
import json
import os
import pty
import re
import select
import signal
import stat
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

import texts
from cli_errors import one_line_error

FRANCE = "The capital of France is"


def _cli(*args, stdin=None, env=None, umask=None):
    """`python -m qkvgguf ARGS` in a subprocess: (returncode, stdout, stderr)."""
    full_env = {**os.environ, **(env or {})}
    p = subprocess.run([sys.executable, "-m", "qkvgguf", *map(str, args)], capture_output=True, text=True,
                       input=stdin, timeout=600, env=full_env,
                       preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)
    return p.returncode, p.stdout, p.stderr


def _run_json(smollm2_path, *args):
    rc, out, err = _cli("run", "-m", smollm2_path, "--json", *args)
    assert rc == 0, err
    return json.loads(out), err


# -- run ----------------------------------------------------------------------------------------

def test_run_prints_the_seed_and_the_seed_repeats_the_sample(smollm2_path):
    rc, out, err = _cli("run", "-m", smollm2_path, FRANCE, "-n", 16, "--temp", 1.2, "--min-p", 0, "--top-k", 0)
    assert rc == 0, err
    seed = int(re.search(r"qkvgguf: seed (\d+)", err)[1])
    rc, again, err2 = _cli("run", "-m", smollm2_path, FRANCE, "-n", 16, "--temp", 1.2, "--min-p", 0, "--top-k", 0,
                           "--seed", seed)
    assert rc == 0 and again == out and f"seed {seed}" in err2
    rc, other, _ = _cli("run", "-m", smollm2_path, FRANCE, "-n", 16, "--temp", 1.2, "--min-p", 0, "--top-k", 0,
                        "--seed", seed + 1)
    assert other != out  # the seed is what made the sample


def test_run_prompt_given_twice_is_an_error(smollm2_path, tmp_path):
    rc, _, err = _cli("run", "-m", smollm2_path, "-p", "a", "b")
    one_line_error(rc, err, "more than once", "'b'")
    (tmp_path / "p.txt").write_text("x")
    rc, _, err = _cli("run", "-m", smollm2_path, "-p", "a", "-f", tmp_path / "p.txt")
    one_line_error(rc, err, "-p and -f")
    rc, _, err = _cli("run", "-m", smollm2_path, "-f", tmp_path / "missing.txt")
    one_line_error(rc, err, "missing.txt", "no such file")


def test_run_prompt_from_a_file_equals_the_same_prompt_inline(smollm2_path, tmp_path):
    prompt = texts.sherlock()[5000:5400]
    (tmp_path / "p.txt").write_text(prompt, encoding="utf-8")
    a, _ = _run_json(smollm2_path, "-f", tmp_path / "p.txt", "-n", 8, "--temp", 0)
    b, _ = _run_json(smollm2_path, "-p", prompt, "-n", 8, "--temp", 0)
    assert a["prompt"] == prompt and a["tokens"] == b["tokens"] and len(a["tokens"]) == 8


def test_run_stop_strings_cut_the_greedy_text_where_they_first_appear(smollm2_path):
    full, _ = _run_json(smollm2_path, FRANCE, "-n", 40, "--temp", 0)
    assert "." in full["text"] and full["stop"] != "stop"
    for flag in ("-r", "--stop"):
        cut, _ = _run_json(smollm2_path, FRANCE, "-n", 40, "--temp", 0, flag, ".")
        assert cut["text"] == full["text"][:full["text"].index(".")], cut
        assert cut["stop"] == "stop" and cut["stop_string"] == "." and len(cut["tokens"]) < len(full["tokens"])
    # streamed text: the held-back prefix of a stop string that never completes is still printed
    rc, out, err = _cli("run", "-m", smollm2_path, FRANCE, "-n", 40, "--temp", 0, "-r", "\\n\\nzzz")
    assert rc == 0 and out == FRANCE + full["text"] + "\n", (out, err)


def test_repeat_penalty_matches_llamacpps_formula(smollm2_path):
    """Greedy decoding with --repeat-penalty 1.5 equals argmax of logits penalized by hand (llama.cpp:
    a token seen in the last 64 gets logit / 1.5 if positive, * 1.5 if not) over the API's logits."""
    import torch

    from qkvgguf import GGUFFile
    from qkvgguf.runtime import Model
    from qkvgguf.runtime.generate import Session
    from qkvgguf.tokenizer import Tokenizer

    prompt = "one two three one two three one two three one two"
    got, _ = _run_json(smollm2_path, prompt, "-n", 12, "--temp", 0, "--repeat-penalty", 1.5)
    plain, _ = _run_json(smollm2_path, prompt, "-n", 12, "--temp", 0)
    assert got["tokens"] != plain["tokens"]
    gguf = GGUFFile(smollm2_path)
    ids = Tokenizer.from_gguf(gguf).encode(prompt, add_special=True, parse_special=True)
    session = Session(Model(gguf), 128)
    logits, want = session.feed(ids), []
    for _ in range(12):
        x = logits.float().clone()
        for t in set((ids + want)[-64:]):
            x[t] = x[t] / 1.5 if x[t] > 0 else x[t] * 1.5
        want.append(int(torch.argmax(x)))
        logits = session.decode(want[-1])
    assert got["tokens"] == want


def test_ignore_eos_and_n_predict_minus_one(smollm2_path):
    chat = "<|im_start|>user\nWhat is 2+2? Answer with a number only.<|im_end|>\n<|im_start|>assistant\n"
    ends, _ = _run_json(smollm2_path, "-p", chat, "-n", 200, "--temp", 0)
    assert ends["stop"] == "eog" and 0 < ends["n_tokens"] < 200
    more, _ = _run_json(smollm2_path, "-p", chat, "-n", ends["n_tokens"] + 6, "--temp", 0, "--ignore-eos")
    assert more["stop"] == "length" and more["n_tokens"] == ends["n_tokens"] + 6
    assert more["tokens"][:ends["n_tokens"]] == ends["tokens"]  # the same text, then on past the end
    full, _ = _run_json(smollm2_path, "-p", chat, "-n", -1, "--temp", 0, "--ignore-eos", "-c", 48)
    assert full["stop"] == "context" and len(full["prompt_tokens"]) + full["n_tokens"] == 48 + 1
    rc, _, err = _cli("run", "-m", smollm2_path, "hi", "-n", -2)
    one_line_error(rc, err, "-n/--n-predict")


def test_run_json_holds_text_tokens_timings_and_seed(smollm2_path):
    from qkvgguf import GGUFFile
    from qkvgguf.tokenizer import Tokenizer

    r, err = _run_json(smollm2_path, FRANCE, "-n", 10, "--seed", 42)
    assert r["seed"] == 42 and r["n_tokens"] == len(r["tokens"]) == r["timings"]["decode_tokens"] == 10
    assert r["timings"]["prompt_tokens"] == len(r["prompt_tokens"]) and r["timings"]["decode_tokens_per_s"] > 0
    assert r["text"] == Tokenizer.from_gguf(GGUFFile(smollm2_path)).decode(r["tokens"])
    assert r["prompt"] == FRANCE and r["stop"] == "length"


# -- chat in a pseudo-terminal ---------------------------------------------------------------------

class Terminal:
    """A child process on a pseudo-terminal (its controlling terminal, so Ctrl-C is a SIGINT)."""

    alive: list[int] = []  # children not yet reaped: the fixture below kills them after a failed test

    def __init__(self, *args):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child
            # Ctrl-C as in a user's shell: a pytest started in the background (`cmd &` in a script)
            # inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.execv(sys.executable, [sys.executable, "-m", "qkvgguf", *map(str, args)])
        Terminal.alive.append(self.pid)
        # a terminal 100 columns wide (a new pty has 0 x 0, where tqdm draws nothing)
        fcntl.ioctl(self.fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
        self.seen = b""

    def read_until(self, needle: str, timeout: float = 180) -> str:
        end = time.monotonic() + timeout
        while needle.encode() not in self.seen:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, end - time.monotonic()))
            if not ready:
                raise AssertionError(f"no {needle!r} in {timeout} s; the terminal shows: {self.seen[-800:]!r}")
            try:
                data = os.read(self.fd, 4096)
            except OSError:  # the child exited
                raise AssertionError(f"exited before {needle!r}; the terminal shows: {self.seen[-800:]!r}") from None
            self.seen += data
        i = self.seen.index(needle.encode()) + len(needle)
        out, self.seen = self.seen[:i], self.seen[i:]
        return out.decode("utf-8", errors="replace")

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def wait(self, timeout: float = 60) -> tuple[int, str]:
        """(exit status, the rest of the output)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            ready, _, _ = select.select([self.fd], [], [], 0.2)
            if ready:
                try:
                    data = os.read(self.fd, 4096)
                except OSError:
                    data = b""
                self.seen += data
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                Terminal.alive.remove(self.pid)
                try:
                    while select.select([self.fd], [], [], 0.2)[0]:
                        self.seen += os.read(self.fd, 4096)
                except OSError:
                    pass
                return os.waitstatus_to_exitcode(status), self.seen.decode("utf-8", errors="replace")
        os.kill(self.pid, 9)
        raise AssertionError(f"still running after {timeout} s: {self.seen[-800:]!r}")


@pytest.fixture(autouse=True)
def _kill_terminals():
    """A test that fails mid-conversation leaves no child running."""
    yield
    while Terminal.alive:
        pid = Terminal.alive.pop()
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


@pytest.mark.slow
def test_chat_banner_ctrl_c_stops_only_the_reply_then_exit(smollm2_path):
    term = Terminal("run", "-m", smollm2_path, "--chat", "-n", 400, "--ignore-eos", "-c", 2048, "--seed", 1)
    banner = term.read_until("> ")
    assert "/exit or Ctrl-D leaves" in banner and "Ctrl-C stops a reply" in banner
    term.type("Tell me a long story about a dragon.\n")
    term.read_until("dragon.\r\n")  # the echo of the line
    term.read_until(" ", timeout=120)  # the reply has begun
    time.sleep(1.0)
    term.type("\x03")  # Ctrl-C: stops this reply, not the chat
    stopped = term.read_until("(reply stopped)", timeout=60)  # fails (timeout) if the reply ran on to its end
    stopped += term.read_until("> ", timeout=60)  # and the next prompt
    assert "Traceback" not in stopped
    term.type("/exit\n")
    rc, rest = term.wait()
    assert rc == 0 and "Traceback" not in rest and "interrupted" not in rest


@pytest.mark.slow
def test_chat_next_turn_after_ctrl_c_and_ctrl_d_leaves_with_a_newline(smollm2_path):
    term = Terminal("run", "-m", smollm2_path, "--chat", "-n", 300, "--ignore-eos", "-c", 2048, "--seed", 2)
    term.read_until("> ")
    term.type("Write a poem about the sea.\n")
    term.read_until("sea.\r\n")
    term.read_until(" ", timeout=120)
    term.type("\x03")
    term.read_until("> ", timeout=60)
    term.type("What is 2 + 2?\n")
    term.read_until("2?\r\n")
    reply = term.read_until("> ", timeout=300)  # the next turn runs to its end (-n 300) and prompts again
    assert len(reply.strip()) > 20, reply
    term.type("\x04")  # Ctrl-D at the prompt
    rc, rest = term.wait()
    assert rc == 0 and rest.startswith(("\r\n", "\n")), repr(rest)
    assert "Traceback" not in rest


def test_chat_from_stdin_marks_each_turn(smollm2_path):
    rc, out, err = _cli("run", "-m", smollm2_path, "--chat", "--chat-stdin", "-n", 12, "--temp", 0,
                        stdin="Hello there.\nWhat is your name?\n")
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0] == "> Hello there." and "> What is your name?" in lines
    i = lines.index("> What is your name?")
    assert lines[i - 1] == "" and any(line.strip() for line in lines[1:i - 1])  # a reply, then a blank line


def test_chat_template_file_replaces_the_files_template(smollm2_path, tmp_path):
    """The chat renders through the given template: its reply is run's greedy completion of the
    template's text."""
    template = tmp_path / "t.jinja"
    template.write_text("<|im_start|>user\n{{ messages[-1]['content'] }} in one word?<|im_end|>\n"
                        "<|im_start|>assistant\nThe answer is")
    rc, out, err = _cli("run", "-m", smollm2_path, "--chat", "--chat-template-file", template, "-n", 6, "--temp", 0,
                        "Capital of France")
    assert rc == 0, err
    ref, _ = _run_json(smollm2_path, "-p", "<|im_start|>user\nCapital of France in one word?<|im_end|>\n"
                                            "<|im_start|>assistant\nThe answer is", "-n", 6, "--temp", 0)
    assert out.splitlines()[0] == ref["text"].split("\n")[0], (out, ref)
    rc, _, err = _cli("run", "-m", smollm2_path, "--chat", "--chat-template-file", tmp_path / "none.jinja", "x")
    one_line_error(rc, err, "none.jinja")


# -- perplexity ---------------------------------------------------------------------------------

def test_perplexity_help_states_the_default_it_uses():
    rc, out, _ = _cli("perplexity", "--help")
    assert rc == 0 and "default: 512" in " ".join(out.split())


def test_perplexity_progress_lines_when_piped_and_plus_minus(smollm2_path, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(texts.war_and_peace()[20_000:26_000])
    rc, out, err = _cli("perplexity", "-m", smollm2_path, "-f", text, "-c", 128, "--chunks", 2,
                        env={"QKVGGUF_PROGRESS_EVERY": "0"})
    assert rc == 0, err
    assert "qkvgguf: perplexity: 1 / 2 (50%) windows" in err and "qkvgguf: perplexity: done, 2 / 2" in err
    assert re.match(r"PPL = \d+\.\d{4} ± \d+\.\d{5}", out), out


# -- inspect ------------------------------------------------------------------------------------

def test_inspect_shapes_in_ggml_order_and_metadata_types(smollm2_path):
    rc, out, err = _cli("inspect", smollm2_path, "--tensors", "--metadata")
    assert rc == 0, err
    embd = next(line for line in out.splitlines() if line.strip().startswith("token_embd.weight"))
    assert "576, 49152" in embd and "49152x576" not in out  # gguf-dump's order: ne0 (the row) first
    block_count = next(line for line in out.splitlines() if line.strip().startswith("llama.block_count"))
    assert block_count.split()[1:] == ["uint32", "30"]
    tokens = next(line for line in out.splitlines() if line.strip().startswith("tokenizer.ggml.tokens"))
    assert "array[string] x 49,152" in tokens
    rc, out, _ = _cli("inspect", smollm2_path, "--json")
    data = json.loads(out)
    assert data["metadata_types"]["llama.rope.freq_base"] == "float32"
    assert data["metadata_types"]["tokenizer.ggml.merges"] == "array[string]"
    assert next(t for t in data["tensors"] if t["name"] == "token_embd.weight")["ne"] == [576, 49152]


def test_inspect_takes_a_demo_models_short_name(smollm2_path):
    """`inspect smollm2` reads the demo file, as `run -m smollm2` does."""
    rc, out, err = _cli("inspect", "smollm2", "--json")
    assert rc == 0, err
    by_name = json.loads(out)
    assert os.path.samefile(by_name["file"], smollm2_path)
    rc, out, err = _cli("inspect", smollm2_path, "--json")
    assert rc == 0, err
    assert by_name["totals"] == json.loads(out)["totals"]


def test_inspect_collapses_runs_of_identical_blocks(tiny_hf, tmp_path):
    out_file = tmp_path / "m.gguf"
    assert _cli("convert", tiny_hf, "-o", out_file, "--outtype", "q4_k_m", "--vocab-pre", "gpt-2")[0] == 0
    rc, out, _ = _cli("inspect", out_file)
    rows = [line.split()[0] for line in out.splitlines() if re.match(r"^\s+\d+(-\d+)?\s+F32", line)]
    assert rows == ["0", "1"]  # q4_k_m gives block 1's attn_v and ffn_down more bits: no run
    q8 = tmp_path / "q8.gguf"
    assert _cli("convert", tiny_hf, "-o", q8, "--outtype", "q8_0", "--vocab-pre", "gpt-2")[0] == 0
    rc, out, _ = _cli("inspect", q8)
    rows = [line.split()[0] for line in out.splitlines() if re.match(r"^\s+\d+(-\d+)?\s+F32", line)]
    assert rows == ["0-1"]


def test_inspect_a_hugging_face_folder_predicts_convert(tiny_hf, tmp_path):
    from qkvgguf import GGUFFile

    rc, out, err = _cli("inspect", tiny_hf)
    assert rc == 0, err
    assert "Hugging Face checkpoint" in out and "F32" in out and "q4_k_m" in out
    rc, out, _ = _cli("inspect", tiny_hf, "--json")
    data = json.loads(out)
    assert data["dtypes"] == [{"dtype": "F32", "n_tensors": 21, "n_elements": data["totals"]["n_elements"],
                               "n_bytes": 4 * data["totals"]["n_elements"]}]
    predicted = {o["outtype"]: o for o in data["outtypes"]}
    for outtype in ("q8_0", "q4_k_m"):
        path = tmp_path / f"{outtype}.gguf"
        assert _cli("convert", tiny_hf, "-o", path, "--outtype", outtype, "--vocab-pre", "gpt-2")[0] == 0
        g = GGUFFile(path)
        counts = {}
        for t in g.tensors.values():
            counts[t.type.name] = counts.get(t.type.name, 0) + 1
        assert predicted[outtype]["n_bytes"] == g.tensor_data_bytes and predicted[outtype]["types"] == counts
    rc, out, _ = _cli("inspect", tiny_hf, "--tensors")
    assert re.search(r"model\.layers\.0\.mlp\.down_proj\.weight\s+F32\s+96, 64\s+blk\.0\.ffn_down\.weight", out)


def test_run_on_a_hugging_face_folder_suggests_convert(tiny_hf, tmp_path):
    rc, _, err = _cli("run", "-m", tiny_hf, "hello")
    one_line_error(rc, err, str(tiny_hf), "is a folder", f"qkvgguf convert {tiny_hf}")
    rc, _, err = _cli("run", "-m", tmp_path, "hello")
    one_line_error(rc, err, "is a folder, not a GGUF file")


def test_plot_of_a_uniform_file_scales_by_the_quantized_tensors(smollm2_path, tmp_path):
    pytest.importorskip("matplotlib")
    import numpy as np
    from matplotlib.image import imread

    png = tmp_path / "p.png"
    rc, out, err = _cli("inspect", smollm2_path, "--plot", png, "--json")
    assert rc == 0, err
    p = json.loads(out)["plot"]
    lo, hi = p["scale_bits"]
    assert lo < 5.0 < hi < 16  # the Q4_1 cells mid-scale, not at the bottom of a 5..32 range
    assert p["colours"]["F32"] == p["float_colour"] != p["colours"]["Q4_1"]
    assert p["panels"][0].startswith("(a)") and p["panels"][1].startswith("(b)")
    pixels = (imread(png)[..., :3] * 255).round().astype(int).reshape(-1, 3)
    for colour in (p["colours"]["F32"], p["colours"]["Q4_1"]):
        rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(pixels - rgb).max(axis=1) <= 1).sum() > 1000, colour  # both drawn, as large areas


# -- convert ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    """A 2-layer llama Hugging Face folder (random weights, a byte-level BPE tokenizer: --vocab-pre gpt-2)."""
    from test_convert import hf_model, write_bpe

    folder = tmp_path_factory.mktemp("tiny-llama")
    hf_model("llama").save_pretrained(folder)
    write_bpe(folder)
    return folder


def _fresh(tiny_hf, tmp_path) -> Path:
    """A copy of the folder (convert writes its default output into it)."""
    import shutil

    dst = tmp_path / "tiny"
    shutil.copytree(tiny_hf, dst)
    return dst


def test_convert_names_the_output_as_llamacpp_and_follows_the_umask(tiny_hf, tmp_path):
    from qkvgguf import GGUFFile

    folder = _fresh(tiny_hf, tmp_path)
    rc, _, err = _cli("convert", folder, "--outtype", "Q4_K_M", "--vocab-pre", "gpt-2", umask=0o022)
    assert rc == 0, err
    out = folder / "tiny-Q4_K_M.gguf"
    assert out.is_file() and stat.S_IMODE(out.stat().st_mode) == 0o644
    g = GGUFFile(out)
    n_elements = sum(t.n_elements for t in g.tensors.values())
    assert f"{8 * g.tensor_data_bytes / n_elements:.2f} bits per weight" in err.splitlines()[-1]
    rc, _, err = _cli("convert", folder, "--outtype", "q8_0", "--vocab-pre", "gpt-2", umask=0o027)
    assert rc == 0 and stat.S_IMODE((folder / "tiny-Q8_0.gguf").stat().st_mode) == 0o640


def test_convert_warns_once_per_kind_of_fallback(tiny_hf, tmp_path):
    from qkvgguf import GGUFFile

    rc, _, err = _cli("convert", tiny_hf, "-o", tmp_path / "m.gguf", "--outtype", "q4_k_m", "--vocab-pre", "gpt-2")
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if "not a multiple of" in line]
    assert len(warnings) == 2, err  # Q4_K -> Q5_0 and Q6_K -> Q8_0, however many tensors each
    n_fell_back = sum(int(w.split()[1]) for w in warnings)
    assert n_fell_back == 15 and "15 tensors fell back" in err
    counts = {}
    for t in GGUFFile(tmp_path / "m.gguf").tensors.values():
        counts[t.type.name] = counts.get(t.type.name, 0) + 1
    assert f"{counts['Q5_0']} tensors with rows of 64, 96" in warnings[0]
    rc, _, err = _cli("convert", tiny_hf, "-o", tmp_path / "v.gguf", "--outtype", "q4_k_m", "--vocab-pre", "gpt-2",
                      "-v")
    assert sum("is not a multiple of" in line for line in err.splitlines()) == 15  # -v: one line per tensor


def test_convert_auto_announces_its_stages_and_reports_progress_when_piped(tiny_hf, tmp_path):
    rc, _, err = _cli("convert", tiny_hf, "-o", tmp_path / "a.gguf", "--outtype", "auto", "--target-bpw", 6,
                      "--calib-chunks", 2, "--vocab-pre", "gpt-2", env={"QKVGGUF_PROGRESS_EVERY": "0"})
    assert rc == 0, err
    lines = err.splitlines()
    starts = [line for line in lines if line.startswith("qkvgguf: stage ")]
    assert [s.split(":")[1].strip() for s in starts] == ["stage 1/4", "stage 2/4", "stage 3/4", "stage 4/4"]
    for name in ("f16 copy", "calibrating", "measuring", "converting"):
        assert any(line.startswith(f"qkvgguf: {name}: done, ") for line in lines), name
    assert "qkvgguf: calibrating: 1 / 2 (50%) chunks" in err
    assert re.search(r"qkvgguf: converting: .* KiB / .* KiB \(\d+%\), .*iB/s", err)
    assert lines[-1].startswith("qkvgguf: wrote ") and "bits per weight" in lines[-1]


def test_convert_bar_on_a_terminal_counts_mib_and_closes_each_stage(tiny_hf, tmp_path):
    term = Terminal("convert", tiny_hf, "-o", tmp_path / "a.gguf", "--outtype", "auto", "--target-bpw", 6,
                    "--calib-chunks", 2, "--vocab-pre", "gpt-2")
    rc, out = term.wait(timeout=300)
    assert rc == 0, out
    assert "MiB/s" in out and not re.search(r"\d ?(kB|MB|GB|kiB)\b", out)  # binary units, named as such
    # each stage's bar ends at 100% before the next stage starts, and none is redrawn after that
    done = re.findall(r"(f16 copy|calibrating|measuring|converting): 100%", out)
    assert [m for i, m in enumerate(done) if i == 0 or done[i - 1] != m] == [
        "f16 copy", "calibrating", "measuring", "converting"], out


# -- bench --------------------------------------------------------------------------------------

def test_bench_markdown_table_csv_and_json(smollm2_path):
    rc, out, err = _cli("bench", "-m", smollm2_path, "-p", 16, "-n", 4, "-r", 3)
    assert rc == 0, err
    lines = out.strip().splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[-2:] == ["test", "t/s"] and re.fullmatch(r"\|( -+:? \|)+", lines[1]), lines[:2]
    rows = {r.split("|")[-3].strip(): r.split("|")[-2].strip() for r in lines[2:]}
    assert set(rows) == {"pp16", "tg4 @ d16"} and all(re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d", v) for v in rows.values())
    rc, out, err = _cli("bench", "-m", smollm2_path, "-p", "8,16", "-n", 2, "-r", 2, "-ctk", "f16,q8_0", "--csv")
    assert rc == 0, err
    table = list(csv.DictReader(io.StringIO(out)))
    assert sorted((r["test"], r["type_k"]) for r in table) == sorted(
        [(t, k) for t in ("pp8", "pp16", "tg2 @ d8", "tg2 @ d16") for k in ("f16", "q8_0")])
    assert all(len(r["samples_ts"].split(";")) == 2 and float(r["avg_ts"]) > 0 for r in table)
    rc, out, err = _cli("bench", "-m", smollm2_path, "-p", 8, "-n", 2, "-r", 2, "--json")
    r = json.loads(out)  # one combination: one object
    assert r["repetitions"] == 2 and len(r["prompt_samples_tokens_per_s"]) == 2
    assert r["prompt_tokens_per_s"] == pytest.approx(sum(r["prompt_samples_tokens_per_s"]) / 2)
    rc, _, err = _cli("bench", "-m", smollm2_path, "-ctk", "f16,q8_0,q4_0", "-ctv", "f16,q8_0")
    one_line_error(rc, err, "-ctk lists 3 types and -ctv 2")
