"""FLOPs of a run: `flops_breakdown` turns a `tokcomp.Report` into the vision encoder's and the LLM
prefill's FLOPs, with the uncompressed baseline next to them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ..flops import (
    COMPONENTS,
    LayerShape,
    StackFlops,
    llm_prefill_flops,
    qwen2_5_vl_window_groups,
    vision_flops,
)
from ..report import Report

__all__ = ["flops_breakdown"]


def _with_attention(stack: StackFlops) -> dict[str, Any]:
    """A StackFlops with an ``attention`` entry (projections + both products) per layer and in total."""
    attn_keys = ("qkv", "attn_scores", "attn_values", "out_proj")
    layers = [dict(layer, attention=sum(layer[k] for k in attn_keys)) for layer in stack["layers"]]
    out: dict[str, Any] = {k: stack[k] for k in (*COMPONENTS, "total")}  # type: ignore[literal-required]
    out["attention"] = sum(stack[k] for k in attn_keys)  # type: ignore[literal-required]
    out["layers"] = layers
    return out


def _sum_stacks(stacks: list[StackFlops], depth: int) -> StackFlops:
    keys = (*COMPONENTS, "total")
    layers = [{k: sum(s["layers"][i][k] for s in stacks) for k in keys} for i in range(depth)]
    out = {k: sum(layer[k] for layer in layers) for k in keys}
    return StackFlops(layers=layers, **out)  # type: ignore[typeddict-item]


def _vision_module(model: torch.nn.Module) -> torch.nn.Module | None:
    inner = getattr(model, "model", model)
    for name in ("visual", "vision_tower"):
        mod = getattr(inner, name, None)
        if isinstance(mod, torch.nn.Module):
            return mod
    return None


def _baseline_vision_groups(
    model: torch.nn.Module, report: Report, inputs: Mapping[str, Any] | None
) -> tuple[list[list[int]], bool, str]:
    """Per vision item (in tower-call order), its attention groups in the uncompressed tower; whether exact;
    how they were found."""
    cfg = model.config
    mtype = getattr(cfg, "model_type", "")
    vcfg = getattr(cfg, "vision_config", None)
    if mtype in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"):
        merge = int(vcfg.spatial_merge_size)
        if inputs is not None and (
            inputs.get("image_grid_thw") is not None or inputs.get("video_grid_thw") is not None
        ):
            items = []
            for key in ("image_grid_thw", "video_grid_thw"):
                grid = inputs.get(key)
                if grid is not None:
                    items += [[int(h) * int(w)] * int(t) for t, h, w in grid.tolist()]
            return items, True, "grids from image_grid_thw / video_grid_thw"
        encoder_events = [e for e in report.vision_events if e.get("site") == "encoder"]
        if encoder_events:
            # provenance maps every original patch of every frame: its length is the frame's patch count
            seen: list[list[int]] = []
            first_layer = encoder_events[0]["layer"]
            for e in encoder_events:
                if e["layer"] == first_layer and e["stage"] == encoder_events[0]["stage"]:
                    seen += [[int(fr.numel()) for fr in item] for item in e["provenance"]]
            return seen, True, "grids from the encoder events' provenance"
        per_sample = [n * merge * merge for n in report.baseline_visual]
        return (
            [[n] for n in per_sample if n],
            False,
            (
                "no grids given: each sample's visual tokens taken as one image "
                "(pass inputs= for exact counts)"
            ),
        )
    if inputs is None or inputs.get("pixel_values") is None:
        return [], False, "no pixel_values given: vision FLOPs need inputs= for this architecture"
    pv = inputs["pixel_values"]
    side = vcfg.image_size if isinstance(vcfg.image_size, int) else vcfg.image_size[0]
    patch = vcfg.patch_size if isinstance(vcfg.patch_size, int) else vcfg.patch_size[0]
    per_tile = (side // patch) ** 2
    if mtype == "llava_onevision":
        # (images, tiles, 3, S, S); tiles only added to stack images of different tile counts are zeros
        tiles = int(pv.flatten(2).ne(0).any(-1).sum()) if pv.dim() == 5 else int(pv.shape[0])
        groups = [[per_tile]] * tiles
        vids = inputs.get("pixel_values_videos")
        if vids is not None:
            groups += [[per_tile]] * int(vids.shape[0] * vids.shape[1])
        return groups, True, "one group per SigLIP tile"
    cls_token = 1  # InternViT and CLIP run a CLS token with the patches
    return [[per_tile + cls_token]] * int(pv.shape[0]), True, "one group per tile (CLS included)"


def _vision_plan(
    model: torch.nn.Module, report: Report, inputs: Mapping[str, Any] | None
) -> dict[str, Any] | None:
    from ..flops import model_shapes

    cfg = model.config
    vcfg = getattr(cfg, "vision_config", None)
    if vcfg is None:
        return None
    _, vshape, _, depth = model_shapes(cfg)
    assert vshape is not None
    base_items, exact, how = _baseline_vision_groups(model, report, inputs)
    if not base_items:
        return {"shape": vshape, "depth": depth, "base": None, "comp": None, "exact": False, "note": how}
    base_groups = [g for item in base_items for g in item]
    per_block_base = [list(base_groups) for _ in range(depth)]
    per_block_comp = [list(base_groups) for _ in range(depth)]
    frames = [len(item) for item in base_items]
    for block, counts in report.encoder_tokens.items():
        if len(counts) != len(frames) or block >= depth:
            exact = False
            how += "; encoder token counts do not match the items (vision FLOPs approximate)"
            continue
        per_block_comp[block] = [c // f for c, f in zip(counts, frames) for _ in range(f)]
    windows_base: list[list[int] | None] | None = None
    windows_comp: list[list[int] | None] | None = None
    if getattr(cfg, "model_type", "") == "qwen2_5_vl":
        grids_base = _qwen_grids(inputs, base_items)
        if grids_base:
            full = set(vcfg.fullatt_block_indexes)
            kw = {
                "window_size": int(vcfg.window_size),
                "patch_size": int(vcfg.patch_size),
                "spatial_merge_size": int(vcfg.spatial_merge_size),
            }
            timeline = _grid_timeline(report, grids_base, depth)
            windows_base = [
                None if b in full else qwen2_5_vl_window_groups(grids_base, **kw) for b in range(depth)
            ]
            windows_comp = [
                None if b in full else qwen2_5_vl_window_groups(timeline[b], **kw) for b in range(depth)
            ]
        else:
            exact = False
            how += "; Qwen2.5-VL windows unknown without inputs= (windowed blocks counted as full attention)"
    return {
        "shape": vshape,
        "depth": depth,
        "base": per_block_base,
        "comp": per_block_comp,
        "windows_base": windows_base,
        "windows_comp": windows_comp,
        "exact": exact,
        "note": how,
    }


def _qwen_grids(inputs: Mapping[str, Any] | None, base_items: list[list[int]]) -> list[tuple[int, int, int]]:
    if inputs is None:
        return []
    out: list[tuple[int, int, int]] = []
    for key in ("image_grid_thw", "video_grid_thw"):
        grid = inputs.get(key)
        if grid is not None:
            out += [(int(t), int(h), int(w)) for t, h, w in grid.tolist()]
    return out if len(out) == len(base_items) else []


def _grid_timeline(report: Report, grids: list[tuple[int, int, int]], depth: int) -> list[list[tuple]]:
    """The (t, h, w) patch grid of every item at the input of every block, from the encoder events."""
    changes: dict[int, dict[int, tuple[int, int, int]]] = {}
    offset, last_layer = 0, -1
    for e in report.vision_events:
        if e.get("site") != "encoder":
            continue
        if e["layer"] <= last_layer:  # a new tower call (images, then videos)
            offset += len(e["tokens_out"])
        last_layer = e["layer"]
        for k, g in enumerate(e.get("grids", [])):
            changes.setdefault(e["layer"], {})[offset + k] = tuple(int(x) for x in g)
    current = list(grids)
    out = []
    for b in range(depth):
        for k, g in changes.get(b, {}).items():
            if k < len(current):
                current[k] = g
        out.append(list(current))
    return out


def flops_breakdown(
    model: torch.nn.Module, report: Report, *, inputs: Mapping[str, Any] | None = None, causal: bool = False
) -> dict[str, Any]:
    """The FLOPs of the run a `Report` describes, next to the uncompressed baseline.

    * **LLM prefill**, per decoder layer, from the tokens each layer actually processed
      (``report.text_tokens[b] + report.visual_tokens[layer][b]``, summed over samples; padding excluded),
      with the components of `tokcomp.flops.layer_flops` and ``attention`` = q/k/v + both attention
      products + output projection, separate from ``mlp``. The baseline keeps every visual token
      (``report.baseline_visual``) at every layer.
    * **Vision encoder**, per block, with the tokens the block ran on: ``report.encoder_tokens`` from the
      first encoder stage on, the original tokens before it (attention per frame / tile / Qwen2.5-VL
      window, see `tokcomp.flops.vision_flops`). The original grids come from ``inputs``
      (``image_grid_thw``, ``pixel_values``) when given; for Qwen2-VL without inputs they are read from
      the encoder events' provenance, or else each sample's visual tokens are taken as one image (then
      ``vision["exact"]`` is False).
    * The strategies' own cost is not a FLOPs count: it is ``report.overhead_s``, measured wall time.

    Args:
        model: The model the report comes from (its config gives the shapes).
        report: ``run.report()`` of the run.
        inputs: The processor outputs the run used (optional; makes the vision counts exact).
        causal: Count only causally visible attention pairs in the LLM (see `tokcomp.flops.layer_flops`).

    Returns:
        A JSON-ready dict: ``llm`` and ``vision`` (each ``compressed``, ``baseline`` — StackFlops-like dicts
        with per-layer ``layers`` — ``ratio`` and ``ideal_speedup``; ``vision`` is None without a vision
        tower), ``total`` (``compressed``, ``baseline``, ``ratio``, ``ideal_speedup`` of vision + LLM),
        ``tokens`` (what was counted), ``overhead_s`` and ``notes``.

    Examples:
        >>> import tokcomp as tc
        >>> from tokcomp import testing
        >>> model = testing.tiny_model("qwen2_vl")
        >>> inputs = testing.tiny_inputs("qwen2_vl")
        >>> with tc.compress(model, tc.Schedule.preset("spu")) as run:
        ...     _ = model(**inputs)
        >>> fb = flops_breakdown(model, run.report(), inputs=inputs)
        >>> llm = fb["llm"]
        >>> llm["ideal_speedup"] > 1.0
        True
    """
    from ..flops import model_shapes

    llm_shape, _, _, _ = model_shapes(model.config)
    depth = report.num_layers
    comp_stacks, base_stacks = [], []
    comp_tokens, base_tokens = [], []
    for b in range(report.batch):
        counts = report.tokens_per_layer(b)
        base = [report.text_tokens[b] + report.baseline_visual[b]] * depth
        comp_tokens.append(counts)
        base_tokens.append(base)
        comp_stacks.append(llm_prefill_flops(llm_shape, counts, causal=causal))
        base_stacks.append(llm_prefill_flops(llm_shape, base, causal=causal))
    llm_c = _sum_stacks(comp_stacks, depth)
    llm_b = _sum_stacks(base_stacks, depth)
    notes = ["2 FLOPs per multiply-accumulate; matrix products only (docs: FLOPs accounting)"]
    out: dict[str, Any] = {
        "llm": {
            "compressed": _with_attention(llm_c),
            "baseline": _with_attention(llm_b),
            "ratio": llm_c["total"] / llm_b["total"] if llm_b["total"] else 1.0,
            "ideal_speedup": llm_b["total"] / llm_c["total"] if llm_c["total"] else math.inf,
            "causal": causal,
        },
        "vision": None,
        "tokens": {"llm": comp_tokens, "llm_baseline": base_tokens},
        "overhead_s": float(report.overhead_s),
    }
    plan = _vision_plan(model, report, inputs)
    vis_c = vis_b = 0
    if plan is not None and plan["base"] is not None:
        shape: LayerShape = plan["shape"]
        vc = vision_flops(shape, plan["comp"], windows=plan.get("windows_comp"))
        vb = vision_flops(shape, plan["base"], windows=plan.get("windows_base"))
        vis_c, vis_b = vc["total"], vb["total"]
        out["vision"] = {
            "compressed": _with_attention(vc),
            "baseline": _with_attention(vb),
            "ratio": vis_c / vis_b if vis_b else 1.0,
            "ideal_speedup": vis_b / vis_c if vis_c else math.inf,
            "exact": bool(plan["exact"]),
        }
        out["tokens"]["vision"] = [sum(g) for g in plan["comp"]]
        out["tokens"]["vision_baseline"] = [sum(g) for g in plan["base"]]
        notes.append("vision: " + plan["note"])
    elif plan is not None:
        notes.append("vision: " + plan["note"])
    tot_c, tot_b = llm_c["total"] + vis_c, llm_b["total"] + vis_b
    out["total"] = {
        "compressed": tot_c,
        "baseline": tot_b,
        "ratio": tot_c / tot_b if tot_b else 1.0,
        "ideal_speedup": tot_b / tot_c if tot_c else math.inf,
    }
    notes.append("not counted: patch embedding, projector/merger, norms, RoPE, softmax, LM head")
    out["notes"] = notes
    return out
