"""No import cycle anywhere in the repository's code (runtime/, export/, benchmarks/, scripts/).

Every module is parsed with :mod:`ast` (nothing is imported), each ``import`` becomes an
edge, and the graph must be acyclic. Conventions:

* ``runtime/heimdex_clip/x.py`` is the module ``heimdex_clip.x`` (``__init__.py`` is the
  package itself), likewise ``export/heimdex_clip_export``; relative imports are resolved.
* A file in ``benchmarks/`` or ``scripts/`` runs as a script, with its own directory on
  ``sys.path``: a bare ``import run`` there means the sibling ``run.py``.
* ``from pkg import name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``.
* Every import counts, also inside functions and under ``if TYPE_CHECKING:``: a lazy or
  type-only import that closes a cycle still ties the two modules to each other.
* Importing ``pkg.mod`` is not counted as importing ``pkg/__init__.py`` (Python runs it, but
  every submodule would then close a cycle with any ``__init__`` that re-exports it).
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE_ROOTS = (REPO / "runtime", REPO / "export")
SCRIPT_DIRS = (REPO / "benchmarks", REPO / "scripts")


def _modules() -> dict[str, Path]:
    """Module name -> file, for every Python file under the four trees."""
    found: dict[str, Path] = {}
    for root in PACKAGE_ROOTS:
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts and ".egg-info" not in str(path) and "build" not in parts:
                found[".".join(parts)] = path
    for folder in SCRIPT_DIRS:
        for path in sorted(folder.rglob("*.py")):
            found[f"{folder.name}/{path.relative_to(folder).with_suffix('').as_posix()}"] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The repository modules ``name`` (at ``path``) imports."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    script_dir = name.split("/")[0] if "/" in name else None

    def known(target: str) -> str | None:
        if script_dir and f"{script_dir}/{target.replace('.', '/')}" in modules:
            return f"{script_dir}/{target.replace('.', '/')}"
        while target:
            if target in modules:
                return target
            target = target.rpartition(".")[0]
        return None

    edges: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([base] if base else []))
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        edges.update(t for t in map(known, targets) if t is not None and t != name)
    return edges


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (first module repeated at the end), or None."""
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        return list(exc.args[1])
    return None


def test_the_cycle_finder_finds_cycles():
    # The check below can fail: a two-module and a three-module cycle are found.
    assert find_cycle({"a": {"b"}, "b": {"a"}}) is not None
    assert set(find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) or []) == {
        "a",
        "b",
        "c",
    }
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_relative_and_script_imports_are_resolved():
    graph = import_graph()
    assert "heimdex_clip.providers" in graph["heimdex_clip.session"]  # from .providers import
    assert "heimdex_clip.session" in graph["heimdex_clip_export.pipeline"]  # absolute
    assert "heimdex_clip.db.connection" in graph["heimdex_clip.db.store"]
    if (REPO / "benchmarks" / "run.py").is_file():
        assert any(name.startswith("benchmarks/") for deps in graph.values() for name in deps)


@pytest.mark.parametrize("area", ["heimdex_clip", "heimdex_clip_export", "benchmarks", "scripts"])
def test_no_import_cycle(area):
    """Per area, so that a failure says whose modules close the cycle."""
    graph = import_graph()
    cycle = find_cycle(
        {name: deps for name, deps in graph.items() if name.split("/")[0].split(".")[0] == area}
    )
    assert cycle is None, f"import cycle in {area}: {' -> '.join(cycle or [])}"


def test_no_import_cycle_across_the_repository():
    cycle = find_cycle(import_graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle or [])}"
