"""Token Merging (ToMe, Bolya et al., ICLR 2023): tensor functions, written from the project's specification.

The behaviour follows section 1 of the baselines specification (the reference code at facebookresearch/ToMe
af95e4b, which this module does not reproduce), including the token order after a merge, which is not
spatial: the unmerged A tokens come first, then all B tokens in their original order.

Shapes: ``metric`` and ``x`` are ``(B, T, C)`` with tokens on dimension 1; ``size`` is ``(B, T, 1)``.

Rules chosen where the specification is silent:

* Ties in similarity are broken by a stable sort, i.e. in favour of the lower A index (the reference uses an
  unstable sort, whose order on exact ties is unspecified).
* Cosine similarity uses `torch.nn.functional.normalize`, which equals division by the norm except
  for zero vectors, which get similarity 0 instead of NaN.
* ``unmerge`` also inverts the distill-token order, so ``unmerge(merge(x))`` is in the original layout
  whatever the flags.
* `parse_r` rejects a list longer than the number of layers and an ``inflect`` outside ``[-1, 1]``,
  and accepts one layer with ``(r, inflect)`` (the reference would divide by zero).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from tokcomp.contracts import ItemShape, ShapeStep, VisualStrategy
from tokcomp.errors import ScheduleError
from tokcomp.tokens import FrameGrid, VisualItemTokens, VisualTokens

__all__ = [
    "MergeFn",
    "ToMe",
    "bipartite_soft_matching",
    "merge_source",
    "merge_wavg",
    "parse_r",
    "proportional_attention_bias",
]

Reduce = Literal["mean", "sum", "amax", "amin", "prod"]
"""Reductions ``merge`` accepts: the ``reduce`` argument of `torch.Tensor.scatter_reduce`."""

MergeFn = Callable[..., Tensor]
"""``merge(x, mode="mean")`` maps ``(B, T, C)`` to ``(B, T - r, C)``; ``unmerge(x)`` maps it back."""


def _identity(x: Tensor, mode: Reduce = "mean") -> Tensor:
    return x


def _follow(old_to_new: Tensor, owner: Tensor) -> Tensor:
    """Provenance through a merge; patches held by no token (``-1``, after a pruning stage) stay ``-1``."""
    return torch.where(owner >= 0, old_to_new[owner.clamp(min=0)], owner)


def bipartite_soft_matching(
    metric: Tensor, r: int, class_token: bool = False, distill_token: bool = False
) -> tuple[MergeFn, MergeFn]:
    """ToMe's bipartite soft matching: plan the removal of ``r`` tokens by merging A tokens into B tokens.

    Tokens are split by alternation into A (even indices) and B (odd indices). Every A token finds its most
    cosine-similar B token; the ``r`` A tokens with the most similar partner are merged into it. ``r`` is
    first clamped to ``(T - protected) // 2`` where ``protected = class_token + distill_token``.

    The merged layout is ``concat([unmerged A, all B])``. The unmerged A tokens are in descending order of
    their best similarity, except with ``class_token``, where they are in ascending index order (so the class
    token stays first). With ``distill_token`` the layout is ``[unm[0], dst[0], unm[1:], dst[1:]]``, keeping
    the class and distill tokens at indices 0 and 1.

    Args:
        metric: ``(B, T, C)`` similarity vectors (ToMe: the block's attention keys averaged over heads).
        r: Number of tokens to remove.
        class_token: Token 0 is a class token: it is never merged away.
        distill_token: Token 1 is a distillation token: nothing merges into it.

    Returns:
        ``(merge, unmerge)``. ``merge(x, mode="mean")`` reduces ``x`` ``(B, T, C')`` to ``(B, T - r, C')``, the
        merged value combining the B token and all its sources with ``torch.scatter_reduce(reduce=mode,
        include_self=True)``. ``unmerge(x)`` maps ``(B, T - r, C')`` back to ``(B, T, C')``, each source
        taking its destination's value. Both are identities when the clamped ``r`` is not positive.
    """
    protected = int(class_token) + int(distill_token)
    t = metric.shape[1]
    r = min(r, (t - protected) // 2)
    if r <= 0:
        return _identity, _identity

    with torch.no_grad():
        unit = F.normalize(metric, dim=-1)
        scores = unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)
        if class_token:
            scores[:, 0, :] = float("-inf")
        if distill_token:
            scores[:, :, 0] = float("-inf")
        node_max, node_idx = scores.max(dim=-1)
        edge_idx = torch.sort(node_max, dim=-1, descending=True, stable=True).indices[..., None]
        unm_idx = edge_idx[:, r:]
        src_idx = edge_idx[:, :r]
        dst_idx = node_idx[..., None].gather(1, src_idx)
        if class_token:
            unm_idx = unm_idx.sort(dim=1).values

    n_unm = unm_idx.shape[1]

    def merge(x: Tensor, mode: Reduce = "mean") -> Tensor:
        """Apply the planned merge to ``x`` ``(B, T, C)``, giving ``(B, T - r, C)``."""
        a, b = x[:, ::2], x[:, 1::2]
        n, _, c = a.shape
        unm = a.gather(1, unm_idx.expand(n, n_unm, c))
        src = a.gather(1, src_idx.expand(n, r, c))
        dst = b.scatter_reduce(1, dst_idx.expand(n, r, c), src, reduce=mode)
        if distill_token:
            return torch.cat([unm[:, :1], dst[:, :1], unm[:, 1:], dst[:, 1:]], dim=1)
        return torch.cat([unm, dst], dim=1)

    def unmerge(x: Tensor) -> Tensor:
        """Map merged tokens ``(B, T - r, C)`` back to the original ``(B, T, C)`` layout."""
        if distill_token:
            x = torch.cat([x[:, :1], x[:, 2 : n_unm + 1], x[:, 1:2], x[:, n_unm + 1 :]], dim=1)
        unm, dst = x[:, :n_unm], x[:, n_unm:]
        n, _, c = x.shape
        src = dst.gather(1, dst_idx.expand(n, r, c))
        out = x.new_zeros(n, t, c)
        out[:, 1::2] = dst
        a = out[:, ::2].scatter(1, unm_idx.expand(n, n_unm, c), unm)
        out[:, ::2] = a.scatter(1, src_idx.expand(n, r, c), src)
        return out

    return merge, unmerge


def merge_wavg(merge: MergeFn, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Size-weighted merge: each merged token is the mean of the original patches it covers.

    Args:
        merge: The ``merge`` function of `bipartite_soft_matching`.
        x: ``(B, T, C)`` tokens.
        size: ``(B, T, 1)`` patches per token, or ``None`` for all ones (first merge).

    Returns:
        ``(x, size)``: ``merge(x * size, "sum") / merge(size, "sum")`` and ``merge(size, "sum")``.
    """
    if size is None:
        size = torch.ones_like(x[..., :1])
    x = merge(x * size, mode="sum")
    size = merge(size, mode="sum")
    return x / size, size


def merge_source(merge: MergeFn, x: Tensor, source: Tensor | None = None) -> Tensor:
    """Track which original patches each current token covers.

    Args:
        merge: The ``merge`` function of `bipartite_soft_matching`.
        x: ``(B, T, C)`` tokens before this merge; used for shape, device and dtype when ``source`` is None.
        source: ``(B, T, T_orig)`` 0/1 map of the previous merges, or ``None`` before the first merge.

    Returns:
        ``(B, T - r, T_orig)`` 0/1 map: entry ``[b, i, j]`` is 1 iff current token ``i`` covers original
        patch ``j``. Every column holds exactly one 1.
    """
    if source is None:
        n, t, _ = x.shape
        source = torch.eye(t, device=x.device, dtype=x.dtype).expand(n, t, t)
    return merge(source, mode="amax")


def parse_r(num_layers: int, r: int | tuple[int, float] | Sequence[int]) -> list[int]:
    """Expand a ToMe reduction schedule into one ``r`` per layer.

    Args:
        num_layers: Number of transformer blocks ``L``.
        r: An int (the same ``r`` in every layer); a tuple ``(r, inflect)`` with ``inflect`` in ``[-1, 1]``,
            giving ``r_l = int(lo + (hi - lo) * l / (L - 1))`` with ``lo = int(r * (1 - inflect))`` and
            ``hi = 2r - lo`` (``-1``: decreasing from ``2r`` to 0, ``0``: constant, ``1``: increasing); or a
            list of per-layer values, right-padded with zeros to ``L``.

    Returns:
        ``L`` integers, the number of tokens each block removes (before the block's own clamp).

    Raises:
        ValueError: If ``num_layers`` is negative, ``inflect`` is outside ``[-1, 1]`` or the list is longer than
            ``num_layers``.
        TypeError: If ``r`` has none of the accepted forms.
    """
    if num_layers < 0:
        raise ValueError(f"num_layers must be >= 0, got {num_layers}")
    if isinstance(r, bool):
        raise TypeError("r must be an int, an (r, inflect) tuple or a list of ints, not a bool")
    if isinstance(r, int):
        return [r] * num_layers
    if isinstance(r, tuple):
        if len(r) != 2:
            raise TypeError(f"a tuple r must be (r, inflect), got {r!r}; use a list for per-layer values")
        base, inflect = r
        if not -1.0 <= inflect <= 1.0:
            raise ValueError(f"inflect must be in [-1, 1], got {inflect}")
        lo = int(base * (1.0 - inflect))
        hi = 2 * base - lo
        if num_layers == 1:
            return [lo]
        step = (hi - lo) / (num_layers - 1)
        return [int(lo + step * layer) for layer in range(num_layers)]
    if isinstance(r, Sequence):
        values = [int(v) for v in r]
        if len(values) > num_layers:
            raise ValueError(
                f"the r list has {len(values)} entries for {num_layers} layers; shorten it to {num_layers}"
            )
        return values + [0] * (num_layers - len(values))
    raise TypeError(f"r must be an int, an (r, inflect) tuple or a list of ints, got {type(r).__name__}")


def proportional_attention_bias(size: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Additive key bias ``log(size)`` for proportional attention.

    A token standing for ``s`` patches gets the attention weight of ``s`` identical tokens: adding
    ``log s`` of each key to the logits before the softmax, for every head and query.

    Args:
        size: ``(B, T, 1)`` or ``(B, T)`` patches per token.
        dtype: Dtype of the result (the attention logits' dtype); default: that of ``size``.

    Returns:
        ``(B, 1, 1, T)`` bias, broadcastable to attention logits ``(B, heads, queries, T)``; usable as an
        additive ``attn_mask`` of `torch.nn.functional.scaled_dot_product_attention`.
    """
    if size.ndim == 3:
        size = size[..., 0]
    if size.ndim != 2:
        raise ValueError(f"size must be (B, T, 1) or (B, T), got shape {tuple(size.shape)}")
    bias = size.log()[:, None, None, :]
    return bias if dtype is None else bias.to(dtype)


@dataclass
class ToMe(VisualStrategy):
    """Token Merging (Bolya et al., ICLR 2023): bipartite soft matching on head-averaged keys.

    Each frame's tokens are merged as one 1-D sequence (the 2-D grid is not kept), size-weighted, with
    proportional attention in the following blocks and provenance tracked. Placement differs from the
    reference in one respect: tokcomp runs it at the *input* of the scheduled blocks, with the previous
    block's keys, instead of between a block's attention and its MLP.

    On a tower with a class token (CLIP in LLaVA-1.5) the reference matches on ``[CLS] + patches`` with the
    class token protected: the CLS takes the first A slot, so the patches alternate the other way round, and
    the unmerged tokens come out in index order. That is the default here (``class_token=None`` follows the
    tower); the CLS itself stays where the runtime holds it, never merged. ``class_token=False`` matches on
    the patches alone (tokcomp's earlier behaviour).

    Args:
        r: Tokens removed per scheduled block: an int, ``(r, inflect)`` or a per-block list (ToMe's forms,
            over the stage's blocks). In a schedule file ``(r, inflect)`` is written ``[r, inflect]`` with a
            float ``inflect`` (``[8, -1.0]``); a list of ints is the per-block form.
        metric: ``"keys"``, ``"hidden"`` or ``"auto"`` (keys after block 0, hidden states at block 0 and at
            the projector).
        proportional_attention: Add ``log size`` to the attention logits in the following blocks.
        class_token: Match as the reference does with a protected class token in front of the patches.
            ``None``: when the tower has one; ``True``: always; ``False``: never.

    Examples:
        >>> from tokcomp.strategies import ToMe
        >>> ToMe(r=(8, -1.0)).check()
    """

    name: ClassVar[str] = "tome"
    preserves_grid: ClassVar[bool] = False
    r: int | list[int] | tuple[int, float] = 8
    metric: Literal["keys", "hidden", "auto"] = "auto"
    proportional_attention: bool = True
    class_token: bool | None = None

    def check(self) -> None:
        """The schedule form must parse."""
        try:
            values = parse_r(max(4, len(self.r) if isinstance(self.r, list) else 4), self.r)
        except (TypeError, ValueError) as exc:
            raise ScheduleError(f"tome: bad r={self.r!r}: {exc}") from None
        if isinstance(self.r, list) and any(v < 0 for v in values):
            raise ScheduleError(
                f"tome: r={self.r!r}: per-block values must be >= 0; for ToMe's (r, inflect) form write a "
                f"tuple, or in a file [r, inflect] with a float inflect ([{self.r[0]}, {float(self.r[-1])}])"
            )
        if isinstance(self.r, int) and self.r < 0:
            raise ScheduleError(f"tome: r must be >= 0 (tokens removed per block), got {self.r}")
        if self.metric not in ("keys", "hidden", "auto"):
            raise ScheduleError(f"tome: metric must be 'keys', 'hidden' or 'auto', got {self.metric!r}")

    def default_layers(self, num_layers: int) -> list[int]:
        """Every block (the reference merges in all of them); from block 1 with ``metric="keys"``."""
        return list(range(1 if self.metric == "keys" else 0, num_layers))

    def validate(self, stage: Any, adapter: Any) -> None:
        """A per-block ``r`` list must not be longer than the stage's blocks (the projector runs once)."""
        super().validate(stage, adapter)
        if isinstance(self.r, list):
            if stage.site == "projector":
                n = 1
            else:
                n = len(set(stage.layers if stage.layers is not None else self.default_layers(adapter.num_vision_blocks)))
            if len(self.r) > n:
                raise ScheduleError(
                    f"tome: r={self.r!r} has {len(self.r)} per-block values but the stage runs at {n} block(s); "
                    f"shorten the list to {n} or schedule more blocks"
                )

    def output_shape(self, shape: ItemShape, step: ShapeStep) -> ItemShape | None:
        """Every frame becomes a 1-D list of ``n - min(r, n // 2)`` tokens: ``r`` comes from the parameters
        and the stage's blocks (any of ToMe's forms), and the clamp from the token count alone (a protected
        class token in front changes which tokens merge, not how many)."""
        r = parse_r(len(step.stage_layers), self.r)[step.iteration]
        n = shape.h * shape.w
        return ItemShape(shape.t, 1, n - max(0, min(r, n // 2)), is_grid=False)

    def reduce(self, tokens: VisualTokens) -> VisualTokens:
        """Merge ``r`` tokens of every frame."""
        r = parse_r(len(tokens.stage_layers), self.r)[tokens.iteration]
        cls = bool(tokens.prefix) if self.class_token is None else self.class_token
        items = []
        for it in tokens.items:
            frames = []
            for fr in it.frames:
                n = fr.num_tokens
                x = fr.x.reshape(1, n, -1).float()
                if self.metric == "keys" and fr.metric is None:
                    raise ScheduleError(f"tome: metric='keys' but no attention keys reached block {tokens.layer}")
                m = fr.metric if (self.metric != "hidden" and fr.metric is not None) else fr.x
                m = m.reshape(1, n, -1).float()
                size = fr.size.reshape(1, n, 1).float()
                pos = fr.pos.reshape(1, n, 2).float()
                if cls:
                    # The reference's [CLS] + patches: a protected slot in front. Its values never reach a
                    # patch (it is an A token that cannot be a source, and nothing merges into A), so a zero
                    # stands in for the CLS the runtime holds aside; it is dropped again after the merge.
                    m, x, pos = (torch.cat([t.new_zeros(1, 1, t.shape[-1]), t], 1) for t in (m, x, pos))
                    size = torch.cat([size.new_ones(1, 1, 1), size], 1)
                t = n + int(cls)
                merge, _ = bipartite_soft_matching(m, r, class_token=cls)
                xm, new_size = merge_wavg(merge, x, size)
                pm, _ = merge_wavg(merge, pos, size)
                onehot = torch.eye(t, device=x.device).unsqueeze(0)
                old_to_new = merge(onehot, mode="amax")[0].argmax(0)  # (t,) new index of each old token
                if cls:  # the CLS slot is first in the output (unmerged A tokens in index order)
                    xm, new_size, pm, old_to_new = xm[:, 1:], new_size[:, 1:], pm[:, 1:], old_to_new[1:] - 1
                k = xm.shape[1]
                frames.append(FrameGrid(xm.to(fr.x.dtype).reshape(1, k, -1), new_size.reshape(1, k),
                                        pm.reshape(1, k, 2), _follow(old_to_new, fr.owner), None,
                                        is_grid=False))
            items.append(VisualItemTokens(it.kind, frames, it.original))
        return VisualTokens(items, tokens.site, tokens.layer, tokens.num_layers, tokens.stage_layers,
                            tokens.multiple, {"r": r}, tokens.prefix)
