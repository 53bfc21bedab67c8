"""The examples in README.md and docs/*.md run, so they cannot rot.

Convention: a fenced block directly preceded by the line ``<!-- test -->``
(invisible once rendered) is run. ``python`` blocks of one file run in order
in one namespace, in an empty temporary directory; in ``console`` blocks each
``$ async-ckpt ...`` line runs through ``async_ckpt.cli.main`` and must exit 0.
Every Python block of docs/quickstart.md must be marked.
"""

from __future__ import annotations

import inspect
import re
import shlex
from pathlib import Path

import pytest

import async_ckpt.errors
from async_ckpt.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = "<!-- test -->"
BLOCK = re.compile(
    r"^<!-- test -->[ \t]*\n```(?P<lang>[a-z]+)[ \t]*\n(?P<body>.*?)^```[ \t]*$", re.S | re.M
)
FENCE = re.compile(r"^```(?P<lang>[a-z]*)[ \t]*$", re.M)


def marked_blocks(path: Path) -> list[tuple[str, str, int]]:
    """``(language, code, line of the code's first line)`` of each marked block."""
    text = path.read_text()
    return [
        (m["lang"], m["body"], text.count("\n", 0, m.start("body")) + 1)
        for m in BLOCK.finditer(text)
    ]


TESTED = [p for p in DOCS if p.exists() and marked_blocks(p)]


@pytest.mark.multiprocess
@pytest.mark.parametrize("path", TESTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_examples_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {"__name__": f"docs_example_{path.stem}"}
    for lang, body, line in marked_blocks(path):
        if lang == "python":
            # leading newlines make tracebacks point at the line in the document
            exec(compile("\n" * (line - 1) + body, str(path), "exec"), namespace)
        elif lang == "console":
            for command in body.splitlines():
                if command.startswith("$ async-ckpt "):
                    argv = shlex.split(command.removeprefix("$ async-ckpt "))
                    assert main(argv) == 0, f"{path.name}:{line}: {command}"
        else:
            pytest.fail(f"{path.name}:{line}: cannot run a {lang!r} block")


@pytest.mark.parametrize("path", [p for p in DOCS if p.exists()], ids=lambda p: p.name)
def test_every_marker_precedes_a_block(path: Path) -> None:
    text = path.read_text()
    assert text.count(MARKER) == len(marked_blocks(path)), (
        f"{path.name}: a {MARKER} line must come right before a ```python or ```console fence"
    )


def test_quickstart_python_blocks_are_all_tested() -> None:
    path = ROOT / "docs" / "quickstart.md"
    python_fences = [m for m in FENCE.finditer(path.read_text()) if m["lang"] == "python"]
    marked = [b for b in marked_blocks(path) if b[0] == "python"]
    assert len(python_fences) == len(marked) >= 4


def test_troubleshooting_covers_every_error() -> None:
    text = (ROOT / "docs" / "troubleshooting.md").read_text()
    errors = [
        name
        for name, cls in inspect.getmembers(async_ckpt.errors, inspect.isclass)
        if issubclass(cls, async_ckpt.errors.CheckpointError)
        and cls is not async_ckpt.errors.CheckpointError
    ]
    assert len(errors) >= 15
    missing = [name for name in errors if f"### {name}\n" not in text]
    assert not missing, f"docs/troubleshooting.md has no section for {missing}"
