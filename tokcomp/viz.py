"""Which image patches survive each stage of a schedule, and which were merged together.

`stage_provenance` runs the model once under a schedule and returns, per image, one map per stage: for
every original patch of the image (raster order over the vision tower's patch grid, 14-px patches for
Qwen2-VL), the token that holds it after that stage, or -1 once it is gone. Stages are, in order:

* ``input`` — the patch grid the vision tower starts from (every patch its own token);
* every encoder / projector stage event (``report.vision_events``; the map is the event's
  ``provenance``);
* ``LLM input`` — the tokens the LLM receives (the projector's merge of 2×2 patches included; after
  encoder/projector stages, the final provenance of the vision call);
* selected LLM layers — the LLM tokens still present at the layer's input
  (`tokcomp.CompressionRun.kept_positions`), mapped back to their patches through the LLM-input map.

`provenance_figure` draws those maps over the picture: patches held by a token that stands for more than
one patch share a colour and an outline, removed patches are greyed out.

Architectures: Qwen2-VL and Qwen2.5-VL (one panel row per image), LLaVA-1.5 (per image), InternVL (per
tile, thumbnail included) and LLaVA-OneVision (base tile and packed AnyRes grid): their adapters record
patch-level provenance per tower item. LLM-side merges
(PACT's clusters) are shown as the kept token only: the LLM site does not record cluster members.
Internals used: the run's private state (``run._state``: the vision-call results and the sample's
visual layout after encoder stages), until the runtime has a public accessor.

Examples:
    >>> from tokcomp import testing
    >>> from tokcomp.viz import stage_provenance
    >>> model = testing.tiny_model("qwen2_vl")
    >>> maps = stage_provenance(model, testing.make_image(224, 168), "luvc")
    >>> labels = [s["label"] for s in maps["stages"]]
    >>> tuple(labels[:2])
    ('input (patches)', '0:oim@encoder block 1')
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .bench import load_schedule
from .errors import UsageError

__all__ = ["SUPPORTED", "add_arguments", "cli", "image_inputs", "provenance_figure", "qwen_image_inputs",
           "stage_provenance"]

SUPPORTED: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "llava", "internvl", "llava_onevision")
"""Model types `stage_provenance` can draw."""

# OpenAI CLIP statistics: the Qwen2-VL image processor's defaults.
_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
_STD = np.array([0.26862954, 0.26130258, 0.27577711])


def qwen_image_inputs(
    model: torch.nn.Module, image: Image.Image, *, max_tokens: int = 256, prompt: str = "w2 w3 w4"
) -> Any:
    """Processor outputs for one picture on a `tokcomp.testing` Qwen model (its tiny tokenizer), keeping
    up to ``max_tokens`` LLM tokens (the picture is resized like the real processor does, in 28-px units).

    Args:
        model: A Qwen2-VL / Qwen2.5-VL model using the `tokcomp.testing` vocabulary.
        image: The picture.
        max_tokens: Upper bound on LLM tokens (4·14² px each ... 28² px per token).
        prompt: Words after the image.

    Returns:
        A ``BatchFeature`` with one sample, in the model's dtype.
    """
    from transformers import Qwen2VLImageProcessorPil

    from . import testing

    arch = getattr(model.config, "model_type", "qwen2_vl")
    if arch not in ("qwen2_vl", "qwen2_5_vl"):
        raise ValueError(f"qwen_image_inputs needs a Qwen2-VL/2.5-VL model, got {arch}")
    cls = type(testing.tiny_processor(arch))
    ip = Qwen2VLImageProcessorPil(
        min_pixels=28 * 28 * 4,
        max_pixels=28 * 28 * max_tokens,
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    proc = cls(image_processor=ip, tokenizer=testing.tiny_tokenizer(arch), video_processor=None)
    text = f"{testing._PROMPT_PREFIX} {testing._IMAGE_PROMPT[arch]} {prompt}"
    inputs = proc(text=[text], images=[image.convert("RGB")], return_tensors="pt")
    inputs["pixel_values"] = inputs["pixel_values"].to(next(model.parameters()).dtype)
    return inputs


def image_inputs(model: torch.nn.Module, image: Image.Image, *, max_tokens: int = 256) -> Any:
    """Processor outputs for one picture on a `tokcomp.testing` model of any architecture `stage_provenance`
    supports: `qwen_image_inputs` for Qwen (resized to at most ``max_tokens`` LLM tokens), otherwise the
    tiny processor of `tokcomp.testing.tiny_inputs` (LLaVA: one 4x4-patch image; InternVL: its tiles and
    thumbnail), in the model's dtype."""
    from . import testing

    arch = getattr(model.config, "model_type", "")
    if arch in ("qwen2_vl", "qwen2_5_vl"):
        return qwen_image_inputs(model, image, max_tokens=max_tokens)
    return testing.tiny_inputs(arch, [[image.convert("RGB")]], dtype=next(model.parameters()).dtype)


