"""The house rule: imports run from the wings (``strategies/``, ``adapters/``) to the core (``tokcomp/``),
never back and never between the wings; and the core's modules form no import cycle.

Imports are read with `ast` from the source, so a lazy import inside a function counts as much as one at the
top of a module (a function-level import is still an arrow).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package directory -> the dotted name it is installed as (pyproject's package-dir)
PACKAGES = {"tokcomp": "tokcomp", "strategies": "tokcomp.strategies", "adapters": "tokcomp.adapters"}
WINGS = ("tokcomp.strategies", "tokcomp.adapters")


def _modules(folder: str) -> dict[str, Path]:
    """Every module of a package directory, by its installed dotted name."""
    base = PACKAGES[folder]
    out = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([base, *parts])] = path
    return out


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    """``(line, absolute dotted name)`` of everything ``module`` imports, relative imports resolved."""
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.append((node.lineno, base))
            # `from tokcomp import strategies` names the wing as an attribute
            found += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return found


def _inside(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


CORE = {m: p for m, p in _modules("tokcomp").items()}
CASES = [(m, p, "core") for m, p in CORE.items()]
CASES += [(m, p, "tokcomp.strategies") for m, p in _modules("strategies").items()]
CASES += [(m, p, "tokcomp.adapters") for m, p in _modules("adapters").items()]


@pytest.mark.parametrize(("module", "path", "side"), CASES, ids=[c[0] for c in CASES])
def test_arrows_point_from_the_wings_to_the_core(module: str, path: Path, side: str) -> None:
    forbidden = WINGS if side == "core" else tuple(w for w in WINGS if w != side)
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for line, name in _imports(module, path)
        if any(_inside(name, w) for w in forbidden)
    ]
    assert not bad, "imports against the arrows: " + "; ".join(bad)


def test_the_scan_sees_wing_imports() -> None:
    """The checker itself: it resolves relative and attribute imports of a wing (else the test above
    would pass on anything)."""
    probe = ROOT / "tokcomp" / "_probe_for_arrows.py"
    src = "from .adapters.llava_onevision import _nearest\nfrom tokcomp import strategies\nimport tokcomp.adapters\n"
    tree_names = []
    try:
        probe.write_text(src)
        tree_names = [n for _, n in _imports("tokcomp._probe_for_arrows", probe)]
    finally:
        probe.unlink()
    assert "tokcomp.adapters.llava_onevision" in tree_names
    assert "tokcomp.strategies" in tree_names
    assert "tokcomp.adapters" in tree_names


def _core_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in CORE}
    for module, path in CORE.items():
        for _, name in _imports(module, path):
            # the longest core module the name lies in (a `from . import registry` names tokcomp.registry)
            hits = [m for m in CORE if _inside(name, m) and m != "tokcomp"]
            if hits:
                target = max(hits, key=len)
                if target != module:
                    graph[module].add(target)
    return graph


def test_contracts_and_schedule_do_not_import_each_other() -> None:
    graph = _core_graph()
    assert "tokcomp.contracts" in graph["tokcomp.schedule"]  # the schedule is built on the contracts
    assert "tokcomp.schedule" not in graph["tokcomp.contracts"]
    # and nothing the contracts import leads back to the schedule
    seen, todo = set(), ["tokcomp.contracts"]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo += graph[m]
    assert "tokcomp.schedule" not in seen, sorted(seen)
