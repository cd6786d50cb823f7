"""Adapter for InternVL (the ``transformers``-native ``InternVLForConditionalGeneration``: InternVL2.5/3-hf).

Where things are in this model (transformers 5.x):

* LLM decoder layers: ``model.model.language_model.layers[i]`` (a ``Qwen2Model`` or another standard
  decoder, 1-D RoPE); one ``(cos, sin)`` pair of shape ``(B, L, head_dim)`` computed before the layers and
  handed to every layer, plus ``position_ids (B, L)``.
* Vision tower: ``model.model.vision_tower`` (``InternVLVisionModel``), blocks ``.encoder.layer[i]`` (note:
  ``layer``, not ``layers``); ``(1 + (S/p)**2)`` tokens per tile, CLS first. ``get_image_features`` drops
  CLS, reshapes each tile to its ``S/p x S/p`` grid and runs ``model.model.pixel_shuffle`` (scale
  ``config.downsample_ratio`` = 0.5: every 2x2 block of patches becomes one token), then
  ``model.model.multi_modal_projector``. Pixel shuffle needs even grid sides: ``grid_multiple = 2``.
* Visual tokens in the prompt: ``<IMG_CONTEXT>`` (``config.image_token_id``). The processor writes each
  image as ``<img>`` + ``<IMG_CONTEXT>`` x (tokens per tile x tiles) + ``</img>``; its tiles are the dynamic
  crops followed by a thumbnail, each a square grid of ``(S/p * 0.5)**2`` tokens (16 x 16 = 256 at 448 px)
  in raster order (checked: pixel shuffle keeps row-major order).
* Each item's grid: one item per tile, ``(1, S/p * r, S/p * r)`` from ``config.vision_config``
  (``image_size``, ``patch_size``) and ``config.downsample_ratio`` r. The crop layout of an image (how
  many tiles across) is not kept by the processor, so tiles are separate items. Video frames are written
  with the same ``<IMG_CONTEXT>`` token (one tile per frame) and therefore appear as tiles of kind
  ``"image"``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from tokcomp.contracts import Adapter, SampleLayout, VisualItem
from tokcomp.errors import RuntimeStateError

__all__ = ["InternVLAdapter"]


class InternVLAdapter(Adapter):
    """InternVL: every tile (crop or thumbnail) is its own square token grid."""

    name: ClassVar[str] = "internvl"
    model_classes: ClassVar[tuple[str, ...]] = ("InternVLForConditionalGeneration",)
    grid_multiple: ClassVar[int] = 2  # pixel shuffle (0.5) merges 2x2 patches: grid sides must be even

    @property
    def language_model(self) -> torch.nn.Module:
        """``model.model.language_model`` (``Qwen2Model`` for InternVL3)."""
        return self.model.model.language_model

    @property
    def tile_grid(self) -> tuple[int, int]:
        """``(rows, cols)`` of one tile's tokens as they enter the LLM (after pixel shuffle)."""
        cfg = self.model.config
        side = _pair(cfg.vision_config.image_size)
        patch = _pair(cfg.vision_config.patch_size)
        r = float(cfg.downsample_ratio)
        return int(side[0] // patch[0] * r), int(side[1] // patch[1] * r)

    def layouts(self, call: dict[str, Any]) -> list[SampleLayout]:
        """Cut every ``<IMG_CONTEXT>`` run into tiles of ``h * w`` tokens, one ``(1, h, w)`` item each."""
        ids: torch.Tensor = call["input_ids"]
        h, w = self.tile_grid
        per_tile = h * w
        out = []
        for b in range(ids.shape[0]):
            visual = ids[b] == self.model.config.image_token_id
            positions = visual.nonzero().squeeze(1)
            items: list[VisualItem] = []
            for run in _runs(positions):
                if run.numel() % per_tile:
                    raise RuntimeStateError(
                        f"sample {b}: a run of {run.numel()} <IMG_CONTEXT> tokens is not a whole number of "
                        f"{h}x{w} tiles; check that the processor's image_seq_length matches the model config"
                    )
                for _ in range(run.numel() // per_tile):
                    items.append(VisualItem("image", (1, h, w), len(items) * per_tile, per_tile))
            out.append(SampleLayout.from_items(positions, items))
        return out


def _pair(x: Any) -> tuple[int, int]:
    if isinstance(x, (list, tuple)):
        return int(x[0]), int(x[-1])
    return int(x), int(x)


def _runs(positions: torch.Tensor) -> list[torch.Tensor]:
    """Ascending sequence indices split into runs of consecutive positions."""
    if positions.numel() == 0:
        return []
    breaks = (positions[1:] != positions[:-1] + 1).nonzero().squeeze(1) + 1
    return list(torch.tensor_split(positions, breaks.tolist()))
