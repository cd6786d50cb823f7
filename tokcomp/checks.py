"""Checks on what a strategy returns, applied where the runtime consumes it.

A strategy is third-party code as far as the runtime is concerned: before its decision changes a sequence,
it is checked here, and a bad one is refused with the strategy's name and what was wrong, instead of
becoming an index error deep in a model or, worse, a silently wrong answer (an encoder result whose items
come back in another order would give one sample another sample's image).

* `checked_select`: an LLM-site decision (`tokcomp.LLMDecision`): ``keep`` must be ascending, unique indices
  into the view's visual tokens (text tokens are never the strategy's to drop); ``hidden``/``sizes`` must
  have one row per kept token.
* `checked_reduce`: an encoder/projector-site result (`tokcomp.tokens.VisualTokens`): one item per item
  given, in the same order, of the same kind and original grid, with the same number of frames, and no
  more tokens than it was given.

Item order is checked through the item's ``original`` grid: before the strategy runs, each input item's
``original`` is replaced by an equal tuple that also carries the item's index. Strategies build output
items with ``VisualItemTokens(it.kind, frames, it.original)`` (or ``dataclasses.replace``), which carries
the index along, so an item that arrives in another slot is caught. An item built with a new grid tuple
is refused: with two images of one grid nothing else could tell a reordered result from a right one.
"""

from __future__ import annotations

from typing import Any

import torch

from .contracts import LLMDecision, LLMView
from .errors import RuntimeStateError
from .tokens import VisualTokens

__all__ = ["StrategyOutputError", "checked_reduce", "checked_select"]


class StrategyOutputError(RuntimeStateError):
    """A strategy returned something the runtime cannot apply; the message names the strategy."""


class _ItemGrid(tuple):
    """An item's original ``(t, h, w)``, equal to the plain tuple, that remembers the item's index."""

    key: int

    def __new__(cls, grid: Any, key: int) -> _ItemGrid:  # noqa: PYI034
        obj = super().__new__(cls, tuple(grid))
        obj.key = key
        return obj

    def __reduce__(self) -> tuple[Any, ...]:
        return (_ItemGrid, (tuple(self), self.key))


def _name(strategy: Any) -> str:
    return getattr(type(strategy), "name", "") or type(strategy).__name__


def checked_select(label: str, layer: int, strategy: Any, view: LLMView) -> LLMDecision:
    """Run ``strategy.select(view)`` and return its decision with ``keep`` as a long tensor on the view's device.

    Raises:
        StrategyOutputError: The decision cannot be applied (names the strategy, stage and layer).
    """
    decision = strategy.select(view)
    where = f"strategy {_name(strategy)!r} (stage {label}, layer {layer})"
    n = view.num_present
    if isinstance(decision, torch.Tensor):
        decision = LLMDecision(keep=decision)
    if not isinstance(decision, LLMDecision):
        raise StrategyOutputError(
            f"{where} returned {type(decision).__name__}; select() returns a tokcomp.LLMDecision(keep=...)"
        )
    keep = decision.keep
    if not isinstance(keep, torch.Tensor):
        try:
            keep = torch.as_tensor(keep, dtype=torch.long)
        except (TypeError, ValueError):
            raise StrategyOutputError(f"{where}: keep must be a tensor of indices, got {type(keep).__name__}") from None
    if keep.dtype == torch.bool:
        raise StrategyOutputError(
            f"{where}: keep is a boolean mask; return the indices of the kept tokens (mask.nonzero().squeeze(1))"
        )
    if keep.is_floating_point() or keep.is_complex():
        raise StrategyOutputError(f"{where}: keep must hold integer indices, got dtype {keep.dtype}")
    if keep.dim() != 1:
        raise StrategyOutputError(f"{where}: keep must be 1-D (k,), got shape {tuple(keep.shape)}")
    keep = keep.to(device=view.hidden.device, dtype=torch.long)
    if keep.numel():
        bad = keep[(keep < 0) | (keep >= n)]
        if bad.numel():
            raise StrategyOutputError(
                f"{where}: keep has indices {bad.tolist()[:8]} outside [0, {n}); keep indexes the {n} visual "
                "tokens of the view only (text tokens are always kept)"
            )
        uniq = keep.unique()
        if uniq.numel() != keep.numel():
            counts = torch.bincount(keep, minlength=n)
            dup = (counts > 1).nonzero().squeeze(1).tolist()
            raise StrategyOutputError(f"{where}: keep lists indices {dup[:8]} more than once; each token is kept once")
        if bool((keep[1:] <= keep[:-1]).any()):
            raise StrategyOutputError(
                f"{where}: keep must be in ascending order (tokens keep their sequence order); return "
                "keep.sort().values"
            )
    k = int(keep.numel())
    if decision.hidden is not None and tuple(decision.hidden.shape) != (k, view.hidden.shape[-1]):
        raise StrategyOutputError(
            f"{where}: hidden has shape {tuple(decision.hidden.shape)}, expected ({k}, {view.hidden.shape[-1]}): "
            "one row per kept token"
        )
    if decision.sizes is not None:
        sizes = decision.sizes
        if tuple(sizes.shape) != (k,):
            raise StrategyOutputError(f"{where}: sizes has shape {tuple(sizes.shape)}, expected ({k},)")
        if k and not bool(torch.isfinite(sizes).all() and (sizes > 0).all()):
            raise StrategyOutputError(f"{where}: sizes must be finite and > 0 (patches each token stands for)")
    if decision.members is not None:
        members = decision.members
        if not isinstance(members, torch.Tensor) or members.is_floating_point() or members.dtype == torch.bool:
            raise StrategyOutputError(f"{where}: members must be a long tensor of positions in keep (or -1)")
        if tuple(members.shape) != (n,):
            raise StrategyOutputError(
                f"{where}: members has shape {tuple(members.shape)}, expected ({n},): one entry per present token"
            )
        members = members.to(device=keep.device, dtype=torch.long)
        if bool(((members < -1) | (members >= k)).any()):
            raise StrategyOutputError(f"{where}: members must hold positions in keep, in [0, {k}), or -1 (dropped)")
        if k and bool((members[keep] != torch.arange(k, device=keep.device)).any()):
            raise StrategyOutputError(f"{where}: members must send every kept token into itself (members[keep[i]] == i)")
        if decision.hidden is None:
            raise StrategyOutputError(f"{where}: members describes a merge; give the merged hidden states too")
        decision.members = members
    decision.keep = keep
    return decision