def _qwen_items(model: torch.nn.Module, inputs: Mapping[str, Any], sample: int) -> tuple[list[dict], int]:
    """The sample's images as Qwen's tower sees them (one item each), and the projector's merge size."""
    cfg = model.config
    vcfg = cfg.vision_config
    merge, patch, temporal = int(vcfg.spatial_merge_size), int(vcfg.patch_size), int(vcfg.temporal_patch_size)
    grids = inputs.get("image_grid_thw")
    if grids is None:
        raise ValueError("the inputs have no image_grid_thw: visualize needs images")
    grids = [tuple(int(v) for v in g) for g in grids.tolist()]
    ids = inputs["input_ids"]
    per_sample = [int(n) for n in ((ids == cfg.image_token_id).sum(1)).tolist()]
    # images of earlier samples come first in the tower call
    first, counts, acc = 0, [t * h * w // merge**2 for t, h, w in grids], 0
    while acc < sum(per_sample[:sample]):
        acc += counts[first]
        first += 1
    mine = []
    k, total = first, 0
    while total < per_sample[sample]:
        mine.append(k)
        total += counts[k]
        k += 1
    if not mine:
        raise ValueError(f"sample {sample} has no image")
    offsets = [0, *np.cumsum([t * h * w for t, h, w in grids]).tolist()]
    items = []
    for j in mine:
        _, h, w = grids[j]
        pic = _picture_from_pixels(
            inputs["pixel_values"][offsets[j] : offsets[j + 1]], grids[j], merge, patch, temporal
        )
        items.append({"tower_item": j, "patch_grid": (h, w), "picture": pic})
    return items, merge


def _row_items(model: torch.nn.Module, inputs: Mapping[str, Any], sample: int) -> tuple[list[dict], int]:
    """The sample's images (LLaVA) or tiles (InternVL), one row of the tower's batch each, and the
    projector's unit (InternVL's pixel shuffle reads 2x2 patches per token)."""
    import tokcomp as tc

    cfg = model.config
    adapter = tc.find_adapter(model)
    layouts = adapter.layouts(dict(inputs))
    counts = [sum(1 for it in lay.items if it.kind == "image") for lay in layouts]
    if not counts[sample]:
        raise ValueError(f"sample {sample} has no image")
    first = sum(counts[:sample])
    pixels = inputs["pixel_values"]
    grid = next(it.grid for it in layouts[sample].items if it.kind == "image")[1:]
    unit = round(1 / float(cfg.downsample_ratio)) if hasattr(cfg, "downsample_ratio") else 1
    patch_grid = (grid[0] * unit, grid[1] * unit)  # InternVL's layout counts units, the tower patches
    items = []
    for j in range(first, first + counts[sample]):
        pic = pixels[j].float().permute(1, 2, 0).cpu().numpy()
        # the processor's normalisation differs per model: stretch each picture to [0, 1] for display
        pic = (pic - pic.min()) / max(float(pic.max() - pic.min()), 1e-6)
        items.append({"tower_item": j, "patch_grid": patch_grid, "picture": pic, "name": "tile" if unit > 1
                      else "image"})
    return items, unit


def _row_map(ev: Mapping[str, Any], j: int, mine: Sequence[int]) -> torch.Tensor | None:
    """Item ``j``'s map in a vision event, or None when the event belongs to another tower call."""
    if len(ev["provenance"]) <= max(mine):
        return None
    return ev["provenance"][j][0].cpu().long()


def _stretch(pixels: torch.Tensor) -> np.ndarray:
    """``(3, H, W)`` processor pixels as an ``(H, W, 3)`` picture stretched to [0, 1] (processors normalise
    differently; the picture is for display only)."""
    pic = pixels.float().permute(1, 2, 0).cpu().numpy()
    return (pic - pic.min()) / max(float(pic.max() - pic.min()), 1e-6)


def _onevision_items(
    model: torch.nn.Module, inputs: Mapping[str, Any], sample: int
) -> tuple[list[dict], int]:
    """LLaVA-OneVision: per image of the sample, its base tile and (single-image samples) its AnyRes grid as
    the model packs it (stitched tiles, padding cropped, shrunk to the ``anyres_max`` budget).

    Encoder stages run on tiles; an AnyRes panel shows them through the packing: each cell of the packed
    grid takes the token of the canvas patch at its centre, as the adapter's `packed_grid` (part of the
    adapter contract, `tokcomp.contracts.Adapter.packed_grid`) describes it."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    import tokcomp as tc

    cfg = model.config
    S, p = int(cfg.vision_config.image_size), int(cfg.vision_config.patch_size)
    h0 = w0 = S // p
    sizes = inputs["image_sizes"]
    per_sample = inputs.get("batch_num_images")
    if per_sample is None:
        raise ValueError("LLaVA-OneVision inputs without batch_num_images: pass the processor's outputs")
    per_sample = [int(n) for n in per_sample]
    anyres = [n == 1 for n in per_sample for _ in range(n)]
    tiles = [
        image_size_to_num_patches(size, cfg.image_grid_pinpoints, S) if a else 1
        for size, a in zip(sizes, anyres)
    ]
    if not per_sample[sample]:
        raise ValueError(f"sample {sample} has no image")
    adapter = tc.find_adapter(model)
    layouts = adapter.layouts(dict(inputs))
    llm_first = sum(len(lay.items) for lay in layouts[:sample])  # the run's items are in prompt order
    image_rows = sum(tiles)
    pixels = inputs["pixel_values"]
    items: list[dict] = []
    first_image = sum(per_sample[:sample])
    for i in range(first_image, first_image + per_sample[sample]):
        row = sum(tiles[:i])

        base = {"tower_item": row, "llm_item": llm_first + len(items), "patch_grid": (h0, w0),
                "picture": _stretch(pixels[i, 0]), "name": "base tile"}
        base["event_map"] = _item_event_map(
            base["llm_item"], image_rows, lambda ev, r=row: ev["provenance"][r][0]
        )
        items.append(base)
        if tiles[i] == 1:
            continue
        packed = adapter.packed_grid(dict(inputs), i)
        if packed is None:
            raise ValueError(f"the {adapter.name!r} adapter describes no AnyRes packing for image {i}")
        R, C = packed.layout
        grid = packed.grid
        tile, patch_in_tile = packed.cell_tile, packed.cell_patch

        def anyres_map(ev: Mapping[str, Any], row: int = row, tile: torch.Tensor = tile,
                       patch: torch.Tensor = patch_in_tile) -> torch.Tensor:
            owners = torch.stack(
                [ev["provenance"][row + t][0].cpu().long() for t in range(int(tile.max()) + 1)]
            )
            ids = tile * (h0 * w0) + owners[tile, patch]
            return torch.unique(ids, return_inverse=True)[1]

        stitched = pixels[i, 1:1 + R * C].view(R, C, 3, S, S).permute(2, 0, 3, 1, 4).reshape(3, R * S, C * S)
        top, bottom, left, right = (v * p for v in packed.content)
        crop = stitched[:, top:bottom, left:right]
        crop = torch.nn.functional.interpolate(crop[None].float(), size=[grid[0] * p, grid[1] * p],
                                               mode="bilinear")[0]
        item = {"tower_item": row, "llm_item": llm_first + len(items), "patch_grid": grid,
                "picture": _stretch(crop), "name": "AnyRes grid"}
        item["event_map"] = _item_event_map(item["llm_item"], image_rows, anyres_map)
        items.append(item)
    return items, 1


def _item_event_map(llm_item: int, image_rows: int, encoder_map: Any) -> Any:
    """An OneVision item's map in an event: encoder events run on the image call's tiles (``image_rows``
    of them), projector events on the packed LLM items."""

    def event_map(ev: Mapping[str, Any]) -> torch.Tensor | None:
        if ev["site"] == "encoder":
            return encoder_map(ev).cpu().long() if len(ev["provenance"]) == image_rows else None
        return ev["provenance"][llm_item][0].cpu().long() if len(ev["provenance"]) > llm_item else None

    return event_map


def _picture_from_pixels(
    pixel_values: torch.Tensor, grid: Sequence[int], merge: int, patch: int, temporal: int
) -> np.ndarray:
    """The (first frame of the) picture a Qwen processor produced, un-normalised, ``(H, W, 3)`` in [0, 1]."""
    t, h, w = (int(x) for x in grid)
    x = pixel_values[: t * h * w].float().cpu().numpy()
    x = x.reshape(t, h // merge, w // merge, merge, merge, 3, temporal, patch, patch)[0, ..., 0, :, :]
    # (h/m, w/m, m, m, 3, p, p) -> (h/m, m, p, w/m, m, p, 3)
    x = x.transpose(0, 2, 5, 1, 3, 6, 4).reshape(h * patch, w * patch, 3)
    return np.clip(x * _STD + _MEAN, 0.0, 1.0)


def _select_layers(visual: list[list[int]], sample: int, count: int = 4) -> list[int]:
    """Layers where the sample's visual-token count changes, thinned to about ``count`` spread-out ones."""
    n = [row[sample] for row in visual]
    changes = [i for i in range(1, len(n)) if n[i] != n[i - 1]]
    changes = [i for i in changes if n[i] > 0] or changes
    if len(changes) <= count:
        return changes
    picks = {changes[round(k * (len(changes) - 1) / (count - 1))] for k in range(count)}
    return sorted(picks)


@torch.no_grad()
def stage_provenance(
    model: torch.nn.Module,
    inputs_or_image: Mapping[str, Any] | Image.Image,
    schedule: Any,
    *,
    layers: Sequence[int] | None = None,
    sample: int = 0,
) -> dict[str, Any]:
    """The patch → token maps of every stage for the images of one sample.

    Args:
        model: A model of `SUPPORTED` (``...ForConditionalGeneration``): Qwen2-VL / Qwen2.5-VL (one item per
            image), LLaVA-1.5 (one per image), InternVL (one per tile, thumbnail included) or LLaVA-OneVision
            (the base tile and, for a single-image sample, the packed AnyRes grid).
        inputs_or_image: Processor outputs (``input_ids``, ``pixel_values``, ``image_grid_thw``, ...), or a
            PIL picture for a model built by `tokcomp.testing` (processed by `image_inputs`).
        schedule: Anything `tokcomp.bench.load_schedule` accepts (a `Schedule`, a preset name, ...).
        layers: LLM layers to show (default: about four layers at which the visual-token count changes).
        sample: Which sample of the batch.

    Returns:
        ``{"items": [...], "stages": [...], "report": Report}``. ``items[i]`` describes image (or tile,
        or packed grid) ``i`` of the sample: ``patch_grid`` ``(h, w)``, ``picture`` (``(h·p, w·p, 3)``
        float array, ``p`` the patch side in pixels) and its index among the tower's items (rows).
        ``stages[k]`` has ``label``, ``site`` (``"input"``, ``"encoder"``, ``"projector"``, ``"llm-input"``,
        ``"llm"``), ``layer`` and ``maps``: per image a LongTensor of ``h·w`` entries, the token holding
        each original patch after the stage (-1: removed); token ids are raster indices in the stage's grid
        (for LLM stages, in the image's LLM-input grid), and ``tokens``: per image, how many tokens are
        left.

    Raises:
        ValueError: If the model is not of `SUPPORTED` or the sample has no image.
    """
    import tokcomp as tc

    cfg = model.config
    arch = getattr(cfg, "model_type", "")
    if arch not in SUPPORTED:
        raise ValueError(
            f"tokcomp.viz supports {', '.join(SUPPORTED)} (patch-level provenance per image or tile); got "
            f"{arch!r}"
        )
    if isinstance(inputs_or_image, Image.Image):
        inputs = image_inputs(model, inputs_or_image)
    else:
        inputs = inputs_or_image
    sched = load_schedule(schedule)
    if arch in ("qwen2_vl", "qwen2_5_vl"):
        items, merge = _qwen_items(model, inputs, sample)
    elif arch == "llava_onevision":
        items, merge = _onevision_items(model, inputs, sample)
    else:
        items, merge = _row_items(model, inputs, sample)
    mine = [it["tower_item"] for it in items]

    with tc.compress(model, sched) as run:
        model(**inputs)
        report = run.report()
        state = run._state  # private: vision results and layouts (see the module docstring)
        assert state is not None
        kept = {layer: run.kept_positions(layer)[sample] for layer in range(report.num_layers)}

    def n_tokens(m: torch.Tensor) -> int:
        return int(torch.unique(m[m >= 0]).numel())

    stages: list[dict[str, Any]] = []
    ident = [torch.arange(it["patch_grid"][0] * it["patch_grid"][1]) for it in items]
    stages.append(
        {
            "label": "input (patches)",
            "site": "input",
            "layer": None,
            "maps": ident,
            "tokens": [m.numel() for m in ident],
        }
    )
    for ev in report.vision_events:
        maps = [it["event_map"](ev) if "event_map" in it else _row_map(ev, it["tower_item"], mine)
                for it in items]
        if any(m is None for m in maps):
            continue  # an event of another tower call (videos)
        where = f"block {ev['layer']}" if ev["site"] == "encoder" else "output"
        stages.append(
            {
                "label": f"{ev['stage']} {where}",
                "site": ev["site"],
                "layer": ev["layer"],
                "maps": maps,
                "tokens": [n_tokens(m) for m in maps],
            }
        )
    # the LLM input: final provenance, or the projector's 2x2 merge when no vision stage ran
    final: list[torch.Tensor] = []
    llm_grids: list[tuple[int, int]] = []
    results = list(state.vision)
    for it in items:
        j = it.get("llm_item", it["tower_item"])
        h, w = it["patch_grid"]
        res_item = None
        acc = 0
        for r in results:
            if j - acc < len(r.units):
                res_item = (r, j - acc)
                break
            acc += len(r.units)
        if res_item is not None and res_item[0].provenance:
            r, jj = res_item
            final.append(r.provenance[jj][0].cpu().long())
            g = r.grids[jj]
            llm_grids.append(
                (int(g[1]), int(g[2])) if g is not None and r.anchors[jj] is None else (1, r.units[jj])
            )
        else:
            rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            final.append(((rows // merge) * (w // merge) + cols // merge).reshape(-1))
            llm_grids.append((h // merge, w // merge))
    stages.append(
        {
            "label": "LLM input",
            "site": "llm-input",
            "layer": None,
            "maps": final,
            "tokens": [n_tokens(m) for m in final],
        }
    )
    # LLM layers: the tokens present, through the sample's visual layout
    layout = state.layouts[sample]
    positions = layout.positions.cpu()
    image_items = [i for i, vi in enumerate(layout.items) if vi.kind == "image"]
    show = list(layers) if layers is not None else _select_layers(report.visual_tokens, sample)
    for layer in show:
        present = kept[layer].cpu()
        present = present[present >= 0]
        rank = torch.searchsorted(positions, present)
        ok = (rank < positions.numel()) & (
            positions[rank.clamp(max=max(positions.numel() - 1, 0))] == present
        )
        rank = rank[ok]
        maps = []
        for img, final_map in zip(image_items, final):
            vi = layout.items[img]
            local = rank[(rank >= vi.start) & (rank < vi.start + vi.count)] - vi.start
            frame_tokens = vi.grid[1] * vi.grid[2]
            local = local[local < frame_tokens]  # first frame
            alive = torch.zeros(max(frame_tokens, int(final_map.max()) + 1), dtype=torch.bool)
            alive[local] = True
            maps.append(torch.where((final_map >= 0) & alive[final_map.clamp(min=0)], final_map, -1))
        stages.append(
            {
                "label": f"LLM layer {layer}",
                "site": "llm",
                "layer": layer,
                "maps": maps,
                "tokens": [n_tokens(m) for m in maps],
            }
        )
    for it, g in zip(items, llm_grids):
        it["llm_grid"] = g
    return {"items": items, "stages": stages, "report": report}


def _palette(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    import matplotlib

    base = np.array([matplotlib.colormaps["tab20"](k)[:3] for k in range(20)])
    return base[rng.permutation(max(n, 1)) % 20] if n else base[:0]


def _draw(ax: Any, picture: np.ndarray, owner: torch.Tensor, grid: tuple[int, int], patch: int) -> None:
    h, w = grid
    own = owner.view(h, w).numpy()
    ax.imshow(picture, interpolation="nearest")
    sizes = np.bincount(own[own >= 0].ravel(), minlength=1) if (own >= 0).any() else np.zeros(1)
    # colours: one per token that stands for more than one patch (merged groups); order-stable shuffle
    tokens = np.unique(own[own >= 0])
    colours = _palette(len(tokens))
    lut = {int(t): colours[k] for k, t in enumerate(tokens)}
    overlay = np.zeros((h, w, 4))
    for r in range(h):
        for c in range(w):
            t = int(own[r, c])
            if t < 0:
                overlay[r, c] = (0.45, 0.45, 0.45, 0.85)
            elif sizes[t] > 1:
                overlay[r, c] = (*lut[t], 0.45)
    ax.imshow(overlay, extent=(0, w * patch, h * patch, 0), interpolation="nearest")
    # outlines between patches held by different tokens (or kept vs removed)
    segs = []
    for r in range(h):
        for c in range(w):
            if c + 1 < w and own[r, c] != own[r, c + 1]:
                segs.append([((c + 1) * patch, r * patch), ((c + 1) * patch, (r + 1) * patch)])
            if r + 1 < h and own[r, c] != own[r + 1, c]:
                segs.append([(c * patch, (r + 1) * patch), ((c + 1) * patch, (r + 1) * patch)])
    if segs:
        from matplotlib.collections import LineCollection

        ax.add_collection(LineCollection(segs, colors="white", linewidths=0.6, alpha=0.9))
    ax.set_xlim(0, w * patch)
    ax.set_ylim(h * patch, 0)
    ax.set_xticks([])
    ax.set_yticks([])


def provenance_figure(
    model: torch.nn.Module,
    processor_inputs_or_image: Mapping[str, Any] | Image.Image,
    schedule: Any,
    *,
    layers: Sequence[int] | None = None,
    sample: int = 0,
    columns: int = 4,
    title: str | None = None,
) -> Any:
    """A matplotlib figure: one panel per stage, the picture with each patch coloured by its token.

    Patches whose token stands for several patches (merged by the projector or a strategy) share a tint
    and are outlined as a group; patches no longer held by any token are greyed out; a single patch kept
    as its own token is left as it is. Panel titles give the stage and the tokens left.

    Args:
        model: A model of `SUPPORTED` (Qwen2-VL / Qwen2.5-VL, LLaVA-1.5, InternVL, LLaVA-OneVision).
        processor_inputs_or_image: Processor outputs, or a PIL picture (see `stage_provenance`).
        schedule: The schedule (anything `tokcomp.bench.load_schedule` accepts).
        layers: LLM layers to show (default: about four where the count changes).
        sample: Which sample of the batch.
        columns: Panels per row.
        title: Figure title (default: the schedule).

    Returns:
        The ``matplotlib.figure.Figure`` (save it with ``fig.savefig("out.png")``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = stage_provenance(model, processor_inputs_or_image, schedule, layers=layers, sample=sample)
    items, stages = data["items"], data["stages"]
    panels = [(s, k) for k in range(len(items)) for s in stages]
    # several images or tiles: one row of panels each, when the stages fit on a row
    cols = min(len(stages) if 1 < len(items) and len(stages) <= 8 else columns, len(panels))
    rows = math.ceil(len(panels) / cols)
    h0, w0 = items[0]["patch_grid"]
    aspect = h0 / w0
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.3 * cols, (3.3 * aspect + 0.6) * rows + 0.3), dpi=110, squeeze=False
    )
    for ax in axes.ravel()[len(panels) :]:
        ax.axis("off")
    for ax, (stage, k) in zip(axes.ravel(), panels):
        it = items[k]
        patch = it["picture"].shape[1] // it["patch_grid"][1]  # pixels per patch side in the picture drawn
        _draw(ax, it["picture"], stage["maps"][k], it["patch_grid"], patch)
        name = stage["label"] + (f" ({it.get('name', 'image')} {k})" if len(items) > 1 else "")
        removed = int((stage["maps"][k] < 0).sum())
        extra = f", {removed} patches gone" if removed else ""
        ax.set_title(f"{name}\n{stage['tokens'][k]} tokens{extra}", fontsize=8)
    sched_name = schedule if isinstance(schedule, str) else getattr(schedule, "name", None) or "schedule"
    fig.suptitle(
        title
        or f"tokcomp: patches surviving each stage of {sched_name!r} "
        "(tint + outline: merged into one token; grey: removed)",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()), h_pad=1.6)
    return fig


# ---------------------------------------------------------------------------------------------------------
# Command line: ``tokcomp visualize``
# ---------------------------------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``tokcomp visualize``."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--image", help="a picture file (PNG/JPEG)")
    src.add_argument("--demo", action="store_true", help="a generated test picture (the default)")
    p.add_argument("--preset", default=None, help="a preset name (default luvc)")
    p.add_argument(
        "--schedule", default=None, help="a JSON schedule file or 'module:attr' (instead of --preset)"
    )
    p.add_argument(
        "--arch",
        default="qwen2_vl",
        choices=list(SUPPORTED),
        help="tiny built-in model (random weights)",
    )
    p.add_argument("--llm-layers", type=int, default=8, help="depth of the tiny LLM")
    p.add_argument("--max-tokens", type=int, default=256, help="LLM tokens the picture may use")
    p.add_argument("--layers", default=None, type=_layer_list,
                   help="LLM layers to show, e.g. 2,4,6 (default: automatic)")
    p.add_argument("--out", default="provenance.png", help="PNG to write")


def _layer_list(text: str) -> list[int]:
    """``--layers 2,4,6`` as ints; argparse turns the error into a usage message (exit status 2)."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of layer indices (2,4,6)") from None


def cli(args: argparse.Namespace) -> int:
    """Run ``tokcomp visualize`` with parsed arguments.

    Raises:
        UsageError: ``--layers`` names a layer the model does not have.
    """
    import tokcomp as tc

    from . import testing

    model = testing.tiny_model(args.arch, num_hidden_layers=args.llm_layers)
    image = Image.open(args.image).convert("RGB") if args.image else testing.make_image(448, 336, seed=3)
    inputs = image_inputs(model, image, max_tokens=args.max_tokens)
    spec = args.schedule or args.preset or "luvc"
    layers = args.layers or None
    depth = tc.find_adapter(model).num_layers
    bad = [x for x in layers or () if not 0 <= x < depth]
    if bad:
        raise UsageError(
            f"--layers {','.join(map(str, bad))}: the model has fewer layers: {depth} LLM layers (valid "
            f"0..{depth - 1}; --llm-layers sets the tiny model's depth)"
        )
    fig = provenance_figure(
        model,
        inputs,
        spec,
        layers=layers,
        title=f"tokcomp visualize: {spec} on a tiny {args.arch} (random weights)",
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    print(f"wrote {args.out}")
    return 0
