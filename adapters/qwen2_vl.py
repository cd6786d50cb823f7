"""Adapter for Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``).

Where things are in these models (transformers 5.x):

* LLM decoder layers: ``model.model.language_model.layers[i]``; one ``(cos, sin)`` pair computed from the
  3-D M-RoPE position ids (t, h, w) before the layers, shape ``(B, L, head_dim)``, handed to every layer.
* Visual tokens in the prompt: ``<|image_pad|>`` (``config.image_token_id``) and ``<|video_pad|>``
  (``config.video_token_id``) runs, one run per image (``t*h*w / merge**2`` tokens) and per video.
* Each item's grid: ``image_grid_thw`` / ``video_grid_thw`` rows ``(t, h, w)`` in 14-px patches, in the
  order the items appear in the batch; the LLM sees ``(t, h/merge, w/merge)`` tokens in raster order.

The machinery (layouts, the ViT hooks of the encoder/projector sites, the LLM input with M-RoPE recomputed
for the new grids) is shared with Qwen3-VL in the private helper ``tokcomp.adapters._qwen_vl``.
"""

from __future__ import annotations

from typing import ClassVar

from ._qwen_vl import QwenVLAdapterBase

__all__ = ["Qwen2VLAdapter"]


class Qwen2VLAdapter(QwenVLAdapterBase):
    """Qwen2-VL / Qwen2.5-VL: the visual token grids and the LLM's decoder layers."""

    name: ClassVar[str] = "qwen2_vl"
    model_classes: ClassVar[tuple[str, ...]] = (
        "Qwen2VLForConditionalGeneration",
        "Qwen2_5_VLForConditionalGeneration",
    )
