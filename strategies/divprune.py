"""DivPrune (Alvar et al., CVPR 2025): keep a maximally diverse subset of the projected visual tokens.

Written from the project's specification of the reference code (``shared/spec/methods-2025.md`` §3; vbdi/divprune
@ 799e2d9), which this module does not reproduce. The selection is the greedy solution of a max–min diversity
problem on cosine distance ``D = 1 − X̂X̂ᵀ``:

* the first token is the one whose nearest *other* token is farthest (the second-smallest entry of its column
  of ``D``; the smallest is its distance to itself);
* every next token is the one farthest from the selected set, ``argmax_j min_{s ∈ S} D[s, j]``; ties go to
  the lowest index.

Deliberate differences from the reference (each changes only degenerate inputs):

* Tokens already selected are excluded from the argmax. The reference does not exclude them; when every
  remaining token is at distance about 0 from the set (identical tokens) it selects an index again and returns
  duplicates. tokcomp always returns unique indices, and equals the reference whenever the reference does not
  re-select.
* Distances are computed in float32, and rows are normalised with an epsilon (`torch.nn.functional.normalize`):
  a zero vector is at distance 1 from everything instead of NaN.
* The budget keeps at least one token per frame and at most all of them (the reference keeps none at
  ``round(ratio · n) = 0`` and crashes on a one-token image).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from tokcomp.contracts import VisualStrategy, check_keep_ratio
from tokcomp.errors import ScheduleError
from tokcomp.tokens import VisualItemTokens, VisualTokens

__all__ = ["DivPrune", "cosine_distance", "divprune_budget", "divprune_select"]


def cosine_distance(x: Tensor) -> Tensor:
    """``1 − cos`` between every pair of rows of ``x`` ``(n, D)``, in float32 ``(n, n)``."""
    unit = F.normalize(x.float(), dim=-1)
    return 1.0 - unit @ unit.T


def divprune_budget(n: int, keep_ratio: float, keep: int | None = None) -> int:
    """Tokens kept out of ``n``: ``keep`` if given, else ``round(keep_ratio · n)`` with Python's rounding (the
    reference's; ties to even), clamped to ``[1, n]`` (0 when ``n == 0``)."""
    k = keep if keep is not None else round(keep_ratio * n)
    return max(min(k, n), 1) if n else 0


def divprune_select(x: Tensor, k: int) -> Tensor:
    """Greedy max–min diversity selection (module docstring).

    Args:
        x: ``(n, D)`` token features (DivPrune: the projected visual embeddings).
        k: Number of tokens to select; clamped to ``[0, n]``.

    Returns:
        ``(k,)`` long tensor of unique indices in **selection order** (sort it for sequence order).
    """
    n = int(x.shape[0])
    k = max(0, min(int(k), n))
    out = torch.empty(k, dtype=torch.long, device=x.device)
    if k == 0:
        return out
    if n == 1:
        return out.fill_(0)
    dist = cosine_distance(x)
    # nearest other token per column: the second-smallest value (the smallest is the self-distance ~0)
    first = int(torch.topk(dist, 2, dim=0, largest=False).values[1].argmax())
    out[0] = first
    score = dist[first].clone()  # distance of every token to the selected set
    taken = torch.zeros(n, dtype=torch.bool, device=x.device)
    taken[first] = True
    for i in range(1, k):
        j = int(score.masked_fill(taken, float("-inf")).argmax())  # first maximum: ties to the lower index
        out[i] = j
        taken[j] = True
        score = torch.minimum(score, dist[j])
    return out


@dataclass
class DivPrune(VisualStrategy):
    """DivPrune: keep the most diverse projected visual tokens of every image (or video frame).

    Runs at the ``projector`` site, on each frame's tokens as one pool. The kept tokens stay in their original
    order as a 1-D frame (the grid is not kept): each keeps its size, its position (so M-RoPE models give it
    its original ``(t, h, w)`` ids) and its provenance; original patches of removed tokens are owned by no token.

    Args:
        keep_ratio: Fraction of each frame's tokens kept (the reference's ``SUBSET_RATIO``; 0.098 keeps 56 of
            LLaVA-1.5's 576).
        keep: Absolute number kept per frame; overrides ``keep_ratio``.
    """

    name: ClassVar[str] = "divprune"
    sites: ClassVar[frozenset[str]] = frozenset({"projector"})
    preserves_grid: ClassVar[bool] = False
    keep_ratio: float = 0.098
    keep: int | None = None

    def check(self) -> None:
        """Parameter ranges."""
        check_keep_ratio("divprune", self.keep_ratio)
        if self.keep is not None and self.keep < 1:
            raise ScheduleError(f"divprune: keep must be >= 1 token per frame, got {self.keep}")

    def reduce(self, tokens: VisualTokens) -> VisualTokens:
        """Select ``k`` tokens of every frame."""
        items, kept = [], []
        for it in tokens.items:
            frames = []
            for fr in it.frames:
                n = fr.num_tokens
                k = divprune_budget(n, self.keep_ratio, self.keep)
                keep = divprune_select(fr.x.reshape(n, -1), k).sort().values
                frames.append(fr.subset(keep))
                kept.append(k)
            items.append(VisualItemTokens(it.kind, frames, it.original))
        return VisualTokens(items, tokens.site, tokens.layer, tokens.num_layers, tokens.stage_layers,
                            tokens.multiple, {"kept_per_frame": kept})
