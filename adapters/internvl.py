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

Encoder and projector sites (`tokcomp.encoder.RowTower`, ``canvas="corner"``, unit 2):

* **Encoder.** Stages run at the input of ``vision_tower.encoder.layer[i]`` on one ``(1, S/p, S/p)`` patch
  grid per tile, CLS kept aside (never merged, size 1). Merges must keep both sides even (``grid_multiple``
  2), so ToMe is refused here by the validator; every tile of a call must keep the same number of tokens.
  Proportional attention reaches the attention function through a pre-hook on each block's ``attention``
  module (the block itself passes no keyword arguments on).
* **Back to the square grid.** ``get_image_features`` reshapes each tile to a *square* grid and pixel-shuffles
  it. At the tower's output the features (``last_hidden_state``, or the selected ``hidden_states`` entry)
  are spread back: the merged ``h' x w'`` grid goes to the top-left corner of the original ``S/p x S/p``
  canvas, zeros elsewhere. Pixel shuffle is local (output unit ``(i, j)`` reads patches ``2i..2i+1`` x
  ``2j..2j+1``), so the ``h'/2 x w'/2`` top-left units are exactly the merged grid's units and read no zero.
  The features are the tower's last output (``vision_feature_layer`` -1) or the input of block
  ``L + vision_feature_layer + 1``; encoder stages at a later block are refused when the ``with`` block is
  entered.
* **Projector.** The top-left units of every tile (all of them without encoder stages) form its unit grid
  (sizes, positions and provenance carried from the patch grid); projector stages run on it (OIM and
  downsample keep a grid, ToMe gives a 1-D list), and the tile's real units are written to its first slots.
* **LLM input.** The first ``n'`` slots of every tile's 256-token run are kept (raster order of the new grid),
  the others removed before decoder layer 0; positions are renumbered contiguously and decoding continues
  from the compressed length, as for the unpatched model fed the compressed features with shorter runs.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from tokcomp.contracts import (
    Adapter,
    CountItem,
    ItemShape,
    LLMInput,
    SampleLayout,
    ShapeFn,
    TokenCount,
    VisualItem,
)
from tokcomp.encoder import (
    RowTower,
    VisionCallResult,
    VisionSession,
    feature_index,
    install_row_tower,
    layout_first_slots_input,
)
from tokcomp.errors import RuntimeStateError

__all__ = ["InternVLAdapter"]


class InternVLAdapter(Adapter):
    """InternVL: every tile (crop or thumbnail) is its own square token grid."""

    name: ClassVar[str] = "internvl"
    model_classes: ClassVar[tuple[str, ...]] = ("InternVLForConditionalGeneration",)
    grid_multiple: ClassVar[int] = 2  # pixel shuffle (0.5) merges 2x2 patches: grid sides must be even
    sites: ClassVar[frozenset[str]] = frozenset({"encoder", "projector", "llm"})
    encoder_attention_sites: ClassVar[frozenset[str]] = frozenset({"encoder", "projector"})

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

    # -- vision tower (encoder / projector sites) ---------------------------------------------------------
    @property
    def num_vision_blocks(self) -> int:
        """Blocks of InternViT (``vision_tower.encoder.layer``)."""
        return len(self.model.model.vision_tower.encoder.layer)

    @property
    def vision_attn_implementation(self) -> str:
        """The vision tower's attention backend."""
        return str(self.model.model.vision_tower.config._attn_implementation)

    @property
    def vision_has_cls(self) -> bool:
        """Whether the tower runs a CLS token in front of the patches."""
        return True

    def vision_attention_configs(self) -> list[Any]:
        """The InternViT attention config (one object shared by every block)."""
        blocks = self.model.model.vision_tower.encoder.layer
        cfgs = {id(b.attention.config): b.attention.config for b in blocks}
        return list(cfgs.values())

    def install_vision(self, session: VisionSession) -> list[Any]:
        """Row-tower hooks on InternViT, its blocks and the projector (module docstring)."""
        cfg = self.model.config
        tower = self.model.model.vision_tower
        blocks = list(tower.encoder.layer)
        vc = cfg.vision_config
        side, patch = _pair(vc.image_size), _pair(vc.patch_size)
        unit = round(1 / float(cfg.downsample_ratio))
        spec = RowTower(
            tower=tower,
            blocks=blocks,
            attention=[b.attention for b in blocks],
            queries=[b.attention.q_norm for b in blocks],  # as the attention uses them
            keys=[b.attention.k_norm for b in blocks],  # the keys as the attention uses them (after qk norm)
            num_heads=int(vc.num_attention_heads),
            grid=(side[0] // patch[0], side[1] // patch[1]),
            prefix=1,
            projector=self.model.model.multi_modal_projector,
            unit=unit,
            canvas="corner",
            feature_index=feature_index(self.model.config.vision_feature_layer, len(blocks)),
        )
        return install_row_tower(spec, session, f"the {self.name!r} adapter")

    def llm_input(self, call: dict[str, Any], lm_kwargs: dict[str, Any], results: list[VisionCallResult]) -> LLMInput:
        """Keep the first ``n'`` slots of every tile's run; renumber positions contiguously."""
        return layout_first_slots_input(self.layouts(call), call, lm_kwargs, results)

    def count_items(self, call: dict[str, Any]) -> list[list[CountItem]]:
        """One item per ``<IMG_CONTEXT>`` run (an image with its tiles, or a video's frames): grid
        ``(tiles, S/p, S/p)`` in patches."""
        ids: torch.Tensor = call["input_ids"]
        h, w = self.tile_grid
        unit = round(1 / float(self.model.config.downsample_ratio))
        out = []
        for b in range(ids.shape[0]):
            runs = _runs((ids[b] == self.model.config.image_token_id).nonzero().squeeze(1))
            out.append([CountItem("image", (run.numel() // (h * w), h * unit, w * unit)) for run in runs])
        return out

    def predict_tokens(self, item: CountItem, encoder: ShapeFn, projector: ShapeFn) -> TokenCount:
        """The encoder stages on every tile's patch grid, pixel shuffle (each side divided by its unit),
        then the projector stages on the tile's unit grid."""
        unit = round(1 / float(self.model.config.downsample_ratio))
        enc = encoder(ItemShape(*item.grid))
        n = projector(ItemShape(enc.t, enc.h // unit, enc.w // unit)).num_tokens
        return TokenCount(n, n)

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
