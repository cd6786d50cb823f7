"""The plugin registry: every strategy, adapter, preset and equal-budget schedule tokcomp knows, built-in
or third-party.

Built-in strategies, adapters, presets and budget schedules arrive exactly like a third party's: through the
entry-point group ``tokcomp`` and the hooks in `tokcomp.hookspecs`. Plugins are loaded once, on first use.

Examples:
    >>> import tokcomp
    >>> "spu" in tokcomp.registry.strategies()
    True
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as md
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pluggy

from .errors import PluginError
from .hookspecs import PROJECT_NAME, TokcompHookSpecs

__all__ = [
    "Registration",
    "adapter_order",
    "adapters",
    "budgets",
    "describe",
    "get_adapter",
    "get_preset",
    "get_strategy",
    "plugin_manager",
    "presets",
    "register_plugin",
    "reload",
    "select_adapter",
    "strategies",
    "unregister_plugin",
]


@dataclass(frozen=True)
class Registration:
    """One registered thing and who registered it.

    Attributes:
        name: The key it is found by.
        obj: The class (strategy, adapter) or factory (preset, budget schedule).
        package: The distribution (or plugin name) that registered it.
        description: One line, for listings.
    """

    name: str
    obj: Any
    package: str
    description: str = ""


_lock = threading.RLock()
_pm: pluggy.PluginManager | None = None
_tables: dict[str, dict[str, Registration]] | None = None
_plugin_package: dict[int, str] = {}


def plugin_manager() -> pluggy.PluginManager:
    """The pluggy plugin manager, with every entry-point plugin loaded."""
    global _pm
    with _lock:
        if _pm is None:
            pm = pluggy.PluginManager(PROJECT_NAME)
            pm.add_hookspecs(TokcompHookSpecs)
            _load_entry_points(pm)
            _pm = pm
        return _pm


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    # Done by hand rather than pm.load_setuptools_entrypoints so a broken plugin names its package.
    seen: set[tuple[str, str]] = set()
    for ep in md.entry_points(group=PROJECT_NAME):
        dist = getattr(ep, "dist", None)
        package = dist.metadata["Name"] if dist is not None else ep.value
        if (package, ep.value) in seen:  # the same distribution found twice on sys.path
            continue
        seen.add((package, ep.value))
        try:
            plugin = ep.load()
        except Exception as exc:
            raise PluginError(
                f"the tokcomp plugin {ep.name!r} of package {package!r} failed to import ({ep.value}): "
                f"{type(exc).__name__}: {exc}. Fix or uninstall {package!r} (pip uninstall {package})."
            ) from exc
        if pm.is_registered(plugin):
            continue
        pm.register(plugin, name=f"{package}:{ep.name}")
        _plugin_package[id(plugin)] = package


def register_plugin(plugin: Any, name: str | None = None) -> None:
    """Register a plugin object or module in this process (no entry point needed).

    Useful in notebooks and tests. The plugin's hook implementations are called at once, so a name clash
    raises here.

    Args:
        plugin: A module or object with ``@tokcomp.hookimpl`` functions.
        name: The name reported as its package; defaults to the module's name.
    """
    pm = plugin_manager()
    pkg = name or getattr(plugin, "__name__", type(plugin).__name__)
    with _lock:
        pm.register(plugin, name=pkg)
        _plugin_package[id(plugin)] = pkg
        try:
            _rebuild()
        except Exception:
            # roll back: the registry answers exactly as before the call
            pm.unregister(plugin)
            _plugin_package.pop(id(plugin), None)
            _rebuild()
            raise


def unregister_plugin(plugin: Any) -> None:
    """Remove a plugin registered with `register_plugin`."""
    pm = plugin_manager()
    with _lock:
        pm.unregister(plugin)
        _plugin_package.pop(id(plugin), None)
        _rebuild()


def reload() -> None:
    """Forget everything and load the entry points again (after installing a plugin in this process)."""
    global _pm, _tables
    with _lock:
        _pm, _tables = None, None
        _plugin_package.clear()
        importlib.invalidate_caches()


def _rebuild() -> dict[str, dict[str, Registration]]:
    global _tables
    pm = plugin_manager()
    tables: dict[str, dict[str, Registration]] = {"strategy": {}, "adapter": {}, "preset": {}, "budget": {}}
    for plugin in pm.get_plugins():
        package = _plugin_package.get(id(plugin), pm.get_name(plugin) or repr(plugin))
        for kind, hook in (
            ("strategy", "tokcomp_register_strategies"),
            ("adapter", "tokcomp_register_adapters"),
            ("preset", "tokcomp_register_presets"),
            ("budget", "tokcomp_register_budgets"),
        ):
            impl = getattr(plugin, hook, None)
            if impl is None:
                continue
            # A hook that raises half-way must not leave half its names behind: register into a scratch
            # copy and keep it only when the hook returns.
            scratch = dict(tables[kind])
            try:
                impl(register=_registrar(scratch, kind, package))
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(
                    f"the tokcomp plugin of package {package!r} raised in {hook}: {type(exc).__name__}: {exc}. "
                    f"Fix or uninstall {package!r}."
                ) from exc
            tables[kind] = scratch
    _tables = tables
    return tables


def _registrar(table: dict[str, Registration], kind: str, package: str) -> Callable[..., None]:
    def register(obj_or_name: Any, factory: Any = None, description: str = "") -> None:
        if kind in ("preset", "budget"):
            name, obj = str(obj_or_name), factory
            if not callable(obj):
                raise PluginError(f"package {package!r} registered {kind} {name!r} without a factory")
        else:
            obj = obj_or_name
            name = getattr(obj, "name", "")
            if not name:
                raise PluginError(f"package {package!r} registered a {kind} {obj!r} without a `name`")
            doc = (obj.__doc__ or "").strip().splitlines()
            description = description or (doc[0] if doc else "")
        if name in table and table[name].obj is not obj:
            raise PluginError(
                f"{kind} name clash: {name!r} is registered by both {table[name].package!r} and {package!r}. "
                f"Rename one of them, or uninstall one of the packages."
            )
        table[name] = Registration(name, obj, package, description)

    return register


def _tables_now() -> dict[str, dict[str, Registration]]:
    with _lock:
        return _tables if _tables is not None else _rebuild()


def strategies() -> dict[str, Registration]:
    """Registered strategies by name."""
    return dict(_tables_now()["strategy"])


def adapters() -> dict[str, Registration]:
    """Registered adapters by name."""
    return dict(_tables_now()["adapter"])


def presets() -> dict[str, Registration]:
    """Registered schedule presets by name."""
    return dict(_tables_now()["preset"])


def budgets() -> dict[str, Registration]:
    """Registered equal-budget schedule factories by name (`tokcomp.budgets.budget_schedules` calls them)."""
    return dict(_tables_now()["budget"])


def _get(kind: str, table: dict[str, Registration], name: str) -> Registration:
    if name in table:
        return table[name]
    close = difflib.get_close_matches(name, table, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    from .errors import ScheduleError

    raise ScheduleError(
        f"unknown {kind} {name!r}.{hint} Registered: {', '.join(sorted(table)) or 'none'}. "
        f"A third-party {kind} must be installed and announced under the entry-point group 'tokcomp'."
    )


def get_strategy(name: str) -> Registration:
    """The registration of strategy ``name``; a `ScheduleError` lists the known names otherwise."""
    return _get("strategy", strategies(), name)


def adapter_order() -> list[Registration]:
    """The registered adapters in the order `select_adapter` tries them.

    The order is fixed, whatever order the plugins were loaded in: higher ``Adapter.priority`` first; on a
    tie, third-party adapters before tokcomp's own (so a plugin can take over a model a built-in adapter
    also supports); then by name.
    """
    regs = adapters().values()
    return sorted(regs, key=lambda r: (-int(getattr(r.obj, "priority", 0)), r.package == PROJECT_NAME, r.name))


def select_adapter(model: Any) -> tuple[Registration | None, list[str]]:
    """The first adapter (in `adapter_order`) whose ``supports(model)`` is true, and the problems met.

    An adapter whose ``supports()`` raises is skipped (it cannot break the choice for other models); the
    returned list names it, its package and the exception, for the caller to report.
    """
    problems: list[str] = []
    for reg in adapter_order():
        try:
            ok = bool(reg.obj.supports(model))
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not break other models
            problems.append(
                f"adapter {reg.name!r} (package {reg.package!r}) raised in supports(): {type(exc).__name__}: {exc}"
            )
            continue
        if ok:
            return reg, problems
    return None, problems


def get_adapter(name: str) -> Registration:
    """The registration of adapter ``name``."""
    return _get("adapter", adapters(), name)


def get_preset(name: str) -> Registration:
    """The registration of preset ``name``."""
    return _get("preset", presets(), name)


def describe() -> str:
    """A plain-text listing of everything registered, with the package that registered it."""
    lines = []
    for title, table in (("strategies", strategies()), ("adapters", adapters()), ("presets", presets())):
        lines.append(f"{title}:")
        for name, reg in sorted(table.items()):
            lines.append(f"  {name:<16} {reg.package:<12} {reg.description}")
    return "\n".join(lines)
