"""The repository stands alone: no file cites a document outside it, and every docs/ page a file
cites exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: documents that live outside the repository (the requirements' originals)
OUTSIDE = re.compile(r"\bDESIGN\.md\b|\bshared/[\w.-]+\.md\b|/work/shared\b")
CITED_DOC = re.compile(r"\bdocs/[\w./-]+\.md\b")


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    files = []
    for name in out.decode().split("\0"):
        path = ROOT / name
        if name and path.is_file() and path.suffix not in {".png", ".jpg", ".gz", ".whl"}:
            files.append(path)
    return files


def test_no_file_cites_a_document_outside_the_repository():
    offenders = []
    for path in _tracked_text_files():
        if path.name == "test_standalone.py":
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:100]}")
    assert not offenders, "cite docs/ pages instead:\n" + "\n".join(offenders)


def test_every_cited_docs_page_exists():
    missing = []
    for path in _tracked_text_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for cited in set(CITED_DOC.findall(text)):
            if "<" in cited or "*" in cited:
                continue
            if not (ROOT / cited).exists() and not (ROOT / cited.split("docs/", 1)[0] / cited).exists():
                missing.append(f"{path.relative_to(ROOT)} cites {cited}")
    assert not missing, "\n".join(missing)
