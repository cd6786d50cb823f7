"""tokcomp's built-in strategies (one module per method), registered through the ``tokcomp`` entry point.

Import a strategy class from here to use it in a schedule:

```python
from tokcomp.strategies import SPU, OIM, ToMe, Downsample, FastV, VTW, RandomPrune, DivPrune, CDPruner, DART, VisionZip, VScan
```
"""

from __future__ import annotations

from collections.abc import Callable

from tokcomp.hookspecs import hookimpl

from .baselines import RandomPrune
from .cdpruner import CDPruner
from .dart import DART
from .divprune import DivPrune
from .downsample import Downsample
from .fastv import FastV
from .oim import OIM
from .pact import PACT
from .spu import SPU
from .tome import ToMe
from .visionzip import VisionZip
from .vscan import VScan
from .vtw import VTW

__all__ = [
    "DART",
    "OIM",
    "PACT",
    "SPU",
    "VTW",
    "CDPruner",
    "DivPrune",
    "Downsample",
    "FastV",
    "RandomPrune",
    "ToMe",
    "VScan",
    "VisionZip",
    "tokcomp_register_strategies",
]


@hookimpl
def tokcomp_register_strategies(register: Callable[[type], None]) -> None:
    """Register the built-in strategies."""
    for cls in (SPU, OIM, ToMe, Downsample, FastV, PACT, VTW, RandomPrune, DivPrune, CDPruner, DART, VisionZip, VScan):
        register(cls)
