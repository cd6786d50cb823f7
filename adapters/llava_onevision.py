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

**Sites: ``encoder``, ``projector`` and ``llm``.**

The **encoder** site runs inside the SigLIP tower (`tokcomp.encoder.RowTower`, ``canvas="first"``): every
tile (the base image, each AnyRes tile, the one tile of a multi-image sample, each video frame) is one row of
the tower's batch and one ``h0 x w0`` grid; a stage at block ``i`` merges inside each tile, and every tile of a
call keeps the same number of tokens (OIM and downsample do). The tower's outputs are spread back to full
rows so the model's own code runs unchanged; its packing of those rows is then discarded, and the merged
tiles are packed by the model's rule applied to the merged grids (`pack_merged_anyres`, `pool_merged_frame`):

* AnyRes: the merged tiles (``h' x w'`` each) are stitched into a ``rows*h' x cols*w'`` grid; the padding
  is cropped by provenance: a stitched row (column) stays when some token in it covers a patch inside the
  unpadded region the model computes (``unpad_image``), so no image content is ever cropped. When the
  model would shrink the uncompressed grid to the ``anyres_max_N`` budget by a factor ``ratio``, the merged
  grid is shrunk (bilinear, like the model) by the same factor, so the encoder's reduction carries through
  to the LLM. Each row is followed by its newline: the newlines follow the new row count.
* Base tile and the tile of a multi-image sample: the merged grid, then (multi-image) one newline.
* Video: each merged frame pooled 2x2 (bilinear to ``ceil(h'/2) x ceil(w'/2)``, the model's
  ``apply_pooling`` on the merged grid), frames in order, one newline.

Stitching and pooling need a grid, so grid-breaking strategies (ToMe) are refused at this adapter's
encoder site by the validator (they run at ``projector``). ``image_sizes`` and the AnyRes tile layout are
only known inside ``get_image_features`` (``generate()`` passes them there and not to ``forward``), so for the
duration of the ``with`` block the model instance's ``pack_image_features`` is wrapped by an instance
attribute (the class is untouched; the attribute is deleted on exit): the wrapper calls the model's own
method, then builds the merged packing from the same arguments. The result equals the unpatched model when
the encoder stage merges nothing (tested), including the unpadding and the ``anyres_max`` interpolation.
Provenance of the packed items maps each cell of the model's (uncompressed) packed grid to the token that
holds it, through the nearest canvas patch where the model or tokcomp interpolates.

The **projector** site runs on the packed features as they enter the LLM: in `llm_input`, which the runtime
calls at the language model's input, every item of the layout above (base tile, AnyRes grid, the base tile
of a multi-image sample, a video's frames) becomes one `tokcomp.tokens.VisualItemTokens`, read off
``inputs_embeds`` (or, after encoder stages, the merged packing above); newline tokens are not part of any
item. The projector stages run on them, and the
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

import functools
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from transformers.models.llava_onevision.modeling_llava_onevision import (
    get_anyres_image_grid_shape,
    image_size_to_num_patches,
    unpad_image,
)

from tokcomp.compat import cache_of
from tokcomp.contracts import (
    Adapter,
    CountItem,
    ItemShape,
    LLMInput,
    PackedGrid,
    SampleLayout,
    ShapeFn,
    TokenCount,
    VisualItem,
)
from tokcomp.encoder import (
    RowTower,
    VisionCallResult,
    VisionSession,
    compact_positions,
    feature_index,
    install_row_tower,
    valid_slots,
)
from tokcomp.errors import RuntimeStateError, ScheduleError
from tokcomp.tokens import FrameGrid, VisualItemTokens

