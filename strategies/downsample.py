"""Plain 2-D average pooling of a token grid: the spatial-downsampling baseline.

Uses the grid representation of `tokcomp.strategies.oim` (``x`` ``(h, w, c)``, ``size`` ``(h, w)``,
``pos`` ``(h, w, 2)``, ``owner`` ``(n_orig,)``).

Bins: output row ``i`` of ``out_h`` covers the input rows ``floor(i * h / out_h) <= row < floor((i + 1) * h /
out_h)``, and likewise for columns. When ``out_h`` divides ``h`` this is exactly
`torch.nn.functional.adaptive_avg_pool2d`. Otherwise adaptive pooling ends bin ``i`` at
``ceil((i + 1) * h / out_h)``, so neighbouring bins share a row; this module uses the floor boundary instead so
that the bins partition the grid: each input token, and so each original patch, belongs to one output token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from tokcomp.contracts import ItemShape, ShapeStep, VisualStrategy
from tokcomp.errors import RuntimeStateError, ScheduleError
from tokcomp.tokens import FrameGrid, VisualItemTokens, VisualTokens

__all__ = ["Downsample", "bin_index", "downsample_grid"]


def bin_index(n: int, out: int, device: torch.device | str | None = None) -> Tensor:
    """Output bin of each of ``n`` input positions when pooling to ``out`` bins.

    Args:
        n: Input length.
        out: Number of bins, ``1 <= out <= n``.
        device: Device of the result.

    Returns:
        ``(n,)`` long tensor, non-decreasing, taking every value ``0 .. out - 1``; bin ``i`` covers
        ``floor(i * n / out) <= k < floor((i + 1) * n / out)``.
    """
    boundaries = torch.arange(out + 1, device=device) * n // out
    return torch.searchsorted(boundaries, torch.arange(n, device=device), right=True) - 1


def downsample_grid(
    x: Tensor,
    size: Tensor,
    pos: Tensor,
    owner: Tensor,
    out_h: int,
    out_w: int,
    multiple: int = 1,
    weighted: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Average-pool a token grid to ``out_h × out_w``.

    Args:
        x: ``(h, w, c)`` hidden states.
        size: ``(h, w)`` float, original patches per token.
        pos: ``(h, w, 2)`` float, continuous ``(row, col)`` positions.
        owner: ``(n_orig,)`` long, current raster index of every original patch.
        out_h: Target number of rows, ``1 <= out_h <= h``, divisible by ``multiple``.
        out_w: Target number of columns, ``1 <= out_w <= w``, divisible by ``multiple``.
        multiple: The projector's grid unit the target sides must be divisible by.
        weighted: Average ``x`` weighted by ``size`` instead of the plain (unweighted) mean of the bin.

    Returns:
        ``(x, size, pos, owner)`` of the pooled grid: ``x`` is the mean over each bin (see the module
        docstring for the bins), sizes are summed, positions are size-weighted means, and each original
        patch is owned by the output token whose bin contains its previous owner.

    Raises:
        ValueError: On inconsistent shapes or an invalid target.
    """
    if x.ndim != 3:
        raise ValueError(f"x must be (h, w, c), got shape {tuple(x.shape)}")
    h, w, c = x.shape
    if size.shape != (h, w) or pos.shape != (h, w, 2):
        raise ValueError(
            f"size must be (h, w) and pos (h, w, 2) with (h, w) = {(h, w)}, "
            f"got {tuple(size.shape)} and {tuple(pos.shape)}"
        )
    if owner.ndim != 1 or owner.dtype != torch.long:
        raise ValueError(f"owner must be a 1-D LongTensor, got {owner.dtype} of shape {tuple(owner.shape)}")
    if multiple <= 0:
        raise ValueError(f"multiple must be positive, got {multiple}")
    for name, out, cur in (("out_h", out_h, h), ("out_w", out_w, w)):
        if not 1 <= out <= cur:
            raise ValueError(f"{name} must be in [1, {cur}] (the current side), got {out}")
        if out % multiple:
            raise ValueError(
                f"{name}={out} must be divisible by multiple={multiple}; "
                f"use {max(multiple, out // multiple * multiple)} or multiple=1"
            )
    if (out_h, out_w) == (h, w):
        return x, size, pos, owner

    device = x.device
    cell = (bin_index(h, out_h, device)[:, None] * out_w + bin_index(w, out_w, device)[None, :]).flatten()
    n_out = out_h * out_w
    acc_dtype = torch.promote_types(x.dtype, torch.float32)
    weight = size.reshape(-1).to(acc_dtype)

    def pool_sum(values: Tensor) -> Tensor:
        return values.new_zeros(n_out, *values.shape[1:]).index_add_(0, cell, values)

    new_size = pool_sum(weight)
    new_pos = pool_sum(pos.reshape(-1, 2).to(acc_dtype) * weight[:, None]) / new_size[:, None]
    flat_x = x.reshape(-1, c).to(acc_dtype)
    if weighted:
        new_x = pool_sum(flat_x * weight[:, None]) / new_size[:, None]
    else:
        new_x = pool_sum(flat_x) / pool_sum(torch.ones_like(weight))[:, None]
    return (
        new_x.view(out_h, out_w, c).to(x.dtype),
        new_size.view(out_h, out_w).to(size.dtype),
        new_pos.view(out_h, out_w, 2).to(pos.dtype),
        cell[owner],
    )


