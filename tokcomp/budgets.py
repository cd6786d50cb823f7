"""Every built-in strategy configured to one retained-token budget (the "equal-budget" schedules).

`budget_schedules` is shared by the benchmark suite (``benchmarks/run.py``) and the accuracy
evaluation (`tokcomp.evaluate`), so that "at 25%" means the same configuration in both.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["budget_schedules", "geometric_decay"]


def geometric_decay(layers: int, first: int, target: float) -> float:
    """Decay ``d`` of SPU's geometric cascade from layer ``first`` so that the mean kept fraction over
    ``layers`` LLM layers is ``target``.

    Args:
        layers: LLM depth.
        first: First layer of the cascade (layers before it keep everything).
        target: Mean fraction of visual tokens kept over all layers.

    Returns:
        The decay, rounded to 4 decimals.
    """
    lo, hi = 1e-4, 0.9999
    for _ in range(60):
        d = (lo + hi) / 2
        mean = (first + sum(d**k for k in range(1, layers - first + 1))) / layers
        lo, hi = (d, hi) if mean < target else (lo, d)
    return round((lo + hi) / 2, 4)


def budget_schedules(layers: int, llm_tokens: int, f: float = 0.35) -> dict[str, Any]:
    """Every strategy configured to keep about a fraction ``f`` of the visual tokens over the LLM layers.

    LLM-side pruners act at layer ``K = 2`` (FastV's K; the first layer with attention scores behind it)
    and keep ``r`` with ``(K + (L-K)·r) / L = f``; when even ``r = 0.01`` at layer 2 keeps more than
    ``f`` (shallow models, small budgets), they act at layer 1 instead, and ``r`` stays at least 0.01, so
    the smallest budgets are not always reached (the measured retained fraction says what was). VTW
    withdraws everything at ``K = round(f·L)`` (at least 1); SPU's geometric cascade from layer 2 has its
    decay solved for ``f``; OIM (two iterations, width then height) removes ``1 - sqrt(f)`` of the
    lines; downsample divides each side by ``1/sqrt(f)``; ToMe at the projector can merge at most half
    of the tokens in one application (bipartite matching), so it always runs at ``f = 0.5``. DART acts
    at ``K`` with FastV's ``r`` (plus its 4 image pivots: about ``r·n + 4``); DivPrune (projector) and CDPruner
    (LLM input) keep ``f`` of each image before the first layer; VisionZip (its projector-site port, which
    runs on every architecture whose adapter maps the encoder's attention to the LLM tokens) keeps ``f`` of
    each image, split 54 : 10 between dominant and contextual tokens as in its README setting.

    Args:
        layers: LLM depth ``L``.
        llm_tokens: Visual tokens per sample at the LLM input (ToMe's ``r`` is half of it).
        f: The budget: mean fraction of the visual tokens kept over the LLM layers.

    Returns:
        ``{"spu@0.35": Schedule, "fastv@0.35": ..., "pact@...", "random@...", "vtw@...", "oim@...",
        "downsample@...", "tome@0.50": ...}``, names tagged with ``f`` to two decimals.

    Examples:
        >>> sorted(budget_schedules(8, 144, 0.25))[:3]
        ['downsample@0.25', 'fastv@0.25', 'oim@0.25']
    """
    import tokcomp as tc
    from tokcomp.strategies import (
        DART,
        OIM,
        PACT,
        SPU,
        VTW,
        CDPruner,
        DivPrune,
        Downsample,
        FastV,
        RandomPrune,
        ToMe,
        VisionZip,
    )

    k = 2 if f * layers >= 2 + 0.01 * (layers - 2) or layers <= 2 else 1
    r = max(0.01, round((f * layers - k) / (layers - k), 4))
    tag = f"{f:.2f}"
    return {
        f"spu@{tag}": tc.Schedule(
            [tc.Stage(SPU(schedule="geometric", decay=geometric_decay(layers, 2, f)), site="llm",
                      layers=range(2, layers))]
        ),
        f"fastv@{tag}": tc.Schedule([tc.Stage(FastV(keep_ratio=r), site="llm", layers=[k])]),
        f"pact@{tag}": tc.Schedule([tc.Stage(PACT(keep_ratio=r), site="llm", layers=[k])]),
        f"random@{tag}": tc.Schedule([tc.Stage(RandomPrune(keep_ratio=r), site="llm", layers=[k])]),
        f"dart@{tag}": tc.Schedule([tc.Stage(DART(keep_ratio=r), site="llm", layers=[k])]),
        f"divprune@{tag}": tc.Schedule([tc.Stage(DivPrune(keep_ratio=f), site="projector")]),
        f"cdpruner@{tag}": tc.Schedule([tc.Stage(CDPruner(keep_ratio=f), site="llm", layers=[0])]),
        f"visionzip@{tag}": tc.Schedule([tc.Stage(
            VisionZip(dominant_ratio=round(f * 54 / 64, 4), contextual_ratio=round(f * 10 / 64, 4)),
            site="projector")]),
        f"vtw@{tag}": tc.Schedule([tc.Stage(VTW(), site="llm", layers=[max(1, round(f * layers))])]),
        f"oim@{tag}": tc.Schedule(
            [tc.Stage(OIM(rate=round(1 - math.sqrt(f), 3), iterations=2), site="encoder")]
        ),
        f"downsample@{tag}": tc.Schedule(
            [tc.Stage(Downsample(factor=round(1 / math.sqrt(f), 3)), site="encoder")]
        ),
        "tome@0.50": tc.Schedule([tc.Stage(ToMe(r=llm_tokens // 2), site="projector")]),
    }