__all__ = ["LlavaOnevisionAdapter", "pack_merged_anyres", "pool_merged_frame"]


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
    grid_multiple: ClassVar[int] = 1  # the projector works per token
    encoder_grid_reason: ClassVar[str] = (
        "the merged tiles are stitched into the AnyRes grid and video frames are pooled 2x2"
    )
    # encoder: in the tiles, packed by the model's rule; projector: on the packed LLM input
    sites: ClassVar[frozenset[str]] = frozenset({"encoder", "projector", "llm"})
    encoder_attention_sites: ClassVar[frozenset[str]] = frozenset({"encoder"})

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
        """None: SigLIP's attention does not pass extra kwargs on, so proportional attention's bias goes in
        as the blocks' additive ``attention_mask`` (`tokcomp.encoder.RowTower.bias_in_mask`) and the
        attention implementation never changes."""
        return []

    def install_vision(self, session: VisionSession) -> list[Any]:
        """With encoder stages: the row-tower hooks and the ``pack_image_features`` wrapper (module
        docstring); the tower's results then mark each prefill, and a prefill that reuses the features
        computed once (``generate(use_cache=False)``) reuses them. Projector stages alone: mark every prefill
        call of the model, so that the runtime consults `llm_input` (where the projector stages run) whether
        the features come from the tower or were passed in as ``mm_encoder_outputs``."""
        self._session = session
        handles: list[Any] = []
        if session.encoder_stages:
            handles += self._install_encoder(session)

        if session.encoder_stages:
            # the tower's results mark the prefill; a prefill that reuses features computed once (generate()
            # with use_cache=False) reuses the tower's last results
            return handles

        def mark(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            cache = cache_of(kwargs)
            if cache is None or cache.get_seq_length() == 0:
                session.finish_call(VisionCallResult([], [], [], []))

        return [*handles, self.model.register_forward_pre_hook(mark, with_kwargs=True)]

    def _install_encoder(self, session: VisionSession) -> list[Any]:
        inner = self.model.model
        tower = inner.vision_tower
        blocks = list(tower.encoder.layers)
        spec = RowTower(
            tower=tower,
            blocks=blocks,
            attention=[b.self_attn for b in blocks],
            queries=[b.self_attn.q_proj for b in blocks],
            keys=[b.self_attn.k_proj for b in blocks],
            num_heads=int(tower.config.num_attention_heads),
            grid=self.tile_grid,
            prefix=0,  # SigLIP has no CLS token
            projector=inner.multi_modal_projector,
            feature_index=feature_index(self.model.config.vision_feature_layer, len(blocks)),
            projector_stages=False,  # they run on the packed LLM input (llm_input)
            bias_in_mask=True,
        )
        handles = install_row_tower(spec, session, f"the {self.name!r} adapter")
        own = inner.pack_image_features  # the class's method, bound to this instance
        adapter = self

        @functools.wraps(own)
        def pack_image_features(image_features: Any, image_sizes: Any, image_newline: Any = None,
                                vision_aspect_ratio: str = "anyres_max_9") -> Any:
            out = own(image_features, image_sizes, image_newline=image_newline,
                      vision_aspect_ratio=vision_aspect_ratio)
            if session.pending and not isinstance(session.pending[-1], _PackedImages):
                tiles = [int(f.shape[0]) for f in image_features]
                session.pending[-1] = adapter._pack_images(session.pending[-1], tiles, image_sizes,
                                                           vision_aspect_ratio)
            return out

        inner.pack_image_features = pack_image_features
        return [*handles, _InstanceAttribute(inner, "pack_image_features")]

    def _pack_images(self, tiles: VisionCallResult, counts: list[int], image_sizes: Any,
                     aspect: str) -> _PackedImages:
        """The tower call's merged tiles packed per image (module docstring)."""
        cfg = self.model.config
        h0, w0 = self.tile_grid
        max_tiles = int(str(aspect).removeprefix("anyres_max_"))
        rows = [_tile_frame(tiles, j, (h0, w0)) for j in range(len(tiles.units))]
        if sum(counts) != len(rows):
            raise RuntimeStateError(f"{len(rows)} tiles came out of the tower, but the images have {counts}")
        packed = _PackedImages([], [], [], [], encoder_tokens=tiles.encoder_tokens, events=tiles.events)
        start = 0
        for n, size in zip(counts, image_sizes):
            own = rows[start:start + n]
            start += n
            if n == 1:
                packed.images.append([VisualItemTokens("image", [_owned_frame(*own[0], (h0, w0))], (1, h0, w0))])
                continue
            grid = get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
            xs = torch.stack([x for x, _ in own[1:]])
            owners = torch.stack([o for _, o in own[1:]])
            x, owner, original = pack_merged_anyres(xs, owners, tuple(grid), (h0, w0), size, max_tiles)
            packed.images.append([
                VisualItemTokens("image", [_owned_frame(*own[0], (h0, w0))], (1, h0, w0)),
                VisualItemTokens("image", [_owned_frame(x, owner, original)], (1, *original)),
            ])
        return packed

    def _pool_videos(self, results: list[VisionCallResult], call: dict[str, Any]) -> list[VisualItemTokens]:
        """The video calls' merged frames, pooled 2x2 and grouped per video."""
        h0, w0 = self.tile_grid
        frames = [_tile_frame(r, j, (h0, w0)) for r in results for j in range(len(r.units))]
        out, k = [], 0
        for (part,) in self._video_parts(call):
            t = part.grid[0]
            if k + t > len(frames):
                raise RuntimeStateError(f"the tower ran {len(frames)} video frames, fewer than the videos have")
            pooled = [_owned_frame(*pool_merged_frame(x, o, (h0, w0))) for x, o in frames[k:k + t]]
            out.append(VisualItemTokens("video", pooled, part.grid))
            k += t
        if k != len(frames):
            raise RuntimeStateError(f"the tower ran {len(frames)} video frames, the videos have {k}")
        return out

    def llm_input(self, call: dict[str, Any], lm_kwargs: dict[str, Any], results: list[VisionCallResult]) -> LLMInput:
        """Run the projector stages on the packed items and compact the runs: the items are read off
        ``inputs_embeds``, or after encoder stages built from the merged tiles (`pack_merged_anyres`,
        `pool_merged_frame`); the result is written back into ``inputs_embeds``."""
        session: VisionSession | None = getattr(self, "_session", None)
        if session is None:
            raise RuntimeStateError("llm_input runs after install_vision (inside a tokcomp.compress block)")
        embeds = lm_kwargs.get("inputs_embeds")
        if not isinstance(embeds, torch.Tensor):
            raise RuntimeStateError("expected inputs_embeds at the language model's input")
        ids: torch.Tensor = call["input_ids"]
        valid = valid_slots(call)
        placed = self._placed(call)
        encoded = self._encoded_items(results, call) if session.encoder_stages else None
        where, items = [], []
        for b, parts in enumerate(placed):
            for part, slots in parts:
                vis = slots[part.visual_offsets().to(slots.device)]
                t, h, w = part.grid
                if encoded is not None:
                    item = next(encoded[part.kind], None)
                    if item is None or item.original != part.grid:
                        raise RuntimeStateError(
                            f"the merged {part.kind} features do not match the prompt's {part.kind} layout "
                            f"(expected a {part.grid} grid, got {None if item is None else item.original})"
                        )
                    items.append(item)
                else:
                    x = embeds[b, vis].reshape(t, h, w, -1)
                    items.append(VisualItemTokens(part.kind, [FrameGrid.fresh(x[f]) for f in range(t)], part.grid))
                where.append((b, part, slots, vis))
        encoder_events = [e for r in results for e in r.events] if encoded is not None else []
        items = session.run("projector", self.num_vision_blocks, items)
        record = VisionCallResult([], [], [], [])
        session.attach_events(record)
        record.events = encoder_events + record.events
        for r in results:  # per tower row (tile or frame), images' calls before videos': the attention groups
            for block, counts in r.encoder_tokens.items():
                record.encoder_tokens.setdefault(block, []).extend(counts)
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
        # Written back even when every slot stays: the values may have changed (after encoder stages the
        # model's own packing of the spread-back tiles is replaced in every slot).
        lm_kwargs["inputs_embeds"] = new_embeds
        if bool(keep[valid].all()):
            return LLMInput(out, keep)
        positions, shift = compact_positions(lm_kwargs.get("position_ids"), keep, valid)
        return LLMInput(out, keep, positions, shift)

    def _encoded_items(self, results: list[VisionCallResult], call: dict[str, Any]) -> dict[str, Any]:
        """Per kind, an iterator over the merged packed items in prompt order (images, then videos)."""
        images = [part for r in results if isinstance(r, _PackedImages) for parts in r.images for part in parts]
        tiles = [r for r in results if not isinstance(r, _PackedImages) and r.units]
        if not images and not tiles:
            raise RuntimeStateError(
                "the schedule has encoder stages but the vision tower did not run inside this tokcomp.compress "
                "block (features passed as mm_encoder_outputs were computed without them); pass pixel values "
                "to the model inside the with block"
            )
        videos = self._pool_videos(tiles, call) if tiles else []
        return {"image": iter(images), "video": iter(videos)}

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

    # -- count functions ---------------------------------------------------------------------------------
    def count_items(self, call: dict[str, Any]) -> list[list[CountItem]]:
        """Per sample, its images (``image_sizes``; ``multi_image`` from ``batch_num_images``) and videos
        (``pixel_values_videos``: grid ``(frames, S/p, S/p)``), in prompt order."""
        ids: torch.Tensor = call["input_ids"]
        cfg = self.model.config
        h0, w0 = self.tile_grid
        sizes = call.get("image_sizes")
        sizes = [] if sizes is None else [tuple(int(v) for v in r) for r in sizes.tolist()]
        # batch_num_images lists the samples that have images (text-only samples are skipped)
        counts = iter([int(n) for n in call["batch_num_images"]]) if call.get("batch_num_images") is not None else None
        per_sample = []
        for b in range(ids.shape[0]):
            runs = len(_runs((ids[b] == cfg.image_token_id).nonzero().squeeze(1)))
            per_sample.append(0 if not runs else runs if counts is None else next(counts))
        videos = call.get("pixel_values_videos")
        frames = int(videos.shape[1]) if videos is not None else 0
        out, k = [], 0
        for b in range(ids.shape[0]):
            images = [CountItem("image", (1, h0, w0), sizes[k + j], per_sample[b] > 1) for j in range(per_sample[b])]
            k += per_sample[b]
            vid = (ids[b] == cfg.video_token_id).nonzero().squeeze(1)
            img = (ids[b] == cfg.image_token_id).nonzero().squeeze(1)
            clip = [CountItem("video", (frames, h0, w0))] * len(_runs(vid))
            first_video = bool(vid.numel()) and (not img.numel() or int(vid[0]) < int(img[0]))
            out.append(clip + images if first_video else images + clip)
        return out

    def predict_tokens(self, item: CountItem, encoder: ShapeFn, projector: ShapeFn) -> TokenCount:
        """The model's packing applied to the stages' grids (module docstring): video frames pooled 2x2 then
        one newline; a multi-image tile then one newline; a single image's base tile, then its AnyRes grid
        with one newline per row. With encoder stages the AnyRes count is known only when the picture's
        aspect ratio fills the tiles: otherwise the padding is cropped by provenance, and how many merged
        rows or columns hold picture content depends on which lines merged."""
        h0, w0 = self.tile_grid
        if item.kind == "video":
            enc = encoder(ItemShape(item.grid[0], h0, w0))
            n = projector(ItemShape(enc.t, math.ceil(enc.h / 2), math.ceil(enc.w / 2))).num_tokens
            return TokenCount(n, n + 1)
        base = projector(encoder(ItemShape(1, h0, w0))).num_tokens
        if item.multi_image:
            return TokenCount(base, base + 1)
        if item.image_size is None:
            raise ScheduleError("a single image of llava_onevision needs its image_size for the AnyRes layout")
        cfg = self.model.config
        rows, cols = get_anyres_image_grid_shape(item.image_size, cfg.image_grid_pinpoints,
                                                 cfg.vision_config.image_size)
        _, hc, wc = unpad_image(torch.empty(0, rows * h0, cols * w0), list(item.image_size)).shape
        enc = encoder(ItemShape(1, h0, w0))
        if (enc.h, enc.w) == (h0, w0):
            h, w = hc, wc
        elif (hc, wc) == (rows * h0, cols * w0):
            h, w = rows * enc.h, cols * enc.w
        else:
            raise ScheduleError(
                f"llava_onevision crops the AnyRes padding of a {item.image_size[0]}x{item.image_size[1]} picture "
                "after the encoder; with merged tiles the rows and columns that stay depend on which lines "
                "merged, so this item's count is known only after the encoder runs (move the stage to the "
                "projector site, or use pictures whose aspect ratio fills the tiles)"
            )
        max_tiles = int(str(cfg.vision_aspect_ratio).removeprefix("anyres_max_"))
        ratio = math.sqrt(hc * wc / (max_tiles * h0**2))
        if ratio > 1.1:
            h, w = max(1, int(h // ratio)), max(1, int(w // ratio))
        grid = projector(ItemShape(1, h, w))
        n = grid.num_tokens
        return TokenCount(base + n, base + (grid.h * (grid.w + 1) if grid.is_grid else n + 1))

    # -- displays ------------------------------------------------------------------------------------------
    def packed_grid(self, call: dict[str, Any], image: int) -> PackedGrid | None:
        """The AnyRes grid of a single-image sample's image: each packed cell takes the canvas patch at its
        centre (the rule `pack_merged_anyres` follows); None for base-tile-only images (several images in
        the sample)."""
        cfg = self.model.config
        sizes = call["image_sizes"]
        counts = call.get("batch_num_images")
        anyres = [True] * len(sizes) if counts is None else [int(n) == 1 for n in counts for _ in range(int(n))]
        S = int(cfg.vision_config.image_size)
        if not anyres[image] or image_size_to_num_patches(sizes[image], cfg.image_grid_pinpoints, S) == 1:
            return None
        h0, w0 = self.tile_grid
        aspect = call.get("vision_aspect_ratio") or cfg.vision_aspect_ratio
        max_tiles = int(str(aspect).removeprefix("anyres_max_"))
        R, C = get_anyres_image_grid_shape(sizes[image], cfg.image_grid_pinpoints, S)
        canvas = unpad_image(torch.arange(R * h0 * C * w0).view(1, R * h0, C * w0), sizes[image])[0]
        c_rows, c_cols = canvas[:, 0] // (C * w0), canvas[0] % (C * w0)
        hc, wc = len(c_rows), len(c_cols)
        ratio = math.sqrt(hc * wc / (max_tiles * h0**2))
        grid = (int(hc // ratio), int(wc // ratio)) if ratio > 1.1 else (hc, wc)
        rr = c_rows[_nearest(torch.arange(grid[0])[:, None], grid[0], hc)]
        cc = c_cols[_nearest(torch.arange(grid[1])[None, :], grid[1], wc)]
        return PackedGrid(
            grid=grid,
            layout=(int(R), int(C)),
            tile=(h0, w0),
            content=(int(c_rows[0]), int(c_rows[-1]) + 1, int(c_cols[0]), int(c_cols[-1]) + 1),
            cell_tile=(1 + (rr // h0) * C + cc // w0).reshape(-1),
            cell_patch=((rr % h0) * w0 + cc % w0).reshape(-1),
        )

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
            out.append([base, _Part("image", (1, *_empty_grid(h, w)), row_newline=True)])
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
        if rest == 0:  # an extreme aspect ratio left the AnyRes grid no row (see _empty_grid)
            return [_Part("image", (1, h0, w0)), _Part("image", (1, 0, 0), row_newline=True)]
        if is_nl.numel() >= 1:
            w = int(is_nl[0])  # 0: no column, rows of one newline each
            h = is_nl.numel()
            if (
                h * (w + 1) == rest
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


# ----------------------------------------------------------------------------------------------------------
# Packing merged tiles by the model's rule (pure tensor functions)


def _nearest(i: torch.Tensor, n_from: int, n_to: int) -> torch.Tensor:
    """Cell ``i`` of ``n_from`` cells mapped to the ``n_to``-cell axis whose cell covers its centre."""
    return ((i.float() + 0.5) * n_to / n_from).floor().long().clamp(0, n_to - 1)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(h, w, D)`` resized bilinearly like the model's ``nn.functional.interpolate`` calls."""
    return F.interpolate(x.permute(2, 0, 1)[None], list(size), mode="bilinear")[0].permute(1, 2, 0)


def pack_merged_anyres(
    tiles: torch.Tensor,
    owners: torch.Tensor,
    layout: tuple[int, int],
    tile: tuple[int, int],
    image_size: Any,
    max_tiles: int,
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Stitch, unpad and (if the model would) shrink merged AnyRes tiles; the model's rule on merged grids.

    Args:
        tiles: ``(rows * cols, h', w', D)`` the merged tiles in raster tile order.
        owners: ``(rows * cols, h0 * w0)`` per tile, the merged cell (raster index into ``h' x w'``) holding
            each original patch.
        layout: ``(rows, cols)`` tiles (``get_anyres_image_grid_shape``).
        tile: ``(h0, w0)`` patches per tile.
        image_size: ``(height, width)`` of the picture, for ``unpad_image``.
        max_tiles: ``N`` of ``anyres_max_N``.

    Returns:
        ``(x, owner, original)``: the packed grid ``(h'', w'', D)``; for each cell of the grid the model packs
        from unmerged tiles (``original``, raster order), the index of the cell of ``x`` that holds it.
    """
    R, C = layout
    h0, w0 = tile
    n, h2, w2, D = tiles.shape
    dev = tiles.device
    if n != R * C:
        raise RuntimeStateError(f"an AnyRes layout of {R}x{C} tiles, but {n} tiles came out of the tower")
    # Where each canvas patch went: the stitched cell of the merged token that holds it.
    rr = torch.arange(R * h0, device=dev)[:, None]
    cc = torch.arange(C * w0, device=dev)[None, :]
    own = owners.to(dev)[(rr // h0) * C + cc // w0, (rr % h0) * w0 + cc % w0]
    s_row = (rr // h0) * h2 + own // w2
    s_col = (cc // w0) * w2 + own % w2
    # The model's own crop, read off a canvas of indices.
    content = unpad_image(torch.arange(R * h0 * C * w0, device=dev).view(1, R * h0, C * w0), image_size)[0]
    hc, wc = content.shape
    if hc == 0 or wc == 0:
        # An extreme aspect ratio: the model's crop keeps no patch column (row), and its grid is h x 0 (0 x w),
        # only newlines. The merged grid is the same empty grid.
        hc, wc = _empty_grid(hc, wc)
        return tiles.new_zeros(hc, wc, D), torch.zeros(0, dtype=torch.long, device=dev), (hc, wc)
    c_rows, c_cols = content[:, 0] // (C * w0), content[0] % (C * w0)
    keep_rows = _covering(s_row[c_rows][:, c_cols], R * h2, hc)
    keep_cols = _covering(s_col[c_rows][:, c_cols], C * w2, wc)
    stitched = tiles.view(R, C, h2, w2, D).permute(0, 2, 1, 3, 4).reshape(R * h2, C * w2, D)
    x = stitched[keep_rows][:, keep_cols]
    hk, wk = x.shape[:2]
    ratio = math.sqrt(hc * wc / (max_tiles * h0**2))
    original = (hc, wc)
    final = (hk, wk)
    if ratio > 1.1:  # the model shrinks the unmerged grid by `ratio`; the merged one shrinks by as much
        original = (int(hc // ratio), int(wc // ratio))
        final = (max(1, int(hk // ratio)), max(1, int(wk // ratio)))
        x = _resize(x, final)
    # Provenance: original packed cell -> its canvas patch -> stitched cell -> kept cell -> final cell.
    oi = torch.arange(original[0], device=dev)[:, None]
    oj = torch.arange(original[1], device=dev)[None, :]
    pr, pc = c_rows[_nearest(oi, original[0], hc)], c_cols[_nearest(oj, original[1], wc)]
    a = torch.searchsorted(keep_rows, s_row[pr, pc])
    b = torch.searchsorted(keep_cols, s_col[pr, pc])
    a, b = _nearest(a, hk, final[0]), _nearest(b, wk, final[1])
    return x, (a * final[1] + b).reshape(-1), original


def _empty_grid(h: int, w: int) -> tuple[int, int]:
    """An AnyRes grid's ``(rows, cols)``, with every grid of no row written ``(0, 0)``.

    Extreme aspect ratios (a 28 x 1000 picture) make the model's unpadding keep no column (``h x 0``: ``h``
    newlines, no visual token) or no row (nothing at all); the width of a grid without rows is not readable
    off the packed features, so it is not part of the layout.
    """
    return (0, 0) if h == 0 else (h, w)


def _covering(cells: torch.Tensor, n: int, limit: int) -> torch.Tensor:
    """The stitched lines (of ``n``) that hold some content patch (``cells``: the line of each), at most
    ``limit`` of them.

    More than ``limit`` (the unmerged content's lines) happens only when one tile row or column is cropped
    at both ends and its tiles merged different lines; the outer line holding fewer content patches is then
    dropped until the grid fits the model's placeholder run.
    """
    counts = torch.bincount(cells.reshape(-1), minlength=n)
    lines = (counts > 0).nonzero().squeeze(1)
    while lines.numel() > limit:
        lines = lines[1:] if counts[lines[0]] <= counts[lines[-1]] else lines[:-1]
    return lines


def pool_merged_frame(
    x: torch.Tensor, owner: torch.Tensor, tile: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """A merged video frame pooled like the model's ``apply_pooling``: bilinear to half size, rounded up.

    Args:
        x: ``(h', w', D)`` the merged frame.
        owner: ``(h0 * w0,)`` the merged cell holding each original patch.
        tile: ``(h0, w0)``.

    Returns:
        ``(pooled, owner, original)``: the pooled frame; for each cell of the frame the model pools from the
        unmerged tile (``original = (ceil(h0/2), ceil(w0/2))``), the pooled cell that holds it.
    """
    h0, w0 = tile
    h2, w2 = x.shape[:2]
    final = (math.ceil(h2 / 2), math.ceil(w2 / 2))
    original = (math.ceil(h0 / 2), math.ceil(w0 / 2))
    dev = x.device
    oi = torch.arange(original[0], device=dev)[:, None]
    oj = torch.arange(original[1], device=dev)[None, :]
    cell = owner.to(dev)[_nearest(oi, original[0], h0) * w0 + _nearest(oj, original[1], w0)]
    a, b = _nearest(cell // w2, h2, final[0]), _nearest(cell % w2, w2, final[1])
    return _resize(x, final), (a * final[1] + b).reshape(-1), original


def _owned_frame(x: torch.Tensor, owner: torch.Tensor, original: tuple[int, int]) -> FrameGrid:
    """A `FrameGrid` whose sizes and positions follow from its provenance over an ``original`` grid."""
    h, w = x.shape[:2]
    n = h * w
    coords = torch.stack(torch.meshgrid(torch.arange(original[0]), torch.arange(original[1]), indexing="ij"),
                         -1).reshape(-1, 2).to(x.device, torch.float32)
    counts = torch.bincount(owner, minlength=n).float()
    pos = torch.zeros(n, 2, device=x.device).index_add_(0, owner, coords) / counts.clamp(min=1)[:, None]
    # A token made by interpolation may hold no original cell under the nearest-cell map: size 1, no patch.
    return FrameGrid(x, counts.clamp(min=1).view(h, w), pos.view(h, w, 2), owner)


def _tile_frame(result: VisionCallResult, j: int, tile: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ``j`` of a tower call: its merged features as a grid and its provenance."""
    grid = result.grids[j]
    if grid is None:
        raise RuntimeStateError("an encoder stage broke a tile's 2-D grid; the AnyRes packing needs it")
    x = result.features[j].reshape(grid[1], grid[2], -1)
    return x, result.provenance[j][0]


@dataclass
class _PackedImages(VisionCallResult):
    """An image call's merged tiles, packed per image (``images[i]``: the image's items in prompt order)."""

    images: list[list[VisualItemTokens]] = field(default_factory=list)


class _InstanceAttribute:
    """Removes an attribute set on one object (a handle like torch's hook handles)."""

    def __init__(self, obj: Any, name: str) -> None:
        self.obj, self.name = obj, name

    def remove(self) -> None:
        """Delete the attribute (the class's own definition shows through again)."""
        self.obj.__dict__.pop(self.name, None)


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
        for name in ("original_units", "units", "grids", "anchors", "features", "provenance", "events",
                     "encoder_tokens"):
            setattr(res, name, getattr(src, name))


def _runs(positions: torch.Tensor) -> list[torch.Tensor]:
    """Ascending sequence indices split into runs of consecutive positions."""
    if positions.numel() == 0:
        return []
    breaks = (positions[1:] != positions[:-1] + 1).nonzero().squeeze(1) + 1
    return list(torch.tensor_split(positions, breaks.tolist()))
