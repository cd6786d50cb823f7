"""Every built-in strategy configured to one retained-token budget (the "equal-budget" schedules),
registered through the ``tokcomp`` entry point (hook ``tokcomp_register_budgets``).

`tokcomp.budgets.budget_schedules` collects every registered budget factory, these and a plugin's, so
that the benchmark suite and `tokcomp.evaluate` compare them at the same budgets. The rule for each
strategy is written in `tokcomp.budgets.budget_schedules`' docstring.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from tokcomp.budgets import geometric_decay, llm_pruning_point
from tokcomp.hookspecs import hookimpl
from tokcomp.schedule import Schedule, Stage

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
from .vtw import VTW

__all__ = ["BUDGETS", "tokcomp_register_budgets"]

BudgetFactory = Callable[[int, int, float], "tuple[float, Schedule]"]


def _llm_pruner(cls: type) -> BudgetFactory:
    def build(layers: int, llm_tokens: int, f: float) -> tuple[float, Schedule]:
        k, r = llm_pruning_point(layers, f)
        return f, Schedule([Stage(cls(keep_ratio=r), site="llm", layers=[k])])

    return build


def _spu(layers: int, llm_tokens: int, f: float) -> tuple[float, Schedule]:
    spu = SPU(schedule="geometric", decay=geometric_decay(layers, 2, f))
    return f, Schedule([Stage(spu, site="llm", layers=range(2, layers))])


def _divprune(layers: int, llm_tokens: int, f: float) -> tuple[float, Schedule]:
    return f, Schedule([Stage(DivPrune(keep_ratio=f), site="projector")])


def _cdpruner(layers: int, llm_tokens: int, f: float) -> tuple[float, Schedule]:
    return f, Schedule([Stage(CDPruner(keep_ratio=f), site="llm", layers=[0])])


def _visionzip(layers: int, llm_tokens: int, f: float) -> tuple[float, Schedule]:
    # the projector-site port (every architecture whose adapter maps encoder attention to LLM tokens),
    # split 54 : 10 between dominant and contextual tokens as in the README setting
    vz = VisionZip(dominant_ratio=round(f * 54 / 64, 4), contextual_ratio=round(f * 10 / 64, 4))
    return f, Schedule([Stage(vz, site="projector")])


def _vtw(layers: int, llm_tokens: int, f: float) -> tuple[float, Schedule]:
    return f, Schedule([Stage(VTW(), site="llm", layers=[max(1, round(f * layers))])])


def _oim(layers: int, llm_tokens: int, f: float) -> tuple[float, Schedule]:
    return f, Schedule([Stage(OIM(rate=round(1 - math.sqrt(f), 3), iterations=2), site="encoder")])


def _downsample(layers: int, llm_tokens: int, f: float) -> tuple[float, Schedule]:
    return f, Schedule([Stage(Downsample(factor=round(1 / math.sqrt(f), 3)), site="encoder")])


def _tome(layers: int, llm_tokens: int, f: float) -> tuple[float, Schedule]:
    # bipartite matching merges at most half of the tokens in one application: always 0.5
    return 0.5, Schedule([Stage(ToMe(r=llm_tokens // 2), site="projector")])


BUDGETS: dict[str, tuple[BudgetFactory, str]] = {
    "spu": (_spu, "geometric SPU cascade from layer 2, decay solved for the budget"),
    "fastv": (_llm_pruner(FastV), "FastV at layer K=2 (1 on shallow models) keeping r"),
    "pact": (_llm_pruner(PACT), "PACT at layer K keeping r"),
    "random": (_llm_pruner(RandomPrune), "random pruning at layer K keeping r"),
    "dart": (_llm_pruner(DART), "DART at layer K keeping r (plus its pivots)"),
    "divprune": (_divprune, "DivPrune on the projected tokens keeping f"),
    "cdpruner": (_cdpruner, "CDPruner at the LLM input keeping f"),
    "visionzip": (_visionzip, "VisionZip's projector port keeping f, 54 : 10 dominant : contextual"),
    "vtw": (_vtw, "VTW withdrawing every visual token at round(f * L)"),
    "oim": (_oim, "OIM, two iterations removing 1 - sqrt(f) of the lines"),
    "downsample": (_downsample, "downsample dividing each side by 1/sqrt(f)"),
    "tome": (_tome, "ToMe at the projector, always half of the tokens"),
}
"""The built-in budget factories: name -> (factory ``(layers, llm_tokens, f) -> (budget, Schedule)``,
description)."""


@hookimpl
def tokcomp_register_budgets(register: Callable[..., None]) -> None:
    """Register the built-in strategies' equal-budget schedules."""
    for name, (factory, description) in BUDGETS.items():
        register(name, factory, description)
