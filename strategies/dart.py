"""DART (Wen et al., EMNLP 2025): keep the visual tokens least duplicated by a few pivot tokens.

Written from the project's specification of the reference code (``shared/spec/methods-2025.md`` §1; ZichenWen1/DART
@ 5a19452), which this module does not reproduce. Before layer K (default 2), for one sample:

1. Pivots by key norm: the ``pivot_image`` visual tokens and the ``pivot_text`` text tokens after the last
   visual token with the largest L1 norm of layer K−1's post-RoPE key (all heads concatenated).
2. The other visual tokens are the candidates. The pivots are visited in the reference's order: the iteration
   order of a CPython ``set`` of their absolute sequence indices, image pivots inserted first. For each pivot
   ``p``, the ``per_pivot`` candidates least similar to it, by ``cos(x_p, x_v)`` with ``x`` the final-normed
   hidden states entering layer K, are kept and leave the candidates.
3. Kept: the image pivots and every token picked in step 2, ``pivot_image + (pivot_image + pivot_text) ·
   per_pivot`` tokens, more than the nominal budget (the reference's count).

Deliberate differences from the reference, each for inputs it cannot handle:

* A pivot takes at most the candidates left, and the counts of pivots are clamped to the tokens available (the
  reference's ``topk`` raises); ``info["short"]`` counts the tokens a clamp left out.
* Several images: the candidates are all visual tokens of the sample, and the text pivots come from the text after
  the *last* visual token (the reference sees one image, or the first image's tokens only).
* Per sample: the absolute index of a token is its index in the sample's unpadded sequence, so a batch gives what
  its samples give alone (the reference asserts batch 1).
* Exact ties in key norm or similarity go to the lower index (the reference's ``topk`` leaves them unspecified).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from tokcomp.contracts import LLMDecision, LLMStrategy, LLMView, check_keep_ratio
from tokcomp.errors import ScheduleError

__all__ = ["DART", "dart_per_pivot", "dart_reference_keep", "dart_select", "pivot_visit_order"]


def pivot_visit_order(positions: list[int]) -> list[int]:
    """The order the reference visits its pivots in: iteration order of a CPython ``set`` built by inserting
    ``positions`` (absolute sequence indices: image pivots, then text pivots) in that order.

    Int hashing is deterministic, so this is reproducible; for a few small ints it is about ascending
    ``index mod`` the set's table size, not ascending index.
    """
    seen: set[int] = set()
    for p in positions:
        seen.add(int(p))
    return list(seen)


def _top(values: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest values, largest first; exact ties to the lower index."""
    return torch.sort(values, descending=True, stable=True).indices[: max(0, min(k, values.numel()))]


def dart_per_pivot(n: int, pivots: int, keep_ratio: float, keep: int | None = None) -> int:
    """Tokens each pivot keeps (the reference's ``TOKEN_TOPK``).

    Args:
        n: Visual tokens of the sample.
        pivots: ``pivot_image + pivot_text``.
        keep_ratio: Qwen2-VL rule, ``int(n · keep_ratio / pivots)``.
        keep: LLaVA rule (the scripts' ``max_num_trunction``), ``keep // pivots``; overrides ``keep_ratio``.
    """
    if keep is not None:
        return keep // pivots
    return int(n * keep_ratio / pivots)


def dart_select(
    key_norm: Tensor,
    states: Tensor,
    visual: Tensor,
    positions: Tensor,
    pivot_image: int,
    pivot_text: int,
    per_pivot: int,
    order: Literal["set", "sorted"] = "set",
) -> tuple[Tensor, dict[str, Any]]:
    """DART's selection for one sample (module docstring).

    Args:
        key_norm: ``(N,)`` L1 norm of each token's post-RoPE key at layer K−1, tokens in sequence order.
        states: ``(N, D)`` final-normed hidden states entering layer K (only their direction matters).
        visual: ``(N,)`` bool, the visual tokens.
        positions: ``(N,)`` long, each token's absolute sequence index (decides the set order).
        pivot_image: Visual pivots.
        pivot_text: Text pivots, from the tokens after the last visual token.
        per_pivot: Candidates each pivot keeps.
        order: ``"set"``: the reference's pivot order; ``"sorted"``: image pivots ascending, then text pivots
            ascending (what some ports do; it changes the result, see the docs).

    Returns:
        ``(keep, info)``: ascending indices into the visual tokens (``0..n-1``, in sequence order), and the
        pivots (``image_pivots``, ``text_pivots`` as visual / sequence indices) and ``short`` (tokens that
        clamps left out of the nominal count).
    """
    vis = visual.nonzero().squeeze(1)
    n = int(vis.numel())
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=visual.device), {"short": 0}
    after = (~visual).nonzero().squeeze(1)
    after = after[after > vis[-1]]
    p_img = _top(key_norm[vis].float(), pivot_image)  # indices into the visual tokens
    p_txt = after[_top(key_norm[after].float(), pivot_text)]  # indices into the N tokens
    pivots = [int(v) for v in vis[p_img]] + [int(t) for t in p_txt]  # indices into the N tokens
    pos_of = {int(positions[t]): t for t in pivots}
    if order == "set":
        visit = [pos_of[p] for p in pivot_visit_order([int(positions[t]) for t in pivots])]
    elif order == "sorted":
        visit = sorted(pivots[: p_img.numel()]) + sorted(pivots[p_img.numel():])
    else:
        raise ValueError(f"order must be 'set' or 'sorted', got {order!r}")
    x = states.float()
    xv = x[vis]
    candidate = torch.ones(n, dtype=torch.bool, device=visual.device)
    candidate[p_img] = False
    kept = candidate.clone().logical_not_()
    for t in visit:
        take = min(per_pivot, int(candidate.sum()))
        if take <= 0:
            continue
        dissimilar = -F.cosine_similarity(x[t][None], xv, dim=-1)
        picked = _top(dissimilar.masked_fill(~candidate, float("-inf")), take)
        kept[picked] = True
        candidate[picked] = False
    nominal = pivot_image + (pivot_image + pivot_text) * per_pivot
    keep = kept.nonzero().squeeze(1)
    info = {
        "image_pivots": sorted(int(i) for i in p_img),
        "text_pivots": sorted(int(t) for t in p_txt),
        "short": max(0, nominal - int(keep.numel())),
    }
    return keep, info


