"""Progress for a person: a bar on a terminal, plain lines (no redraws) in a log file."""

from __future__ import annotations

import io

from forcenet.progress import ProgressLog, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_without_a_terminal_progress_is_plain_lines():
    log = io.StringIO()
    assert list(progress(range(100), total=100, desc="convert", unit="shard", stream=log)) == list(
        range(100)
    )
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 20  # one per 5 %, the last at the end
    assert lines[0].startswith("convert: 5/100 shards, ")
    assert lines[-1].startswith("convert: 100/100 shards, ")


def test_a_short_loop_gets_a_line_per_item_and_one_at_the_end():
    log = io.StringIO()
    with ProgressLog(3, "emt systems", "system", stream=log) as bar:
        for _ in range(3):
            bar.update()
    assert [line.split(",")[0] for line in log.getvalue().splitlines()] == [
        "emt systems: 1/3 systems",
        "emt systems: 2/3 systems",
        "emt systems: 3/3 systems",
    ]


def test_on_a_terminal_progress_is_a_bar():
    term = Terminal()
    list(progress(range(50), total=50, desc="convert", unit="shard", stream=term))
    assert "\r" in term.getvalue() and "convert: 5/50 shards," not in term.getvalue()
