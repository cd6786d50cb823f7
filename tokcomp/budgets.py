"""Every registered strategy configured to one retained-token budget (the "equal-budget" schedules).

`budget_schedules` is shared by the benchmark suite (``benchmarks/run.py``) and the accuracy
evaluation (`tokcomp.evaluate`), so that "at 25%" means the same configuration in both. The schedules
themselves come from plugins (hook ``tokcomp_register_budgets``): the built-in strategies' from
``tokcomp.strategies.budgets``, a third party's from its own package, so that this module names no
strategy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .schedule import Schedule

__all__ = ["budget_schedules", "geometric_decay", "llm_pruning_point"]


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


def budget_schedules(layers: int, llm_tokens: int, f: float = 0.35) -> dict[str, Schedule]:
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

    Every factory registered with ``tokcomp_register_budgets`` contributes one schedule (the built-ins'
    rules are the ones above; a plugin's strategy joins the comparison by registering its own).

    Returns:
        ``{"spu@0.35": Schedule, "fastv@0.35": ..., "pact@...", "random@...", "vtw@...", "oim@...",
        "downsample@...", "tome@0.50": ...}``, each name tagged with the budget its factory aimed at, to
        two decimals.

    Examples:
        >>> sorted(budget_schedules(8, 144, 0.25))[:3]
        ['cdpruner@0.25', 'dart@0.25', 'divprune@0.25']
    """
    from . import registry

    out: dict[str, Schedule] = {}
    for name, reg in registry.budgets().items():
        target, schedule = reg.obj(layers, llm_tokens, f)
        out[f"{name}@{target:.2f}"] = schedule
    return out


def llm_pruning_point(layers: int, f: float) -> tuple[int, float]:
    """Where an LLM-side pruner acts, and what it keeps, for a mean retained fraction ``f``: ``(K, r)``
    with ``(K + (L-K)·r) / L = f`` (the rule of `budget_schedules`).

    Args:
        layers: LLM depth ``L``.
        f: The budget.

    Returns:
        ``K`` (2, or 1 when even ``r = 0.01`` at layer 2 keeps more than ``f``) and ``r`` (at least 0.01).

    Examples:
        >>> llm_pruning_point(28, 0.35)
        (2, 0.3)
    """
    k = 2 if f * layers >= 2 + 0.01 * (layers - 2) or layers <= 2 else 1
    return k, max(0.01, round((f * layers - k) / (layers - k), 4))
