"""User-facing errors.

Anything a user can cause (a bad file, a bad flag, a model we do not support) raises a subclass of
`QkvggufError` with a one-line message that names the file, key or tensor, what was expected and what
was found. The CLI prints that line and exits with status 2, without a traceback. Anything else is a
bug and keeps its traceback.
"""


class QkvggufError(Exception):
    """A user error: printed as one line by the CLI, exit status 2."""


class GGUFError(QkvggufError):
    """The GGUF file is malformed, truncated, or lacks what we need."""


class UnsupportedError(QkvggufError):
    """The file is valid but uses something qkvgguf does not implement (architecture, tensor type)."""


# -- file-supplied text in messages ------------------------------------------------------------------

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}  # a backslash stays itself: escaping twice (a message, then its line) must not double it


def _escape_char(c: str) -> str:
    if c in _ESCAPES:
        return _ESCAPES[c]
    o = ord(c)
    if 0xDC80 <= o <= 0xDCFF:  # a byte that was not UTF-8 (read with surrogateescape): show the byte
        return f"\\x{o - 0xDC00:02x}"
    if c.isprintable() and not 0xD800 <= o <= 0xDFFF:
        return c
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def escape(text: str, limit: int = 0) -> str:
    """`text` with every control character, escape sequence, lone surrogate and undecodable byte
    written as a visible escape (\\n, \\x1b, \\xff), so it prints as one line on any terminal and
    encodes under a strict UTF-8 stream; cut to `limit` characters (0: no cut) with a note."""
    text = str(text)
    cut = limit and len(text) > limit
    out = "".join(_escape_char(c) for c in (text[:limit] if cut else text))
    return f"{out}...({len(text):,} chars)" if cut else out


def shown(value, limit: int = 80) -> str:
    """A value from a file (a key, a tensor name, a metadata value) as it goes into a message: a string
    quoted and escaped, anything else by its repr (escaped too); both cut to `limit` characters."""
    if isinstance(value, str):
        return f"'{escape(value, limit)}'"
    if isinstance(value, (list, tuple)) and len(value) > 8:
        value = f"[{', '.join(repr(v) for v in value[:4])}, ... ({len(value):,} items)]"
        return escape(value, limit)
    return escape(repr(value), limit)
