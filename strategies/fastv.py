"""FastV (Chen et al., ECCV 2024): keep the visual tokens the last token attends to most.

Faithful to the reference code (`shared/spec/baselines.md` §2): the scores are the head-averaged attention
of the **last** token at the previous layer (``query="last"``; the paper's "average attention received" is
``query="mean"``). Unlike the reference, the scores are computed from that layer's own q/k for one query
row, so no eager layer and no attention matrix are needed, and batches are scored per sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from tokcomp.contracts import LLMDecision, LLMStrategy, LLMView, check_keep_ratio
from tokcomp.errors import ScheduleError

__all__ = ["FastV", "fastv_keep"]


def fastv_keep(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Ascending indices of the ``k`` highest scores; equal scores go to the lower index."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[: max(0, min(k, scores.numel()))].sort().values


@dataclass
class FastV(LLMStrategy):
    """FastV: prune visual tokens by the attention they receive at the previous layer.

    Args:
        keep_ratio: Fraction of the visual tokens present that is kept (the reference's ``1 − R``).
        keep: Absolute number kept (the reference scripts' ``attention_rank``); overrides ``keep_ratio``.
        query: ``"last"`` (reference code) or ``"mean"`` (paper).
    """

    name: ClassVar[str] = "fastv"
    needs_scores: ClassVar[bool] = True
    keep_ratio: float = 0.5
    keep: int | None = None
    query: Literal["last", "mean"] = "last"

    def check(self) -> None:
        """Parameter ranges."""
        check_keep_ratio("fastv", self.keep_ratio)
        if self.keep is not None and self.keep < 1:
            raise ScheduleError(f"fastv: keep must be >= 1 token, got {self.keep}; use 'vtw' to drop all")
        if self.query not in ("last", "mean"):
            raise ScheduleError(f"fastv: query must be 'last' or 'mean', got {self.query!r}")

    def default_layers(self, num_layers: int) -> list[int]:
        """Layer 2 (the paper's K = 2)."""
        return [min(2, num_layers - 1)]

    def select(self, view: LLMView) -> LLMDecision:
        """Top-k by attention received."""
        n = view.num_present
        k = self.keep if self.keep is not None else round(n * self.keep_ratio)
        s = view.attention_scores(self.query)
        return LLMDecision(keep=fastv_keep(s, k))
