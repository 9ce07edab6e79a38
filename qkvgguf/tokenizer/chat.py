"""Chat templates (`tokenizer.chat_template`): Jinja2 in a sandbox, set up as transformers sets it up.

Templates come from model files we did not write, so they run in jinja2's ImmutableSandboxedEnvironment:
no attribute access to Python internals, no mutation of the lists and dicts passed in. The environment
matches transformers' `apply_chat_template` so that a template renders to the same string here:
`trim_blocks` and `lstrip_blocks` on, the `loopcontrols` extension, `raise_exception(msg)`,
`strftime_now(fmt)`, a `tojson` filter that keeps non-ASCII text, and `{% generation %}` blocks
(which only mark assistant text there) rendered as their body.

Any error in a template (bad syntax, `raise_exception`, a sandbox violation) becomes a one-line
QkvggufError.
"""

from __future__ import annotations

import json
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

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    lineno = getattr(e, "lineno", None)
    return f"line {lineno}: {text}" if lineno else text


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
    try:
        return compiled.render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                               add_generation_prompt=add_generation_prompt, **extra)
    except jinja2.TemplateError as e:
        raise QkvggufError(f"chat template failed: {_one_line(e)}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
        raise QkvggufError(f"chat template failed: {type(e).__name__}: {_one_line(e)}") from None
