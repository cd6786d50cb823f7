"""Adapter for LLaVA-1.5 (``LlavaForConditionalGeneration``).

Where things are in this model (transformers 5.x):

* LLM decoder layers: ``model.model.language_model.layers[i]`` (a ``LlamaModel``, 1-D RoPE); one
  ``(cos, sin)`` pair of shape ``(B, L, head_dim)`` computed before the layers and handed to every layer,
  plus ``position_ids (B, L)``.
* Vision tower: ``model.model.vision_tower`` (``CLIPVisionModel``), blocks ``.encoder.layers[i]``; one
  ``(1 + S/p * S/p)``-token sequence per image (CLS first); features from ``vision_feature_layer`` (-2).
  Projector: ``model.model.multi_modal_projector`` (per token, Linear-GELU-Linear), so any grid side works
  (``grid_multiple = 1``).
* Visual tokens in the prompt: ``<image>`` (``config.image_token_id``) runs; each image is ``(S/p)**2``
  tokens (24 x 24 = 576 for 336 px / 14 px) in raster order, because the ``"default"`` feature strategy
  drops CLS. Images of one sample may be adjacent (one run), so runs are cut into per-image chunks.
* Each item's grid: ``(1, S/p, S/p)`` from ``config.vision_config`` (``image_size``, ``patch_size``). Inside
  ``generate()`` the prefill call carries ``mm_encoder_outputs["image"].pooler_output`` (one ``(n_i, D)``
  tensor per image) instead of ``pixel_values``; the per-image counts are then read from it.
* With ``vision_feature_select_strategy="full"`` the CLS token is fed to the LLM in front of each image's
  grid; it is left out of the layout (treated like text, never pruned).

Encoder and projector sites (`tokcomp.encoder.RowTower`, ``canvas="first"``):

* **Encoder.** Stages run at the input of ``vision_tower.encoder.layers[i]`` on one ``(1, h, w)`` grid per
  image; the CLS token is kept aside (never merged, size 1, always kept). Every image of a call is one row of
  the tower's batch, so every image must keep the same number of tokens (OIM and ToMe with a fixed ``r``
  do). ToMe may run here: the projector works per token, so a 1-D token list is fine (``grid_multiple``
  1). Proportional attention adds ``log size`` per key through the ``tokcomp_sdpa``/``tokcomp_eager``
  attention functions (CLIP's attention calls the attention interface with the kwargs of its layer).
* **Which tokens the LLM gets.** The features are ``hidden_states[vision_feature_layer]``, the *input* of
  block ``L + vision_feature_layer + 1`` (-2: the input of the last block). A stage scheduled at that block
  acts on that input, so its result is what the LLM reads (with -2, a stage at the last block counts); a
  stage at a later block would change nothing the LLM sees and is refused when the ``with`` block is
  entered. At the tower's output the selected hidden state (and ``last_hidden_state``) is spread back to
  ``(n, 1 + h*w, C)``: CLS, the tokens in raster order (a 1-D list in the strategy's order), zeros after.
* **Projector.** Projector stages run on each image's projected tokens (the grid, or the 1-D list an
  encoder-side ToMe left); the real tokens are written to the first slots of the image's features.
* **LLM input.** The first ``n'`` slots of every image's placeholder run are kept, the others removed
  before decoder layer 0, and positions are renumbered contiguously as if the prompt had ``n'`` placeholders
  per image: text after an image moves back, and decoding continues from the compressed length
  (``decode_shift``). This is the unpatched model fed the compressed features with shorter placeholder runs.
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

__all__ = ["LlavaAdapter"]


class LlavaAdapter(Adapter):
    """LLaVA-1.5: one square patch grid per image, a Llama (or other standard) decoder."""

    name: ClassVar[str] = "llava"
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaForConditionalGeneration",)
    grid_multiple: ClassVar[int] = 1  # the projector works per token
    sites: ClassVar[frozenset[str]] = frozenset({"encoder", "projector", "llm"})
    encoder_attention_sites: ClassVar[frozenset[str]] = frozenset({"encoder", "projector"})

    @classmethod
    def supports(cls, model: torch.nn.Module) -> bool:
        """``LlavaForConditionalGeneration`` with a fixed-resolution tower (CLIP, SigLIP, ...).

        Pixtral towers (variable resolution, ``[IMG_BREAK]`` tokens between rows) lay images out differently
        and are not supported.
        """
        vision = getattr(getattr(model, "config", None), "vision_config", None)
        return super().supports(model) and getattr(vision, "model_type", "") != "pixtral"

    @property
    def language_model(self) -> torch.nn.Module:
        """``model.model.language_model`` (``LlamaModel``)."""
        return self.model.model.language_model

    @property
    def patch_grid(self) -> tuple[int, int]:
        """``(rows, cols)`` of one image's patch grid: ``image_size // patch_size`` each way."""
        vc = self.model.config.vision_config
        side = _pair(vc.image_size)
        patch = _pair(vc.patch_size)
        return side[0] // patch[0], side[1] // patch[1]

    # -- vision tower (encoder / projector sites) ---------------------------------------------------------
    @property
    def _tower_blocks(self) -> Any:
        tower = self.model.model.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers

    @property
    def num_vision_blocks(self) -> int:
        """Blocks of the vision tower (``vision_tower.encoder.layers``)."""
        return len(self._tower_blocks)

    @property
    def vision_attn_implementation(self) -> str:
        """The vision tower's attention backend."""
        return str(self.model.model.vision_tower.config._attn_implementation)

    @property
    def vision_has_cls(self) -> bool:
        """Whether the tower runs a CLS token in front of the patches."""
        return self._tower_has_cls()

    def vision_attention_configs(self) -> list[Any]:
        """The tower's attention config (one object shared by every block)."""
        cfgs = {id(b.self_attn.config): b.self_attn.config for b in self._tower_blocks}
        return list(cfgs.values())

    def install_vision(self, session: VisionSession) -> list[Any]:
        """Row-tower hooks on the vision tower, its blocks and the projector (module docstring)."""
        tower = self.model.model.vision_tower
        blocks = list(self._tower_blocks)
        spec = RowTower(
            tower=tower,
            blocks=blocks,
            attention=[b.self_attn for b in blocks],
            queries=[b.self_attn.q_proj for b in blocks],
            keys=[b.self_attn.k_proj for b in blocks],
            num_heads=int(tower.config.num_attention_heads),
            grid=self.patch_grid,
            prefix=1 if self._tower_has_cls() else 0,
            projector=self.model.model.multi_modal_projector,
            feature_index=feature_index(self.model.config.vision_feature_layer, len(blocks)),
        )
        return install_row_tower(spec, session, f"the {self.name!r} adapter")

    def llm_input(self, call: dict[str, Any], lm_kwargs: dict[str, Any], results: list[VisionCallResult]) -> LLMInput:
        """Keep the first ``n'`` placeholder slots of every image; renumber positions contiguously."""
        return layout_first_slots_input(self.layouts(call), call, lm_kwargs, results)

    def count_items(self, call: dict[str, Any]) -> list[list[CountItem]]:
        """One ``(1, S/p, S/p)`` item per image of each sample."""
        return [[CountItem("image", it.grid) for it in lay.items] for lay in self.layouts(call)]

    def predict_tokens(self, item: CountItem, encoder: ShapeFn, projector: ShapeFn) -> TokenCount:
        """The encoder stages on the patch grid, then the projector stages (the projector works per token);
        with the ``"full"`` feature strategy the CLS token takes one more placeholder."""
        n = projector(encoder(ItemShape(*item.grid))).num_tokens
        cls = self.model.config.vision_feature_select_strategy == "full" and self._tower_has_cls()
        return TokenCount(n, n + int(cls))

    def _tower_has_cls(self) -> bool:
        return any(hasattr(m, "class_embedding") for m in self.model.model.vision_tower.modules())

    def layouts(self, call: dict[str, Any]) -> list[SampleLayout]:
        """One ``(1, h, w)`` item per image; a CLS token in front (``"full"`` strategy) is not visual."""
        ids: torch.Tensor = call["input_ids"]
        h, w = self.patch_grid
        grid_tokens = h * w
        # Tokens per image, in batch order: read off precomputed features when generate() passed them,
        # else every image has the same count (fixed-resolution tower).
        counts = self._counts_from_features(call)
        default = grid_tokens + (1 if self._keeps_cls(call) else 0)
        used = 0
        out = []
        for b in range(ids.shape[0]):
            positions: list[torch.Tensor] = []
            items: list[VisualItem] = []
            for run in _runs((ids[b] == self.model.config.image_token_id).nonzero().squeeze(1)):
                offset = 0
                while offset < run.numel():
                    if counts is not None and used >= len(counts):
                        raise RuntimeStateError(
                            f"sample {b} has more <image> placeholder tokens than the call has images"
                        )
                    n = default if counts is None else counts[used]
                    used += 1
                    cls = n - grid_tokens  # a leading CLS token is not part of the grid
                    if cls not in (0, 1) or offset + n > run.numel():
                        raise RuntimeStateError(
                            f"sample {b}: an image of {n} tokens does not fit a {h}x{w} patch grid "
                            f"(+ an optional CLS token) in a run of {run.numel()} <image> tokens"
                        )
                    items.append(VisualItem("image", (1, h, w), len(items) * grid_tokens, grid_tokens))
                    positions.append(run[offset + cls : offset + n])
                    offset += n
            pos = torch.cat(positions) if positions else ids.new_zeros(0)
            out.append(SampleLayout.from_items(pos, items))
        if counts is not None and used != len(counts):
            raise RuntimeStateError(f"the call has {len(counts)} images but {used} were found in input_ids")
        return out

    def _keeps_cls(self, call: dict[str, Any]) -> bool:
        """Whether the LLM receives the tower's CLS token: ``"full"`` strategy and a tower that has one."""
        strategy = (
            call.get("vision_feature_select_strategy") or self.model.config.vision_feature_select_strategy
        )
        if strategy != "full":
            return False
        return self._tower_has_cls()

    @staticmethod
    def _counts_from_features(call: dict[str, Any]) -> list[int] | None:
        """Tokens per image from ``mm_encoder_outputs`` (what ``generate()`` passes at prefill), else None."""
        enc = (call.get("mm_encoder_outputs") or {}).get("image")
        if enc is None:
            return None
        feats = enc.pooler_output
        if isinstance(feats, torch.Tensor) and feats.dim() == 3:
            return [int(feats.shape[1])] * int(feats.shape[0])
        if isinstance(feats, (list, tuple)):
            return [int(f.shape[0]) for f in feats]
        return None


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
