"""Progress of a long loop, for a person: a tqdm bar on a terminal, plain lines in a log.

A bar redrawn into a file (``dvc repro > log``, a cluster job's output) leaves hundreds of
carriage-return redraws there. When its stream is not a terminal, :class:`ProgressLog`
writes a plain line every ``total / 20`` items and one at the end instead, as the
training loop does.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

from tqdm import tqdm

T = TypeVar("T")

#: Plain lines written over a whole loop (besides the last one) without a terminal.
LINES = 20


class ProgressLog:
    """Progress toward ``total`` items: a bar on a terminal, else plain lines such as
    ``preprocess train: 3/12 shards, 41 s``. ``stream``: where it goes (stderr, so that a
    command's output on stdout stays clean)."""

    def __init__(self, total: int, desc: str, unit: str, *, stream: TextIO | None = None) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = sys.stderr if stream is None else stream
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = max(1, total // LINES)
        self.count = 0
        self.start = time.monotonic()
        self.bar = tqdm(
            total=total,
            desc=desc,
            unit=unit,
            file=self.stream,
            disable=not self.interactive,
            leave=False,
            dynamic_ncols=True,
        )

    def update(self, n: int = 1) -> None:
        before, self.count = self.count, self.count + n
        self.bar.update(n)
        if self.interactive:
            return
        if self.count // self.every > before // self.every or self.count == self.total:
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        return f"{self.desc}: {self.count}/{self.total} {self.unit}s, {elapsed:.0f} s"

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> ProgressLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(
    items: Iterable[T], *, total: int, desc: str, unit: str, stream: TextIO | None = None
) -> Iterator[T]:
    """Yield ``items``, reporting progress toward ``total`` (see :class:`ProgressLog`)."""
    with ProgressLog(total, desc, unit, stream=stream) as log:
        for item in items:
            yield item
            log.update()