def checked_reduce(label: str, strategy: Any, tokens: VisualTokens) -> VisualTokens:
    """Run ``strategy.reduce(tokens)`` and check the result against what it was given.

    Raises:
        StrategyOutputError: Items missing, added, reordered, of another kind or grid, with other frame
            counts, with more tokens than given, or with inconsistent frame tensors.
    """
    given = list(tokens.items)
    before = [[fr.num_tokens for fr in it.frames] for it in given]
    owners = [[int(fr.owner.numel()) for fr in it.frames] for it in given]
    for j, it in enumerate(given):
        it.original = _ItemGrid(it.original, j)
    out = strategy.reduce(tokens)
    where = f"strategy {_name(strategy)!r} (stage {label}, {tokens.site} site, block {tokens.layer})"
    if not isinstance(out, VisualTokens):
        raise StrategyOutputError(f"{where} returned {type(out).__name__}; reduce() returns a VisualTokens")
    if len(out.items) != len(given):
        raise StrategyOutputError(
            f"{where} returned {len(out.items)} items for the {len(given)} it was given; return one item per "
            "input item, in the same order"
        )
    for j, (it, old) in enumerate(zip(out.items, given)):
        key = getattr(it.original, "key", None)
        if key is None:
            raise StrategyOutputError(
                f"{where}: output item {j} does not carry its input item's original grid object; build output "
                "items as VisualItemTokens(it.kind, frames, it.original) or dataclasses.replace(it, ...), so that "
                "their order can be checked (a reordered result gives one sample another sample's image)"
            )
        if key != j:
            raise StrategyOutputError(
                f"{where}: output item {j} is input item {key} (the items are reordered); return the items in "
                "the order given, or each sample would receive another sample's image"
            )
        if it.kind != old.kind or tuple(it.original) != tuple(old.original):
            raise StrategyOutputError(
                f"{where}: output item {j} is a {it.kind} of original grid {tuple(it.original)}, but input item {j} "
                f"is a {old.kind} of original grid {tuple(old.original)}; return the items in the order given"
            )
        if len(it.frames) != len(before[j]):
            raise StrategyOutputError(
                f"{where}: item {j} has {len(it.frames)} frames, it was given {len(before[j])}; keep every frame"
            )
        for f, fr in enumerate(it.frames):
            h, w = fr.shape
            n = h * w
            if n < 1 or n > before[j][f]:
                raise StrategyOutputError(
                    f"{where}: item {j} frame {f} has {n} tokens, it was given {before[j][f]}; a strategy keeps "
                    "between 1 and all of them"
                )
            if tuple(fr.size.shape) != (h, w) or tuple(fr.pos.shape[:2]) != (h, w):
                raise StrategyOutputError(
                    f"{where}: item {j} frame {f}: x is {h}x{w} but size is {tuple(fr.size.shape)} and pos "
                    f"{tuple(fr.pos.shape)}; every token needs a size and a position"
                )
            if int(fr.owner.numel()) != owners[j][f] or (
                fr.owner.numel() and (int(fr.owner.min()) < -1 or int(fr.owner.max()) >= n)
            ):
                raise StrategyOutputError(
                    f"{where}: item {j} frame {f}: owner must map each of the {owners[j][f]} original patches to "
                    f"one of the {n} output tokens (0..{n - 1}), or to -1 for a patch whose token was removed"
                )
    return out
