"""The documentation holds: its examples run, the site builds with ``--strict``, every module is in the API
reference, and every public name has a docstring.

* Every ```` ```python ```` block of ``docs/**/*.md`` is executed. A page's blocks run in order in one
  namespace (later blocks use earlier names), with the working directory in a temporary folder. Blocks that
  must not run are tagged ```` ```text ```` or ```` ```bash ````. Tracebacks point at the Markdown file and line.
* ``mkdocs build --strict`` builds the site into a temporary folder (skipped only when mkdocs is not
  installed: ``pip install -e ".[docs]"``).
* Every module of ``tokcomp``, ``tokcomp.strategies`` and ``tokcomp.adapters`` (found with ``pkgutil``, so a
  new module is checked without editing this file) appears in the built API reference.
* Every public name (``__all__`` of each of those modules and packages, else its public top-level
  definitions) and every public method of a public class has a docstring of its own. A constant's docstring
  is the string literal right after its assignment (the only form mkdocstrings renders; ``#:`` comments are
  not shown). A dataclass without a docstring counts as undocumented, although Python fills in its
  signature as ``__doc__``.
"""

from __future__ import annotations

import ast
import dataclasses
import html
import importlib
import inspect
import os
import pkgutil
import re
import subprocess
import sys
import textwrap
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tokcomp

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PACKAGES = ("tokcomp", "tokcomp.strategies", "tokcomp.adapters")

