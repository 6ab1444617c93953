"""Progress of vqgen's long loops (training, encoding, embedding, sampling, evaluation).

On a terminal, or in a notebook, a tqdm bar redraws itself in place. Written to a file
(``python train.py demo > log 2>&1``) each redraw would be one more carriage-return line, so
there ``progress_bar`` prints a plain line instead, at most every ``interval`` seconds and
once at the end: ``train transformer: 120/400 steps (30%), 2.1 steps/s, 57 s, ~133 s left, loss=3.21``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any

from tqdm.auto import tqdm

PLAIN_INTERVAL_S = 5.0  # between two plain lines


def progress_bar(
    iterable: Iterable | None = None,
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    initial: int = 0,
    disable: bool = False,
    file: IO[str] | None = None,
    interval: float = PLAIN_INTERVAL_S,
) -> tqdm | PlainProgress:
    """A tqdm bar where ``file`` (default: stderr) redraws in place, else :class:`PlainProgress`;
    both iterate over ``iterable`` or count ``update(n)`` calls, take ``set_postfix`` and ``close``."""
    file = sys.stderr if file is None else file
    if _redraws(file):
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, file=file,
                    dynamic_ncols=True)
    return PlainProgress(iterable, total, desc, unit, initial, disable, file, interval)


def _redraws(stream: IO[str]) -> bool:
    """Whether a bar can redraw itself on ``stream``: a terminal, or a Jupyter kernel's output."""
    if stream.isatty():
        return True
    ipython = sys.modules.get("IPython")  # imported by every notebook kernel, never by vqgen
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and "IPKernelApp" in shell.config


class PlainProgress:
    """The part of tqdm's interface vqgen uses, printing one plain line at most every
    ``interval`` seconds, and a last one at ``close`` (when there is news since the one before)."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str, unit: str, initial: int,
                 disable: bool, file: IO[str], interval: float):
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.file, self.interval = file, interval
        self.disable, self.n, self.start_n, self.printed_n = disable, initial, initial, initial
        self.postfix = ""
        self.started = self.printed_at = time.monotonic()
        self.closed = False

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.printed_at >= self.interval:
            self._print(now)

    def set_postfix(self, values: dict[str, Any]) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if not self.closed and self.n != self.printed_n:
            self._print(time.monotonic())
        self.closed = True

    def _print(self, now: float) -> None:
        self.printed_at, self.printed_n = now, self.n
        if self.disable:
            return
        elapsed = now - self.started
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts += [f"{rate:.3g} {self.unit}/s", f"{elapsed:.0f} s"]
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"~{(self.total - self.n) / rate:.0f} s left")
        if self.postfix:
            parts.append(self.postfix)
        prefix = f"{self.desc}: " if self.desc else ""
        print(prefix + ", ".join(parts), file=self.file, flush=True)
