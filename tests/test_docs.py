"""The documents a clone ships: every link in them leads somewhere inside the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "BENCHMARKS.md", "CHANGELOG.md", "docs/DECISIONS.md", "docs/ARCHITECTURE.md"]
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} (.+)$", re.MULTILINE)


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {anchor(h) for h in HEADING.findall(path.read_text())}


@pytest.mark.parametrize("doc", DOCS)
def test_every_link_is_a_file_or_heading_of_the_repository(doc: str) -> None:
    path = REPO / doc
    broken = []
    for target in LINK.findall(path.read_text()):
        file, _, fragment = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        inside = not re.match(r"[a-z]+:", target) and linked.is_relative_to(REPO)  # no address
        if not (inside and linked.exists() and (not fragment or fragment in anchors(linked))):
            broken.append(target)
    assert broken == []


def test_the_readme_lists_every_section_in_its_contents() -> None:
    text = (REPO / "README.md").read_text()
    contents = text.split("## Contents", 1)[1].split("\n## ", 1)[0]
    listed = LINK.findall(contents)
    sections = [h for h in re.findall(r"^#{2,3} (.+)$", text, re.MULTILINE) if h != "Contents"]
    assert listed == [f"#{anchor(h)}" for h in sections]
