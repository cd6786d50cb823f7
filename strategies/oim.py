"""Orthogonal Iterative Merger (OIM): tensor functions for one merge iteration on one token grid.

These functions implement the section "OIM as implemented" of the LUVC specification. They are
model-agnostic: an adapter hands over one image (or video frame) as a grid and gets a smaller grid back.

Grid representation (shared with `tokcomp.strategies.downsample`):

* ``x`` ``(h, w, c)``: hidden states, any floating dtype.
* ``size`` ``(h, w)`` float: number of original patches each token stands for (starts at 1).
* ``pos`` ``(h, w, 2)`` float: continuous ``(row, col)`` position of each token in the original patch grid,
  the size-weighted mean of the positions of the patches it covers (starts at the integer coordinates).
* ``owner`` ``(n_orig,)`` long: for every *original* patch (raster index ``row * w0 + col`` in the original
  ``h0 × w0`` grid), the raster index ``row * w + col`` of the token that currently holds it in the current
  ``h × w`` grid. This is the provenance: ``O(n_orig)`` memory instead of an ``(h, w, n_orig)`` boolean map,
  and the original patches a token covers are ``(owner == index).nonzero()``. Every function keeps it a
  partition: each original patch has one owner and every current token owns at least one patch.
* ``metric`` ``(h, w, c_m)``, optional: the vectors whose cosine similarity decides what merges (attention
  keys averaged over heads, or hidden states). ``None`` means "use ``x``".

Rules chosen where the specification is silent (also stated on each function):

* Ties between the two neighbours of an A-line go to the right (``axis="width"``) or lower
  (``axis="height"``) neighbour. Ties between candidate matches when picking the ``r`` best go to the
  lower line index (a stable sort).
* Several A-lines may pick the same B-line; all of them merge into it in one size-weighted average. Every
  A-line is merged at most once, so exactly ``r`` lines disappear.
* One iteration can remove at most one line per A-line, i.e. ``multiple * ceil(n / 2)`` of ``n`` super-lines,
  and never leaves fewer than ``multiple`` lines; larger ``r`` is clamped silently (as ToMe clamps its r).
* The surviving lines (the B-lines and the unmatched A-lines) keep their spatial order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from tokcomp.contracts import ItemShape, ShapeStep, VisualStrategy
from tokcomp.errors import RuntimeStateError, ScheduleError
from tokcomp.tokens import FrameGrid, VisualItemTokens, VisualTokens

__all__ = [
    "OIM",
    "Axis",
    "GridState",
    "init_grid_state",
    "oim_merge_lines",
    "oim_merge_pairs",
    "oim_removed",
    "rate_to_r",
]

Axis = Literal["width", "height"]
"""Which side of the grid an iteration shrinks: ``"width"`` merges columns, ``"height"`` merges rows."""

GridState = tuple[Tensor, Tensor, Tensor, Tensor]
"""``(x, size, pos, owner)`` as described in the module docstring."""


def init_grid_state(
    h: int, w: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor, Tensor]:
    """Build the starting bookkeeping of an unmerged ``h × w`` grid.

    Args:
        h: Number of rows of patches.
        w: Number of columns of patches.
        device: Device of the returned tensors.
        dtype: Floating dtype of ``size`` and ``pos``.

    Returns:
        ``(size, pos, owner)``: sizes all 1 ``(h, w)``, integer ``(row, col)`` positions ``(h, w, 2)`` and the
        identity provenance ``arange(h * w)``.

    Raises:
        ValueError: If a side is not positive.
    """
    if h <= 0 or w <= 0:
        raise ValueError(f"grid sides must be positive, got h={h}, w={w}")
    size = torch.ones(h, w, device=device, dtype=dtype)
    rows, cols = torch.meshgrid(
        torch.arange(h, device=device, dtype=dtype),
        torch.arange(w, device=device, dtype=dtype),
        indexing="ij",
    )
    pos = torch.stack([rows, cols], dim=-1)
    owner = torch.arange(h * w, device=device)
    return size, pos, owner


def rate_to_r(side: int, rate: float, multiple: int = 1) -> int:
    """Number of lines to remove so that a fraction ``rate`` of a side disappears.

    Args:
        side: Current number of lines along the axis.
        rate: Fraction of the side to remove, in ``[0, 1]``.
        multiple: Grid unit of the projector; the result is a multiple of it.

    Returns:
        ``floor(side * rate)`` rounded down to a multiple of ``multiple``, reduced if needed so that at least
        ``multiple`` lines remain (0 when the side is smaller than ``2 * multiple``).

    Raises:
        ValueError: If ``rate`` is outside ``[0, 1]``, or ``side`` or ``multiple`` is not positive.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be a fraction in [0, 1], got {rate}")
    if side <= 0 or multiple <= 0:
        raise ValueError(f"side and multiple must be positive, got side={side}, multiple={multiple}")
    # The epsilon absorbs binary rounding such as 100 * 0.29 == 28.999999999999996.
    r = math.floor(side * rate + 1e-9)
    r = min(r, side - multiple)
    return max(0, r // multiple * multiple)


def _check_state(x: Tensor, size: Tensor, pos: Tensor, owner: Tensor, metric: Tensor | None) -> None:
    if x.ndim != 3:
        raise ValueError(f"x must be (h, w, c), got shape {tuple(x.shape)}")
    h, w = x.shape[:2]
    if size.shape != (h, w):
        raise ValueError(f"size must be (h, w) = {(h, w)}, got {tuple(size.shape)}")
    if pos.shape != (h, w, 2):
        raise ValueError(f"pos must be (h, w, 2) = {(h, w, 2)}, got {tuple(pos.shape)}")
    if owner.ndim != 1 or owner.dtype != torch.long:
        raise ValueError(f"owner must be a 1-D LongTensor, got {owner.dtype} of shape {tuple(owner.shape)}")
    if metric is not None and (metric.ndim != 3 or metric.shape[:2] != (h, w)):
        raise ValueError(f"metric must be (h, w, c_m) with (h, w) = {(h, w)}, got {tuple(metric.shape)}")


def _check_axis(axis: str) -> None:
    if axis not in ("width", "height"):
        raise ValueError(f'axis must be "width" or "height", got {axis!r}')


def _check_multiple(side: int, r: int, multiple: int, axis: str) -> None:
    if multiple <= 0:
        raise ValueError(f"multiple must be positive, got {multiple}")
    if r < 0:
        raise ValueError(f"r counts removed lines and must be >= 0, got {r}")
    if r % multiple:
        raise ValueError(
            f"r={r} must be a multiple of multiple={multiple} so the {axis} stays divisible; "
            f"use r={r // multiple * multiple} or r={(r // multiple + 1) * multiple} (see rate_to_r)"
        )
    if side % multiple:
        raise ValueError(
            f"the {axis} ({side}) must be divisible by multiple={multiple}; "
            f"resize the input grid or use multiple=1"
        )


def _to_canonical(t: Tensor, axis: str) -> Tensor:
    # Every merge is written for columns; rows are merged by working on the transposed grid.
    return t if axis == "width" else t.transpose(0, 1)


def _from_canonical(t: Tensor, axis: str) -> Tensor:
    # Contiguous so that callers may .view() the result like any freshly computed tensor.
    return t if axis == "width" else t.transpose(0, 1).contiguous()


def _best_neighbour(sim: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Match every even index (A) to its more similar odd neighbour (B).

    Args:
        sim: ``(..., n - 1)`` similarity of neighbours ``i`` and ``i + 1``.
        n: Number of elements along the last axis.

    Returns:
        ``(a_idx, best, dst)``: the A indices ``(n_a,)``, their best similarity ``(..., n_a)`` and the index of
        the chosen B neighbour ``(..., n_a)``. Ties go to the right neighbour.
    """
    a_idx = torch.arange(0, n, 2, device=sim.device)
    neg_inf = torch.full_like(sim[..., :1], float("-inf"))
    # Padding with -inf on both ends makes "no neighbour on that side" lose every comparison.
    padded = torch.cat([neg_inf, sim, neg_inf], dim=-1)
    left = padded[..., a_idx]
    right = padded[..., a_idx + 1]
    take_right = right >= left
    best = torch.where(take_right, right, left)
    dst = torch.where(take_right, a_idx + 1, a_idx - 1)
    return a_idx, best, dst


def _cosine(metric: Tensor) -> Tensor:
    # Float32 at least: bf16 cosines collide often, which would make the choice depend on rounding.
    return F.normalize(metric.to(torch.promote_types(metric.dtype, torch.float32)), dim=-1)


def _neighbour_cosine(metric: Tensor, shift: int) -> Tensor:
    """Cosine similarity (float32) of every token with the token ``shift`` columns to its right.

    Args:
        metric: ``(h, w, c)`` vectors.
        shift: Column distance, ``< w``.

    Returns:
        ``(h, w - shift)``.
    """
    acc_dtype = torch.promote_types(metric.dtype, torch.float32)
    # A few rows at a time: each chunk's float32 copy stays in cache, 3-4x faster than whole-grid temporaries
    # on a 128 x 128 x 1280 grid.
    rows = max(1, (1 << 19) // max(1, metric.shape[1] * metric.shape[2]))
    out = []
    for part in torch.split(metric, rows):
        pf = part.to(acc_dtype)
        norm = torch.linalg.vector_norm(pf, dim=-1).clamp(min=1e-12)
        out.append(torch.linalg.vecdot(pf[:, :-shift], pf[:, shift:]) / (norm[:, :-shift] * norm[:, shift:]))
    return torch.cat(out)


def _merge_columns(
    x: Tensor, size: Tensor, pos: Tensor, target: Tensor, keep: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Size-weighted merge of each column (per row) into the column ``target`` names.

    Args:
        x: ``(h, w, c)`` hidden states.
        size: ``(h, w)`` sizes.
        pos: ``(h, w, 2)`` positions.
        target: ``(h, w)`` long, the column each token goes to (itself for survivors).
        keep: ``(h, w)`` bool, the surviving tokens; every row keeps the same number.

    Returns:
        ``(x, size, pos, new_col)`` on the reduced grid, and ``new_col`` ``(h, w)``: the column of the reduced
        grid each old token ended up in.
    """
    h, w, c = x.shape
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    weight = size.to(acc_dtype)
    weighted_x = x.to(acc_dtype) * weight[..., None]
    weighted_pos = pos.to(acc_dtype) * weight[..., None]
    acc_x = torch.zeros_like(weighted_x).scatter_add_(1, target[..., None].expand(h, w, c), weighted_x)
    acc_pos = torch.zeros_like(weighted_pos).scatter_add_(1, target[..., None].expand(h, w, 2), weighted_pos)
    acc_size = torch.zeros_like(weight).scatter_add_(1, target, weight)
    w_new = int(keep[0].sum())
    new_size = acc_size[keep].view(h, w_new)
    new_x = (acc_x[keep].view(h, w_new, c) / new_size[..., None]).to(x.dtype)
    new_pos = (acc_pos[keep].view(h, w_new, 2) / new_size[..., None]).to(pos.dtype)
    rank = keep.long().cumsum(dim=1) - 1
    new_col = rank.gather(1, target)
    return new_x, new_size.to(size.dtype), new_pos, new_col


def _merge_whole_columns(
    x: Tensor, size: Tensor, pos: Tensor, src: Tensor, dst: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`_merge_columns` when every row merges the same columns: column ``src[i]`` into column ``dst[i]``.

    Only the columns that take part in a merge are averaged (in float32); every other surviving column is
    copied as it is, which on a large grid is most of the work saved.

    Args:
        x: ``(h, w, c)`` hidden states.
        size: ``(h, w)`` sizes.
        pos: ``(h, w, 2)`` positions.
        src: ``(r,)`` the merged-away columns, distinct.
        dst: ``(r,)`` the surviving column each of them goes to.

    Returns:
        As `_merge_columns`.
    """
    h, w, c = x.shape
    dev = x.device
    target = torch.arange(w, device=dev)
    target[src] = dst
    keep = torch.ones(w, dtype=torch.bool, device=dev)
    keep[src] = False
    new_col = keep.long().cumsum(0)[target] - 1  # (w,): the reduced-grid column of every old column
    kept = keep.nonzero().squeeze(1)
    # The columns of the merge groups (receivers and senders), and each one's group among the receivers.
    receivers = torch.unique(dst)
    members = torch.isin(target, receivers).nonzero().squeeze(1)
    group = torch.searchsorted(receivers, target[members])

    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    weight = size[:, members].to(acc_dtype)  # (h, m)
    acc_size = torch.zeros(h, receivers.numel(), dtype=acc_dtype, device=dev).index_add_(1, group, weight)
    acc_x = torch.zeros(h, receivers.numel(), c, dtype=acc_dtype, device=dev).index_add_(
        1, group, x[:, members].to(acc_dtype) * weight[..., None]
    )
    acc_pos = torch.zeros(h, receivers.numel(), 2, dtype=acc_dtype, device=dev).index_add_(
        1, group, pos[:, members].to(acc_dtype) * weight[..., None]
    )
    out_cols = new_col[receivers]
    new_x = x[:, kept]
    new_x[:, out_cols] = (acc_x / acc_size[..., None]).to(x.dtype)
    new_size = size[:, kept]
    new_size[:, out_cols] = acc_size.to(size.dtype)
    new_pos = pos[:, kept]
    new_pos[:, out_cols] = (acc_pos / acc_size[..., None]).to(pos.dtype)
    return new_x, new_size, new_pos, new_col.expand(h, w)


def _remap_owner(owner: Tensor, w: int, new_col: Tensor, axis: str, new_w: int) -> Tensor:
    """Move the provenance to the reduced grid.

    Args:
        owner: ``(n_orig,)`` raster indices into the old ``h × w`` grid.
        w: Old width.
        new_col: ``(h_c, w_c)`` new canonical column of each old canonical token (canonical = transposed
            for ``axis="height"``).
        axis: The merged axis.
        new_w: Width of the reduced grid.

    Returns:
        ``(n_orig,)`` raster indices into the reduced grid.
    """
    row, col = owner // w, owner % w
    if axis == "width":
        return row * new_w + new_col[row, col]
    # In the transposed frame the old column is the canonical row and the old row the canonical column.
    return new_col[col, row] * new_w + col


def oim_merge_lines(
    x: Tensor,
    size: Tensor,
    pos: Tensor,
    owner: Tensor,
    metric: Tensor | None,
    axis: Axis,
    r: int,
    multiple: int = 1,
) -> GridState:
    """One OIM iteration in ``mode="lines"``: merge the ``r`` most similar adjacent lines along one axis.

    Lines (columns for ``axis="width"``, rows for ``axis="height"``) are grouped into super-lines of
    ``multiple`` adjacent lines. The similarity of neighbouring super-lines ``g`` and ``g + 1`` is the mean,
    over the tokens of the line and the ``multiple`` line offsets, of the cosine similarity of ``metric`` at
    ``(g, k)`` and ``(g + 1, k)``. Super-lines are split by alternation into A (even index) and B (odd);
    each A super-line is matched to its more similar adjacent B super-line (ties: the right/lower one), and
    the ``r / multiple`` A super-lines with the highest similarity (ties: the lower index) are merged into
    their match, line ``k`` into line ``k`` and token by token along the line:
    ``x = sum(S_i x_i) / sum(S_i)``, sizes add, positions are size-weighted, provenance is the union.
    Several A super-lines may merge into the same B super-line; each A super-line merges at most once, so
    exactly ``r`` lines disappear and ``h × w`` becomes ``h × (w − r)`` (``axis="width"``). Surviving lines keep
    their order.

    Args:
        x: ``(h, w, c)`` hidden states.
        size: ``(h, w)`` float, original patches per token.
        pos: ``(h, w, 2)`` float, continuous ``(row, col)`` positions.
        owner: ``(n_orig,)`` long, current raster index of every original patch.
        metric: ``(h, w, c_m)`` similarity vectors, or ``None`` to use ``x``.
        axis: ``"width"`` merges columns, ``"height"`` merges rows.
        r: Number of lines to remove; a multiple of ``multiple``. Clamped to what one iteration can remove:
            ``multiple * ceil(n / 2)`` for ``n`` super-lines, and 0 when only one super-line is left (so at
            least ``multiple`` lines always remain).
        multiple: The projector's grid unit; the merged side must be divisible by it and stays so.

    Returns:
        ``(x, size, pos, owner)`` of the reduced grid. The inputs are returned unchanged when nothing merges.

    Raises:
        ValueError: On inconsistent shapes, an unknown axis, a negative ``r``, ``r`` not a multiple of
            ``multiple``, or a side not divisible by ``multiple``.
    """
    _check_state(x, size, pos, owner, metric)
    _check_axis(axis)
    h, w = x.shape[:2]
    side = w if axis == "width" else h
    _check_multiple(side, r, multiple, axis)
    n_super = side // multiple
    r_super = min(r // multiple, math.ceil(n_super / 2)) if n_super >= 2 else 0
    if r_super == 0:
        return x, size, pos, owner

    cx, csize, cpos = (_to_canonical(t, axis) for t in (x, size, pos))
    cmetric = _to_canonical(x if metric is None else metric, axis)

    # sim[g] compares super-line g with g + 1, line offset by line offset, averaged over the grid.
    sim = rearrange(_neighbour_cosine(cmetric, multiple), "h (g m) -> h g m", m=multiple).mean(dim=(0, 2))
    a_idx, best, dst = _best_neighbour(sim, n_super)
    order = torch.sort(best, descending=True, stable=True).indices[:r_super]
    offsets = torch.arange(multiple, device=x.device)
    src_cols = (a_idx[order][:, None] * multiple + offsets).flatten()
    dst_cols = (dst[order][:, None] * multiple + offsets).flatten()

    new_x, new_size, new_pos, new_col = _merge_whole_columns(cx, csize, cpos, src_cols, dst_cols)

    new_w = new_x.shape[1] if axis == "width" else w
    new_owner = _remap_owner(owner, w, new_col, axis, new_w)
    new_x, new_size, new_pos = (_from_canonical(t, axis) for t in (new_x, new_size, new_pos))
    return new_x, new_size, new_pos, new_owner


def oim_merge_pairs(
    x: Tensor,
    size: Tensor,
    pos: Tensor,
    owner: Tensor,
    metric: Tensor | None,
    axis: Axis,
    r: int,
    multiple: int = 1,
) -> GridState:
    """One OIM iteration in ``mode="pairs"``: merge adjacent token pairs inside every line independently.

    For ``axis="width"`` each row is treated on its own (for ``"height"``, each column): its tokens are split
    by alternation into A (even position) and B (odd); each A token is matched to its more similar adjacent
    B token (cosine of ``metric``; ties: the right/lower one) and the ``r`` A tokens with the most similar
    match (ties: the lower index) are merged into it, size-weighted as in `oim_merge_lines`. Several A
    tokens may merge into the same B token. Every row loses exactly ``r`` tokens, so the grid stays
    rectangular, ``h × (w − r)``, although merged tokens of different rows no longer share a column.

    Args:
        x: ``(h, w, c)`` hidden states.
        size: ``(h, w)`` float, original patches per token.
        pos: ``(h, w, 2)`` float, continuous ``(row, col)`` positions.
        owner: ``(n_orig,)`` long, current raster index of every original patch.
        metric: ``(h, w, c_m)`` similarity vectors, or ``None`` to use ``x``.
        axis: ``"width"`` shrinks rows (merges along the width), ``"height"`` shrinks columns.
        r: Tokens removed from every line; a multiple of ``multiple``. Clamped to the number of A tokens,
            ``ceil(n / 2)`` for ``n`` tokens per line, and so that at least ``multiple`` tokens remain.
        multiple: The projector's grid unit; the merged side must be divisible by it and stays so.

    Returns:
        ``(x, size, pos, owner)`` of the reduced grid. The inputs are returned unchanged when nothing merges.

    Raises:
        ValueError: On inconsistent shapes, an unknown axis, a negative ``r``, ``r`` not a multiple of
            ``multiple``, or a side not divisible by ``multiple``.
    """
    _check_state(x, size, pos, owner, metric)
    _check_axis(axis)
    h, w = x.shape[:2]
    side = w if axis == "width" else h
    _check_multiple(side, r, multiple, axis)
    r = min(r, math.ceil(side / 2), side - multiple) // multiple * multiple
    if r <= 0:
        return x, size, pos, owner

    cx, csize, cpos = (_to_canonical(t, axis) for t in (x, size, pos))
    cmetric = _to_canonical(x if metric is None else metric, axis)
    h_c, w_c = csize.shape

    unit = _cosine(cmetric)
    sim = (unit[:, :-1] * unit[:, 1:]).sum(dim=-1)
    a_idx, best, dst = _best_neighbour(sim, w_c)
    order = torch.sort(best, dim=1, descending=True, stable=True).indices[:, :r]
    src_cols = a_idx[order]
    dst_cols = dst.gather(1, order)

    target = torch.arange(w_c, device=x.device).repeat(h_c, 1).scatter_(1, src_cols, dst_cols)
    keep = torch.ones(h_c, w_c, dtype=torch.bool, device=x.device).scatter_(1, src_cols, False)
    new_x, new_size, new_pos, new_col = _merge_columns(cx, csize, cpos, target, keep)

    new_w = new_x.shape[1] if axis == "width" else w
    new_owner = _remap_owner(owner, w, new_col, axis, new_w)
    new_x, new_size, new_pos = (_from_canonical(t, axis) for t in (new_x, new_size, new_pos))
    return new_x, new_size, new_pos, new_owner


def oim_removed(side: int, r: int, multiple: int = 1, mode: str = "lines") -> int:
    """Lines (``mode="lines"``) or tokens per line (``"pairs"``) that one iteration removes from a side of
    ``side``: the clamp of `oim_merge_lines` / `oim_merge_pairs`, on sizes only.

    Args:
        side: Current length of the merged axis.
        r: Requested removal, a multiple of ``multiple``.
        multiple: The projector's grid unit.
        mode: ``"lines"`` or ``"pairs"``.

    Returns:
        How many lines (tokens per line) disappear; ``side - oim_removed(...)`` is the new side.

    Raises:
        ValueError: As the merge functions, for ``r`` or ``side`` not divisible by ``multiple``.
    """
    _check_multiple(side, r, multiple, "side")
    if mode == "lines":
        n_super = side // multiple
        return (min(r // multiple, math.ceil(n_super / 2)) if n_super >= 2 else 0) * multiple
    return max(0, min(r, math.ceil(side / 2), side - multiple) // multiple * multiple)


# ----------------------------------------------------------------------------------------------------------
# The strategy: applies one OIM iteration per scheduled encoder block, alternating the axis.


@dataclass
class OIM(VisualStrategy):
    """Orthogonal Iterative Merger (LUVC): merge whole columns, then whole rows, ... inside the encoder.

    Each scheduled block is one iteration along one axis (``first_axis`` first, then alternating), so the
    grid stays rectangular and its sides stay divisible by the projector's unit.

    Args:
        rate: Fraction of the lines along the iteration's axis removed per iteration.
        r: Lines removed per iteration (overrides ``rate``; rounded down to the grid unit).
        metric: ``"keys"`` (the previous block's attention keys, head-averaged), ``"hidden"``, or ``"auto"``
            (the default: keys where an earlier block exists, the hidden states at block 0, which has no
            previous block). ``"keys"`` at block 0 is refused at `tokcomp.compress`.
        mode: ``"lines"`` (whole columns/rows) or ``"pairs"`` (adjacent token pairs inside each row).
        first_axis: ``"width"`` or ``"height"``.
        proportional_attention: Add ``log size`` to the attention logits in the following blocks.
        iterations: Total iterations over the stage; ``None`` runs one per scheduled block. With fewer
            blocks than iterations, the blocks share them evenly (the axis keeps alternating).
    """

    name: ClassVar[str] = "oim"
    rate: float = 0.25
    r: int | None = None
    metric: Literal["keys", "hidden", "auto"] = "auto"
    mode: Literal["lines", "pairs"] = "lines"
    first_axis: Literal["width", "height"] = "width"
    proportional_attention: bool = True
    iterations: int | None = None

    def check(self) -> None:
        """Parameter ranges."""
        if self.iterations is not None and self.iterations < 1:
            raise ScheduleError(f"oim: iterations must be >= 1, got {self.iterations}")
        if not 0.0 <= self.rate < 1.0:
            raise ScheduleError(f"oim: rate must be in [0, 1) (fraction of lines removed), got {self.rate}")
        if self.r is not None and self.r < 0:
            raise ScheduleError(f"oim: r must be >= 0, got {self.r}")
        if self.metric not in ("keys", "hidden", "auto"):
            raise ScheduleError(f"oim: metric must be 'keys', 'hidden' or 'auto', got {self.metric!r}")
        if self.mode not in ("lines", "pairs"):
            raise ScheduleError(f"oim: mode must be 'lines' or 'pairs', got {self.mode!r}")
        if self.first_axis not in ("width", "height"):
            raise ScheduleError(f"oim: first_axis must be 'width' or 'height', got {self.first_axis!r}")

    def default_layers(self, num_layers: int) -> list[int]:
        """``iterations`` (default 2) blocks spread over the last third of the encoder."""
        n = self.iterations or 2
        start = num_layers - max(1, num_layers // 3)
        span = num_layers - start
        return sorted({start + (k * span) // n for k in range(n)})

    def validate(self, stage: Any, adapter: Any) -> None:
        """Grid sides must stay divisible by the adapter's unit, and merges must leave tokens."""
        super().validate(stage, adapter)
        if self.r is not None and stage.site == "encoder" and self.r % max(1, adapter.grid_multiple):
            raise ScheduleError(
                f"oim: r={self.r} lines cannot keep the grid sides divisible by {adapter.grid_multiple} (the "
                f"{adapter.name!r} projector's unit); use a multiple of {adapter.grid_multiple}"
            )

    def axis_at(self, iteration: int) -> Axis:
        """The axis of iteration ``iteration`` (0-based)."""
        other: Axis = "height" if self.first_axis == "width" else "width"
        return self.first_axis if iteration % 2 == 0 else other  # type: ignore[return-value]

    def reduce(self, tokens: VisualTokens) -> VisualTokens:
        """This block's iteration(s) on every frame of every item."""
        info: dict[str, Any] = {"axes": [], "removed": 0}
        for it in self._iterations(tokens):
            tokens = self._iterate(tokens, it)
            info["axes"].append(tokens.info["axis"])
            info["removed"] += tokens.info["removed"]
        tokens.info = info
        return tokens

    def _iterations(self, step: ShapeStep | VisualTokens) -> range:
        total = self.iterations or len(step.stage_layers)
        per = -(-total // len(step.stage_layers))
        first = step.iteration * per
        return range(first, min(first + per, total))

    def _r(self, side: int, mult: int) -> int:
        r = self.r if self.r is not None else rate_to_r(side, self.rate, mult)
        r = min(r, max(0, side - mult))
        return r - r % mult

    def output_shape(self, shape: ItemShape, step: ShapeStep) -> ItemShape | None:
        """Each iteration removes `oim_removed` lines along its axis: the size follows from the grid alone."""
        if not shape.is_grid:
            raise ScheduleError("oim needs grids; an earlier stage broke the 2-D layout")
        h, w = shape.h, shape.w
        for it in self._iterations(step):
            if self.axis_at(it) == "width":
                w -= oim_removed(w, self._r(w, step.multiple), step.multiple, self.mode)
            else:
                h -= oim_removed(h, self._r(h, step.multiple), step.multiple, self.mode)
        return ItemShape(shape.t, h, w)

    def _iterate(self, tokens: VisualTokens, iteration: int) -> VisualTokens:
        axis = self.axis_at(iteration)
        mult = tokens.multiple
        merge = oim_merge_lines if self.mode == "lines" else oim_merge_pairs
        items = []
        removed = 0
        for it in tokens.items:
            frames = []
            for fr in it.frames:
                if not fr.is_grid:
                    raise RuntimeStateError("oim needs grids; an earlier stage broke the 2-D layout")
                h, w = fr.shape
                side = w if axis == "width" else h
                r = self._r(side, mult)
                if self.metric == "keys" and fr.metric is None:
                    raise RuntimeStateError(f"oim: metric='keys' but no attention keys reached block {tokens.layer}")
                metric = fr.metric if (self.metric != "hidden" and fr.metric is not None) else fr.x
                x, size, pos, owner = merge(fr.x, fr.size, fr.pos, fr.owner, metric, axis, r, mult)
                removed += fr.num_tokens - x.shape[0] * x.shape[1]
                frames.append(FrameGrid(x, size, pos, owner))
            items.append(VisualItemTokens(it.kind, frames, it.original))
        info = {"axis": axis, "removed": removed}
        return VisualTokens(items, tokens.site, tokens.layer, tokens.num_layers, tokens.stage_layers,
                            tokens.multiple, info)
