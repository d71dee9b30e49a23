"""The repository stands on its own: no file points a reader at material outside it.

A user has the repository only. Docs, docstrings, comments and the example configuration say what they
mean in the repository's own words (the reference system and its defects are described in
docs/design.md) instead of citing design guides, specifications or defect numbers kept elsewhere.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve()

#: names of outside material; each match is a pointer a reader of the repository cannot follow
OUTSIDE = re.compile(
    r"ARCHITECTURE\.md|STYLE\.md|reference-node-side|reference-session-job-side|seed-heartbeat-async-fix"
    r"|shared/|\bFlaw-\d|\breference (?:section |§)?\d",
    re.IGNORECASE,
)

#: recorded wire traffic (conformance data) is quoted verbatim, not prose of ours
RECORDINGS = ROOT / "tests" / "conformance" / "recordings"


#: what a user reads, when there is no git checkout to list the tracked files (an unpacked sdist)
_READ_BY_USERS = ("docs", "src", "tests", "bench", "README.md", "Makefile", "lingua-scheduler.example.toml")


def _repository_files() -> list[Path]:
    """Tracked files plus new ones not ignored, so a file is checked before it is committed."""
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        top = [ROOT / name for name in _READ_BY_USERS]
        found = [q for p in top for q in ([p] if p.is_file() else p.rglob("*"))]
        return sorted(q for q in found if "__pycache__" not in q.parts and ".egg-info" not in str(q))
    out = subprocess.run(
        [git, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout
    return sorted({ROOT / name for name in out.decode().split("\0") if name})


def _checked(path: Path) -> bool:
    if path == THIS or path.suffix == ".jsonl" or not path.is_file():
        return False
    return not path.is_relative_to(RECORDINGS)


def _text(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data:
        return None  # binary (images)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def test_no_file_refers_to_material_outside_the_repository() -> None:
    files = [p for p in _repository_files() if _checked(p)]
    names = {p.relative_to(ROOT).as_posix() for p in files}
    # the scan covers what a user reads: docs, code, tests, benchmarks, README, example configuration
    expected = {"README.md", "docs/design.md", "lingua-scheduler.example.toml", "src/lingua_scheduler/cli.py"}
    assert expected <= names
    assert any(n.startswith("bench/") for n in names) and any(n.startswith("tests/") for n in names)
    found: list[str] = []
    for path in files:
        text = _text(path)
        if text is None:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            for m in OUTSIDE.finditer(line):
                found.append(f"{path.relative_to(ROOT)}:{lineno}: {m.group(0)!r} in {line.strip()[:100]!r}")
    assert not found, "references to material outside the repository:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "line",
    [
        "keeps the properties of `ARCHITECTURE.md` section 2",
        "see STYLE.md",
        "FNV-1a 64 exactly as reference-node-side.md section 5.3",
        "(reference-session-job-side.md section 2)",
        "the lists in `shared/reference/`",
        "booleans default to false (reference Flaw-5)",
        "mixed into every FNV-1a hash (reference section 5.3)",
        '"""Reference 6.9: no_nodes if nothing was examined"""',
        "English rendering of seed-heartbeat-async-fix.zh.md",
    ],
)
def test_the_scan_catches_each_kind_of_outside_reference(line: str) -> None:
    assert OUTSIDE.search(line)


@pytest.mark.parametrize(
    "line",
    [
        "the reference scheduler (docs/design.md) computes FNV-1a the same way",
        "hash_seed = 0",
        "the seed document's scenario",
        "weak references to tasks",
        "a flawless run",
        "shared job records",
    ],
)
def test_the_scan_leaves_the_repositorys_own_words_alone(line: str) -> None:
    assert not OUTSIDE.search(line)


def test_recordings_and_this_file_are_not_scanned() -> None:
    assert not _checked(THIS)
    assert not _checked(RECORDINGS / "node-app.jsonl")
    assert not _checked(ROOT / "tests" / "conformance" / "anything.jsonl")
    assert _checked(ROOT / "docs" / "design.md")
