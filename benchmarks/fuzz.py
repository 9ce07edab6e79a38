"""Fuzz qkvgguf with hostile files, as an attacker or a careless user would (issue 19).

    python benchmarks/fuzz.py --cases 20000 --cli 300 --convert 200 --seed 0 --out benchmarks/results/fuzz.json

Three runs, each over a small valid input built here (no download, no model package needed):

- `--cases N`: GGUF files mutated in-process (half structured: a metadata value of another type or
  a hostile value, a tensor dropped, reshaped, retyped or renamed, a token or chat template made
  hostile; half bytes: flipped, overwritten with boundary integers, truncated), each taken through
  everything a user can reach: GGUFFile, inspect's summary and text view, ModelConfig, Tokenizer,
  Model, a forward pass, encode/decode and the chat template;
- `--cli N`: such files through the command line (`inspect`, `inspect --json`, `run`) in a
  subprocess with a strict UTF-8 stdout;
- `--convert N`: corrupted Hugging Face folders (config.json, safetensors headers, tokenizer files,
  NaN weights) through `convert()`, and each file it writes through the runtime.

An outcome is good when it succeeds or raises a QkvggufError whose message is one line (a CLI run:
exit 0, or exit 2 with one stderr line and no traceback). Bad outcomes, counted and listed with the
mutation that caused them: any other exception, a message spanning lines, a hang (a case over
`--timeout` s) and an allocation over the limit (the process runs under RLIMIT_AS: a MemoryError).
The test suite runs a bounded number of in-process cases with the same code (tests/test_hostile.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import resource
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

# ---- GGUF files, written byte by byte (so that any type can go anywhere) ------------------------------

U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12
_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?", U64: "<Q",
        I64: "<q", F64: "<d"}
GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q8_0 = 0, 1, 2, 8
_BLOCK = {GGML_F32: (1, 4), GGML_F16: (1, 2), GGML_Q4_0: (32, 18), GGML_Q8_0: (32, 34)}


def _str(s) -> bytes:
    b = s if isinstance(s, bytes) else s.encode("utf-8", "surrogateescape")
    return struct.pack("<Q", len(b)) + b


def _value(vtype: int, value) -> bytes:
    if vtype == STR:
        return _str(value)
    if vtype == ARR:
        etype, items = value
        return struct.pack("<IQ", etype, len(items)) + b"".join(_value(etype, v) for v in items)
    return struct.pack(_FMT[vtype], value)


def gguf_bytes(kvs: list, tensors: list, alignment: int = 32) -> bytes:
    """kvs: [(key, vtype, value)], arrays as (ARR, (etype, items)); tensors: [(name, ggml type,
    ne (ggml order: row length first), data bytes)]. Offsets are laid out from the data lengths."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)))
    for key, vtype, value in kvs:
        out += _str(key) + struct.pack("<I", vtype) + _value(vtype, value)
    offset = 0
    for name, gtype, ne, data in tensors:
        out += _str(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
        out += struct.pack("<IQ", gtype, offset)
        offset += -(-len(data) // alignment) * alignment
    out += bytes(-len(out) % alignment)
    for _, _, _, data in tensors:
        out += data + bytes(-len(data) % alignment)
    return bytes(out)


def _tensor_bytes(rng: np.random.Generator, gtype: int, ne: list[int]) -> bytes:
    n = math.prod(ne)
    if gtype == GGML_F32:
        return (rng.standard_normal(n) * 0.2 + (1.0 if len(ne) == 1 else 0.0)).astype("<f4").tobytes()
    if gtype == GGML_F16:
        return (rng.standard_normal(n) * 0.2).astype("<f2").tobytes()
    from qkvgguf.quants import quantize
    from gguf import GGMLQuantizationType as T

    values = (rng.standard_normal(n) * 0.2).astype(np.float32).reshape(-1, ne[0])
    return np.asarray(quantize(values, T(gtype))).tobytes()


TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"


def base_model(seed: int = 0) -> tuple[list, list]:
    """A tiny valid llama GGUF (2 layers, width 32, 4 heads / 2 KV heads, an SPM vocabulary of 3
    specials, 256 byte tokens and a few words), as (kvs, tensors) for gguf_bytes."""
    rng = np.random.default_rng(seed)
    words = ["\u2581the", "\u2581a", "\u2581Hello", "\u2581world", "he", "ll", "o", "\u2581", "<|user|>", "<|assistant|>"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + words
    types = [2, 3, 3] + [6] * 256 + [1] * (len(words) - 2) + [3, 3]
    scores = [0.0] * 259 + [-float(i) for i in range(len(words))]
    n_vocab, e, ff, hd = len(tokens), 32, 64, 8
    kvs = [
        ("general.architecture", STR, "llama"), ("general.name", STR, "fuzz"), ("general.file_type", U32, 7),
        ("llama.block_count", U32, 2), ("llama.context_length", U32, 64), ("llama.embedding_length", U32, e),
        ("llama.feed_forward_length", U32, ff), ("llama.attention.head_count", U32, 4),
        ("llama.attention.head_count_kv", U32, 2), ("llama.attention.layer_norm_rms_epsilon", F32, 1e-5),
        ("llama.rope.freq_base", F32, 10000.0), ("llama.rope.dimension_count", U32, hd),
        ("tokenizer.ggml.model", STR, "llama"), ("tokenizer.ggml.tokens", ARR, (STR, tokens)),
        ("tokenizer.ggml.scores", ARR, (F32, scores)), ("tokenizer.ggml.token_type", ARR, (I32, types)),
        ("tokenizer.ggml.bos_token_id", U32, 1), ("tokenizer.ggml.eos_token_id", U32, 2),
        ("tokenizer.chat_template", STR, TEMPLATE),
    ]
    tensors = [("token_embd.weight", GGML_Q8_0, [e, n_vocab]), ("output_norm.weight", GGML_F32, [e]),
               ("output.weight", GGML_Q4_0, [e, n_vocab])]
    for i in range(2):
        p = f"blk.{i}."
        tensors += [(p + "attn_norm.weight", GGML_F32, [e]), (p + "attn_q.weight", GGML_Q8_0, [e, 4 * hd]),
                    (p + "attn_k.weight", GGML_F16, [e, 2 * hd]), (p + "attn_v.weight", GGML_Q4_0, [e, 2 * hd]),
                    (p + "attn_output.weight", GGML_Q8_0, [4 * hd, e]), (p + "ffn_norm.weight", GGML_F32, [e]),
                    (p + "ffn_gate.weight", GGML_Q4_0, [e, ff]), (p + "ffn_up.weight", GGML_F32, [e, ff]),
                    (p + "ffn_down.weight", GGML_Q8_0, [ff, e])]
    return kvs, [(n, t, ne, _tensor_bytes(rng, t, ne)) for n, t, ne in tensors]


# ---- mutations --------------------------------------------------------------------------------------------

BAD_STRINGS = ["", "abc", "nan", "a\nb", "\x1b[31mred\x1b[0m", "\udcff\udcfe", "x" * 5000, "\u202eevil", "0"]
BAD_INTS = [0, 1, -1, 2, 3, 7, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1, 2**15, 100000, 2**24]
BAD_FLOATS = [0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e30, 1e-30, 0.5, 2.0]
HOSTILE_TEMPLATES = [
    "{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ 'x' * 3000000000 }}", "{{ 9 ** 9999999 }}", "{% for m in messages %}{{ m.nope.deeper }}{% endfor %}",
    "{{ ''.__class__.__mro__ }}", "{{ messages.append(1) }}", "{% if %}", "{{ raise_exception('no\nway') }}",
    "{% set ns = namespace(a='x') %}{% for i in range(64) %}{% set ns.a = ns.a ~ ns.a %}{% endfor %}{{ ns.a }}",
    "{{ 1 / 0 }}", "{{ '%d' % 'x' }}", "{{ messages[99] }}", "{{ (messages|first).content|int }}",
]


def _random_value(rng: random.Random):
    kind = rng.randrange(9)
    if kind == 0:
        return STR, rng.choice(BAD_STRINGS)
    if kind == 1:
        v = rng.choice(BAD_INTS)
        for vtype in (U32, I32, U64, I64, U8, U16):
            try:
                struct.pack(_FMT[vtype], v)
                return vtype, v
            except struct.error:
                continue
        return U64, v % 2**64
    if kind == 2:
        return I32, rng.choice([-1, -2**31, 0, 5])
    if kind in (3, 4):
        return rng.choice([F32, F64]), rng.choice(BAD_FLOATS)
    if kind == 5:
        return BOOL, rng.random() < 0.5
    if kind == 6:
        return ARR, (U32, [rng.choice([0, 1, 4, 7]) for _ in range(rng.choice([0, 1, 2, 5]))])
    if kind == 7:
        return ARR, (STR, [rng.choice(BAD_STRINGS) for _ in range(rng.choice([0, 1, 3]))])
    return ARR, (F32, [rng.choice(BAD_FLOATS) for _ in range(rng.choice([0, 2]))])


KNOWN_KEYS = ["general.alignment", "llama.rope.scaling.type", "llama.rope.scaling.factor",
              "llama.attention.key_length", "llama.attention.value_length", "tokenizer.ggml.add_bos_token",
              "tokenizer.ggml.add_eos_token", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.pre",
              "tokenizer.ggml.merges", "qkvgguf.tensor_types", "qkvgguf.auto.budget", "qkvgguf.outtype",
              "general.file_type", "llama.vocab_size", "tokenizer.ggml.add_space_prefix"]


def mutate_structure(kvs: list, tensors: list, rng: random.Random) -> tuple[list, list, str]:
    kvs, tensors = list(kvs), list(tensors)
    op = rng.randrange(10)
    if op <= 2:  # a key gets another type or a hostile value
        i = rng.randrange(len(kvs) + len(KNOWN_KEYS))
        key = kvs[i][0] if i < len(kvs) else KNOWN_KEYS[i - len(kvs)]
        vtype, value = _random_value(rng)
        kvs = [kv for kv in kvs if kv[0] != key] + [(key, vtype, value)]
        return kvs, tensors, f"set {key} = {vtype}:{str(value)[:40]!r}"
    if op == 3:
        i = rng.randrange(len(kvs))
        return kvs[:i] + kvs[i + 1:], tensors, f"drop key {kvs[i][0]}"
    if op == 4:
        i = rng.randrange(len(tensors))
        return kvs, tensors[:i] + tensors[i + 1:], f"drop tensor {tensors[i][0]}"
    if op == 5:  # another shape, data resized to match (so the container stays valid)
        i = rng.randrange(len(tensors))
        name, gtype, ne, _ = tensors[i]
        block, size = _BLOCK.get(gtype, (1, 1))  # an unknown type (an earlier retype): one byte per element
        new = rng.choice([[ne[0]], ne + [1], [ne[0], 2], [block * 2, *ne[1:]], ne[::-1] if ne[-1] % block == 0 else ne,
                          [ne[0], ne[-1] + 1] if len(ne) > 1 else [ne[0] + block]])
        data = bytes(math.prod(new) // block * size)
        tensors[i] = (name, gtype, new, data)
        return kvs, tensors, f"reshape {name} {ne} -> {new}"
    if op == 6:  # another type
        i = rng.randrange(len(tensors))
        name, gtype, ne, data = tensors[i]
        new = rng.choice([GGML_F32, GGML_F16, GGML_Q4_0, GGML_Q8_0, 30, 31, 39])
        if new in _BLOCK and ne[0] % _BLOCK[new][0] == 0:
            data = bytes(math.prod(ne) // _BLOCK[new][0] * _BLOCK[new][1])
        tensors[i] = (name, new, ne, data)
        return kvs, tensors, f"retype {name} {gtype} -> {new}"
    if op == 7:  # a renamed tensor, or a hostile extra one
        i = rng.randrange(len(tensors))
        name, gtype, ne, data = tensors[i]
        new = rng.choice([name + "\n", "\x1b[2J" + name, name.replace("blk.1", "blk.9"), "blk.\udcff.x", name.upper()])
        tensors[i] = (new, gtype, ne, data)
        return kvs, tensors, f"rename {name} -> {new!r}"
    if op == 8:  # tokens: invalid UTF-8, control characters, duplicates, wrong types
        i = next((j for j, kv in enumerate(kvs) if kv[0] == "tokenizer.ggml.tokens"), None)
        if i is None or kvs[i][1] != ARR or kvs[i][2][0] != STR or not kvs[i][2][1]:
            return kvs, tensors, "tokens (absent)"
        toks = list(kvs[i][2][1])
        for _ in range(rng.randrange(1, 4)):
            toks[rng.randrange(len(toks))] = rng.choice(["\udcff\udcfe", "\x1b[31m", "a\nb", "", "<s>", "\u2581the"])
        kvs[i] = ("tokenizer.ggml.tokens", ARR, (STR, toks))
        return kvs, tensors, "tokens"
    template = rng.choice(HOSTILE_TEMPLATES)
    kvs = [kv for kv in kvs if kv[0] != "tokenizer.chat_template"] + [("tokenizer.chat_template", STR, template)]
    return kvs, tensors, f"template {template[:40]!r}"


INT_EDGES = [b"\xff" * 8, b"\x00" * 8, b"\xff\xff\xff\x7f\x00\x00\x00\x00", b"\x00\x00\x00\x80\x00\x00\x00\x00",
             b"\x01\x00\x00\x00\x00\x00\x00\x00", b"\x0c\x00\x00\x00"]


def mutate_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    buf = bytearray(data)
    head = min(len(buf), 12000)  # the header: metadata and tensor records
    op = rng.randrange(4)
    if op == 0:
        for _ in range(rng.randrange(1, 8)):
            buf[rng.randrange(head)] = rng.randrange(256)
        return bytes(buf), "flip"
    if op == 1:
        pos, edge = rng.randrange(head), rng.choice(INT_EDGES)
        buf[pos:pos + len(edge)] = edge
        return bytes(buf), f"int@{pos}"
    if op == 2:
        n = rng.randrange(len(buf))
        return bytes(buf[:n]), f"truncate@{n}"
    pos = rng.randrange(head)
    return bytes(buf[:pos] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16))) + buf[pos:]), "insert"


# ---- running one case --------------------------------------------------------------------------------------

class Hang(BaseException):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    def on_alarm(signum, frame):
        raise Hang()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def exercise_gguf(path: str) -> None:
    """Everything a user can make qkvgguf do with a GGUF file, in-process."""
    import torch

    from qkvgguf.config import ModelConfig
    from qkvgguf.gguf_file import GGUFFile
    from qkvgguf.inspect import render, summarize
    from qkvgguf.runtime.model import Model
    from qkvgguf.tokenizer import Tokenizer

    g = GGUFFile(path)
    summary = summarize(g)
    render(summary, show_tensors=True, show_metadata=True)
    json.dumps(summary)
    if g.tensors:  # inspect --tensor NAME on the first and last tensor (reads their bytes)
        from qkvgguf.inspect.tensor import render_tensor, tensor_report

        for name in {next(iter(g.tensors)), list(g.tensors)[-1]}:
            render_tensor(tensor_report(g, name, n_blocks=2))
    from qkvgguf.inspect.memory import estimate, render_memory

    render_memory(estimate(g, 4 << 30, None, "f16", "f32", 512))  # inspect --vram 4GiB
    ModelConfig.from_gguf(g)
    tok = Tokenizer.from_gguf(g)
    model = Model(g, cache_bytes=0)
    ids = tok.encode("Hello the world\n\x1b<s>", add_special=True, parse_special=True)[:12] or [0]
    cache = model.new_cache(16, "f16", "f16")
    logits = model.forward(torch.tensor(ids), cache)
    nxt = int(logits.argmax())
    tok.decode(ids + [nxt])
    stream = tok.stream()
    for t in ids + [nxt]:
        stream.feed(t)
    stream.flush()
    if tok.chat_template:
        tok.render_chat([{"role": "user", "content": "hi"}])


def classify(fn, timeout: float) -> tuple[str, str]:
    """('ok' | 'error' | 'multiline' | 'uncaught' | 'hang' | 'memory', detail)."""
    from qkvgguf.errors import QkvggufError

    try:
        with time_limit(timeout):
            fn()
        return "ok", ""
    except Hang:
        return "hang", f"over {timeout} s"
    except MemoryError:
        return "memory", traceback.format_exc(limit=-3)[-600:]
    except QkvggufError as e:
        msg = str(e)
        bad = [c for c in msg if not c.isprintable() or 0xD800 <= ord(c) <= 0xDFFF]
        return ("multiline", msg[:300]) if bad else ("error", msg[:200])
    except Exception:
        return "uncaught", traceback.format_exc(limit=-4)[-900:]


def limit_memory(extra_bytes: int) -> int:
    """Cap the address space at what the process maps now plus `extra_bytes`: an allocation past it
    raises MemoryError (counted as an over-limit allocation). Returns the limit."""
    with open("/proc/self/statm") as f:
        vsize = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    limit = vsize + extra_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    return limit


def gguf_cases(n: int, seed: int):
    """(label, file bytes) for n mutated files: half structured, half byte-level."""
    rng = random.Random(seed)
    kvs, tensors = base_model(seed)
    base = gguf_bytes(kvs, tensors)
    yield "base", base
    for i in range(1, n):
        if i % 2:
            k, t, label = kvs, tensors, []
            for _ in range(rng.choice([1, 1, 2, 3])):
                k, t, what = mutate_structure(k, t, rng)
                label.append(what)
            yield "; ".join(label), gguf_bytes(k, t)
        else:
            data, label = mutate_bytes(base, rng)
            yield label, data


def run_gguf(n: int, seed: int, timeout: float, folder: str, progress: bool = False, checkpoint=None) -> dict:
    import torch

    torch.set_num_threads(1)
    counts: dict[str, int] = {}
    failures = []
    path = os.path.join(folder, "case.gguf")
    t0 = time.perf_counter()
    for i, (label, data) in enumerate(gguf_cases(n, seed)):
        with open(path, "wb") as f:
            f.write(data)
        outcome, detail = classify(lambda: exercise_gguf(path), timeout)
        if i == 0 and outcome != "ok":
            raise RuntimeError(f"the unmutated file failed: {outcome} {detail}")
        counts[outcome] = counts.get(outcome, 0) + 1
        if outcome not in ("ok", "error"):
            failures.append({"case": i, "mutation": label, "outcome": outcome, "detail": detail})
        if progress and i % 500 == 0:
            print(f"  gguf {i}/{n} {counts} {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if checkpoint is not None and i % 500 == 499:
            checkpoint({"cases": i + 1, "complete": False, "seconds": round(time.perf_counter() - t0, 1),
                        "outcomes": counts, "failures": failures})
    return {"cases": n, "complete": True, "seconds": round(time.perf_counter() - t0, 1), "outcomes": counts,
            "failures": failures}


# ---- the command line -----------------------------------------------------------------------------------

def forked_cli(argv: list[str], timeout: float, extra_bytes: int,
               errors: str = "replace") -> tuple[int | None, str, str]:
    """`qkvgguf ARGV` in a forked child of this process: (exit status or None on a hang, stdout,
    stderr). The child sets RLIMIT_AS to what it maps plus `extra_bytes`, swaps in strict UTF-8
    stdout/stderr (an unencodable character raises there, as on a strict terminal), calls
    `qkvgguf.cli.main(argv)` and prints a traceback for anything main() lets escape, as the
    interpreter would. A fork costs milliseconds where a fresh interpreter importing torch costs
    seconds; the code path from main() on is the command's. `errors`: how the parent decodes the
    child's output ("strict": tests/test_hostile.py's check that it is valid UTF-8)."""
    import io
    import selectors

    import torch  # noqa: F401  (mapped before the fork)

    with open("/proc/self/statm") as f:
        limit = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE") + extra_bytes
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns
        rc = 1
        try:
            os.close(out_r)
            os.close(err_r)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            sys.stdout = io.TextIOWrapper(os.fdopen(out_w, "wb"), encoding="utf-8", errors="strict")
            sys.stderr = io.TextIOWrapper(os.fdopen(err_w, "wb"), encoding="utf-8", errors="strict")
            sys.stdin = io.StringIO("")
            import logging

            logging.disable(logging.NOTSET)
            from qkvgguf.cli import main

            try:
                rc = main(list(argv))
            except SystemExit as e:
                rc = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
                rc = 1
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc)
    os.close(out_w)
    os.close(err_w)
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
    sel = selectors.DefaultSelector()
    for fd in chunks:
        sel.register(fd, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    live = set(chunks)
    hung = False
    while live:
        left = deadline - time.monotonic()
        if left <= 0:
            os.kill(pid, signal.SIGKILL)
            hung = True
            break
        for key, _ in sel.select(left):
            data = os.read(key.fd, 65536)
            if data:
                chunks[key.fd].append(data)
            else:
                sel.unregister(key.fd)
                live.discard(key.fd)
    for fd in chunks:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    out, err = (b"".join(chunks[fd]).decode("utf-8", errors) for fd in (out_r, err_r))
    return (None if hung else os.waitstatus_to_exitcode(status)), out, err


def _child_limits(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    return apply


def run_cli(n: int, seed: int, timeout: float, folder: str, mem_limit: int, progress: bool = False,
            fork: bool = True, checkpoint=None) -> dict:
    """n mutated files through `inspect`, `inspect --json` and `run`: forked children (`forked_cli`,
    RLIMIT_AS at what they map plus 3 GiB), or with fork=False fresh interpreters (`python -m
    qkvgguf.cli`, RLIMIT_AS `mem_limit`)."""
    counts: dict[str, int] = {}
    failures = []
    env = dict(os.environ, PYTHONIOENCODING="utf-8:strict", QKVGGUF_CPU_KERNELS="0")
    t0 = time.perf_counter()
    for i, (label, data) in enumerate(gguf_cases(n, seed + 1)):
        path = os.path.join(folder, f"cli{i % 4}.gguf")
        with open(path, "wb") as f:
            f.write(data)
        verb = [["inspect", path, "--metadata", "--tensors"], ["inspect", path, "--json", "--full"],
                ["run", "-m", path, "-n", "3", "--temp", "0", "-t", "1", "-c", "32", "Hello"]][i % 3]
        if i % 3 == 2 and label.startswith("template"):
            verb = verb[:-1] + ["--chat", "Hello"]
        try:
            if fork:
                rc, _, err = forked_cli(verb, timeout, 3 << 30)
                if rc is None:
                    raise subprocess.TimeoutExpired(verb, timeout)
            else:
                r = subprocess.run([sys.executable, "-m", "qkvgguf.cli", *verb], capture_output=True,
                                   timeout=timeout, env=env, preexec_fn=_child_limits(mem_limit), cwd=folder)
                rc, err = r.returncode, r.stderr.decode("utf-8", "replace")
            lines = [line for line in err.splitlines() if line.strip()]
            if rc == 0 and "Traceback" not in err:
                outcome = "ok"
            elif rc == 2 and len(lines) == 1 and lines[0].startswith("qkvgguf: error: ") \
                    and all(c.isprintable() for c in lines[0]):
                outcome = "error"
            elif "MemoryError" in err:
                outcome = "memory"
            elif rc == 2:
                outcome = "multiline"
            else:
                outcome = "uncaught"
            detail = err[-900:]
        except subprocess.TimeoutExpired:
            outcome, detail = "hang", f"over {timeout} s"
        counts[outcome] = counts.get(outcome, 0) + 1
        if outcome not in ("ok", "error"):
            failures.append({"case": i, "mutation": label, "argv": verb[:1], "outcome": outcome, "detail": detail})
        if progress and i % 25 == 0:
            print(f"  cli {i}/{n} {counts} {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if checkpoint is not None and i % 25 == 24:
            checkpoint({"cases": i + 1, "complete": False, "seconds": round(time.perf_counter() - t0, 1),
                        "outcomes": counts, "failures": failures})
    return {"cases": n, "complete": True, "mode": "fork" if fork else "exec",
            "seconds": round(time.perf_counter() - t0, 1), "outcomes": counts, "failures": failures}


# ---- Hugging Face folders -------------------------------------------------------------------------------

HF_VOCAB = 320
HF_TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
           "want of a wife. Happy families are all alike; every unhappy family is unhappy in its own way. ") * 20


def base_hf_folder(folder: Path, seed: int = 0) -> Path:
    """A tiny valid LlamaForCausalLM folder: config.json, float32 model.safetensors, a byte-level BPE
    tokenizer.json (convert with vocab_pre='gpt-2') and tokenizer_config.json with a chat template."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    e, ff, heads, kv, n_layer = 32, 64, 4, 2, 2
    hd = e // heads
    state = {"model.embed_tokens.weight": (HF_VOCAB, e), "model.norm.weight": (e,), "lm_head.weight": (HF_VOCAB, e)}
    for i in range(n_layer):
        p = f"model.layers.{i}."
        state.update({p + "input_layernorm.weight": (e,), p + "post_attention_layernorm.weight": (e,),
                      p + "self_attn.q_proj.weight": (heads * hd, e), p + "self_attn.k_proj.weight": (kv * hd, e),
                      p + "self_attn.v_proj.weight": (kv * hd, e), p + "self_attn.o_proj.weight": (e, heads * hd),
                      p + "mlp.gate_proj.weight": (ff, e), p + "mlp.up_proj.weight": (ff, e),
                      p + "mlp.down_proj.weight": (e, ff)})
    save_file({k: (rng.standard_normal(s) * 0.2 + (1.0 if len(s) == 1 else 0.0)).astype(np.float32)
               for k, s in state.items()}, str(folder / "model.safetensors"))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": e,
              "intermediate_size": ff, "num_hidden_layers": n_layer, "num_attention_heads": heads,
              "num_key_value_heads": kv, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "vocab_size": HF_VOCAB, "tie_word_embeddings": False,
              "bos_token_id": 0, "eos_token_id": 1}
    (folder / "config.json").write_text(json.dumps(config))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=HF_VOCAB, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([HF_TEXT] * 4, trainer)
    data = json.loads(tok.to_str())
    # pad the vocabulary to HF_VOCAB with unused tokens if the text was too short to fill it
    vocab = data["model"]["vocab"]
    for i in range(len(vocab) + len(data["added_tokens"]), HF_VOCAB):
        vocab[f"<unused{i}>"] = i
    (folder / "tokenizer.json").write_text(json.dumps(data))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "add_bos_token": False,
         "chat_template": "{% for m in messages %}{{ m.content }}<|im_end|>{% endfor %}"}))
    return folder


def _st_rewrite(path: Path, edit) -> None:
    """Rewrite a safetensors file's header JSON through edit(header) (data bytes unchanged)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def mutate_hf(folder: Path, rng: random.Random) -> str:
    """Corrupt one thing in a copy of the base folder; returns what."""
    cfg_path, st_path, tok_path = folder / "config.json", folder / "model.safetensors", folder / "tokenizer.json"
    op = rng.randrange(12)
    if op <= 2:
        cfg = json.loads(cfg_path.read_text())
        key = rng.choice(["hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
                          "intermediate_size", "vocab_size", "rms_norm_eps", "rope_theta", "max_position_embeddings",
                          "tie_word_embeddings", "rope_scaling", "rope_parameters", "head_dim", "architectures"])
        value = rng.choice([0, -1, 3, 7, 2**31, 2**64, 1.5, "abc", "false", None, [], {}, {"type": "linear"},
                            {"rope_type": "yarn"}, float("nan"), True, ["LlamaForCausalLM"], [1]])
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
        cfg_path.write_text(json.dumps(cfg))
        return f"config {key} = {value!r}"
    if op == 3:
        cfg_path.write_bytes(rng.choice([b"\xff\xfe{}", b"{\"a\": ", b"[]", b"{\"architectures\": [\"\xff\"]}"]))
        return "config bytes"
    if op in (4, 5, 6):
        names = sorted(json.loads(st_path.read_bytes()[8:8 + struct.unpack("<Q", st_path.read_bytes()[:8])[0]]))
        name = rng.choice([n for n in names if n != "__metadata__"])
        what = rng.randrange(9)

        def edit(h):
            rec = h[name]
            if what == 0:
                rec["data_offsets"] = [str(o) for o in rec["data_offsets"]]
            elif what == 1:
                rec["data_offsets"] = [float(o) for o in rec["data_offsets"]]
            elif what == 2:
                rec["shape"] = [-1] + rec["shape"][1:]
            elif what == 3:
                rec["shape"] = [1] + rec["shape"]  # 3-D, same bytes
            elif what == 4:
                rec["dtype"] = rng.choice(["I64", "F8", "F16", 3])
            elif what == 5:
                other = h[rng.choice([n for n in names if n != name])]
                rec["data_offsets"] = list(other["data_offsets"])
                rec["shape"], rec["dtype"] = other["shape"], other["dtype"]
            elif what == 6:
                del h[name]
            elif what == 7:
                rec["shape"] = list(reversed(rec["shape"]))
            else:
                rec["shape"] = [float(d) for d in rec["shape"]]

        _st_rewrite(st_path, edit)
        return f"safetensors {name} edit {what}"
    if op == 7:  # NaN / inf weights
        raw = bytearray(st_path.read_bytes())
        (n,) = struct.unpack("<Q", raw[:8])
        pos = 8 + n + 4 * rng.randrange((len(raw) - 8 - n) // 4)
        raw[pos:pos + 4] = struct.pack("<f", rng.choice([float("nan"), float("inf")]))
        st_path.write_bytes(bytes(raw))
        return "nonfinite weight"
    if op in (8, 9):
        tj = json.loads(tok_path.read_text())
        what = rng.randrange(6)
        if what == 0:
            k = next(iter(tj["model"]["vocab"]))
            tj["model"]["vocab"][k] = "x"
        elif what == 1:
            tj["added_tokens"] = [{"id": 5}]
        elif what == 2:
            tj["model"]["merges"] = [[1, 2], [3, 4]]
        elif what == 3:
            tj["post_processor"] = rng.choice([{"type": "TemplateProcessing", "single": [1]}, [], "x",
                                               {"processors": [1]}, {"type": "TemplateProcessing", "single": "x"}])
        elif what == 4:
            tj["model"] = rng.choice([[], "BPE", {"type": "BPE", "vocab": []}])
        else:
            tj["added_tokens"] = [{"id": "x", "content": 3}]
        tok_path.write_text(json.dumps(tj))
        return f"tokenizer.json edit {what}"
    if op == 10:
        tc = json.loads((folder / "tokenizer_config.json").read_text())
        tc[rng.choice(["chat_template", "bos_token", "add_bos_token", "added_tokens_decoder"])] = rng.choice(
            [3, [], [{"name": "x"}], {"x": 1}, "{% if %}", None, {"1": "x"}])
        (folder / "tokenizer_config.json").write_text(json.dumps(tc))
        return "tokenizer_config"
    index = {"metadata": {}, "weight_map": {"model.norm.weight": rng.choice([3, None, "../x", "/etc/passwd", ""])}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return "shard index"


def run_convert(n: int, seed: int, timeout: float, folder: str, progress: bool = False) -> dict:
    import shutil

    from qkvgguf.convert.pipeline import convert

    base = base_hf_folder(Path(folder) / "base")
    rng = random.Random(seed)
    counts: dict[str, int] = {}
    failures = []
    t0 = time.perf_counter()
    for i in range(n):
        case = Path(folder) / "case"
        shutil.rmtree(case, ignore_errors=True)
        shutil.copytree(base, case)
        label = "base" if i == 0 else mutate_hf(case, rng)
        out = Path(folder) / "out.gguf"
        if out.exists():
            out.unlink()

        def job():
            convert(case, out, rng.choice(["f16", "q8_0", "q4_0"]), vocab_pre="gpt-2")
            exercise_gguf(str(out))

        outcome, detail = classify(job, timeout)
        if i == 0 and outcome != "ok":
            raise RuntimeError(f"the unmutated folder failed: {outcome} {detail}")
        counts[outcome] = counts.get(outcome, 0) + 1
        if outcome not in ("ok", "error"):
            failures.append({"case": i, "mutation": label, "outcome": outcome, "detail": detail})
        if progress and i % 25 == 0:
            print(f"  convert {i}/{n} {counts} {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return {"cases": n, "complete": True, "seconds": round(time.perf_counter() - t0, 1), "outcomes": counts,
            "failures": failures}


def _write_out(path: str, result: dict) -> None:
    """Write `result`'s runs into the JSON at `path`, keeping runs of the other kinds already there
    (one file holds the gguf, convert and cli runs, each with its command)."""
    out = Path(path)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    kinds = [k for k in ("gguf", "convert", "cli") if k in result]
    merged = {k: v for k, v in previous.items() if k in ("gguf", "convert", "cli") and k not in kinds}
    commands = {k: c for k, c in previous.get("commands", {}).items() if k not in kinds}
    commands.update({k: result["command"] for k in kinds})
    merged.update({k: result[k] for k in kinds})
    merged["commands"] = commands
    merged["settings"] = {k: result[k] for k in ("seed", "timeout_s", "memory_limit_extra_gib")}
    merged["bad"] = {k: sum(v for o, v in merged[k]["outcomes"].items() if o not in ("ok", "error"))
                     for k in ("gguf", "convert", "cli") if k in merged}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(merged, indent=1) + "\n")
    os.replace(tmp, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=2000, help="in-process GGUF mutations (default 2000)")
    ap.add_argument("--cli", type=int, default=0, help="mutated GGUF files through the command line")
    ap.add_argument("--convert", type=int, default=0, help="corrupted Hugging Face folders through convert")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds before a case counts as a hang")
    ap.add_argument("--memory", type=float, default=3.0, help="GiB an allocation may add before it counts as over the limit")
    ap.add_argument("--out", default=None, help="JSON results (e.g. benchmarks/results/fuzz.json); "
                    "rewritten every 500 GGUF / 25 CLI cases while running (\"complete\": false)")
    ap.add_argument("--cli-exec", action="store_true",
                    help="--cli in fresh interpreters (python -m qkvgguf.cli) instead of forked children")
    args = ap.parse_args(argv)
    import logging

    logging.disable(logging.WARNING)  # the fuzzer's own cases warn by design
    sys.path.insert(0, str(ROOT))
    result = {"command": "python benchmarks/fuzz.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "seed": args.seed, "timeout_s": args.timeout, "memory_limit_extra_gib": args.memory}
    with tempfile.TemporaryDirectory(prefix="qkvgguf-fuzz-") as tmp:
        import torch  # noqa: F401  (mapped before the limit is set)

        limit = limit_memory(int(args.memory * 2**30))  # this process: what torch maps plus --memory
        result["address_space_limit_bytes"] = limit
        def saver(kind):
            def save(partial):
                if args.out:
                    _write_out(args.out, {**result, kind: partial})
            return save

        if args.cases:
            result["gguf"] = run_gguf(args.cases, args.seed, args.timeout, tmp, progress=True, checkpoint=saver("gguf"))
        if args.convert:
            result["convert"] = run_convert(args.convert, args.seed, args.timeout * 3, tmp, progress=True)
        if args.cli:  # each child gets the same limit
            resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            result["cli"] = run_cli(args.cli, args.seed, args.timeout * 3, tmp, limit, progress=True,
                                    fork=not args.cli_exec, checkpoint=saver("cli"))
    bad = {k: sum(v for o, v in r["outcomes"].items() if o not in ("ok", "error"))
           for k, r in result.items() if isinstance(r, dict) and "outcomes" in r}
    result["bad"] = bad
    summary = {k: r["outcomes"] for k, r in result.items() if isinstance(r, dict) and "outcomes" in r}
    print(json.dumps({"outcomes": summary, "bad": bad}))
    if args.out:
        _write_out(args.out, result)
    return 1 if any(bad.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
