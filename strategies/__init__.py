"""tokcomp's built-in strategies (one module per method), registered through the ``tokcomp`` entry point.

Import a strategy class from here to use it in a schedule::

    from tokcomp.strategies import SPU, FastV, VTW, RandomPrune
"""

from __future__ import annotations

from collections.abc import Callable

from tokcomp.hookspecs import hookimpl

from .baselines import RandomPrune
from .fastv import FastV
from .spu import SPU
from .vtw import VTW

__all__ = ["SPU", "FastV", "VTW", "RandomPrune", "tokcomp_register_strategies"]


@hookimpl
def tokcomp_register_strategies(register: Callable[[type], None]) -> None:
    """Register the built-in strategies."""
    for cls in (SPU, FastV, VTW, RandomPrune):
        register(cls)
