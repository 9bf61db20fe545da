"""The package layout docs/design.md states: each package imports only packages above it, so there is
no import cycle and the model never reaches into the runtime."""

from __future__ import annotations

import ast
from pathlib import Path

import seekwen

ROOT = Path(seekwen.__file__).parent
# docs/design.md, "Layout": each package may import the ones before it, never one after it
ORDER = ["errors", "config", "model", "fast", "hf", "gguf", "parallel", "runtime", "server", "train", "tools", "cli"]


def _package(module: str) -> str | None:
    """'seekwen.model.mla' -> 'model'; modules outside the ordered packages -> None."""
    parts = module.split(".")
    if parts[0] != "seekwen" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in ORDER else None


def _imports(path: Path) -> set[str]:
    """Absolute names of every seekwen module `path` imports (top level or inside functions)."""
    rel = path.relative_to(ROOT.parent).with_suffix("")
    here = list(rel.parts if rel.name != "__init__" else rel.parts[:-1])
    if rel.name != "__init__":
        here = here[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return {m for m in out if m.startswith("seekwen")}


def test_packages_import_only_packages_above_them():
    bad = []
    for path in ROOT.rglob("*.py"):
        src = _package("seekwen." + ".".join(path.relative_to(ROOT).with_suffix("").parts))
        if src is None:
            continue
        for mod in _imports(path):
            dst = _package(mod)
            if dst is not None and ORDER.index(dst) > ORDER.index(src):
                bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not bad, "\n".join(sorted(bad))


def test_model_never_imports_runtime():
    for path in (ROOT / "model").rglob("*.py"):
        assert not any(m.startswith("seekwen.runtime") for m in _imports(path)), path
        assert "importlib" not in path.read_text(), path  # nor by the back door