def dart_reference_keep(
    keys: Tensor,
    states: Tensor,
    image_start: int,
    image_len: int,
    pivot_image: int = 4,
    pivot_text: int = 4,
    per_pivot: int = 16,
) -> Tensor:
    """`dart_select` in the reference's batch-1 layout: one image span ``[image_start, image_start + image_len)``,
    the text after it, absolute sequence indices.

    Args:
        keys: ``(H, N, d)`` or ``(1, H, N, d)`` layer K−1's post-RoPE keys (repeated or not).
        states: ``(N, D)`` or ``(1, N, D)`` hidden states entering layer K, final-normed (or only scaled by the
            norm's weight: the cosine does not see the per-token scale).
        image_start: First image token.
        image_len: Image tokens.
        pivot_image: Visual pivots.
        pivot_text: Text pivots.
        per_pivot: The reference's ``TOKEN_TOPK``.

    Returns:
        The reference's ``keep_indexs``: sorted absolute indices of every token kept (all non-image tokens).
    """
    N = int(keys.shape[-2])
    k = keys.reshape(-1, N, keys.shape[-1])
    key_norm = k.float().abs().sum((0, 2))
    visual = torch.zeros(N, dtype=torch.bool, device=keys.device)
    visual[image_start:image_start + image_len] = True
    positions = torch.arange(N, device=keys.device)
    keep, _ = dart_select(key_norm, states.reshape(N, -1), visual, positions, pivot_image, pivot_text, per_pivot)
    return torch.cat([positions[:image_start], keep + image_start, positions[image_start + image_len:]]).sort().values


@dataclass
class DART(LLMStrategy):
    """DART: pivots by key norm, then the tokens least duplicated by each pivot (cosine on final-normed states).

    Args:
        keep_ratio: Budget by the reference's Qwen2-VL rule: each of the ``P = pivot_image + pivot_text`` pivots
            keeps ``int(n · keep_ratio / P)`` tokens (the scripts' ``1 − reduction_ratio``, 0.222).
        keep: Budget by the reference's LLaVA rule (``max_num_trunction``): each pivot keeps ``keep // P``;
            overrides ``keep_ratio``. Either way ``pivot_image`` more tokens are kept (132 for ``keep=128``).
        pivot_image: Visual pivots (by the L1 norm of layer K−1's keys).
        pivot_text: Text pivots, among the tokens after the last visual token.
        pivot_order: ``"set"`` (the reference's order) or ``"sorted"``.
    """

    name: ClassVar[str] = "dart"
    needs_previous_projections: ClassVar[bool] = True
    keep_ratio: float = 0.222
    keep: int | None = None
    pivot_image: int = 4
    pivot_text: int = 4
    pivot_order: Literal["set", "sorted"] = "set"

    def check(self) -> None:
        """Parameter ranges."""
        check_keep_ratio("dart", self.keep_ratio)
        if self.keep is not None and self.keep < 0:
            raise ScheduleError(f"dart: keep must be >= 0 tokens, got {self.keep}")
        if self.pivot_image < 0 or self.pivot_text < 0 or self.pivot_image + self.pivot_text < 1:
            raise ScheduleError(
                f"dart: pivot_image and pivot_text must be >= 0 with at least one pivot, got "
                f"{self.pivot_image} and {self.pivot_text}"
            )
        if self.pivot_order not in ("set", "sorted"):
            raise ScheduleError(f"dart: pivot_order must be 'set' or 'sorted', got {self.pivot_order!r}")

    def default_layers(self, num_layers: int) -> list[int]:
        """Layer 2 (the reference's ``pruned_layer``)."""
        return [min(2, num_layers - 1)]

    def validate(self, stage: Any, adapter: Any) -> None:
        """DART prunes once."""
        if len(stage.layers or []) > 1:
            raise ScheduleError(f"dart prunes once: give its stage one layer, got {list(stage.layers)}")

    def select(self, view: LLMView) -> LLMDecision:
        """Pivots and duplication for one sample."""
        cur = view.projections()
        prev = view.previous_projections()
        k = prev.k_rope.float()  # (H_kv, N, d); the reference's GQA-repeated keys only scale every norm
        key_norm = k.permute(1, 0, 2).reshape(k.shape[1], -1).abs().sum(-1)
        states = view.final_norm(cur.hidden)
        positions = cur.sequence_index
        if positions is None:
            positions = torch.arange(cur.hidden.shape[0], device=cur.hidden.device)
        per_pivot = dart_per_pivot(view.num_present, self.pivot_image + self.pivot_text, self.keep_ratio, self.keep)
        keep, info = dart_select(key_norm, states, cur.visual, positions, self.pivot_image, self.pivot_text,
                                 per_pivot, self.pivot_order)
        info["per_pivot"] = per_pivot
        return LLMDecision(keep=keep, info=info)
