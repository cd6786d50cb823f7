"""Schedule presets (`Schedule.preset`): named schedules, each a function of the LLM's depth.

Presets are registered by plugins (hook ``tokcomp_register_presets``, see `tokcomp.hookspecs`); tokcomp's
own live next to the strategies they compose, in ``tokcomp.strategies.presets``, and arrive through the
same entry point a third-party package uses. This module reads them from the registry, so the core names
no strategy.

Examples:
    >>> from tokcomp import presets
    >>> "luvc" in presets.names()
    True
    >>> presets.build("fastv", 28).stages[0].layers
    [2]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .schedule import Schedule

__all__ = ["PRESETS", "build", "describe", "names"]


def names() -> list[str]:
    """The registered preset names, sorted."""
    from . import registry

    return sorted(registry.presets())


def describe(name: str) -> str:
    """The one-line description preset ``name`` was registered with (where its numbers come from).

    Raises:
        ScheduleError: No preset of that name (the message lists the registered ones).
    """
    from . import registry

    return registry.get_preset(name).description


def build(name: str, num_layers: int) -> Schedule:
    """Preset ``name`` built for an LLM of depth ``num_layers`` (`Schedule.preset` with a depth).

    Raises:
        ScheduleError: No preset of that name.
    """
    from .schedule import Schedule

    return Schedule.preset(name, num_layers)


class _RegisteredPresets(Mapping[str, "tuple[Callable[[int], Schedule], str]"]):
    """A read-only view of the registry's presets: name -> (factory, description)."""

    def _table(self) -> dict[str, tuple[Callable[[int], Schedule], str]]:
        from . import registry

        return {n: (r.obj, r.description) for n, r in registry.presets().items()}

    def __getitem__(self, name: str) -> tuple[Callable[[int], Schedule], str]:
        return self._table()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())

    def __repr__(self) -> str:
        return f"PRESETS({sorted(self._table())})"


PRESETS: Mapping[str, tuple[Callable[[int], Schedule], str]] = _RegisteredPresets()
"""Every registered preset (built-in and plugins'): name -> (factory of the LLM depth, description)."""
