"""Imports flow one way through the package (docs/architecture.md): no module imports a layer above it."""

from __future__ import annotations

import ast
from pathlib import Path

import async_ckpt

PACKAGE = Path(async_ckpt.__file__).parent

# What each top-level part of the package may import from the package (besides itself).
BASE = {"errors", "settings", "gc_pause", "threads"}
ALLOWED = {
    "errors": set(),
    "settings": {"errors"},
    "gc_pause": set(),
    "threads": set(),
    "format": BASE,
    "state": BASE | {"format"},
    "dist": BASE,
    "storage": BASE | {"format"},
    "planning": BASE | {"format", "state", "dist"},
    "staging": BASE | {"format", "state"},
    "pipeline": BASE | {"format", "state", "dist", "storage", "planning", "staging"},
    "executor": BASE | {"format", "state", "dist", "storage", "planning", "staging", "pipeline"},
}
ALLOWED["dcp_compat"] = ALLOWED["executor"] | {"executor"}
ALLOWED["api"] = ALLOWED["executor"] | {"executor", "dcp_compat"}
ALLOWED["materialize"] = ALLOWED["api"]
ALLOWED["manager"] = ALLOWED["api"] | {"api"}
ALLOWED["tools"] = ALLOWED["manager"] | {"manager", "materialize"}
ALLOWED["integrations"] = ALLOWED["tools"] | {"tools"}
ALLOWED["cli"] = ALLOWED["tools"] | {"tools"}
ALLOWED["demo"] = ALLOWED["cli"] | {"cli", "__init__"}
ALLOWED["__init__"] = set(ALLOWED) - {"demo", "cli", "integrations", "__init__"}


def _part(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_parts(path: Path) -> set[str]:
    """The top-level parts of the package that ``path`` imports (relative or absolute)."""
    depth = len(path.relative_to(PACKAGE).parts) - 1
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level <= depth:
                    continue  # inside its own part
                names = (node.module or "").split(".")
                if names == [""]:
                    found.update(alias.name for alias in node.names)
                else:
                    found.add(names[0])
            elif node.module and node.module.startswith("async_ckpt."):
                found.add(node.module.split(".")[1])
            elif node.module == "async_ckpt":
                found.add("__init__")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("async_ckpt."):
                    found.add(alias.name.split(".")[1])
    return found


def test_no_module_imports_a_layer_above_it():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = _part(path)
        allowed = ALLOWED.get(part)
        assert allowed is not None, f"{path}: part {part!r} has no place in the layering"
        for other in _imported_parts(path) - {part} - allowed:
            wrong.append(f"{path.relative_to(PACKAGE)} imports {other}")
    assert not wrong, "\n".join(wrong)
