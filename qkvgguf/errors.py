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
