"""VScan (Zhang et al., TMLR 2026): a local and a global scan of the vision encoder's attention, with merging.

Written from the project's specification of the reference code (``shared/spec/methods-2025.md`` §5;
Tencent/SelfEvolvingAgent @ a82450e, ``VScan/``), which this module does not reproduce. Per image (tile, video
frame) of ``n`` projected tokens with ``T`` to keep and two encoder attention maps, a shallow one ``a`` and a
deep one ``b`` (LLaVA: the CLS query rows of blocks 5 and 22 of 24, averaged over heads; towers without CLS:
the attention each token receives, averaged over heads and over each LLM token's patches, as the Qwen2.5-VL
code does):

1. **Local scan**: the grid is cut into ``window x window`` windows; each keeps its ``⌊T/2⌋ // windows``
   tokens of largest ``a``.
2. **Global scan**: the ``T − ⌊T/2⌋`` other tokens of largest ``b``.
3. **Merge**: every token not selected joins the selected token of largest cosine similarity (on the
   projected features), and each selected token becomes the plain mean ``(x_s + Σ_{i→s} x_i) / (1 + count_s)``.
   The selected tokens stay in sequence order and keep their positions.

The reference then prunes once more at a middle LLM layer (the last prompt token's attention); the ``vscan``
preset composes that stage from `FastV` (see the docs page for the one-layer difference).

Deliberate differences (each named on the docs page): the global scan excludes the local picks (the
reference zeroes them in the deep map, which selects them again once ``T − ⌊T/2⌋`` exceeds the other tokens);
exact ties go to the lower index; a budget ``T >= n`` keeps every token (the reference's per-window ``topk``
raises there); batched, per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from tokcomp.contracts import (
    AttentionSite,
    EncoderAttention,
    ItemShape,
    ShapeStep,
    VisualStrategy,
    check_keep_ratio,
)
from tokcomp.errors import ScheduleError
from tokcomp.tokens import FrameGrid, VisualItemTokens, VisualTokens

__all__ = ["VScan", "vscan_count", "vscan_merge", "vscan_select", "vscan_windows"]


def _top(scores: Tensor, k: int, allowed: Tensor | None = None) -> Tensor:
    """Indices of the ``k`` largest ``scores`` (among ``allowed``); equal scores go to the lower index."""
    s = scores.float()
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
        k = min(k, int(allowed.sum()))
    order = torch.sort(s, descending=True, stable=True).indices
    return order[: max(0, min(k, s.numel()))]


def vscan_windows(h: int, w: int, window: int) -> Tensor:
    """The window of every token of an ``h x w`` grid cut into ``window x window`` windows.

    Windows are numbered in raster order; the last row and column of windows are smaller when ``window`` does
    not divide the side.

    Args:
        h: Rows of the grid.
        w: Columns of the grid.
        window: Side of a window, >= 1.

    Returns:
        ``(h * w,)`` long window indices, in the grid's raster order.

    Examples:
        >>> vscan_windows(2, 3, 2).tolist()
        [0, 0, 1, 0, 0, 1]
    """
    rows = torch.arange(h) // window
    cols = torch.arange(w) // window
    per_row = (w + window - 1) // window
    return (rows[:, None] * per_row + cols[None, :]).reshape(-1)


def vscan_select(shallow: Tensor, deep: Tensor, windows: Tensor, keep: int) -> Tensor:
    """The local and the global scan (module docstring, steps 1–2).

    Args:
        shallow: ``(n,)`` the shallow attention map (local scan).
        deep: ``(n,)`` the deep attention map (global scan).
        windows: ``(n,)`` long, each token's window (`vscan_windows`), numbered from 0.
        keep: ``T``, at least 1; ``T >= n`` keeps every token.

    Returns:
        ``(k,)`` ascending unique indices of the selected tokens, ``k <= T`` (fewer when ``⌊T/2⌋`` does not
        divide among the windows or a window is smaller than its share, as in the reference).
    """
    n = int(shallow.numel())
    if keep >= n:  # nothing to choose (the reference's per-window topk would raise on small windows)
        return torch.arange(n, device=shallow.device)
    keep = max(1, int(keep))
    windows = windows.to(shallow.device)
    num_windows = int(windows.max()) + 1 if n else 0
    per_window = (keep // 2) // max(num_windows, 1)
    picked = torch.zeros(n, dtype=torch.bool, device=shallow.device)
    if per_window:
        for win in range(num_windows):
            members = (windows == win).nonzero().squeeze(1)
            picked[members[_top(shallow[members], per_window)]] = True
    picked[_top(deep, keep - keep // 2, ~picked)] = True
    return picked.nonzero().squeeze(1)


def vscan_count(h: int, w: int, window: int, keep: int) -> int:
    """How many tokens `vscan_select` keeps on an ``h x w`` grid (independent of the maps' values).

    Args:
        h: Rows (1 for a 1-D frame, which is one window).
        w: Columns.
        window: Side of a window.
        keep: ``T``.

    Returns:
        The selected count.
    """
    n = h * w
    if keep >= n:
        return n
    keep = max(1, int(keep))
    sizes = torch.bincount(vscan_windows(h, w, window))
    per_window = (keep // 2) // int(sizes.numel())
    local = int(sizes.clamp(max=per_window).sum())
    return local + min(keep - keep // 2, n - local)


def vscan_merge(x: Tensor, selected: Tensor) -> tuple[Tensor, Tensor]:
    """Merge every other token into its most cosine-similar selected token, as a plain mean (step 3).

    Args:
        x: ``(n, C)`` projected tokens.
        selected: ``(k,)`` unique selected indices.

    Returns:
        ``(merged, assign)``: ``(k, C)`` the merged tokens in the order of ``selected``, and ``(n,)`` for every
        token the position in ``selected`` of the token it joined (a selected token: its own; ties: the first).
    """
    xf = x.float()
    unit = F.normalize(xf, dim=-1)
    assign = (unit @ unit[selected].T).argmax(1)  # first maximum on ties
    assign[selected] = torch.arange(selected.numel(), device=x.device)
    total = xf.new_zeros(selected.numel(), x.shape[1]).index_add_(0, assign, xf)
    count = torch.bincount(assign, minlength=selected.numel()).to(xf.dtype)
    return (total / count[:, None]).to(x.dtype), assign


@dataclass
class VScan(VisualStrategy):
    """VScan's visual stage: local and global scans of two encoder attention maps, then merging.

    Runs at the ``projector`` site, where the reference merges (the projected tokens), on every image, tile
    and video frame. The maps are requested from the runtime (`tokcomp.contracts.EncoderAttention`): the CLS
    query row on a tower with a CLS token, the attention each token receives otherwise.

    Args:
        keep: Tokens selected per frame (the reference's ``visual_token_num``: 96 of LLaVA-1.5's 576).
        keep_ratio: Instead of ``keep``: ``round(ratio · n)`` of each frame's tokens.
        shallow_block: Encoder block of the local scan's map (default ``5 · depth // 24``: LLaVA's 5 of 24).
        deep_block: Encoder block of the global scan's map (default ``depth − 2``: LLaVA's 22 of 24).
        window: Side of the local scan's windows, in LLM tokens (the reference's 6 on LLaVA's 24 x 24).
    """

    name: ClassVar[str] = "vscan"
    sites: ClassVar[frozenset[str]] = frozenset({"projector"})
    preserves_grid: ClassVar[bool] = False
    keep: int = 96
    keep_ratio: float | None = None
    shallow_block: int | None = None
    deep_block: int | None = None
    window: int = 6

    def check(self) -> None:
        """Parameter ranges."""
        if self.keep < 1:
            raise ScheduleError(f"vscan: keep must be >= 1 token per frame, got {self.keep}")
        if self.keep_ratio is not None:
            check_keep_ratio("vscan", self.keep_ratio)
        if self.window < 1:
            raise ScheduleError(f"vscan: window must be >= 1 token, got {self.window}")
        for name in ("shallow_block", "deep_block"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ScheduleError(f"vscan: {name} must be an encoder block >= 0, got {v}")

    def blocks(self, num_blocks: int) -> tuple[int, int]:
        """``(shallow, deep)`` encoder blocks for a tower of ``num_blocks`` blocks."""
        shallow = self.shallow_block if self.shallow_block is not None else min(num_blocks - 1, 5 * num_blocks // 24)
        deep = self.deep_block if self.deep_block is not None else max(num_blocks - 2, 0)
        return shallow, deep

    def attention_needs(self, where: AttentionSite) -> tuple[EncoderAttention, ...]:
        """The two maps: CLS rows on a CLS tower, received attention otherwise."""
        query = "cls" if where.has_cls else "mean"
        return tuple(EncoderAttention(b, query) for b in self.blocks(where.num_blocks))

    def _keep(self, n: int) -> int:
        return round(self.keep_ratio * n) if self.keep_ratio is not None else self.keep

    def output_shape(self, shape: ItemShape, step: ShapeStep) -> ItemShape:
        """Every frame keeps `vscan_count` tokens, as a 1-D frame."""
        h, w = (shape.h, shape.w) if shape.is_grid else (1, shape.h * shape.w)
        window = self.window if shape.is_grid else max(h * w, 1)
        return ItemShape(shape.t, 1, vscan_count(h, w, window, self._keep(h * w)), is_grid=False)

    def reduce(self, tokens: VisualTokens) -> VisualTokens:
        """Scan and merge every frame."""
        shallow_b, deep_b = self.blocks(tokens.num_layers)
        items, kept = [], []
        for it in tokens.items:
            frames = []
            for fr in it.frames:
                n = fr.num_tokens
                h, w = fr.shape
                shallow = _map(fr, shallow_b)
                deep = _map(fr, deep_b)
                # a frame an earlier stage made 1-D is one window
                win = vscan_windows(h, w, self.window) if fr.is_grid else torch.zeros(n, dtype=torch.long)
                selected = vscan_select(shallow, deep, win, self._keep(n))
                merged, assign = vscan_merge(fr.x.reshape(n, -1), selected)
                frames.append(_frame(fr, selected, merged, assign))
                kept.append(int(selected.numel()))
            items.append(VisualItemTokens(it.kind, frames, it.original))
        return VisualTokens(items, tokens.site, tokens.layer, tokens.num_layers, tokens.stage_layers,
                            tokens.multiple, {"kept_per_frame": kept}, tokens.prefix)


def _map(fr: FrameGrid, block: int) -> Tensor:
    """The head-averaged ``(n,)`` map of ``block``: whichever query the runtime computed for this tower."""
    need = EncoderAttention(block, "cls")
    if need not in fr.attention:
        need = EncoderAttention(block, "mean")
    return fr.attention_of(need).reshape(-1, fr.num_tokens).mean(0)


def _frame(fr: FrameGrid, selected: Tensor, merged: Tensor, assign: Tensor) -> FrameGrid:
    """The output frame: sizes add up (provenance), a merged token keeps its selected token's position."""
    n = fr.num_tokens
    k = int(selected.numel())
    size = fr.size.reshape(n).float()
    sizes = size.new_zeros(k).index_add_(0, assign, size)
    owner = torch.where(fr.owner >= 0, assign[fr.owner.clamp(min=0)], fr.owner)
    return FrameGrid(merged.reshape(1, k, -1), sizes.reshape(1, k), fr.pos.reshape(n, 2)[selected].reshape(1, k, 2),
                     owner, None, is_grid=False, prefix_x=fr.prefix_x)
