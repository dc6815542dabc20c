"""The repository is self-contained: no file points outside it, and every relative Markdown link (and #anchor) to a
file in it resolves.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(r"DESIGN\.md|STYLE\.md|\.\./shared|/work/")
LINK = re.compile(r"\]\(([^)#\s]+\.md)(?:#([^)\s]+))?\)")


def _tracked() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked-file list is unknown")
    return [REPO / line for line in out.splitlines() if (REPO / line).is_file()]


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", markdown, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_no_file_refers_outside_the_repository() -> None:
    offenders = []
    for path in _tracked():
        if path.suffix in {".png", ".jpg", ".tar", ".pt", ".idx"} or path == Path(__file__).resolve():
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_markdown_links_and_anchors_resolve() -> None:
    broken = []
    for doc in [p for p in _tracked() if p.suffix == ".md"]:
        for target, anchor in LINK.findall(doc.read_text()):
            if "://" in target:
                continue
            path = (doc.parent / target).resolve()
            if not path.is_file():
                broken.append(f"{doc.relative_to(REPO)} -> {target}")
            elif anchor and anchor not in _anchors(path.read_text()):
                broken.append(f"{doc.relative_to(REPO)} -> {target}#{anchor}")
    assert not broken, "\n".join(broken)
