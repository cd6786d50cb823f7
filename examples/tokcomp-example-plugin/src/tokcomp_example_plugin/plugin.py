"""The hook implementations tokcomp calls: the module named under the ``tokcomp`` entry-point group.

Each hook receives a ``register`` callable. Names must be unique across every installed package: registering
a name another package already uses raises `tokcomp.PluginError` naming both packages.
"""

from __future__ import annotations

from collections.abc import Callable

import tokcomp as tc

from .strategies import KeepEveryNth

__all__ = ["every_other", "tokcomp_register_presets", "tokcomp_register_strategies"]


def every_other(num_layers: int) -> tc.Schedule:
    """The ``every-other`` preset: `KeepEveryNth` with ``n=2`` at layer 2 (the last layer for shallower LLMs).

    Args:
        num_layers: Depth of the LLM the preset is built for.
    """
    return tc.Schedule([tc.Stage(KeepEveryNth(n=2), site="llm", layers=[min(2, num_layers - 1)])])


@tc.hookimpl
def tokcomp_register_strategies(register: Callable[[type], None]) -> None:
    """Register `KeepEveryNth` under its ``name``, ``keep_every_nth``."""
    register(KeepEveryNth)


@tc.hookimpl
def tokcomp_register_presets(register: Callable[..., None]) -> None:
    """Register the ``every-other`` preset."""
    register("every-other", every_other, "keep_every_nth n=2 at layer 2 (example plugin)")
