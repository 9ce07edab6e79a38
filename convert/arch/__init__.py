"""Architecture registry: Hugging Face `architectures[0]` -> a small `Arch` subclass.

Adding an architecture means adding one short file here that subclasses `Arch` (see base.py),
decorates it with `@register("SomeForCausalLM")`, and is imported at the bottom of this file.
"""

from __future__ import annotations

from qkvgguf.errors import UnsupportedError

from .base import Arch, ConfigError

ARCHITECTURES: dict[str, type[Arch]] = {}


def register(*hf_names: str):
    def wrap(cls: type[Arch]) -> type[Arch]:
        for name in hf_names:
            ARCHITECTURES[name] = cls
        return cls

    return wrap


def for_config(config: dict, config_path: str) -> Arch:
    """The architecture handler for a parsed config.json."""
    names = config.get("architectures")
    if not isinstance(names, list) or not names or not isinstance(names[0], str):
        raise ConfigError(f"{config_path}: no 'architectures' list naming the model class")
    if names[0] not in ARCHITECTURES:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedError(f"{config_path}: architecture '{names[0]}' is not supported (supported: {supported})")
    return ARCHITECTURES[names[0]](config, config_path)


# Each module registers itself on import (they need `register` defined above).
from . import gemma3, llama, qwen2, qwen3  # noqa: E402,F401

__all__ = ["ARCHITECTURES", "Arch", "ConfigError", "for_config", "register"]
