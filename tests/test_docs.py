"""The README is a front door (short, no figures copied by hand) and every relative link
in it and in docs/ points to a file, and to a heading, that exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 200

_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
#: Figures a run measures: decimals below 1 with two or more digits (an MAE, a λ), times
#: in ms or minutes, and ratios such as "0.45×".
_FIGURE = re.compile(r"\b\d[\d.]*\s?×|\b0\.\d{2,}|\b\d[\d,.]*\s?(?:ms|min)\b")


def prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code."""
    return _CODE.sub("", _FENCE.sub("", text))


def links(text: str) -> list[str]:
    """Targets of the Markdown links and images in the prose of ``text``."""
    return _LINK.findall(prose(text))


def anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", prose(heading).strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = _FENCE.sub("", page.read_text(encoding="utf-8"))
    return {anchor(m) for m in re.findall(r"^#+\s+(.*)$", text, re.M)}


def broken_links(page: Path) -> list[str]:
    """The relative links of ``page`` whose file, or whose heading, does not exist."""
    broken = []
    for target in links(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # absolute URLs; same-page anchors are checked below
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve()
        if not file.exists():
            broken.append(target)
        elif fragment and file.suffix == ".md" and fragment not in anchors(file):
            broken.append(target)
    for target in links(page.read_text(encoding="utf-8")):
        if target.startswith("#") and target[1:] not in anchors(page):
            broken.append(target)
    return broken


def test_readme_is_at_most_200_lines():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move topics to docs/"


def test_readme_quotes_no_measured_figure():
    """Results live in the generated reports; the README links to them."""
    assert _FIGURE.findall(prose(README.read_text(encoding="utf-8"))) == []


def test_every_relative_link_resolves():
    broken = {
        str(page.relative_to(ROOT)): broken_links(page) for page in PAGES if broken_links(page)
    }
    assert broken == {}


def test_link_check_sees_a_missing_file_and_a_missing_heading(tmp_path):
    """The checks above would pass vacuously if they saw no links or no figures."""
    (tmp_path / "other.md").write_text("# A heading\n")
    page = tmp_path / "page.md"
    page.write_text(
        "See [x](other.md#a-heading), [y](missing.md), [z](other.md#nowhere), "
        "[w](https://example.org/none.md) and `[v](in-code.md)`.\n"
        "```\n[u](in-a-block.md)\n```\n"
    )
    assert broken_links(page) == ["missing.md", "other.md#nowhere"]
    assert _FIGURE.findall("val_id 0.0509 at 40 ms per step (0.45×)") == [
        "0.0509",
        "40 ms",
        "0.45×",
    ]
    assert links(README.read_text(encoding="utf-8"))  # the README links to something
