"""Sanity baselines: `RandomPrune` keeps a seeded random subset of the visual tokens."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import ClassVar

import torch

from tokcomp.contracts import LLMDecision, LLMStrategy, LLMView, check_keep_ratio

__all__ = ["RandomPrune", "random_keep"]


def random_keep(n: int, k: int, seed: int, device: torch.device | None = None) -> torch.Tensor:
    """``k`` of ``n`` indices, ascending, drawn from a generator seeded with ``seed`` (CPU, reproducible)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[: max(0, min(k, n))].sort().values.to(device)


@dataclass
class RandomPrune(LLMStrategy):
    """Keep a random ``keep_ratio`` of the visual tokens present (seeded).

    The draw depends on the seed, the layer and the sample's own token counts, never on its row in the
    batch, so a batch gives what its samples give alone.

    Args:
        keep_ratio: Fraction kept, in (0, 1].
        seed: Base seed.
    """

    name: ClassVar[str] = "random"
    keep_ratio: float = 0.5
    seed: int = 0

    def check(self) -> None:
        """Parameter ranges."""
        check_keep_ratio("random", self.keep_ratio)

    def default_layers(self, num_layers: int) -> list[int]:
        """Layer 2, like FastV."""
        return [min(2, num_layers - 1)]

    def select(self, view: LLMView) -> LLMDecision:
        """A seeded random subset."""
        n = view.num_present
        seed = zlib.crc32(f"{self.seed}:{view.layer}:{view.num_original}:{n}".encode())
        return LLMDecision(keep=random_keep(n, round(n * self.keep_ratio), seed, view.hidden.device))
