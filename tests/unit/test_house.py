"""The house's rules that hold for every file: sizes that stay readable, documents that speak of
the project (not of the tracker that asked for a change), and links in the documents that lead
somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_SOURCE_LINES = 600  # one job a file; past this a file has always turned out to hold several
DOCS = [ROOT / "README.md", ROOT / "DESIGN.md", *sorted((ROOT / "docs").glob("*.md"))]
TRACKER_REFERENCE = re.compile(r"\bissues? ?#?\d+\b|\(#\d+\)", re.IGNORECASE)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _sources() -> list[Path]:
    return sorted(p for pkg in ("groupcover", "orchestrator") for p in (ROOT / pkg).rglob("*.py"))


def _texts() -> list[Path]:
    patterns = ("*.py", "*.sh", "*.j2", "*.toml", "*.md", "Makefile")
    found: set[Path] = set()
    folders = ("groupcover", "orchestrator", "tests", "scripts", "images", "vm_templates", ".ci")
    for folder in folders:
        for pattern in patterns:
            found |= set((ROOT / folder).rglob(pattern))
    return sorted({*found, *DOCS, ROOT / "Makefile", ROOT / "pyproject.toml"})


def test_no_source_file_is_over_the_size_of_one_job() -> None:
    sizes = {p: len(p.read_text().splitlines()) for p in _sources()}
    large = {str(p.relative_to(ROOT)): n for p, n in sizes.items() if n > MAX_SOURCE_LINES}
    assert not large, f"split these by job (over {MAX_SOURCE_LINES} lines): {large}"


def test_code_and_documents_say_why_not_which_ticket() -> None:
    hits = []
    for path in _texts():
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if TRACKER_REFERENCE.search(line) and "TRACKER_REFERENCE" not in line:
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not hits, "say what a thing is and why, not which issue asked for it:\n" + "\n".join(
        hits
    )


@pytest.mark.parametrize("document", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_of_a_document_resolves(document: Path) -> None:
    broken = []
    for target in LINK.findall(document.read_text()):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = (document.parent / target.split("#", 1)[0]).resolve()
        if not path.exists():
            broken.append(target)
    assert not broken, f"{document.relative_to(ROOT)} links to missing files: {broken}"
