"""CDPruner (Zhang et al., NeurIPS 2025): a conditional DPP over instruction relevance and feature similarity.

Written from the project's specification of the reference code (``shared/spec/methods-2025.md`` §4; Theia-4869/CDPruner
@ 9541616), which this module does not reproduce. Per image (or crop) with projected visual features ``F`` and a
relevance ``r_i`` of each token to the instruction:

1. ``S = F̂ F̂ᵀ`` (cosine similarity, float32).
2. ``r ← (r − min r + 10⁻⁶) / (max r − min r)``, min and max over the sample's visual tokens.
3. ``L = diag(r) S diag(r)``: a DPP kernel whose quality term is the relevance and whose diversity term is ``S``.
4. ``T`` tokens by the fast greedy MAP inference of Chen et al. (incremental Cholesky): repeatedly take the
   token with the largest residual ``d²_j``, the gain in ``log det L_S``.

**tokcomp's adaptation: relevance from the model's own embeddings.** The reference takes ``r_i`` as minus the
cosine between the CLIP image embedding of each patch and the CLIP text embedding of the raw question. The VLMs
tokcomp drives have no CLIP text tower, so ``r_i`` is the mean cosine similarity between the token's features
and the LLM **input embeddings** of the prompt's text tokens (``instruction="after"``: the text after the last
visual token, where the question is; ``"all"``: every text token). The projector maps visual features into
that same embedding space. The reference's minus sign is, by its maintainer, a property of CLIP as used in
LLaVA, so it is off by default (``negate=True`` restores it).

Other deliberate differences:

* The greedy stops when every remaining token's residual is at most ``eps`` times its ``L[j, j]`` (the selected
  set spans it); the remaining picks are the most relevant unselected tokens, ties to the lower index. The reference
  has no stopping rule: its residuals turn NaN and it returns fewer than ``T`` tokens (padded with indices 0
  and 1). Only rank-exhausted inputs (``T`` above the rank of ``S``, duplicated tokens) differ;
  ``info["filled"]`` counts them.
* Relevance is normalised per sample, over all its images; the reference normalises over every image in the
  call, which couples the samples of a batch. A sample whose relevance is constant gets ``r = 1`` everywhere
  (the reference divides by zero).
* It runs at the ``llm`` site, by default on the input of layer 0: the projected visual tokens and the prompt's
  embeddings meet only there (``generate()`` runs the vision tower before it passes the prompt to the model).
  Kept tokens keep their original positions; the LLaVA reference renumbers the shortened sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from tokcomp.contracts import LLMDecision, LLMStrategy, LLMView, check_keep_ratio
from tokcomp.errors import ScheduleError

__all__ = [
    "CDPruner",
    "cdpruner_kernel",
    "cdpruner_reference_masks",
    "fast_greedy_map",
    "instruction_relevance",
    "normalize_relevance",
]


def instruction_relevance(visual: Tensor, text: Tensor, negate: bool = False) -> Tensor:
    """``r_i = mean_m cos(visual_i, text_m)`` (minus that with ``negate``), in float32.

    Args:
        visual: ``(n, D)`` visual token features.
        text: ``(m, D)`` instruction embeddings, ``m >= 1``.
        negate: The reference's sign (CLIP-specific).

    Returns:
        ``(n,)`` relevance, not yet normalised.
    """
    if text.shape[0] == 0:
        raise ValueError("instruction_relevance needs at least one text embedding")
    r = (F.normalize(visual.float(), dim=-1) @ F.normalize(text.float(), dim=-1).T).mean(-1)
    return -r if negate else r


def normalize_relevance(r: Tensor) -> Tensor:
    """The reference's min–max normalisation ``(r − min + 1e-6) / (max − min)``; constant ``r`` gives ones."""
    lo, hi = r.min(), r.max()
    if not bool(hi > lo):
        return torch.ones_like(r)
    return (r - lo + 1e-6) / (hi - lo)


def cdpruner_kernel(features: Tensor, relevance: Tensor) -> Tensor:
    """The conditional DPP kernel ``L = diag(r) S diag(r)``, ``S`` the cosine similarity of ``features`` ``(n, D)``
    (float32, ``(n, n)``)."""
    unit = F.normalize(features.float(), dim=-1)
    r = relevance.float()
    return r[:, None] * (unit @ unit.T) * r[None, :]


def fast_greedy_map(kernel: Tensor, k: int, eps: float = 1e-5, fill: Tensor | None = None) -> tuple[Tensor, int]:
    """Greedy MAP of a DPP with kernel ``kernel`` ``(n, n)`` by incremental Cholesky (Chen et al., NeurIPS 2018).

    Each step takes ``j = argmax d²`` (first maximum), with ``d²`` the residual diagonal, then updates
    ``e = (L[j] − Σ_t c_t[j] c_t) / √d²_j`` and ``d² −= e²``. Items whose residual is at most ``eps`` times
    their own ``L[j, j]`` lie (numerically) in the span of the selected ones and are not candidates; when none
    is left, the remaining picks are taken by descending ``fill`` (default: the diagonal), ties to the lower
    index.

    Args:
        kernel: Positive semi-definite ``(n, n)`` kernel.
        k: Number of items; clamped to ``[0, n]``.
        eps: Stopping threshold on the relative residual ``d²_j / L[j, j]``.
        fill: ``(n,)`` priority of the remaining picks after the greedy stops.

    Returns:
        ``(selection, filled)``: ``(k,)`` unique indices in selection order, and how many came from ``fill``.
    """
    n = int(kernel.shape[0])
    k = max(0, min(int(k), n))
    L = kernel.float()
    diag = torch.diagonal(L).clone()
    d2 = diag.clone()
    cis = L.new_zeros(k, n)
    taken = torch.zeros(n, dtype=torch.bool, device=L.device)
    out: list[int] = []
    for i in range(k):
        spent = taken | ~(d2 > eps * diag)  # also excludes zero and NaN residuals
        if bool(spent.all()):
            break
        j = int(d2.masked_fill(spent, float("-inf")).argmax())
        e = (L[j] - cis[:i, j] @ cis[:i]) / d2[j].sqrt()
        cis[i] = e
        d2 = d2 - e * e
        taken[j] = True
        out.append(j)
    filled = k - len(out)
    if filled:
        prio = (diag if fill is None else fill.float()).masked_fill(taken, float("-inf"))
        out += torch.sort(prio, descending=True, stable=True).indices[:filled].tolist()
    return torch.tensor(out, dtype=torch.long, device=L.device), filled


