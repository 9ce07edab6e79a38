"""Hostile files and flags (issue 19): every case ends in exit 2 with one line on stderr and no
traceback, within a bounded time and under an address-space limit; file-supplied strings never
reach the terminal unescaped; an interrupted conversion leaves nothing behind.

The files are crafted here from benchmarks/fuzz.py's tiny valid model and folder (one edit each,
the exact cases the issue names). Each command line runs in a forked child of this process
(`cli`), which costs milliseconds instead of a fresh interpreter's seconds: the child sets
RLIMIT_AS, swaps in a strict UTF-8 stdout/stderr, calls `qkvgguf.cli.main(argv)` and prints a
traceback exactly as the interpreter would for anything main() lets escape. A few cases run the
real `python -m qkvgguf` too (signals, the interpreter's own error path).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_errors import one_line_error

ROOT = Path(__file__).resolve().parent.parent
MEMORY_LIMIT = 6 << 30  # address space of a child on top of what this process maps


def _fuzz():
    """benchmarks/fuzz.py loaded by path (benchmarks/ is not a package on sys.path)."""
    spec = importlib.util.spec_from_file_location("qkvgguf_fuzz", ROOT / "benchmarks" / "fuzz.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


fuzz = _fuzz()


def cli(*argv: str, timeout: float = 60.0) -> tuple[int, str, str]:
    """`qkvgguf ARGV` in a forked child under RLIMIT_AS with strict UTF-8 streams (fuzz.forked_cli):
    (rc, stdout, stderr), the output decoded strictly. A child that outlives `timeout` is killed and
    the test fails (a hang)."""
    rc, out, err = fuzz.forked_cli(list(argv), timeout, MEMORY_LIMIT, errors="strict")
    if rc is None:
        pytest.fail(f"qkvgguf {' '.join(argv)} hung (over {timeout} s)")
    return rc, out, err


def _strict_line(err: str) -> str:
    """The error line, checked to be plain text: no control characters (ANSI escapes), no
    surrogates, valid UTF-8 (already: the child's stderr was strict)."""
    line = err.strip()
    bad = [c for c in line if not c.isprintable()]
    assert not bad, f"unescaped characters {bad!r} in {line!r}"
    return line


# ---- crafted GGUF files ---------------------------------------------------------------------------------

def write_model(path: Path, set_kv: dict | None = None, drop: tuple = (), tensors=None, kvs=None) -> str:
    """The fuzzer's tiny model with edits: set_kv {key: (vtype, value)}, drop (keys or tensor names),
    tensors: a function over the tensor list."""
    base_kvs, base_tensors = fuzz.base_model()
    kvs = list(kvs if kvs is not None else base_kvs)
    for key, (vtype, value) in (set_kv or {}).items():
        kvs = [kv for kv in kvs if kv[0] != key] + [(key, vtype, value)]
    kvs = [kv for kv in kvs if kv[0] not in drop]
    ts = [t for t in base_tensors if t[0] not in drop]
    if tensors is not None:
        ts = tensors(ts)
    path.write_bytes(fuzz.gguf_bytes(kvs, ts))
    return str(path)


def _reshape(name: str, ne: list[int]):
    def edit(ts):
        out = []
        for n, gtype, old, data in ts:
            if n == name:
                block, size = fuzz._BLOCK[gtype]
                out.append((n, gtype, ne, bytes(math.prod(ne) // block * size)))
            else:
                out.append((n, gtype, old, data))
        return out

    return edit


def _rename(old: str, new: str):
    return lambda ts: [(new if n == old else n, g, ne, d) for n, g, ne, d in ts]


RUN = ("run", "-n", "2", "--temp", "0", "-c", "32", "-t", "1")

F = fuzz
GGUF_RUN_CASES = {  # id: (edits, words the one error line must contain)
    "missing_tensor": (dict(drop=("blk.1.ffn_down.weight",)), ["'blk.1.ffn_down.weight'", "missing"]),
    "shape_contradicts_config": (dict(tensors=_reshape("blk.0.attn_q.weight", [32, 16])),
                                 ["'blk.0.attn_q.weight'", "shape (16, 32)", "expected (32, 32)"]),
    "kv_shape_contradicts_config": (dict(tensors=_reshape("blk.1.attn_v.weight", [32, 32])),
                                    ["'blk.1.attn_v.weight'", "expected (16, 32)"]),
    "3d_projection": (dict(tensors=_reshape("blk.0.ffn_up.weight", [32, 64, 1])), ["'blk.0.ffn_up.weight'"]),
    "head_count_0": (dict(set_kv={"llama.attention.head_count": (F.U32, 0)}), ["head_count", "= 0"]),
    "head_count_kv_indivisible": (dict(set_kv={"llama.attention.head_count_kv": (F.U32, 3)}), ["head_count"]),
    "eps_nan": (dict(set_kv={"llama.attention.layer_norm_rms_epsilon": (F.F32, float("nan"))}), ["epsilon", "nan"]),
    "freq_base_inf": (dict(set_kv={"llama.rope.freq_base": (F.F32, float("inf"))}), ["freq_base", "inf"]),
    "freq_base_string": (dict(set_kv={"llama.rope.freq_base": (F.STR, "abc")}), ["freq_base", "number", "'abc'"]),
    "block_count_string": (dict(set_kv={"llama.block_count": (F.STR, "2")}), ["block_count", "integer"]),
    "block_count_float": (dict(set_kv={"llama.block_count": (F.F32, 2.0)}), ["block_count", "integer"]),
    "block_count_minus_1": (dict(set_kv={"llama.block_count": (F.I32, -1)}), ["block_count", "-1"]),
    "block_count_2_31": (dict(set_kv={"llama.block_count": (F.U32, 2**31 - 1)}), ["block_count", "2,147,483,647"]),
    "block_count_2_64": (dict(set_kv={"llama.block_count": (F.U64, 2**64 - 1)}), ["block_count"]),
    "block_count_3": (dict(set_kv={"llama.block_count": (F.U32, 3)}), ["'blk.2.attn_norm.weight'", "missing"]),
    "context_length_2_63": (dict(set_kv={"llama.context_length": (F.U64, 2**63)}), ["context_length"]),
    "embedding_length_array": (dict(set_kv={"llama.embedding_length": (F.ARR, (F.U32, [32, 64]))}),
                               ["embedding_length"]),
    "architecture_array": (dict(set_kv={"general.architecture": (F.ARR, (F.STR, ["llama"]))}),
                           ["general.architecture"]),
    "unsupported_tensor_type": (dict(tensors=lambda ts: [(n, 39 if n == "blk.0.attn_q.weight" else g, ne, d)
                                                         for n, g, ne, d in ts]), ["'blk.0.attn_q.weight'"]),
    "chat_template_not_string": (dict(set_kv={"tokenizer.chat_template": (F.U32, 7)}), ["chat_template"]),
}


@pytest.mark.parametrize("case", sorted(GGUF_RUN_CASES))
def test_crafted_gguf_run(tmp_path, case):
    edits, needles = GGUF_RUN_CASES[case]
    path = write_model(tmp_path / f"{case}.gguf", **edits)
    t0 = time.monotonic()
    rc, out, err = cli(*RUN, "-m", path, "Hello")
    one_line_error(rc, err, *needles)
    _strict_line(err)
    assert time.monotonic() - t0 < 30


def test_the_crafting_is_sound(tmp_path):
    """The unmutated file runs (so each case above fails for its edit, not for the base)."""
    rc, out, err = cli(*RUN, "-m", write_model(tmp_path / "ok.gguf"), "Hello")
    assert rc == 0, err
    assert out.startswith("Hello")


INSPECT_CASES = {
    "freq_base_string": {"llama.rope.freq_base": (F.STR, "abc\n\x1b[31m")},
    "context_length_array": {"llama.context_length": (F.ARR, (F.U32, [1, 2, 3]))},
    "auto_of_wrong_type": {"qkvgguf.version": (F.STR, "0"), "qkvgguf.auto.bpw": (F.STR, "x"),
                           "qkvgguf.auto.layer_bpw": (F.ARR, (F.STR, ["a"])),
                           "qkvgguf.auto.weighted_error": (F.ARR, (F.U32, [1]))},
    "vocab_size_string": {"llama.vocab_size": (F.STR, "many"), "tokenizer.ggml.tokens": (F.U32, 3)},
    "name_with_escapes": {"general.name": (F.STR, "evil\x1b]0;title\x07\n\udcff")},
}


@pytest.mark.parametrize("case", sorted(INSPECT_CASES))
@pytest.mark.parametrize("json_out", [False, True])
def test_inspect_survives_mistyped_metadata(tmp_path, case, json_out):
    path = write_model(tmp_path / f"{case}.gguf", set_kv=INSPECT_CASES[case])
    rc, out, err = cli("inspect", path, "--metadata", "--tensors", *(["--json"] if json_out else []))
    assert rc == 0, err
    assert "\x1b" not in out and "\x07" not in out  # escaped, not sent to the terminal
    if json_out:
        json.loads(out)


def test_invalid_utf8_token_keeps_its_bytes(tmp_path):
    """A token whose text is not UTF-8 loads (llama.cpp keeps token bytes as they are): its bytes
    come back from token_to_bytes, decode() shows U+FFFD, and `run` prints valid UTF-8."""
    from qkvgguf.gguf_file import GGUFFile
    from qkvgguf.tokenizer import Tokenizer

    kvs, _ = fuzz.base_model()
    toks = list(dict(((k, v) for k, _, v in kvs))["tokenizer.ggml.tokens"][1])
    i = toks.index("\u2581world")
    toks[i] = "\udcff\udcfeq"  # the bytes ff fe 71
    path = write_model(tmp_path / "utf8.gguf", set_kv={"tokenizer.ggml.tokens": (F.ARR, (F.STR, toks))})
    tok = Tokenizer.from_gguf(GGUFFile(path))
    assert tok.token_to_bytes(i) == b"\xff\xfeq"
    assert tok.decode([i]) == "\ufffd\ufffdq"
    rc, out, err = cli(*RUN, "-m", path, "Hello")
    assert rc == 0, err


def test_names_with_newlines_and_ansi_are_escaped(tmp_path):
    """A tensor name with a newline and an ANSI escape, echoed in an error: one line, escaped."""
    path = write_model(tmp_path / "names.gguf", tensors=_rename("blk.0.attn_q.weight", "blk.0.attn_q.weight\n\x1b[2J"))
    rc, out, err = cli(*RUN, "-m", path, "Hello")
    one_line_error(rc, err, "'blk.0.attn_q.weight'", "missing")
    # the duplicate-key path echoes the key itself
    kvs, tensors = fuzz.base_model()
    evil = "evil\n\x1b[31mkey\udcff"
    Path(tmp_path / "dup.gguf").write_bytes(fuzz.gguf_bytes(kvs + [(evil, F.U32, 1), (evil, F.U32, 2)], tensors))
    rc, out, err = cli(*RUN, "-m", str(tmp_path / "dup.gguf"), "Hello")
    one_line_error(rc, err, "evil\\n\\x1b[31mkey\\xff", "appears twice")
    _strict_line(err)


TEMPLATES = {
    "recursive_macro": ("{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}", "nesting depth"),
    "nested_ranges": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "steps"),
    "huge_string": ("{{ 'x' * 3000000000 }}", "items"),
    "doubling": ("{% set ns = namespace(a='x') %}{% for i in range(64) %}{% set ns.a = ns.a ~ ns.a %}"
                 "{% endfor %}{{ ns.a }}", "items"),
}


@pytest.mark.parametrize("case", sorted(TEMPLATES))
def test_chat_template_limits(tmp_path, case):
    template, limit = TEMPLATES[case]
    path = write_model(tmp_path / f"{case}.gguf", set_kv={"tokenizer.chat_template": (F.STR, template)})
    t0 = time.monotonic()
    rc, out, err = cli(*RUN, "-m", path, "--chat", "Hello", timeout=60)
    one_line_error(rc, err, "chat template stopped", limit)
    assert time.monotonic() - t0 < 40
    rc, out, err = cli(*RUN, "-m", path, "Hello")  # without --chat the template is never rendered
    assert rc == 0, err


def test_model_paths_that_are_not_files(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, words in ((tmp_path, "is a folder, not a GGUF file"), (fifo, "not a regular file"), ("/dev/zero", "not a regular file"),
                        (tmp_path / "nope.gguf", "no such file")):
        rc, out, err = cli(*RUN, "-m", str(path), "Hello", timeout=30)
        one_line_error(rc, err, words)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_model(tmp_path):
    path = Path(write_model(tmp_path / "locked.gguf"))
    path.chmod(0)
    try:
        rc, out, err = cli(*RUN, "-m", str(path), "Hello")
        one_line_error(rc, err, "cannot read")
    finally:
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)


FLAG_CASES = {
    "threads_100000": (("run", "-t", "100000", "x"), "-t/--threads"),
    "temp_nan": (("run", "--temp", "nan", "x"), "--temp"),
    "temp_negative": (("run", "--temp", "-1", "x"), "--temp"),
    "seed_2_70": (("run", "--seed", str(2**70), "x"), "--seed"),
    "top_p_2": (("run", "--top-p", "2", "x"), "--top-p"),
    "min_p_5": (("run", "--min-p", "5", "x"), "--min-p"),
    "top_k_negative": (("run", "--top-k", "-1", "x"), "--top-k"),
    "ctx_huge": (("run", "-c", str(2**40), "x"), "-c/--ctx-size"),
    "chunks_negative": (("perplexity", "-f", __file__, "--chunks", "-1"), "--chunks"),
    "plot_no_dir": (("inspect", "MODEL", "--plot", "/no/such/dir/p.png"), "/no/such/dir"),
    "target_bpw_nan": (("convert", "/nonexistent", "-o", "/tmp/x.gguf", "--outtype", "auto", "--target-bpw", "nan"),
                       "--target-bpw"),
    "argparse_type": (("run", "--temp", "warm", "x"), "--temp"),
    "argparse_unknown": (("run", "--bogus", "x"), "--bogus"),
    "argparse_missing": (("inspect",), "file"),
}


@pytest.mark.parametrize("case", sorted(FLAG_CASES))
def test_flags_out_of_range(tmp_path, case):
    argv, needle = FLAG_CASES[case]
    model = write_model(tmp_path / "m.gguf")
    rc, out, err = cli(*[model if a == "MODEL" else a for a in argv], timeout=30)
    one_line_error(rc, err, needle)


def test_argparse_error_in_a_real_interpreter():
    p = subprocess.run([sys.executable, "-m", "qkvgguf", "run", "--top-k", "many", "x"], capture_output=True,
                       text=True, timeout=120)
    one_line_error(p.returncode, p.stderr, "--top-k", "--help")


# ---- crafted Hugging Face folders ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_base(tmp_path_factory) -> Path:
    return fuzz.base_hf_folder(tmp_path_factory.mktemp("hf") / "base")


def _copy(base: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(base, dest)
    return dest


def _config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


def _header(folder: Path, edit) -> None:
    fuzz._st_rewrite(folder / "model.safetensors", edit)


def _tok(folder: Path, edit) -> None:
    tj = json.loads((folder / "tokenizer.json").read_text())
    edit(tj)
    (folder / "tokenizer.json").write_text(json.dumps(tj))


def _set(d: dict, key, value):
    d[key] = value


Q = "model.layers.0.self_attn.q_proj.weight"


def _nan_weight(folder: Path) -> None:
    raw = bytearray((folder / "model.safetensors").read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    begin = header[Q]["data_offsets"][0]
    raw[8 + n + begin + 40:8 + n + begin + 44] = struct.pack("<f", float("nan"))
    (folder / "model.safetensors").write_bytes(bytes(raw))


def _drop_tensor(name: str):
    """Rewrite model.safetensors without `name` (a valid file: the data is rebuilt)."""
    def edit(folder: Path) -> None:
        from safetensors.numpy import load_file, save_file

        state = load_file(str(folder / "model.safetensors"))
        del state[name]
        save_file(state, str(folder / "model.safetensors"))

    return edit


def _swap_shape(name: str, shape):
    return lambda f: _header(f, lambda h: _set(h[name], "shape", shape))


CONVERT_CASES = {  # id: (edit of the folder, words of the error line)
    "offsets_strings": (lambda f: _header(f, lambda h: _set(h[Q], "data_offsets", [str(o) for o in h[Q]["data_offsets"]])),
                        ["data_offsets", "integers"]),
    "offsets_floats": (lambda f: _header(f, lambda h: _set(h[Q], "data_offsets", [float(o) for o in h[Q]["data_offsets"]])),
                       ["data_offsets"]),
    "negative_shape": (_swap_shape(Q, [-32, -32]), ["shape"]),
    "float_shape": (_swap_shape(Q, [32.0, 32.0]), ["shape"]),
    "3d_projection": (_swap_shape(Q, [1, 32, 32]), ["shape (1, 32, 32)", "expected (32, 32)"]),
    "overlap": (lambda f: _header(f, lambda h: _set(h["model.layers.0.self_attn.k_proj.weight"], "data_offsets",
                                                    h["model.layers.0.self_attn.v_proj.weight"]["data_offsets"])),
                ["overlap"]),
    "shard_name_not_string": (lambda f: (f / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": 3}})), ["shard name"]),
    "shard_name_escapes": (lambda f: (f / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "../../etc/passwd"}})), ["shard name"]),
    "config_invalid_utf8": (lambda f: (f / "config.json").write_bytes(b'{"architectures": ["\xff"]}'), ["UTF-8"]),
    "zero_heads": (lambda f: _config(f, num_attention_heads=0), ["num_attention_heads"]),
    "negative_kv_heads": (lambda f: _config(f, num_key_value_heads=-2), ["num_key_value_heads"]),
    "indivisible_heads": (lambda f: _config(f, num_key_value_heads=3), ["not a multiple"]),
    "rope_theta_string": (lambda f: _config(f, rope_theta="abc"), ["rope_theta", "'abc'"]),
    "rope_scaling_no_factor": (lambda f: _config(f, rope_scaling={"type": "linear"}), ["factor"]),
    "rope_parameters_list": (lambda f: _config(f, rope_parameters=[1, 2]), ["rope_parameters"]),
    "intermediate_size_0": (lambda f: _config(f, intermediate_size=0), ["intermediate_size"]),
    "tie_string_false": (lambda f: _config(f, tie_word_embeddings="false"), ["tie_word_embeddings"]),
    "projection_contradicts_config": (lambda f: _config(f, num_key_value_heads=4), ["k_proj", "expected (32, 32)"]),
    "missing_norm": (_drop_tensor("model.norm.weight"), ["output_norm.weight", "missing"]),
    "missing_lm_head": (_drop_tensor("lm_head.weight"), ["lm_head.weight", "tie_word_embeddings"]),
    "nan_weight": (_nan_weight, [Q, "NaN", "--allow-nonfinite"]),
    "token_id_string": (lambda f: _tok(f, lambda t: _set(t["model"]["vocab"], next(iter(t["model"]["vocab"])), "x")),
                        ["model.vocab", "'x'"]),
    "added_token_without_content": (lambda f: _tok(f, lambda t: _set(t, "added_tokens", [{"id": 5}])), ["content"]),
    "merges_of_ints": (lambda f: _tok(f, lambda t: _set(t["model"], "merges", [[1, 2], [3, 4]])), ["merges"]),
    "post_processor_malformed": (lambda f: _tok(f, lambda t: _set(t, "post_processor", {"processors": [1]})),
                                 ["post_processor"]),
    "chat_template_broken": (lambda f: (f / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": "{% if %}"})), ["chat_template", "does not parse"]),
    "chat_template_not_string": (lambda f: (f / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": 3})), ["chat_template", "string"]),
}


@pytest.mark.parametrize("case", sorted(CONVERT_CASES))
def test_crafted_folder_convert(hf_base, tmp_path, case):
    edit, needles = CONVERT_CASES[case]
    folder = _copy(hf_base, tmp_path / case)
    edit(folder)
    out = tmp_path / "out.gguf"
    rc, _, err = cli("convert", str(folder), "-o", str(out), "--outtype", "q8_0", "--vocab-pre", "gpt-2")
    one_line_error(rc, err, *needles)
    _strict_line(err)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == [case]  # no temporary file either


def test_base_folder_converts_and_nonfinite_is_allowed_on_request(hf_base, tmp_path):
    folder = _copy(hf_base, tmp_path / "nan")
    _nan_weight(folder)
    out = tmp_path / "out.gguf"
    rc, _, err = cli("convert", str(folder), "-o", str(out), "--outtype", "f16", "--vocab-pre", "gpt-2",
                     "--allow-nonfinite")
    assert rc == 0, err
    rc, _, err = cli("convert", str(hf_base), "-o", str(tmp_path / "ok.gguf"), "--vocab-pre", "gpt-2")
    assert rc == 0, err
    rc, out, err = cli(*RUN, "-m", str(tmp_path / "ok.gguf"), "Happy")
    assert rc == 0, err


# ---- interrupted conversions ------------------------------------------------------------------------

def _slow_folder(base: Path, dest: Path) -> Path:
    """The base folder with a large embedding, so a conversion is still writing when it is signalled."""
    from safetensors.numpy import load_file, save_file
    import numpy as np

    folder = _copy(base, dest)
    state = load_file(str(folder / "model.safetensors"))
    vocab = 200_000
    rng = np.random.default_rng(0)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name] = rng.standard_normal((vocab, 32)).astype(np.float32)
    save_file(state, str(folder / "model.safetensors"))
    _config(folder, vocab_size=vocab)
    return folder


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_signal_during_convert_then_rerun_leaves_only_the_output(hf_base, tmp_path, sig):
    folder = _slow_folder(hf_base, tmp_path / "src")
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "model.gguf"
    argv = [sys.executable, "-m", "qkvgguf", "convert", str(folder), "-o", str(out), "--outtype", "q4_0",
            "--vocab-pre", "gpt-2"]
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(outdir.iterdir()):  # the temporary file appears once writing starts
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.3)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0
    if sig == signal.SIGTERM:  # cleaned up by the process itself
        assert "Traceback" not in err
        assert list(outdir.iterdir()) == []
    else:  # nothing could clean up: the temporary file names its dead writer
        left = [q.name for q in outdir.iterdir()]
        assert len(left) == 1 and left[0].startswith(".model.gguf.qkvgguf-"), left
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert [q.name for q in outdir.iterdir()] == ["model.gguf"]


# ---- the fuzzer in CI -------------------------------------------------------------------------------

def test_fuzz_gguf_in_process(tmp_path):
    """A seeded, bounded run of benchmarks/fuzz.py's GGUF mutations: every outcome is success or one
    of our errors on one line (no other exception, no hang, no allocation past the limit)."""
    import logging

    logging.disable(logging.WARNING)
    try:
        result = fuzz.run_gguf(2000, seed=19, timeout=20.0, folder=str(tmp_path))
    finally:
        logging.disable(logging.NOTSET)
    assert set(result["outcomes"]) <= {"ok", "error"}, result["failures"][:5]
    assert result["outcomes"].get("ok", 0) > 200 and result["outcomes"].get("error", 0) > 1000


def test_fuzz_convert_in_process(tmp_path):
    import logging

    logging.disable(logging.WARNING)
    try:
        result = fuzz.run_convert(100, seed=19, timeout=60.0, folder=str(tmp_path))
    finally:
        logging.disable(logging.NOTSET)
    assert set(result["outcomes"]) <= {"ok", "error"}, result["failures"][:5]
