"""Adapter for Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``).

Where things are in these models (transformers 5.x):

* LLM decoder layers: ``model.model.language_model.layers[i]``; one ``(cos, sin)`` pair computed from the
  3-D M-RoPE position ids (t, h, w) before the layers, shape ``(B, L, head_dim)``, handed to every layer.
* Visual tokens in the prompt: ``<|image_pad|>`` (``config.image_token_id``) and ``<|video_pad|>``
  (``config.video_token_id``) runs, one run per image (``t*h*w / merge**2`` tokens) and per video.
* Each item's grid: ``image_grid_thw`` / ``video_grid_thw`` rows ``(t, h, w)`` in 14-px patches, in the
  order the items appear in the batch; the LLM sees ``(t, h/merge, w/merge)`` tokens in raster order.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from tokcomp.contracts import Adapter, SampleLayout, VisualItem
from tokcomp.errors import RuntimeStateError

__all__ = ["Qwen2VLAdapter"]


class Qwen2VLAdapter(Adapter):
    """Qwen2-VL / Qwen2.5-VL: the visual token grids and the LLM's decoder layers."""

    name: ClassVar[str] = "qwen2_vl"
    model_classes: ClassVar[tuple[str, ...]] = (
        "Qwen2VLForConditionalGeneration",
        "Qwen2_5_VLForConditionalGeneration",
    )
    grid_multiple: ClassVar[int] = 2  # the 2x2 patch merger needs even grid sides

    @property
    def language_model(self) -> torch.nn.Module:
        """``model.model.language_model`` (``Qwen2VLTextModel`` / ``Qwen2_5_VLTextModel``)."""
        return self.model.model.language_model

    @property
    def merge_size(self) -> int:
        """Side of the patch merger's window (2: four ViT patches become one LLM token)."""
        return int(self.model.config.vision_config.spatial_merge_size)

    def layouts(self, call: dict[str, Any]) -> list[SampleLayout]:
        """Visual token runs of each sample with their grids.

        Grids come from ``image_grid_thw``/``video_grid_thw`` when the call has them (in batch order). Inside
        ``generate()`` the vision features are computed before the first forward call and the grids are not
        passed on; there each run's grid is read off the M-RoPE ``position_ids`` generate passes (rows t, h,
        w of a run span the item's grid).
        """
        ids: torch.Tensor = call["input_ids"]
        cfg = self.model.config
        m = self.merge_size
        grids = {"image": _rows(call.get("image_grid_thw")), "video": _rows(call.get("video_grid_thw"))}
        from_kwargs = bool(grids["image"] or grids["video"])
        pos = call.get("position_ids")
        used = {"image": 0, "video": 0}
        out = []
        for b in range(ids.shape[0]):
            row = ids[b]
            kind_of = torch.zeros_like(row)
            kind_of[row == cfg.image_token_id] = 1
            kind_of[row == cfg.video_token_id] = 2
            positions = (kind_of > 0).nonzero().squeeze(1)
            items: list[VisualItem] = []
            for run in _runs(positions, kind_of):
                kind = "image" if int(kind_of[run[0]]) == 1 else "video"
                offset = 0
                while offset < run.numel():
                    if from_kwargs:
                        if used[kind] >= len(grids[kind]):
                            raise RuntimeStateError(
                                f"sample {b} has more {kind} placeholder tokens than {kind}_grid_thw describes"
                            )
                        t, h, w = grids[kind][used[kind]]
                        used[kind] += 1
                        grid = (t, h // m, w // m)
                    elif isinstance(pos, torch.Tensor) and pos.dim() == 3 and pos.shape[0] in (3, 4):
                        rc = pos[-3:, b if pos.shape[1] > 1 else 0, run]
                        h = int(rc[1].max() - rc[1].min()) + 1
                        w = int(rc[2].max() - rc[2].min()) + 1
                        grid = (run.numel() // (h * w), h, w)
                    else:
                        raise RuntimeStateError(
                            "cannot tell the visual grids: pass image_grid_thw/video_grid_thw (or the M-RoPE "
                            "position_ids) with input_ids"
                        )
                    count = grid[0] * grid[1] * grid[2]
                    items.append(VisualItem(kind, grid, sum(i.count for i in items), count))
                    offset += count
                if offset != run.numel():
                    raise RuntimeStateError(
                        f"sample {b}: a {kind} run of {run.numel()} tokens does not match its grids ({offset})"
                    )
            out.append(SampleLayout.from_items(positions, items))
        return out


def _runs(positions: torch.Tensor, kind_of: torch.Tensor) -> list[torch.Tensor]:
    """Split ascending positions into runs of consecutive indices of one kind."""
    if positions.numel() == 0:
        return []
    kinds = kind_of[positions]
    breaks = ((positions[1:] != positions[:-1] + 1) | (kinds[1:] != kinds[:-1])).nonzero().squeeze(1) + 1
    return list(torch.tensor_split(positions, breaks.tolist()))


def _rows(grid: torch.Tensor | None) -> list[tuple[int, int, int]]:
    if grid is None:
        return []
    return [tuple(int(v) for v in r) for r in grid.tolist()]  # type: ignore[misc]
