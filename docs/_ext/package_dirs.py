"""A griffe extension that lets mkdocstrings see subpackages kept in another folder (setuptools ``package-dir``).

tokcomp installs the top-level folders ``strategies/`` and ``adapters/`` as ``tokcomp.strategies`` and
``tokcomp.adapters``. Griffe reads source statically and finds a package's submodules by walking its folder,
so it never looks for them outside ``tokcomp/``. When griffe has loaded a package named in ``packages``,
this extension visits each mapped folder as a subpackage of it (``__init__.py`` first, then every module),
exactly as griffe itself would have, had the folder been inside the package.

The subpackage's ``__init__`` re-exports its modules' classes (``from .spu import SPU``, listed in
``__all__``). mkdocstrings would render each of them twice on a page that shows the package with its
submodules, so those re-exports are marked non-public here: every object is documented once, in the module
that defines it.

Configured in ``mkdocs.yml`` (folders relative to the repository root, like ``[tool.setuptools]
package-dir`` in ``pyproject.toml``)::

    extensions:
      - docs/_ext/package_dirs.py:PackageDirs:
          packages: {tokcomp.strategies: strategies, tokcomp.adapters: adapters}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import griffe

ROOT = Path(__file__).resolve().parents[2]


class PackageDirs(griffe.Extension):
    """Attach ``{dotted.name: folder}`` subpackages to their parent package once it is loaded.

    Args:
        packages: Dotted subpackage name to its folder, relative to the repository root.
    """

    def __init__(self, packages: dict[str, str]) -> None:
        super().__init__()
        self.packages = {name: ROOT / folder for name, folder in packages.items()}

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Visit the mapped folders whose parent is ``pkg``, unless griffe already found them."""
        for dotted, folder in self.packages.items():
            parent, _, name = dotted.rpartition(".")
            if parent != pkg.path or name in pkg.members:
                continue
            sub = self._visit(loader, name, folder / "__init__.py", pkg)
            pkg.set_member(name, sub)
            for path in sorted(folder.glob("*.py")):
                if path.stem != "__init__":
                    sub.set_member(path.stem, self._visit(loader, path.stem, path, sub))
            for member in sub.members.values():
                if member.is_alias and member.target_path.startswith(f"{sub.path}."):
                    member.public = False  # documented in its own module

    @staticmethod
    def _visit(loader: griffe.GriffeLoader, name: str, path: Path, parent: griffe.Module) -> griffe.Module:
        code = path.read_text(encoding="utf-8-sig")
        loader.lines_collection[path] = code.splitlines()
        return griffe.visit(
            name,
            filepath=path,
            code=code,
            extensions=loader.extensions,
            parent=parent,
            docstring_parser=loader.docstring_parser,
            docstring_options=loader.docstring_options,
            lines_collection=loader.lines_collection,
            modules_collection=loader.modules_collection,
        )
