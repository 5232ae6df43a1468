"""Every document the code, notebooks, grids and READMEs cite is in the repository.

A citation names a file (``docs/paper.md``, ``results/bench/README.md``) and may name a section
by its number and title: ``docs/paper.md section 1.2 (Hashing)``, ``docs/paper.md sections 3 and
8``, ``docs/design.md section 4 ("Contracts")``. The file must be tracked (or sit beside the citing
file, for a Markdown link), the section number must be a numbered heading of it, and a title in
parentheses right after the number (quoted, or any heading's title of that document) must be that
section's title or one of its subsections'.
Documents outside the repository (a sibling ``shared/`` folder, notes that are not committed)
are never cited.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = (".py", ".ipynb", ".md", ".yaml", ".yml", ".toml")
# Documents that live outside this repository, under any of the names they have been cited by.
OUTSIDE = re.compile(r"engram-paper\.md|\.\./shared\b|\bshared/(?:checks|gpu|design)"
                     r"|shared GPU README|(?<![\w/])gpu/README\.md|(?<![\w/.-])design\.md"
                     r"|house-style\.md")
MD_PATH = re.compile(r"(?<![\w.-])\w[\w.-]*(?:/[\w.-]+)*\.md\b")
SECTIONS = re.compile(
    r"(docs/[\w-]+\.md)[\s#\"'`,*]*sections?\s+"
    r"(\d+(?:\.\d+)?(?:(?:\s*,\s*|\s+and\s+|\s*&\s*)\d+(?:\.\d+)?)*)"
    r"(?:[ \t]*\(([^()]*)\))?")
HEADING = re.compile(r"^#{2,6}\s+(\d+(?:\.\d+)*)\.?\s+(.+?)\s*$", re.M)
# File names in tests that are fixtures the tests write, not citations.
FIXTURES = {"STALE.md", "d000.md"}


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return sorted({f for f in out.stdout.split() if (ROOT / f).is_file()})


def scanned_files() -> list[str]:
    """The files whose citations are checked (this file's made-up ones are its test data)."""
    return [f for f in tracked_files() if (f.endswith(SUFFIXES) or Path(f).name == "Makefile")
            and f != "tests/test_citations.py"]


def text_of(path: Path) -> str:
    """A file's text; for a notebook, its cells' sources (not the JSON around them)."""
    raw = path.read_text(errors="replace")
    if path.suffix == ".ipynb":
        return "\n\n".join("".join(c.get("source", "")) for c in json.loads(raw)["cells"])
    return raw


def headings(doc: Path) -> dict[str, str]:
    """Section number -> title of a Markdown document's numbered headings."""
    return {num: title.strip() for num, title in HEADING.findall(doc.read_text())}


def _titles(raw: str) -> list[str]:
    quoted = re.findall(r"\"([^\"]+)\"", raw)
    return quoted if quoted else [raw.strip()]


def check(text: str, where: str, files: set[str]) -> list[str]:
    """The problems of the citations in ``text`` (found in the file ``where``)."""
    problems = []
    base = Path(where).parent
    for m in OUTSIDE.finditer(text):
        if (base / m.group(0)).as_posix() in files:
            continue  # a relative Markdown link to a file beside the citing one
        problems.append(f"{where}: cites {m.group(0)!r}, which is not in the repository "
                        "(cite docs/paper.md or docs/design.md)")
    for m in MD_PATH.finditer(text):
        name = m.group(0)
        if Path(name).name in FIXTURES or OUTSIDE.fullmatch(name):
            continue
        if name not in files and (base / name).as_posix() not in files:
            problems.append(f"{where}: cites {name}, which does not exist")
    for m in SECTIONS.finditer(text):
        doc, nums, title = m.group(1), re.findall(r"\d+(?:\.\d+)?", m.group(2)), m.group(3)
        if doc not in files:
            continue  # reported above
        heads = headings(ROOT / doc)
        for num in nums:
            if num not in heads:
                problems.append(f"{where}: cites {doc} section {num}, which {doc} does not have "
                                f"(it has {', '.join(heads)})")
        if title is not None and nums and all(n in heads for n in nums):
            known = {t.lower() for n, t in heads.items()
                     if any(n == c or n.startswith(c + ".") for c in nums)}
            quoted = '"' in title
            for t in _titles(title):
                # A parenthesis that names no heading of the document is prose, not a title.
                is_title = quoted or t.lower() in {h.lower() for h in heads.values()}
                if is_title and t.lower() not in known:
                    problems.append(f"{where}: cites {doc} section {', '.join(nums)} as {t!r}, "
                                    f"but its title is {heads[nums[0]]!r}")
    return problems


def test_every_citation_resolves():
    files = set(tracked_files())
    problems = []
    for f in scanned_files():
        problems += check(text_of(ROOT / f), f, files)
    assert not problems, "\n".join(problems)


def test_notes_have_numbered_sections():
    for doc in ("docs/paper.md", "docs/design.md"):
        heads = headings(ROOT / doc)
        assert "1" in heads and len(heads) >= 8, doc
        assert len(set(heads)) == len(heads)


def test_the_paper_notes_are_cited():
    """The module that implements each part of the paper says so."""
    for path, section in [("engram_jax/hashing.py", "docs/paper.md section 1"),
                          ("engram_jax/allocation.py", "docs/paper.md section 2"),
                          ("engram_jax/counting.py", "docs/paper.md section 2"),
                          ("analysis/fit.py", "docs/paper.md section 2")]:
        assert section in (ROOT / path).read_text(), path


@pytest.mark.parametrize("text,ok", [
    ("docs/paper.md section 1.2 (Hashing)", True),
    ("docs/paper.md sections 3 and 8", True),
    ('docs/paper.md section 1 ("Token compression", "Hashing")', True),
    ("see docs/design.md section 4 (Contracts).", True),
    ("docs/paper.md section 9", False),  # no such section
    ("docs/paper.md section 1.2 (Lookup)", False),  # 1.2 is Hashing, 1.3 Lookup
    ('docs/paper.md section 2 ("Lookup")', False),
    ("docs/paper.md section 3 (memory scaling: 1.788 -> 1.743)", True),  # prose, not a title
    ("docs/paper.md sections 2 and 12", False),
    ("docs/nothing.md section 1", False),
    ("engram-paper.md section 2", False),
    ("design.md, 'Contracts'", False),
    ("Method (shared/gpu README)", False),
    ("run ../shared/checks/contracts.py", False),
    ("results/no-such-grid/README.md", False),
])
def test_check_flags_made_up_citations(text, ok):
    problems = check(text, "analysis/example.py", set(tracked_files()))
    assert (not problems) == ok, problems
