"""Adapter for LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``).

Where things are in this model (transformers 5.x):

* LLM decoder layers: ``model.model.language_model.layers[i]`` (a ``Qwen2Model``, 1-D RoPE); one
  ``(cos, sin)`` pair of shape ``(B, L, head_dim)`` computed before the layers and handed to every layer,
  plus ``position_ids (B, L)``.
* Vision tower: ``model.model.vision_tower`` (``SiglipVisionModel``), blocks ``.encoder.layers[i]``;
  ``(S/p)**2`` tokens per tile, no CLS (27 x 27 = 729 for 384 px / 14 px). Projector:
  ``model.model.multi_modal_projector`` (per token). Then ``model.model.pack_image_features`` builds the 2-D
  layout below and appends ``model.model.image_newline`` (one learned ``(D,)`` vector).
* Visual tokens in the prompt: one ``<image>`` (``config.image_token_id``) run per image and one
  ``<video>`` (``config.video_token_id``) run per video. Images of one sample are adjacent, so a run may
  hold several images; it is cut by each image's token count.

Token layout inside each run (``h0 = w0 = S/p``; ``NL`` = the ``image_newline`` token):

* **Single-image sample (AnyRes)**: the base tile ``h0 x w0`` in raster order, then the AnyRes grid: the
  tiles chosen from ``config.image_grid_pinpoints`` put side by side (``rows x cols`` patches), the padding
  the processor added cropped away (``unpad_image`` with ``image_sizes``), bilinearly shrunk if larger than
  ``anyres_max_9`` allows, and written row by row with one ``NL`` at the end of every row:
  ``rows x (cols + 1)`` tokens. Two items of kind ``"image"``: ``(1, h0, w0)`` and ``(1, rows, cols)``.
* **Image of a multi-image sample** (``batch_num_images > 1``): the base tile only, plus one ``NL``:
  ``h0 * w0 + 1`` tokens; one item ``(1, h0, w0)``.
* **Video**: every frame's ``h0 x w0`` grid pooled 2x2 (bilinear, to ``ceil(h0/2) x ceil(w0/2)``), all
  frames in order, plus one trailing ``NL``; one item of kind ``"video"``, grid ``(frames, h, w)``.

**Newline tokens are not visual positions.** They are left out of every layout, so the runtime treats them
like text tokens: no strategy ever sees or prunes them, and they stay in the sequence at every layer (also
after VTW withdraws every visual token). They carry the row structure of the AnyRes grid.

Where the grids come from. A direct ``model(**inputs)`` call carries ``image_sizes`` and
``batch_num_images``; the layout is computed from them with the model's own helpers
(``get_anyres_image_grid_shape``, ``unpad_image``). Inside ``generate()`` the prefill call carries neither,
only ``mm_encoder_outputs["image"].pooler_output``: one packed ``(n_i, D)`` feature tensor per image. There
the newline tokens are found in the features themselves (rows equal to ``model.model.image_newline``; they
are copies of it), which gives ``rows`` and ``cols`` of the AnyRes grid; videos are
``mm_encoder_outputs["video"].pooler_output`` of shape ``(videos, frames * h * w + 1, D)``.

**Sites: ``projector`` and ``llm``; not ``encoder``.** The AnyRes grid exists only inside
``pack_image_features``, which needs every tile at its full ``h0 x w0`` size, stitches the tiles, crops the
padding away and may interpolate; a merge inside one SigLIP tile cannot be carried through that without
reimplementing the packing for merged tiles, and spreading merged tokens back with zeros would let the
crop and the interpolation mix them with the zeros. So the validator refuses ``encoder`` stages (its message
names the sites this adapter supports).

The **projector** site runs on the packed features as they enter the LLM: in `llm_input`, which the runtime
calls at the language model's input, every item of the layout above (base tile, AnyRes grid, the base tile
of a multi-image sample, a video's frames) becomes one `tokcomp.tokens.VisualItemTokens` read off
``inputs_embeds``; newline tokens are not part of any item. The projector stages run on them, and the
compressed features are written back into ``inputs_embeds`` following the packing rule of the model:

* AnyRes grid, new grid ``h' x w'``: the first ``w'`` slots of each of the first ``h'`` rows, each row still
  followed by its newline; the other slots and the newlines of the dropped rows are removed. The prompt
  then reads as the packing of an ``h' x w'`` grid. A 1-D result (ToMe) of ``n'`` tokens is one row: the first
  ``n'`` visual slots, then one newline (the last row's).
* Base tile, multi-image tile, video: the first ``n'`` visual slots (raster order, frame after frame),
  followed by the item's trailing newline when it has one.

The removed slots leave the sequence before decoder layer 0 and positions are renumbered contiguously
(decoding continues from the compressed length), as for the unpatched model fed the compressed packed
features with shorter ``<image>``/``<video>`` runs; features passed in as ``mm_encoder_outputs`` are
compressed the same way. The report's items are the layout's items (newlines not counted).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers.models.llava_onevision.modeling_llava_onevision import (
    get_anyres_image_grid_shape,
    unpad_image,
)

from tokcomp.contracts import Adapter, LLMInput, SampleLayout, VisualItem
from tokcomp.encoder import VisionCallResult, VisionSession, compact_positions
from tokcomp.errors import RuntimeStateError
from tokcomp.tokens import FrameGrid, VisualItemTokens

__all__ = ["LlavaOnevisionAdapter"]


@dataclass(frozen=True)
class _Part:
    """One grid of an image or video as it sits in the placeholder run.

    ``row_newline``: one ``NL`` token after every row; ``tail_newline``: one ``NL`` after the whole grid.
    """

    kind: str
    grid: tuple[int, int, int]
    row_newline: bool = False
    tail_newline: bool = False

    @property
    def num_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * (w + self.row_newline) + self.tail_newline

    def visual_offsets(self) -> torch.Tensor:
        """Offsets (within the part's tokens) of the grid tokens, in raster order."""
        t, h, w = self.grid
        stride = w + self.row_newline
        rows = torch.arange(t * h).unsqueeze(1) * stride
        return (rows + torch.arange(w)).flatten()


class LlavaOnevisionAdapter(Adapter):
    """LLaVA-OneVision: base tile + AnyRes grid per image (newline tokens kept as text), pooled videos."""

    name: ClassVar[str] = "llava_onevision"
    model_classes: ClassVar[tuple[str, ...]] = ("LlavaOnevisionForConditionalGeneration",)
    # The projector works per token. (An encoder-side merge must still hand pack_image_features whole
    # h0 x w0 tiles.)
    grid_multiple: ClassVar[int] = 1
    # encoder: not supported (module docstring); projector: on the packed LLM input
    sites: ClassVar[frozenset[str]] = frozenset({"projector", "llm"})

    @property
    def language_model(self) -> torch.nn.Module:
        """``model.model.language_model`` (``Qwen2Model``)."""
        return self.model.model.language_model

    @property
    def tile_grid(self) -> tuple[int, int]:
        """``(h0, w0)``: one tile's patch grid, ``image_size // patch_size``."""
        vc = self.model.config.vision_config
        side = int(vc.image_size) // int(vc.patch_size)
        return side, side

    # -- projector site (on the packed LLM input) ----------------------------------------------------------
    @property
    def num_vision_blocks(self) -> int:
        """Blocks of the SigLIP tower (``vision_tower.encoder.layers``)."""
        return len(self.model.model.vision_tower.encoder.layers)

    @property
    def vision_attn_implementation(self) -> str:
        """The vision tower's attention backend."""
        return str(self.model.model.vision_tower.config._attn_implementation)

    def vision_attention_configs(self) -> list[Any]:
        """None: no tower block runs after a projector-site stage, so no attention bias is ever needed."""
        return []

    def install_vision(self, session: VisionSession) -> list[Any]:
        """Mark every prefill call of the model, so that the runtime consults `llm_input` (where the stages
        run) whether the features come from the tower or were passed in as ``mm_encoder_outputs``."""
        self._session = session

        def mark(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            cache = kwargs.get("past_key_values")
            if cache is None or cache.get_seq_length() == 0:
                session.finish_call(VisionCallResult([], [], [], []))

        return [self.model.register_forward_pre_hook(mark, with_kwargs=True)]

    def llm_input(self, call: dict[str, Any], lm_kwargs: dict[str, Any], results: list[VisionCallResult]) -> LLMInput:
        """Run the projector stages on the packed features in ``inputs_embeds`` and compact the runs."""
        session: VisionSession | None = getattr(self, "_session", None)
        if session is None:
            raise RuntimeStateError("llm_input runs after install_vision (inside a tokcomp.compress block)")
        embeds = lm_kwargs.get("inputs_embeds")
        if not isinstance(embeds, torch.Tensor):
            raise RuntimeStateError("expected inputs_embeds at the language model's input")
        ids: torch.Tensor = call["input_ids"]
        mask = call.get("attention_mask")
        valid = mask.bool() if isinstance(mask, torch.Tensor) else torch.ones_like(ids, dtype=torch.bool)
        placed = self._placed(call)
        where, items = [], []
        for b, parts in enumerate(placed):
            for part, slots in parts:
                vis = slots[part.visual_offsets().to(slots.device)]
                t, h, w = part.grid
                x = embeds[b, vis].reshape(t, h, w, -1)
                items.append(VisualItemTokens(part.kind, [FrameGrid.fresh(x[f]) for f in range(t)], part.grid))
                where.append((b, part, slots, vis))
        items = session.run("projector", self.num_vision_blocks, items)
        record = VisionCallResult([], [], [], [])
        session.attach_events(record)
        keep = valid.clone()
        new_embeds = embeds.clone()
        layouts: list[list[tuple[VisualItem, torch.Tensor]]] = [[] for _ in placed]
        for (b, part, slots, vis), it in zip(where, items):
            kept_vis, kept_nl = _kept_slots(part, slots, vis, it)
            x = torch.cat([fr.x.reshape(-1, embeds.shape[-1]) for fr in it.frames]).to(embeds.dtype)
            keep[b, slots] = False
            keep[b, kept_vis] = True
            keep[b, kept_nl] = True
            new_embeds[b, kept_vis] = x
            n = int(x.shape[0])
            grid = it.grid if it.frames[0].is_grid else None
            start = sum(i.count for i, _ in layouts[b])
            layouts[b].append((VisualItem(part.kind, grid or (1, 1, n), start, n), kept_vis))
            record.original_units.append(part.grid[0] * part.grid[1] * part.grid[2])
            record.units.append(n)
            record.grids.append(grid)
            record.anchors.append(None)
            record.features.append(x)
            record.provenance.append([fr.owner for fr in it.frames])
        _fill(results, record)
        out = [
            SampleLayout.from_items(
                torch.cat([p for _, p in lay]) if lay else ids.new_zeros(0), [i for i, _ in lay]
            )
            for lay in layouts
        ]
        if bool(keep[valid].all()):
            return LLMInput(out, keep)
        lm_kwargs["inputs_embeds"] = new_embeds
        positions, shift = compact_positions(lm_kwargs.get("position_ids"), keep, valid)
        return LLMInput(out, keep, positions, shift)

    # -- layout ------------------------------------------------------------------------------------------
    def layouts(self, call: dict[str, Any]) -> list[SampleLayout]:
        """Each sample's image and video grids, newline tokens left out (see the module docstring)."""
        out = []
        for placed in self._placed(call):
            positions: list[torch.Tensor] = []
            items: list[VisualItem] = []
            n_visual = 0
            for part, slots in placed:
                count = part.grid[0] * part.grid[1] * part.grid[2]
                positions.append(slots[part.visual_offsets().to(slots.device)])
                items.append(VisualItem(part.kind, part.grid, n_visual, count))
                n_visual += count
            pos = torch.cat(positions) if positions else call["input_ids"].new_zeros(0)
            out.append(SampleLayout.from_items(pos, items))
        return out

    def _placed(self, call: dict[str, Any]) -> list[list[tuple[_Part, torch.Tensor]]]:
        """Per sample, its parts in sequence order, each with the sequence indices of all its tokens."""
        ids: torch.Tensor = call["input_ids"]
        cfg = self.model.config
        queues = {"image": self._image_parts(call), "video": self._video_parts(call)}
        token_of = {"image": cfg.image_token_id, "video": cfg.video_token_id}
        used = {"image": 0, "video": 0}
        out = []
        for b in range(ids.shape[0]):
            runs = [
                (int(run[0]), kind, run)
                for kind in ("image", "video")
                for run in _runs((ids[b] == token_of[kind]).nonzero().squeeze(1))
            ]
            placed: list[tuple[_Part, torch.Tensor]] = []
            for _, kind, run in sorted(runs, key=lambda r: r[0]):
                offset = 0
                while offset < run.numel():
                    if used[kind] >= len(queues[kind]):
                        raise RuntimeStateError(
                            f"sample {b} has more <{kind}> placeholder tokens than the call has {kind}s"
                        )
                    parts = queues[kind][used[kind]]
                    used[kind] += 1
                    for part in parts:
                        if offset + part.num_tokens > run.numel():
                            raise RuntimeStateError(
                                f"sample {b}: a <{kind}> run of {run.numel()} tokens is shorter than its "
                                f"{kind}s' packed features; image_sizes/batch_num_images do not match "
                                "input_ids"
                            )
                        placed.append((part, run[offset:offset + part.num_tokens]))
                        offset += part.num_tokens
            out.append(placed)
        for kind in ("image", "video"):
            if used[kind] != len(queues[kind]):
                raise RuntimeStateError(
                    f"the call has {len(queues[kind])} {kind}s but input_ids place {used[kind]}"
                )
        return out

    # -- images ------------------------------------------------------------------------------------------
    def _image_parts(self, call: dict[str, Any]) -> list[list[_Part]]:
        """Per image (batch order), its parts: from ``image_sizes`` if given, else from packed features."""
        sizes = call.get("image_sizes")
        if call.get("pixel_values") is not None and sizes is not None:
            return self._image_parts_from_sizes(call, sizes)
        enc = (call.get("mm_encoder_outputs") or {}).get("image")
        if enc is not None:
            return [self._image_parts_from_features(f) for f in enc.pooler_output]
        return []

    def _image_parts_from_sizes(self, call: dict[str, Any], sizes: torch.Tensor) -> list[list[_Part]]:
        """The model's own arithmetic (``pack_image_features``), on shapes only."""
        cfg = self.model.config
        h0, w0 = self.tile_grid
        counts = call.get("batch_num_images")
        if counts is None:  # the model then treats every image as a single-image (AnyRes) sample
            anyres = [True] * len(sizes)
        else:
            anyres = [int(n) == 1 for n in counts for _ in range(int(n))]
        aspect = call.get("vision_aspect_ratio") or cfg.vision_aspect_ratio
        max_tiles = int(str(aspect).removeprefix("anyres_max_"))
        base = _Part("image", (1, h0, w0))
        out = []
        for size, patch in zip(sizes, anyres):
            if not patch:
                out.append([_Part("image", (1, h0, w0), tail_newline=True)])
                continue
            rows, cols = get_anyres_image_grid_shape(
                size, cfg.image_grid_pinpoints, cfg.vision_config.image_size
            )
            _, h, w = unpad_image(torch.empty(0, rows * h0, cols * w0), size).shape
            ratio = math.sqrt(h * w / (max_tiles * h0**2))
            if ratio > 1.1:
                h, w = int(h // ratio), int(w // ratio)
            out.append([base, _Part("image", (1, h, w), row_newline=True)])
        return out

    def _image_parts_from_features(self, feats: torch.Tensor) -> list[_Part]:
        """Read the layout off one image's packed features: newline rows are copies of ``image_newline``."""
        h0, w0 = self.tile_grid
        n_base = h0 * w0
        newline = self.model.model.image_newline.to(feats.device, feats.dtype)
        is_nl = (feats[n_base:] == newline).all(-1).nonzero().squeeze(1)
        rest = feats.shape[0] - n_base
        if rest == 1 and is_nl.tolist() == [0]:
            return [_Part("image", (1, h0, w0), tail_newline=True)]
        if is_nl.numel() >= 1:
            w = int(is_nl[0])
            h = is_nl.numel()
            if (
                w > 0
                and h * (w + 1) == rest
                and torch.equal(is_nl, torch.arange(h, device=is_nl.device) * (w + 1) + w)
            ):
                return [_Part("image", (1, h0, w0)), _Part("image", (1, h, w), row_newline=True)]
        raise RuntimeStateError(
            f"cannot read the AnyRes layout of an image with {feats.shape[0]} packed features: expected a "
            f"{h0}x{w0} base tile, then rows ending in image_newline. Pass image_sizes and pixel_values "
            "instead of precomputed features."
        )

    # -- videos ------------------------------------------------------------------------------------------
    def _video_parts(self, call: dict[str, Any]) -> list[list[_Part]]:
        """Per video: frames pooled to ``ceil(h0/2) x ceil(w0/2)``, then one newline."""
        h0, w0 = self.tile_grid
        h, w = math.ceil(h0 / 2), math.ceil(w0 / 2)
        pixels = call.get("pixel_values_videos")
        enc = (call.get("mm_encoder_outputs") or {}).get("video")
        if pixels is not None:
            num, frames = int(pixels.shape[0]), int(pixels.shape[1])
        elif enc is not None:
            feats = enc.pooler_output
            num, frames = int(feats.shape[0]), (int(feats.shape[1]) - 1) // (h * w)
        else:
            return []
        return [[_Part("video", (frames, h, w), tail_newline=True)] for _ in range(num)]


def _kept_slots(
    part: _Part, slots: torch.Tensor, vis: torch.Tensor, item: VisualItemTokens
) -> tuple[torch.Tensor, torch.Tensor]:
    """The visual slots the compressed ``item`` fills and the newline slots that stay (module docstring)."""
    n = item.num_tokens
    fr = item.frames[0]
    if part.row_newline:
        _, h, w = part.grid
        newlines = slots[torch.arange(h, device=slots.device) * (w + 1) + w]
        if fr.is_grid:
            h2, w2 = fr.shape
            return vis.view(h, w)[:h2, :w2].reshape(-1), newlines[:h2]
        return vis[:n], newlines[-1:]
    return vis[:n], slots[-1:] if part.tail_newline else slots[:0]


def _fill(results: list[VisionCallResult], record: VisionCallResult) -> None:
    """Put the record of every item on the first result the prefill consumed (the others then hold none)."""
    for k, res in enumerate(results):
        src = record if k == 0 else VisionCallResult([], [], [], [])
        for name in ("original_units", "units", "grids", "anchors", "features", "provenance", "events"):
            setattr(res, name, getattr(src, name))


def _runs(positions: torch.Tensor) -> list[torch.Tensor]:
    """Ascending sequence indices split into runs of consecutive positions."""
    if positions.numel() == 0:
        return []
    breaks = (positions[1:] != positions[:-1] + 1).nonzero().squeeze(1) + 1
    return list(torch.tensor_split(positions, breaks.tolist()))