def cdpruner_reference_masks(
    image_features: Tensor, image_embeds: Tensor, text_embeds: Tensor, T: int, eps: float = 1e-5
) -> Tensor:
    """The selection in the reference's layout and with its relevance: CLIP patch embeddings against CLIP text
    embeddings with the minus sign, normalised over the whole batch of images (or crops) of one call.

    Args:
        image_features: ``(B, N, D)`` projected features (the DPP's similarity).
        image_embeds: ``(B, N, C)`` CLIP image-space embedding of each patch.
        text_embeds: ``(M, C)`` CLIP text embeddings of the instruction (one row per 77-token segment).
        T: Tokens kept per image.
        eps: `fast_greedy_map`'s stopping threshold (the reference has none; see the module docstring).

    Returns:
        ``(B, N)`` bool, the kept tokens (the reference's ``index_masks``).
    """
    B, N, _ = image_features.shape
    r = instruction_relevance(image_embeds.reshape(B * N, -1), text_embeds, negate=True)
    r = normalize_relevance(r).view(B, N)
    masks = torch.zeros(B, N, dtype=torch.bool, device=image_features.device)
    for b in range(B):
        sel, _ = fast_greedy_map(cdpruner_kernel(image_features[b], r[b]), T, eps, fill=r[b])
        masks[b, sel] = True
    return masks


@dataclass
class CDPruner(LLMStrategy):
    """CDPruner: per image (and per frame of a video), the ``T`` tokens of a greedy conditional-DPP MAP over
    instruction relevance and feature similarity.

    Args:
        keep_ratio: Fraction of each image's (crop's, tile's) tokens kept, ``T = round(keep_ratio · n)``, at
            least 1 (0.111 is the reference's ``visual_token_num=64`` of LLaVA-1.5's 576).
        keep: Absolute ``T`` per image; overrides ``keep_ratio``.
        instruction: Which text tokens' embeddings are the instruction: ``"after"`` the last visual token, or
            ``"all"`` of them.
        negate: Use minus the similarity as relevance (the reference's CLIP-specific sign).
        eps: The greedy's stopping threshold on the relative residual (`fast_greedy_map`).
    """

    name: ClassVar[str] = "cdpruner"
    needs_projections: ClassVar[bool] = True
    keep_ratio: float = 0.111
    keep: int | None = None
    instruction: Literal["after", "all"] = "after"
    negate: bool = False
    eps: float = 1e-5

    def check(self) -> None:
        """Parameter ranges."""
        check_keep_ratio("cdpruner", self.keep_ratio)
        if self.keep is not None and self.keep < 1:
            raise ScheduleError(f"cdpruner: keep must be >= 1 token per image, got {self.keep}")
        if self.instruction not in ("after", "all"):
            raise ScheduleError(f"cdpruner: instruction must be 'after' or 'all', got {self.instruction!r}")
        if not self.eps >= 0:
            raise ScheduleError(f"cdpruner: eps must be >= 0, got {self.eps}")

    def default_layers(self, num_layers: int) -> list[int]:
        """Layer 0: the LLM input, where the projected tokens meet the prompt's embeddings."""
        return [0]

    def validate(self, stage: Any, adapter: Any) -> None:
        """CDPruner selects once."""
        if stage.layers is not None and len(set(stage.layers)) != 1:
            raise ScheduleError(f"cdpruner selects once: give its stage one layer, got {list(stage.layers)}")

    def budget(self, n: int) -> int:
        """``T`` for an image of ``n`` tokens."""
        k = self.keep if self.keep is not None else round(self.keep_ratio * n)
        return max(1, min(k, n))

    def select(self, view: LLMView) -> LLMDecision:
        """Relevance over the sample, then the DPP per image."""
        p = view.projections()
        text = p.hidden[~p.visual]
        if self.instruction == "after":
            vis = p.visual.nonzero().squeeze(1)
            seq = torch.arange(p.visual.numel(), device=p.visual.device)
            after = (~p.visual) & (seq > vis[-1])
            text = p.hidden[after] if bool(after.any()) else text
        x = view.hidden
        n = x.shape[0]
        if text.shape[0] == 0:
            r = torch.ones(n, device=x.device)
        else:
            r = normalize_relevance(instruction_relevance(x, text, self.negate))
        frame = view.coords[:, 0]
        group = view.item_of * (int(frame.max()) + 1) + frame  # one pool per image, per frame of a video
        keep, filled = [], 0
        for g in torch.unique(group).tolist():
            members = (group == g).nonzero().squeeze(1)
            kernel = cdpruner_kernel(x[members], r[members])
            sel, f = fast_greedy_map(kernel, self.budget(int(members.numel())), self.eps, fill=r[members])
            keep.append(members[sel])
            filled += f
        return LLMDecision(keep=torch.cat(keep).sort().values, info={"filled": filled})