# ---------------------------------------------------------------------------------------------------------
# Executable examples
# ---------------------------------------------------------------------------------------------------------
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,})(?P<info>[^`\n]*)$")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(first code line, code)`` of every fenced block whose language is ``python`` (indented fences, as
    inside admonitions, are dedented)."""
    blocks: list[tuple[int, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, ticks = m["indent"], m["ticks"]
        lang = (m["info"].strip().split() or [""])[0].lstrip(".").lower()
        start = i + 1
        j = start
        while j < len(lines) and lines[j].strip() != ticks:
            j += 1
        if lang == "python":
            body = [line.removeprefix(indent) for line in lines[start:j]]
            blocks.append((start + 1, textwrap.dedent("\n".join(body))))
        i = j + 1
    return blocks


def _pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def _pages_with_code() -> list[Path]:
    return [p for p in _pages() if python_blocks(p.read_text(encoding="utf-8"))]


def test_python_blocks_parser() -> None:
    text = "a\n```python\nx = 1\n```\n```text\nnot run\n```\n!!! note\n    ```python\n    y = x\n    ```\n"
    assert python_blocks(text) == [(3, "x = 1"), (10, "y = x")]


@pytest.mark.parametrize("page", _pages_with_code(), ids=lambda p: str(p.relative_to(DOCS)))
def test_page_examples_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The page's python blocks run in order, in one namespace, without an error."""
    rel = page.relative_to(ROOT)
    module = types.ModuleType(f"_tokcomp_docs_{page.stem.replace('-', '_')}")
    module.__file__ = str(page)
    sys.modules[module.__name__] = module  # dataclasses and pickling look their module up
    monkeypatch.chdir(tmp_path)
    try:
        for line, code in python_blocks(page.read_text(encoding="utf-8")):
            # Leading newlines make the line numbers of a traceback those of the Markdown file.
            exec(compile("\n" * (line - 1) + code, str(rel), "exec"), module.__dict__)  # noqa: S102
    finally:
        del sys.modules[module.__name__]
        tokcomp.registry.reload()  # a page may register in-process plugins


# ---------------------------------------------------------------------------------------------------------
# The site
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    try:
        import mkdocs  # noqa: F401
        import mkdocstrings  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"mkdocs is not installed ({exc}); pip install -e '.[docs]' to build the docs")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600, check=False,
    )
    return proc, out


def test_mkdocs_build_strict(site: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, _ = site
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"


def _modules() -> list[str]:
    """Every non-private module of the three packages, the packages included."""
    names: list[str] = []
    for pkg_name in PACKAGES:
        pkg = importlib.import_module(pkg_name)
        found = [pkg_name] + [info.name for info in pkgutil.walk_packages(pkg.__path__, prefix=f"{pkg_name}.")]
        # (In a regular install tokcomp/strategies is inside tokcomp/, so it is walked twice: keep it once.)
        names += [n for n in found if n not in names and not any(part.startswith("_") for part in n.split("."))]
    return names


def test_reference_renders_every_module(site: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    """Each module has an anchor in the built API reference (so its docstrings were collected)."""
    proc, out = site
    if proc.returncode != 0:
        pytest.fail("the site did not build; see test_mkdocs_build_strict")
    rendered = "".join(p.read_text(encoding="utf-8") for p in (out / "reference").rglob("*.html"))
    anchors = set(re.findall(r'id="([\w.]+)"', rendered))
    missing = [m for m in _modules() if m not in anchors]
    assert not missing, (
        f"modules missing from the API reference: {missing}. Core modules need a page "
        "docs/reference/<name>.md holding '::: tokcomp.<name>' (listed in mkdocs.yml's nav); strategies and "
        "adapters are picked up by docs/reference/strategies.md and adapters.md automatically."
    )
    text = html.unescape(re.sub(r"<[^>]+>", " ", rendered))
    for snippet in ("Spectrum Pruning Unit", "Qwen2-VL / Qwen2.5-VL", "The plugin registry"):
        assert snippet in text, f"{snippet!r} not rendered: a docstring was not collected"


def _reference_html(site: tuple[subprocess.CompletedProcess[str], Path]) -> dict[str, str]:
    proc, out = site
    if proc.returncode != 0:
        pytest.fail("the site did not build; see test_mkdocs_build_strict")
    return {str(p.relative_to(out)): p.read_text(encoding="utf-8") for p in (out / "reference").rglob("*.html")}


def _article(page: str) -> str:
    """The page's rendered content (the theme's navigation and search index left out)."""
    m = re.search(r'<article class="md-content__inner[^"]*">(.*?)</article>', page, re.DOTALL)
    return m.group(1) if m else page


def test_reference_renders_docstrings_as_intended(site: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    """What builds but reads broken: a Google-style ``Example:`` section (an admonition whose ``>>>`` lines
    become grey nested blockquotes), reST roles and ``::`` literal blocks (shown verbatim), and signatures
    that were not formatted (no ruff/black installed)."""
    problems = []
    for name, page in _reference_html(site).items():
        body = _article(page)
        text = html.unescape(re.sub(r"<[^>]+>", "", body))
        if "<blockquote>" in body:
            problems.append(f"{name}: a blockquote (a docstring 'Example:' section or '>>>' outside Examples:)")
        for role in re.findall(r":(?:mod|class|func|meth|attr|obj|data|exc|ref):\S*", text):
            problems.append(f"{name}: reST role {role!r} (write `name` or [name][tokcomp.module.name])")
        for line in text.splitlines():
            if re.search(r"\w::\s*$", line):
                problems.append(f"{name}: reST literal-block marker in {line.strip()!r} (use a fenced block)")
        if 'class="doc doc-signature' in body and "doc-signature" in body and "highlight" not in body:
            problems.append(f"{name}: signatures not highlighted")
    assert not problems, "\n".join(problems)


def test_site_has_urls_and_formatted_signatures(site: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    proc, out = site
    if proc.returncode != 0:
        pytest.fail("the site did not build; see test_mkdocs_build_strict")
    index = (out / "index.html").read_text(encoding="utf-8")
    assert '<link rel="canonical" href="https://' in index, "site_url is not set in mkdocs.yml"
    assert 'class="md-source"' in index, "repo_url is not set in mkdocs.yml"
    runtime = (out / "reference" / "runtime" / "index.html").read_text(encoding="utf-8")
    # A formatted signature puts each parameter of a long signature on its own line.
    sig = re.search(r'id="tokcomp\.runtime\.compress".*?<div class="doc-signature[^>]*>(.*?)</div>', runtime, re.DOTALL)
    assert sig, "compress() has no separate signature block"
    assert html.unescape(re.sub(r"<[^>]+>", "", sig.group(1))).count("\n") >= 3, "signature not formatted"


def test_benchmark_page_reads_on_a_page(site: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    """The benchmark page: every table in its own scrolling box (docs/assets/extra.css), short section
    titles, and the profiling notes on a page of their own, linked."""
    proc, out = site
    if proc.returncode != 0:
        pytest.fail("the site did not build; see test_mkdocs_build_strict")
    page = (out / "benchmarks" / "index.html").read_text(encoding="utf-8")
    body = _article(page)
    tables = body.count("<table")
    assert tables >= 5
    boxed = re.findall(r'<div class="bench-table">\s*(?:<div class="md-typeset__scrollwrap">\s*'
                       r'<div class="md-typeset__table">\s*)?<table', body)
    assert len(boxed) == tables, f"{tables - len(boxed)} of {tables} tables are not in a .bench-table box"
    assert "assets/extra.css" in page
    css = (out / "assets" / "extra.css").read_text(encoding="utf-8")
    assert re.search(r"\.bench-table\s*\{[^}]*overflow-x:\s*auto", css)
    titles = [html.unescape(re.sub(r"<[^>]+>", "", t)).replace("¶", "").strip()
              for t in re.findall(r"<h[23][^>]*>(.*?)</h[23]>", body, re.DOTALL)]
    assert titles and all(len(t) <= 32 for t in titles), [t for t in titles if len(t) > 32]
    assert not any("profil" in t.lower() for t in titles)
    assert "cProfile" not in body and 'href="../profiling/"' in body
    notes = _article((out / "profiling" / "index.html").read_text(encoding="utf-8"))
    assert "cProfile" in notes and "Strategy overhead" in notes


# ---------------------------------------------------------------------------------------------------------
# Pages that describe code: they must keep up with it
# ---------------------------------------------------------------------------------------------------------
_TEST_REF = re.compile(r"(tests/test_\w+\.py)::(test_\w+)")


def test_pages_name_existing_tests() -> None:
    """Every ``tests/test_x.py::test_name`` a page cites (the invariants page cites many) exists."""
    missing = []
    cited = 0
    for page in _pages():
        for path, name in _TEST_REF.findall(page.read_text(encoding="utf-8")):
            cited += 1
            source = ROOT / path
            if not source.is_file() or not re.search(rf"^def {name}\(", source.read_text(), re.MULTILINE):
                missing.append(f"{page.relative_to(ROOT)}: {path}::{name}")
    assert cited, "no page cites a test; the invariants page should"
    assert not missing, "pages cite tests that do not exist (renamed?):\n  " + "\n  ".join(missing)


def test_home_page_has_the_readme_setup_commands() -> None:
    """The setup commands on the home page are the README's, letter for letter."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = [line for line in readme.splitlines() if line.startswith("pip install")]
    assert commands, "the README has no 'pip install' command line"
    home = (DOCS / "index.md").read_text(encoding="utf-8").splitlines()
    missing = [c for c in commands if c not in home]
    assert not missing, f"docs/index.md lacks the README's setup commands: {missing}"


_SECTION = re.compile(r"^#{2,3} `(?P<name>[\w-]+)`.*\{#(?P<anchor>[\w-]+)\}\s*$", re.MULTILINE)
_PARAM_ROW = re.compile(r"^\| `(?P<name>\w+)` \| `(?P<default>[^`]*)` \|", re.MULTILINE)


def documented_parameters(text: str) -> dict[str, dict[str, str]]:
    """``{strategy: {parameter: default as written}}`` from the parameter tables of ``docs/strategies.md``
    (a section is a heading ``## `name` ... {#name}``; its parameters are the first table under it whose
    header starts with ``| parameter |``)."""
    sections = list(_SECTION.finditer(text))
    out: dict[str, dict[str, str]] = {}
    for k, m in enumerate(sections):
        body = text[m.end(): sections[k + 1].start() if k + 1 < len(sections) else len(text)]
        body = re.split(r"^## ", body, maxsplit=1, flags=re.MULTILINE)[0]  # stop at the next top-level section
        table = re.search(r"^\| parameter \|.*?(?=^[^|]|\Z)", body, re.MULTILINE | re.DOTALL)
        out[m["name"]] = {r["name"]: r["default"] for r in _PARAM_ROW.finditer(table.group(0))} if table else {}
    return out


def test_strategy_page_matches_the_code() -> None:
    """Every built-in strategy has a section on docs/strategies.md whose parameter table lists exactly its
    dataclass fields, with their defaults."""
    documented = documented_parameters((DOCS / "strategies.md").read_text(encoding="utf-8"))
    problems = []
    for name, reg in sorted(tokcomp.registry.strategies().items()):
        if reg.package != "tokcomp":
            continue  # plugins document themselves
        if name not in documented:
            problems.append(f"{name}: no section '## `{name}` ... {{#{name}}}' on docs/strategies.md")
            continue
        fields = {f.name: f for f in dataclasses.fields(reg.obj)} if dataclasses.is_dataclass(reg.obj) else {}
        table = documented[name]
        if set(table) != set(fields):
            problems.append(f"{name}: documented parameters {sorted(table)} but the class has {sorted(fields)}")
            continue
        for pname, written in table.items():
            default = fields[pname].default
            if default is dataclasses.MISSING:
                continue
            try:
                value = ast.literal_eval(written)
            except (ValueError, SyntaxError):
                problems.append(f"{name}.{pname}: documented default {written!r} is not a Python literal")
                continue
            if value != default or type(value) is not type(default):
                problems.append(f"{name}.{pname}: documented default {written} but the class has {default!r}")
    assert not problems, "docs/strategies.md is out of date:\n  " + "\n  ".join(problems)


def test_documented_parameters_parser() -> None:
    text = "## `a` — A {#a}\n\n| parameter | default | meaning |\n|---|---|---|\n| `x` | `1` | m |\n" \
           "| `y` | `None` | m |\n\ntext\n\n## `b` {#b}\n\nno table\n"
    assert documented_parameters(text) == {"a": {"x": "1", "y": "None"}, "b": {}}


# ---------------------------------------------------------------------------------------------------------
# Docstrings
# ---------------------------------------------------------------------------------------------------------
def _where(obj: Any) -> str:
    try:
        path = Path(inspect.getsourcefile(obj) or "?")
        line = inspect.getsourcelines(obj)[1]
    except (TypeError, OSError):
        return getattr(obj, "__qualname__", repr(obj))
    try:
        path = path.resolve().relative_to(ROOT)
    except ValueError:
        pass
    return f"{path}:{line}"


def _own_doc(cls: type) -> str | None:
    doc = cls.__dict__.get("__doc__")
    if doc and dataclasses.is_dataclass(cls) and doc.startswith(f"{cls.__name__}("):
        try:  # the signature dataclasses writes when the class has no docstring
            auto = cls.__name__ + str(inspect.signature(cls)).replace(" -> None", "")
        except (TypeError, ValueError):
            auto = None
        if doc == auto:
            return None
    return doc


def _func_doc(obj: Any) -> str | None:
    if isinstance(obj, (staticmethod, classmethod)):
        obj = obj.__func__
    return obj.__doc__ if isinstance(obj, property) else getattr(obj, "__doc__", None)


def _module_ast(module: types.ModuleType) -> ast.Module | None:
    try:
        return ast.parse(inspect.getsource(module))
    except (OSError, TypeError):
        return None


def _relative(path: str | None) -> str:
    resolved = Path(path or "?").resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(resolved)


def _constant_doc(module: types.ModuleType, name: str, prefix: str) -> tuple[bool, str]:
    """Whether the module-level ``name`` has a docstring where it is assigned, following ``from x import``
    re-exports inside the packages named by ``prefix``; also where it is assigned."""
    tree = _module_ast(module)
    if tree is None:
        return False, f"{_relative(module.__file__)} ({name})"
    body = tree.body
    for k, node in enumerate(body):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        elif type(node).__name__ == "TypeAlias":  # ``type X = ...`` (Python 3.12+)
            targets = [node.name]  # type: ignore[attr-defined]
        else:
            targets = []
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            nxt = body[k + 1] if k + 1 < len(body) else None
            documented = (
                isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)
            )
            return documented, f"{_relative(module.__file__)}:{node.lineno}"
        if isinstance(node, ast.ImportFrom) and any((a.asname or a.name) == name for a in node.names):
            base = module.__name__ if hasattr(module, "__path__") else module.__name__.rpartition(".")[0]
            for _ in range(max(node.level - 1, 0)):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
            if target.split(".")[0] != prefix:
                return True, name  # another library's object: not ours to document
            original = next(a.name for a in node.names if (a.asname or a.name) == name)
            return _constant_doc(importlib.import_module(target), original, prefix)
    return False, f"{_relative(module.__file__)} ({name})"


def _public_names(module: types.ModuleType) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [
            n for n, v in vars(module).items()
            if not n.startswith("_") and getattr(v, "__module__", module.__name__) == module.__name__
            and not isinstance(v, types.ModuleType)
        ]
    return [n for n in names if not (n.startswith("__") and n.endswith("__"))]


def undocumented(modules: list[types.ModuleType], prefix: str = "tokcomp") -> list[str]:
    """``file:line what`` of every public name of ``modules`` (and public method of their public classes)
    without a docstring of its own; objects re-exported from outside the ``prefix`` package are skipped."""
    problems: list[str] = []
    seen: set[int] = set()
    seen_constants: set[str] = set()

    def check_class(cls: type, qualname: str) -> None:
        if not _own_doc(cls):
            problems.append(f"{_where(cls)} class {qualname}")
        for attr, value in vars(cls).items():
            if attr.startswith("_"):
                continue
            target = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
            if (isinstance(target, property) or inspect.isfunction(target)) and not _func_doc(value):
                fn = target.fget if isinstance(target, property) else target
                problems.append(f"{_where(fn)} method {qualname}.{attr}")

    for module in modules:
        if not module.__doc__:
            problems.append(f"{_where(module)} module {module.__name__}")
        for name in _public_names(module):
            if not hasattr(module, name):
                problems.append(f"{_where(module)} {module.__name__}.__all__ lists {name!r}, which does not exist")
                continue
            obj = getattr(module, name)
            if isinstance(obj, types.ModuleType):
                continue  # checked as a module in its own right
            if inspect.isclass(obj) or inspect.isfunction(obj):
                if id(obj) in seen:
                    continue
                seen.add(id(obj))
                qual = f"{obj.__module__}.{obj.__qualname__}"
                if obj.__module__.split(".")[0] != prefix:
                    continue  # re-exported from another library
                if inspect.isclass(obj):
                    check_class(obj, qual)
                elif not obj.__doc__:
                    problems.append(f"{_where(obj)} function {qual}")
            else:
                ok, where = _constant_doc(module, name, prefix)
                if where in seen_constants:
                    continue  # the same assignment, re-exported (tokcomp.hookimpl is tokcomp.hookspecs.hookimpl)
                seen_constants.add(where)
                if not ok:
                    problems.append(f"{where} constant {module.__name__}.{name}")
    return sorted(set(problems))


def test_docstring_check_catches_gaps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checker itself: it finds an undocumented function, method, dataclass and constant."""
    src = '''"""A module."""
import dataclasses

__all__ = ["f", "g", "C", "D", "K", "J"]

def f():
    """Documented."""

def g():
    pass

class C:
    """Documented."""

    def m(self):
        pass

    @property
    def p(self):
        return 1

@dataclasses.dataclass
class D:
    x: int = 1

K = 1
"""Documented constant."""

J = 2
'''
    (tmp_path / "tokcomp_docs_probe.py").write_text(src)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        found = undocumented([importlib.import_module("tokcomp_docs_probe")], prefix="tokcomp_docs_probe")
    finally:
        sys.modules.pop("tokcomp_docs_probe", None)
    text = "\n".join(found)
    for needle in ("function tokcomp_docs_probe.g", "method tokcomp_docs_probe.C.m", "method tokcomp_docs_probe.C.p",
                   "class tokcomp_docs_probe.D", "constant tokcomp_docs_probe.J"):
        assert needle in text, f"{needle!r} not reported in:\n{text}"
    assert "tokcomp_docs_probe.f" not in text and "constant tokcomp_docs_probe.K" not in text
    assert not any(line.endswith("class tokcomp_docs_probe.C") for line in found)


def _all_modules() -> Iterator[types.ModuleType]:
    for name in _modules():
        yield importlib.import_module(name)


def test_every_public_name_has_a_docstring() -> None:
    problems = undocumented(list(_all_modules()))
    assert not problems, "public names without a docstring (file:line):\n  " + "\n  ".join(problems)
