"""The example plugin's strategy: keep every n-th visual token.

A strategy needs nothing from tokcomp but its contracts (`tokcomp.LLMStrategy`, `tokcomp.LLMView`,
`tokcomp.LLMDecision`): it never imports a model class, so it runs on every architecture tokcomp supports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

import tokcomp as tc

__all__ = ["KeepEveryNth"]


@dataclass
class KeepEveryNth(tc.LLMStrategy):
    """Keep every ``n``-th visual token present (the first, the ``n+1``-th, ...), drop the others.

    Of ``k`` visual tokens present, ``ceil(k / n)`` are kept. The tokens are taken in their original order, so
    for a single image this is a regular subsampling of its raster scan. ``n=1`` keeps everything.

    Args:
        n: The stride, at least 1.
    """

    name: ClassVar[str] = "keep_every_nth"
    n: int = 2

    def check(self) -> None:
        """``n`` must be an integer of at least 1."""
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise tc.ScheduleError(f"keep_every_nth: n must be an integer >= 1 (the stride), got {self.n!r}")

    def default_layers(self, num_layers: int) -> list[int]:
        """Layer 2, where FastV prunes (the last layer for shallower models)."""
        return [min(2, num_layers - 1)]

    def select(self, view: tc.LLMView) -> tc.LLMDecision:
        """Indices ``0, n, 2n, ...`` of the visual tokens present."""
        keep = torch.arange(0, view.num_present, self.n, device=view.hidden.device)
        return tc.LLMDecision(keep=keep, info={"n": self.n})