@dataclass
class Downsample(VisualStrategy):
    """Plain 2-D average pooling of every frame's grid, the baseline recent benchmarks found hard to beat.

    Args:
        factor: Each side is divided by this (rounded down to the grid unit, at least one unit).
        weighted: Size-weighted averages (after earlier merges) instead of plain means.
    """

    name: ClassVar[str] = "downsample"
    factor: float = 2.0
    weighted: bool = True

    def check(self) -> None:
        """``factor >= 1``."""
        if not self.factor >= 1.0:
            raise ScheduleError(f"downsample: factor must be >= 1 (1 keeps the grid), got {self.factor}")

    def default_layers(self, num_layers: int) -> list[int]:
        """The last block's input."""
        return [num_layers - 1]

    def validate(self, stage: Any, adapter: Any) -> None:
        """Nothing beyond the base checks: the target side is rounded to the unit."""
        super().validate(stage, adapter)

    def target(self, side: int, multiple: int) -> int:
        """The pooled length of a side: ``side / factor`` rounded down to the unit, at least one unit."""
        return max(multiple, int(side / self.factor) // multiple * multiple) if side >= multiple else side

    def output_shape(self, shape: ItemShape, step: ShapeStep) -> ItemShape | None:
        """Each side becomes `target`: the size follows from the grid alone."""
        if not shape.is_grid:
            raise ScheduleError("downsample needs grids; an earlier stage broke the 2-D layout")
        return ItemShape(shape.t, self.target(shape.h, step.multiple), self.target(shape.w, step.multiple))

    def reduce(self, tokens: VisualTokens) -> VisualTokens:
        """Pool each frame to ``side / factor``."""
        mult = tokens.multiple
        items = []
        for it in tokens.items:
            frames = []
            for fr in it.frames:
                if not fr.is_grid:
                    raise RuntimeStateError("downsample needs grids; an earlier stage broke the 2-D layout")
                h, w = fr.shape
                oh, ow = self.target(h, mult), self.target(w, mult)
                x, size, pos, owner = downsample_grid(fr.x, fr.size, fr.pos, fr.owner, oh, ow, mult,
                                                      weighted=self.weighted)
                frames.append(FrameGrid(x, size, pos, owner))
            items.append(VisualItemTokens(it.kind, frames, it.original))
        return VisualTokens(items, tokens.site, tokens.layer, tokens.num_layers, tokens.stage_layers,
                            tokens.multiple)
