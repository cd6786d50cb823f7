"""`VisualTokens`: what encoder- and projector-site strategies see and return.

One image is one item with one frame; a video is one item with ``t`` frames (Qwen2-VL: temporal patch
groups). A frame is a rectangular grid of tokens with their sizes, continuous positions and provenance.
Strategies that keep the grid return frames that are still rectangular (all frames of an item with the same
shape); strategies that do not (ToMe) return frames of shape ``(1, n)`` and set ``is_grid=False``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

__all__ = ["FrameGrid", "VisualItemTokens", "VisualTokens"]


@dataclass
class FrameGrid:
    """One frame's tokens as a grid.

    Attributes:
        x: ``(h, w, c)`` hidden states.
        size: ``(h, w)`` float, original patches each token stands for (starts at 1).
        pos: ``(h, w, 2)`` float, size-weighted mean ``(row, col)`` of the original patches, in the
            original grid's units.
        owner: ``(n_orig,)`` long, for every original patch (raster index) the raster index of the token
            that holds it now: provenance.
        metric: Optional ``(h, w, c_m)`` similarity features (the block's keys averaged over heads).
        is_grid: False once a strategy broke the 2-D layout (then ``h == 1``).
        attention: The encoder attention the stage asked for (`tokcomp.contracts.EncoderAttention` ->
            ``(H, h, w)`` float32, per head and per token of this frame), filled by the runtime.
        prefix_x: ``(P, c)`` hidden states of the leading non-patch tokens (a CLS token) the tower runs in
            front of this frame at this block, or None. Read-only: the runtime keeps those tokens aside and
            puts them back itself (VisionZip copies the CLS state into its output).
    """

    x: torch.Tensor
    size: torch.Tensor
    pos: torch.Tensor
    owner: torch.Tensor
    metric: torch.Tensor | None = None
    is_grid: bool = True
    attention: dict[Any, torch.Tensor] = field(default_factory=dict)
    prefix_x: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(h, w)``."""
        return int(self.x.shape[0]), int(self.x.shape[1])

    @property
    def num_tokens(self) -> int:
        """``h * w``."""
        return self.shape[0] * self.shape[1]

    def attention_of(self, need: Any) -> torch.Tensor:
        """The ``(H, h, w)`` encoder attention computed for ``need`` (a `tokcomp.contracts.EncoderAttention`).

        Raises:
            RuntimeError: The runtime did not compute it for this frame (the strategy's
                `tokcomp.contracts.VisualStrategy.attention_needs` did not list it), or a strategy earlier
                in the block changed the frame's tokens without carrying it.
        """
        a = self.attention.get(need)
        if a is None or tuple(a.shape[1:]) != self.shape:
            raise RuntimeError(
                f"no encoder attention {need} for this {self.shape[0]}x{self.shape[1]} frame: list it in "
                "attention_needs(), and keep it on frames you rebuild (FrameGrid.subset carries it)"
            )
        return a

    @classmethod
    def fresh(cls, x: torch.Tensor, metric: torch.Tensor | None = None) -> FrameGrid:
        """A frame that has not been reduced: sizes 1, integer positions, identity provenance."""
        h, w = x.shape[:2]
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        pos = torch.stack([rows, cols], -1).to(device=x.device, dtype=torch.float32)
        size = torch.ones(h, w, device=x.device, dtype=torch.float32)
        owner = torch.arange(h * w, device=x.device)
        return cls(x, size, pos, owner, metric)

    def with_values(self, **changes: object) -> FrameGrid:
        """A copy with some fields replaced."""
        return replace(self, **changes)

    def subset(self, keep: torch.Tensor) -> FrameGrid:
        """The frame reduced to the tokens ``keep``, as a 1-D frame ``(1, k)`` (``is_grid=False``).

        What pruning strategies return: the kept tokens keep their hidden states, sizes, positions and
        metric, in the order of ``keep``; original patches held by a removed token get owner ``-1`` (held by
        no token).

        Args:
            keep: ``(k,)`` unique raster indices of the tokens to keep (ascending keeps the original order).

        Returns:
            The reduced frame.
        """
        n = self.num_tokens
        keep = keep.to(device=self.x.device, dtype=torch.long)
        k = int(keep.numel())
        new_of_old = torch.full((n,), -1, dtype=torch.long, device=self.x.device)
        new_of_old[keep] = torch.arange(k, device=self.x.device)
        owner = torch.where(self.owner >= 0, new_of_old[self.owner.clamp(min=0)], self.owner)
        metric = None if self.metric is None else self.metric.reshape(n, -1)[keep].reshape(1, k, -1)
        attention = {key: a.reshape(a.shape[0], n)[:, keep].reshape(-1, 1, k) for key, a in self.attention.items()}
        return FrameGrid(
            self.x.reshape(n, -1)[keep].reshape(1, k, -1),
            self.size.reshape(n)[keep].reshape(1, k),
            self.pos.reshape(n, 2)[keep].reshape(1, k, 2),
            owner,
            metric,
            is_grid=False,
            attention=attention,
            prefix_x=self.prefix_x,
        )


@dataclass
class VisualItemTokens:
    """One image or video.

    Attributes:
        kind: ``"image"`` or ``"video"``.
        frames: Its frames (one for an image).
        original: ``(t, h, w)`` grid the item started with, in the site's units.
    """

    kind: str
    frames: list[FrameGrid]
    original: tuple[int, int, int]

    @property
    def grid(self) -> tuple[int, int, int]:
        """Current ``(t, h, w)``."""
        h, w = self.frames[0].shape
        return len(self.frames), h, w

    @property
    def num_tokens(self) -> int:
        """Tokens over all frames."""
        return sum(f.num_tokens for f in self.frames)


@dataclass
class VisualTokens:
    """All visual items of one vision-encoder call, handed to an encoder/projector-site strategy.

    Attributes:
        items: The images/videos.
        site: ``"encoder"`` or ``"projector"``.
        layer: Encoder block at whose input the strategy runs (the projector: number of blocks).
        num_layers: Encoder depth.
        stage_layers: The stage's sorted layers.
        multiple: Grid sides must stay divisible by this (the projector's unit).
        info: Numbers the strategy wants in the report.
        prefix: Leading non-patch tokens (a CLS token) the tower runs in front of every frame; the runtime
            holds them aside (they are never merged), so a strategy that matches as its reference does on
            ``[CLS] + patches`` (ToMe) knows they exist.
    """

    items: list[VisualItemTokens]
    site: str
    layer: int
    num_layers: int
    stage_layers: tuple[int, ...]
    multiple: int = 1
    info: dict[str, object] = field(default_factory=dict)
    prefix: int = 0

    @property
    def iteration(self) -> int:
        """Index of ``layer`` in the stage's layers (0 for the first)."""
        return self.stage_layers.index(self.layer) if self.layer in self.stage_layers else 0
