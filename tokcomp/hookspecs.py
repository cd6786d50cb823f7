"""The pluggy hook specifications a tokcomp plugin implements.

A plugin is a module (or object) with functions marked ``@tokcomp.hookimpl``, announced under the
entry-point group ``tokcomp`` in its package metadata (`pyproject.toml`):

```toml
[project.entry-points.tokcomp]
my-plugin = "my_package.tokcomp_plugin"
```

Each hook receives a ``register`` callable; call it once per thing the plugin provides.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

__all__ = ["PROJECT_NAME", "TokcompHookSpecs", "hookimpl", "hookspec"]

PROJECT_NAME = "tokcomp"
"""The pluggy project name, which is also the entry-point group plugins announce themselves under."""
hookspec = pluggy.HookspecMarker(PROJECT_NAME)
"""Marks the hook specifications in `TokcompHookSpecs`."""
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
"""Decorate a plugin's ``tokcomp_register_*`` functions with this (also ``tokcomp.hookimpl``)."""


class TokcompHookSpecs:
    """The hooks tokcomp calls on every plugin."""

    @hookspec
    def tokcomp_register_strategies(self, register: Callable[[type], None]) -> None:
        """Register strategy classes: ``register(MyStrategy)``; the class's ``name`` is its key."""

    @hookspec
    def tokcomp_register_adapters(self, register: Callable[[type], None]) -> None:
        """Register adapter classes: ``register(MyAdapter)``; the class's ``name`` is its key."""

    @hookspec
    def tokcomp_register_presets(self, register: Callable[..., None]) -> None:
        """Register schedule presets: ``register(name, factory, description)``.

        ``factory(num_layers: int) -> Schedule`` builds the schedule for an LLM of that depth.
        """

    @hookspec
    def tokcomp_register_budgets(self, register: Callable[..., None]) -> None:
        """Register equal-budget schedules: ``register(name, factory, description)``.

        ``factory(layers: int, llm_tokens: int, f: float) -> (budget, Schedule)`` configures the strategy to
        keep about a fraction ``f`` of the visual tokens over ``layers`` LLM layers (``llm_tokens`` visual
        tokens per sample at the LLM input) and returns the budget it aimed at (``f``, or the one it is
        limited to) with the schedule. `tokcomp.budgets.budget_schedules` collects them as
        ``"name@budget"``.
        """
