"""Chat templates (`tokenizer.chat_template`): Jinja2 in a sandbox, set up as transformers sets it up.

Templates come from model files we did not write, so they run in jinja2's ImmutableSandboxedEnvironment:
no attribute access to Python internals, no mutation of the lists and dicts passed in. The environment
matches transformers' `apply_chat_template` so that a template renders to the same string here:
`trim_blocks` and `lstrip_blocks` on, the `loopcontrols` extension, `raise_exception(msg)`,
`strftime_now(fmt)`, a `tojson` filter that keeps non-ASCII text, and `{% generation %}` blocks
(which only mark assistant text there) rendered as their body.

Templates also run within limits (a recursive macro, nested loops or `'x' * 3000000000` must not hang
or fill memory): nesting depth, executed steps (loop iterations), wall time, output length and the
size of values built by `*` and `**` (MAX_* below). Any error in a template (bad syntax,
`raise_exception`, a sandbox violation, a limit) becomes a one-line QkvggufError.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from functools import lru_cache

from ..errors import QkvggufError


def _raise_exception(message: str):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile(template: str):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: rendered as its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class _Bounded(ImmutableSandboxedEnvironment):
        """The sandbox plus size limits on the operators that build large values from small ones."""

        intercepted_binops = frozenset(["*", "**", "+"])

        def call_binop(self, context, operator, left, right):
            if operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                _check_size(len(left) + len(right))
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_CHARS:
                        raise TemplateLimit(f"a value of {len(seq) * n:,} items, more than {MAX_CHARS:,}")
            if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
                    and right * abs(left).bit_length() > MAX_INT_BITS:
                raise TemplateLimit(f"an integer of more than {MAX_INT_BITS:,} bits")
            return super().call_binop(context, operator, left, right)

    env = _Bounded(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["center"] = _center
    env.filters["replace"] = jinja2.pass_eval_context(_replace)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    compiled = env.from_string(template)
    # `~` compiles to a call of jinja2.runtime's str_join / markup_join, looked up in the template
    # module's globals: bounded versions there keep a doubling loop of `s ~ s` from filling memory
    namespace = compiled.root_render_func.__globals__
    for name in ("str_join", "markup_join"):
        if name in namespace:
            namespace[name] = _bounded_join(namespace[name])
    return compiled


# What a template may cost (a template comes from the model file: it must not hang or fill memory).
MAX_CHARS = 1 << 23  # output characters, and items of a value built by `*`
MAX_INT_BITS = 1 << 16  # size of an integer built by `**`
MAX_DEPTH = 64  # nested template frames (macros calling macros, recursive loops)
MAX_STEPS = 5_000_000  # lines the template executes (every loop iteration is one or more)
MAX_SECONDS = 10.0  # wall time of one render


class TemplateLimit(Exception):
    """A chat template went past one of the limits above."""


def _check_size(n: int) -> None:
    if n > MAX_CHARS:
        raise TemplateLimit(f"a value of {n:,} items, more than {MAX_CHARS:,}")


def _bounded_join(join):
    def bounded(seq):
        seq = list(seq)
        _check_size(sum(len(x) if isinstance(x, str) else 32 for x in seq))
        return join(seq)

    return bounded


def _replace(eval_ctx, value, old, new, count=None):
    """jinja's `replace` filter, refusing a result above MAX_CHARS before building it."""
    from jinja2.filters import do_replace

    if isinstance(value, str) and isinstance(old, str) and isinstance(new, str):
        hits = len(value) + 1 if old == "" else value.count(old)
        if isinstance(count, int) and count >= 0:
            hits = min(hits, count)
        _check_size(len(value) + hits * (len(new) - len(old)))
    return do_replace(eval_ctx, value, old, new, count)


def _center(value, width: int = 80) -> str:
    if isinstance(width, int) and width > MAX_CHARS:
        raise TemplateLimit(f"a value of {width:,} characters, more than {MAX_CHARS:,}")
    return str(value).center(width)


def _guarded(run):
    """Run `run()` under a trace function that counts the template's executed lines and nested frames
    (its code is compiled to Python functions named after `<template>`) and stops it at MAX_STEPS,
    MAX_DEPTH or MAX_SECONDS with TemplateLimit. Only the template's frames are traced per line."""
    import sys

    deadline = time.monotonic() + MAX_SECONDS
    steps = 0

    def local(frame, event, arg):
        nonlocal steps
        steps += 1
        if steps > MAX_STEPS:
            raise TemplateLimit(f"{MAX_STEPS:,} steps (loop iterations)")
        if not steps & 1023 and time.monotonic() > deadline:
            raise TemplateLimit(f"{MAX_SECONDS:g} s of rendering")
        return local

    def on_call(frame, event, arg):
        if frame.f_code.co_filename != "<template>":
            return None
        depth, f = 0, frame
        while f is not None and depth <= MAX_DEPTH:
            depth += f.f_code.co_filename == "<template>"
            f = f.f_back
        if depth > MAX_DEPTH:
            raise TemplateLimit(f"a nesting depth of {MAX_DEPTH} (recursive macros)")
        return local

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        return run()
    finally:
        sys.settrace(previous)


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    lineno = getattr(e, "lineno", None)
    return f"line {lineno}: {text}" if lineno else text


def check_template(template: str, where: str) -> None:
    """Refuse a template that does not parse (the converter checks before writing one into a file)."""
    import jinja2

    try:
        _compile(template)
    except jinja2.TemplateError as e:
        raise QkvggufError(f"{where} does not parse: {_one_line(e)}") from None


def render_chat(template: str, messages: list[dict], bos_token: str, eos_token: str,
                add_generation_prompt: bool = True, **extra) -> str:
    """Render `messages` ([{'role': ..., 'content': ...}, ...]) with a chat template.

    `extra` is passed to the template as further variables (e.g. `tools=[...]`).
    """
    import jinja2

    try:
        compiled = _compile(template)
    except jinja2.TemplateError as e:
        raise QkvggufError(f"chat template does not parse: {_one_line(e)}") from None
    def render() -> str:
        parts, n = [], 0
        for part in compiled.generate(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                      add_generation_prompt=add_generation_prompt, **extra):
            n += len(part)
            if n > MAX_CHARS:
                raise TemplateLimit(f"{MAX_CHARS:,} characters of output")
            parts.append(part)
        return "".join(parts)

    try:
        return _guarded(render)
    except TemplateLimit as e:
        raise QkvggufError(f"chat template stopped: it exceeds {e}") from None
    except RecursionError:
        raise QkvggufError(f"chat template stopped: it exceeds Python's recursion limit") from None
    except MemoryError:
        raise QkvggufError("chat template stopped: it ran out of memory") from None
    except jinja2.TemplateError as e:
        raise QkvggufError(f"chat template failed: {_one_line(e)}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
        raise QkvggufError(f"chat template failed: {type(e).__name__}: {_one_line(e)}") from None
