"""Progress of a long stage, for the command line: a tqdm bar on a terminal, plain lines elsewhere.

    with Progress("converting", total=n_bytes, unit="bytes") as bar:
        bar.update(k)

On a terminal (stderr is a tty) this is a tqdm bar, closed when the stage ends so that a later
stage never reprints it. When stderr is a pipe or a file, a stage that runs longer than `QUIET_S`
prints one line every `EVERY_S` seconds (stage name, done/total, rate) and one line when it ends,
so a piped run is never silent for minutes and a short one prints nothing:

    qkvgguf: converting: 41.2 / 93.8 MiB (44%), 7.9 MiB/s, 5.2 s

QKVGGUF_PROGRESS_EVERY (seconds) overrides both delays for tests and for people who want more or
fewer lines. Only the CLI layer makes these (library code reports through callbacks).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional, TextIO

from .units import format_bytes

QUIET_S = 5.0  # a non-terminal stage says nothing before this
EVERY_S = 5.0  # then one line this often


def _interval(default: float) -> float:
    env = os.environ.get("QKVGGUF_PROGRESS_EVERY")
    try:
        return float(env) if env is not None else default
    except ValueError:
        return default


class Progress:
    """One stage. unit "bytes" formats counts as MiB/GiB; any other unit is printed after the count."""

    def __init__(self, name: str, total: Optional[int], unit: str = "", file: Optional[TextIO] = None,
                 tty: Optional[bool] = None, prefix: str = "qkvgguf: "):
        self.name, self.total, self.unit, self.prefix = name, total, unit, prefix
        self.file = file if file is not None else sys.stderr
        self.tty = self.file.isatty() if tty is None else tty
        self.done = 0
        self.postfix = ""
        self.t0 = time.perf_counter()
        self.next_line = self.t0 + _interval(QUIET_S)
        self.lines = 0
        self.closed = False
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            if unit == "bytes":  # counted in MiB: tqdm's own scaling would print kB, MB (or kiB)
                self.bar = tqdm(total=total / 2**20 if total else None, desc=name, unit="MiB", file=self.file,
                                leave=True, bar_format="{l_bar}{bar}| {n:.2f}/{total:.2f} MiB "
                                                       "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")
            else:
                self.bar = tqdm(total=total, desc=name, unit=unit or "it", file=self.file, leave=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _count(self, n: float) -> str:
        return format_bytes(int(n)) if self.unit == "bytes" else f"{n:,.0f}"

    def _line(self, final: bool = False) -> str:
        elapsed = time.perf_counter() - self.t0
        done = self._count(self.done)
        if self.total:
            pct = 100 * self.done / self.total
            text = f"{done} / {self._count(self.total)} ({pct:.0f}%)"
        else:
            text = done
        if self.unit and self.unit != "bytes":
            text += f" {self.unit}s" if not self.unit.endswith("s") else f" {self.unit}"
        if elapsed > 0 and self.done:
            rate = self.done / elapsed
            text += (f", {format_bytes(int(rate))}/s" if self.unit == "bytes"
                     else f", {rate:,.1f} {self.unit or 'it'}/s")
        text += f", {elapsed:.1f} s"
        if self.postfix:
            text += f", {self.postfix}"
        return f"{self.prefix}{self.name}: {'done, ' if final else ''}{text}"

    def set_postfix(self, text: str) -> None:
        self.postfix = text
        if self.bar is not None:
            self.bar.set_postfix_str(text)

    def update(self, n: int = 1) -> None:
        self.set_done(self.done + n)

    def set_done(self, done: int) -> None:
        if self.closed:
            return
        step = done - self.done
        self.done = done
        if self.bar is not None:
            self.bar.update(step / 2**20 if self.unit == "bytes" else step)
            return
        now = time.perf_counter()
        if now >= self.next_line:
            print(self._line(), file=self.file, flush=True)
            self.lines += 1
            self.next_line = now + _interval(EVERY_S)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.lines:  # a stage that printed progress says that it ended
            print(self._line(final=True), file=self.file, flush=True)


class Stages:
    """The bars of a sequence of named stages reported as `stage(name, done, total)`: a new name
    closes the previous stage's bar (so it is never reprinted) and announces the new one."""

    def __init__(self, announce=None, units: Optional[dict[str, str]] = None):
        self.current: Optional[Progress] = None
        self.announce = announce
        self.units = units or {}
        self.seen: list[str] = []

    def __call__(self, name: str, done: int, total: int) -> None:
        if self.current is None or self.current.name != name:
            self.close()
            self.seen.append(name)
            if self.announce is not None:
                self.announce(name, total)
            self.current = Progress(name, total, self.units.get(name, ""))
        self.current.set_done(done)
        if total and done >= total:
            self.close()

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None
