"""Measurement: FLOPs of a run, and a benchmark of schedules against the uncompressed model.

Two parts:

* `flops_breakdown` turns a `tokcomp.Report` into FLOPs: the vision encoder with the tokens each block
  actually ran on, the LLM prefill per layer (attention and MLP separated) with the token counts the run
  had, the uncompressed baseline next to it, and the strategies' own measured overhead.
* `run_bench` runs the uncompressed model and one or more schedules on the same inputs, in one process,
  in interleaved repetitions (uncompressed, schedule 1, schedule 2, ..., uncompressed, ...), and reports
  medians and spreads of what was measured, next to what the FLOPs promise. ``tokcomp bench`` is its
  command line.

What each measured number is (every repetition is one ``generate()`` call):

* ``prefill_s``: the vision tower plus the first forward of ``generate()`` over the whole prompt (the
  prefill), timed with forward hooks; ``vision_s`` and ``llm_s`` are the vision tower and the language
  model (its decoder layers, with tokcomp's own hooks and strategies inside) alone.
* ``ttft_s``: from the ``generate()`` call to the first token's logits (everything: input preparation,
  vision, prefill).
* ``decode_tokens_per_s``: ``(N − 1)`` tokens over the time between the first and the N-th token's logits.
* ``peak_memory_bytes``: on CPU, the growth of the process's peak resident set (Linux ``VmHWM``, reset
  through ``/proc/self/clear_refs`` after ``gc.collect()`` and ``malloc_trim``) from the start of
  ``generate()`` to the end of the prefill: the activations, caches and temporaries of vision + prefill,
  not the weights. On CUDA, ``torch.cuda.max_memory_allocated`` over the same span. ``None`` where neither
  is available. ``llm_peak_memory_bytes``: the same from the language model's input to the end of the
  prefill (memory in use at that point as the base). Measured in the warm-up run only: handing freed
  memory back to the OS makes the next allocations page-fault, which would slow the timed rounds (by ~15%
  at 1k tokens on a CPU). During that run glibc's mmap threshold is lowered to 64 KiB, so that freed
  tensors leave the resident set at once and the peak follows the live tensors, not the heap's history;
  the timed runs use glibc's dynamic maximum, 32 MiB.
* ``kv_cache_bytes``: sum over layers of the key and value tensors in the ``DynamicCache`` right after the
  prefill.
* fidelity: KL divergence ``KL(p_uncompressed || p_compressed)`` of the next-token distributions at the
  first generated position (nats, mean over samples), and the fraction of the N greedy tokens equal to
  the uncompressed model's, position by position.

Speed-ups are ratios of medians (uncompressed median / compressed median; for decode rates the other way
round). The FLOPs-ideal speed-ups come from `flops_breakdown`.

Examples:
    >>> import tokcomp as tc
    >>> from tokcomp import testing
    >>> from tokcomp.bench import run_bench
    >>> model = testing.tiny_model("qwen2_vl")
    >>> inputs = testing.tiny_inputs("qwen2_vl", [[testing.make_image(224, 168)]])
    >>> res = run_bench(model, inputs, {"spu": tc.Schedule.preset("spu")}, repeats=1, new_tokens=2,
    ...                 progress=False)
    >>> sorted(res.schedules)
    ['spu']
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ScheduleError, UsageError
from .flops import (
    COMPONENTS,
    LayerShape,
    StackFlops,
    llm_prefill_flops,
    qwen2_5_vl_window_groups,
    vision_flops,
)
from .params import suggest
from .report import Report
from .schedule import Schedule

__all__ = [
    "BenchResult",
    "ScheduleResult",
    "Spread",
    "add_arguments",
    "build_model_and_inputs",
    "cli",
    "flops_breakdown",
    "load_schedule",
    "machine_info",
    "plot_speedups",
    "run_bench",
]


# ---------------------------------------------------------------------------------------------------------
# FLOPs of a report
# ---------------------------------------------------------------------------------------------------------
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
    from .flops import model_shapes

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
    from .flops import model_shapes

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


# ---------------------------------------------------------------------------------------------------------
# Statistics and machine
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Spread:
    """Median and spread of repeated measurements.

    Attributes:
        median: The median.
        q1: First quartile (inclusive method; the median for one value).
        q3: Third quartile.
        min: Smallest value.
        max: Largest value.
        values: Every measurement, in the order taken.
    """

    median: float
    q1: float
    q3: float
    min: float
    max: float
    values: list[float]

    @classmethod
    def of(cls, values: list[float]) -> Spread:
        """The spread of ``values`` (at least one)."""
        vals = [float(v) for v in values]
        if not vals:
            raise ValueError("no measurements")
        if len(vals) > 1:
            q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
        else:
            q1 = q3 = vals[0]
        return cls(statistics.median(vals), q1, q3, min(vals), max(vals), vals)

    def __str__(self) -> str:
        return f"{self.median:.4g} [{self.min:.3g}–{self.max:.3g}]"


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What the measurements ran on: CPU model, cores, threads, memory, library versions, load."""
    import transformers

    cpu = platform.processor() or platform.machine()
    flags: list[str] = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = [
                    f
                    for f in line.split(":", 1)[1].split()
                    if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
                ]
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_flags": flags,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": mem,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "device": device,
    }
    with contextlib.suppress(OSError):
        info["load_average"] = list(os.getloadavg())
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _mmap_threshold(nbytes: int) -> None:
    """glibc's threshold above which an allocation gets its own mapping (returned to the OS when freed)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, nbytes)


def _proc_status(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


class _Memory:
    """Peak memory growth over a span: Linux VmHWM on CPU, the CUDA allocator's peak on CUDA.

    `start` opens the span (the whole prefill); `checkpoint` (at the language model's input) closes the
    vision part and opens the LLM part, so `llm_peak` is the LLM prefill's own growth and `peak` the larger
    of both parts, each over the memory in use when the span began.
    """

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.base: int | None = None
        self.base_llm: int | None = None
        self.before_llm: int | None = None
        self.ok = self.cuda or _proc_status("VmHWM") is not None
        self.active = False

    def _reset(self) -> int | None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return int(torch.cuda.memory_allocated())
        _malloc_trim()
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            self.ok = False
        return _proc_status("VmRSS")

    def _high(self) -> int | None:
        if self.cuda:
            return int(torch.cuda.max_memory_allocated())
        return _proc_status("VmHWM")

    def start(self) -> None:
        self.active = True
        self.base_llm = self.before_llm = None
        if not self.cuda:
            # Every tensor above 64 KiB gets its own mapping and goes back to the OS when freed, so the RSS
            # peak follows the live tensors rather than the heap's history (freed blocks of earlier layers
            # that later allocations of other sizes cannot reuse).
            _mmap_threshold(64 * 1024)
        self.base = self._reset()

    def stop(self) -> None:
        """End a measured span: back to glibc's dynamic maximum threshold (32 MiB) for timed runs."""
        if self.active and not self.cuda:
            _mmap_threshold(32 * 1024 * 1024)
            _malloc_trim()
        self.active = False

    def checkpoint(self) -> None:
        if not (self.active and self.ok) or self.base_llm is not None:
            return
        self.before_llm = self._high()
        self.base_llm = self._reset()

    def peak(self) -> int | None:
        if not self.ok or self.base is None or not self.active:
            return None
        high = max(x for x in (self._high(), self.before_llm) if x is not None)
        return max(0, high - self.base)

    def llm_peak(self) -> int | None:
        high = self._high()
        if not self.ok or self.base_llm is None or not self.active or high is None:
            return None
        return max(0, high - self.base_llm)


def _cache_bytes(cache: Any) -> tuple[int, list[int]]:
    total, lengths = 0, []
    layers = getattr(cache, "layers", None)
    if layers is not None:
        pairs = [(getattr(la, "keys", None), getattr(la, "values", None)) for la in layers]
    else:  # older caches
        pairs = list(zip(getattr(cache, "key_cache", []), getattr(cache, "value_cache", [])))
    for k, v in pairs:
        for t in (k, v):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        lengths.append(int(k.shape[-2]) if isinstance(k, torch.Tensor) and k.dim() >= 2 else 0)
    return total, lengths


# ---------------------------------------------------------------------------------------------------------
# Timing hooks
# ---------------------------------------------------------------------------------------------------------
class _Probe:
    """Forward hooks that time the vision tower, the language model and the first forward of a generate()."""

    def __init__(self, model: torch.nn.Module, memory: _Memory, sync: bool) -> None:
        self.model = model
        self.memory = memory
        self.sync = sync
        self.handles: list[Any] = []
        self.reset()

    def reset(self) -> None:
        self.forwards: list[tuple[float, float]] = []
        self.vision: list[tuple[float, float]] = []
        self.llm: list[tuple[float, float]] = []
        self.cache_bytes: int | None = None
        self.cache_lengths: list[int] = []
        self.peak: int | None = None
        self.llm_peak: int | None = None
        self.token_times: list[float] = []
        self._open: dict[str, float] = {}

    def _now(self) -> float:
        if self.sync:
            torch.cuda.synchronize()
        return time.perf_counter()

    def install(self) -> None:
        lm = None
        with contextlib.suppress(Exception):
            from .runtime import find_adapter

            lm = find_adapter(self.model).language_model
        vis = _vision_module(self.model)
        for name, mod in (("forwards", self.model), ("llm", lm), ("vision", vis)):
            if mod is None:
                continue
            self.handles.append(mod.register_forward_pre_hook(self._pre(name)))
            self.handles.append(mod.register_forward_hook(self._post(name)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _pre(self, name: str) -> Any:
        def hook(module: torch.nn.Module, args: Any) -> None:
            if name == "llm" and not self.llm:
                self.memory.checkpoint()
            self._open[name] = self._now()

        return hook

    def _post(self, name: str) -> Any:
        def hook(module: torch.nn.Module, args: Any, out: Any) -> None:
            start = self._open.pop(name, None)
            if start is None:
                return
            getattr(self, name).append((start, self._now()))  # reset() replaces the lists
            if name == "llm" and len(self.llm) == 1:
                self.llm_peak = self.memory.llm_peak()
            if name == "forwards" and len(self.forwards) == 1:
                self.peak = self.memory.peak()
                cache = getattr(out, "past_key_values", None)
                if cache is not None:
                    self.cache_bytes, self.cache_lengths = _cache_bytes(cache)

        return hook

    def logits_processor(self) -> Any:
        from transformers import LogitsProcessor

        probe = self

        class _Stamp(LogitsProcessor):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
                probe.token_times.append(probe._now())
                return scores

        return _Stamp()

    def prefill_parts(self) -> tuple[float, float | None, float | None]:
        """(prefill, vision, llm) seconds of the first forward (vision before it counted in)."""
        if not self.forwards:
            raise RuntimeError("the model's forward never ran")
        f0, f1 = self.forwards[0]
        vis_before = sum(b - a for a, b in self.vision if b <= f0)
        vis_inside = sum(b - a for a, b in self.vision if a >= f0 and b <= f1)
        llm = [b - a for a, b in self.llm if a >= f0 and b <= f1]
        vision = vis_before + vis_inside if self.vision else None
        return (f1 - f0) + vis_before, vision, (llm[0] if llm else None)


# ---------------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------------
@dataclass
class ScheduleResult:
    """Everything measured for one schedule (or for the uncompressed model).

    Attributes:
        name: The schedule's name in the benchmark (``"uncompressed"`` for the baseline).
        schedule: How it was built (preset name and resolved stages).
        prefill_s: Vision tower + first forward over the prompt, seconds.
        vision_s: The vision tower alone (None without one).
        llm_s: The language model alone during the prefill.
        ttft_s: ``generate()`` call to the first token's logits.
        decode_tokens_per_s: Tokens per second after the first.
        peak_memory_bytes: Peak memory growth from ``generate()`` start to the end of the prefill, measured
            in the warm-up run (see the module docstring); None where it cannot be measured.
        llm_peak_memory_bytes: The same for the language model's prefill alone (from its input on), the
            part visual-token compression in the LLM changes.
        overhead_s: The strategies' own time during the prefill (``report.overhead_s``).
        kv_cache_bytes: Key + value bytes in the cache after the prefill.
        kv_cache_lengths: Cached sequence length per layer after the prefill.
        visual_tokens: ``[layer][sample]`` visual tokens entering each LLM layer.
        encoder_tokens: ``{block: [item]}`` tokens entering each vision block from the first encoder stage.
        retained_fraction: Visual tokens over all layers and samples relative to none removed.
        flops: `flops_breakdown` of the run.
        speedup: Measured speed-ups against the uncompressed model (ratios of medians): ``prefill``,
            ``llm``, ``vision``, ``ttft``, ``decode``.
        speedup_best: The same as ratios of the fastest runs (best-of-N), the steadier estimate on a
            machine shared with other work.
        ideal_speedup: FLOPs-ideal speed-ups: ``llm``, ``vision``, ``prefill`` (vision + LLM).
        efficiency: Measured over ideal speed-up for ``llm`` and ``prefill``.
        overhead_fraction: Median overhead over the median prefill (and over the median LLM time).
        fidelity: ``kl_first_token`` (nats), ``greedy_agreement`` (0–1), and the greedy ``tokens``.
        error: Why the schedule did not run (then the measurements are empty).
    """

    name: str
    schedule: dict[str, Any]
    prefill_s: Spread | None = None
    vision_s: Spread | None = None
    llm_s: Spread | None = None
    ttft_s: Spread | None = None
    decode_tokens_per_s: Spread | None = None
    peak_memory_bytes: Spread | None = None
    llm_peak_memory_bytes: Spread | None = None
    overhead_s: Spread | None = None
    kv_cache_bytes: int = 0
    kv_cache_lengths: list[int] = field(default_factory=list)
    visual_tokens: list[list[int]] = field(default_factory=list)
    encoder_tokens: dict[int, list[int]] = field(default_factory=dict)
    retained_fraction: float = 1.0
    flops: dict[str, Any] = field(default_factory=dict)
    speedup: dict[str, float | None] = field(default_factory=dict)
    speedup_best: dict[str, float | None] = field(default_factory=dict)
    ideal_speedup: dict[str, float | None] = field(default_factory=dict)
    efficiency: dict[str, float | None] = field(default_factory=dict)
    overhead_fraction: dict[str, float | None] = field(default_factory=dict)
    fidelity: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        d = asdict(self)
        d["encoder_tokens"] = {str(k): v for k, v in self.encoder_tokens.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ScheduleResult:
        """The inverse of `to_dict` (e.g. from a saved JSON)."""
        kw = dict(d)
        for key in (
            "prefill_s",
            "vision_s",
            "llm_s",
            "ttft_s",
            "decode_tokens_per_s",
            "peak_memory_bytes",
            "llm_peak_memory_bytes",
            "overhead_s",
        ):
            if kw.get(key) is not None:
                kw[key] = Spread(**kw[key])
        kw["encoder_tokens"] = {int(k): v for k, v in (kw.get("encoder_tokens") or {}).items()}
        return cls(**kw)


@dataclass
class BenchResult:
    """A benchmark: the uncompressed model and each schedule, on the same inputs, in one process.

    Attributes:
        model: What was measured (class, shape description, reductions).
        inputs: The inputs (batch, sequence length, visual tokens, image size).
        dtype: Parameter dtype.
        device: ``"cpu"`` or a CUDA device.
        repeats: Timed repetitions per schedule (after one warm-up each).
        new_tokens: Tokens generated per repetition.
        machine: `machine_info` at the start.
        baseline: The uncompressed model.
        schedules: Each schedule, by name.
        wall_s: Wall time of the whole benchmark.
        notes: What a reader must know (reduced depth, measurement definitions).
    """

    model: dict[str, Any]
    inputs: dict[str, Any]
    dtype: str
    device: str
    repeats: int
    new_tokens: int
    machine: dict[str, Any]
    baseline: ScheduleResult
    schedules: dict[str, ScheduleResult]
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``json.dumps`` works on it)."""
        return {
            "model": self.model,
            "inputs": self.inputs,
            "dtype": self.dtype,
            "device": self.device,
            "repeats": self.repeats,
            "new_tokens": self.new_tokens,
            "machine": self.machine,
            "baseline": self.baseline.to_dict(),
            "schedules": {k: v.to_dict() for k, v in self.schedules.items()},
            "wall_s": self.wall_s,
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BenchResult:
        """The inverse of `to_dict`."""
        kw = dict(d)
        kw["baseline"] = ScheduleResult.from_dict(d["baseline"])
        kw["schedules"] = {k: ScheduleResult.from_dict(v) for k, v in d["schedules"].items()}
        return cls(**kw)

    @classmethod
    def load_json(cls, path: str | Path) -> BenchResult:
        """A result written by `save_json`."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def save_json(self, path: str | Path) -> None:
        """Write `to_dict` as JSON."""
        Path(path).write_text(json.dumps(_finite(self.to_dict()), indent=1) + "\n")

    def rows(self) -> list[ScheduleResult]:
        """The baseline, then every schedule."""
        return [self.baseline, *self.schedules.values()]

    def table(self) -> Any:
        """A `rich.table.Table` of the medians, spreads and speed-ups."""
        from rich.table import Table

        t = Table(title=f"tokcomp bench: {self.model.get('description', self.model.get('class'))}")
        for col in (
            "schedule",
            "vis. tokens kept",
            "prefill s",
            "LLM s",
            "LLM speed-up (ideal)",
            "prefill speed-up (ideal)",
            "TTFT s",
            "decode tok/s",
            "peak MiB (LLM)",
            "KV MiB",
            "overhead",
            "KL",
            "agree",
        ):
            t.add_column(col, justify="left" if col == "schedule" else "right")
        for r in self.rows():
            if r.error:
                t.add_row(r.name, "[red]error[/red]", *[""] * 11)
                continue
            t.add_row(
                r.name,
                f"{r.retained_fraction:.3f}",
                _fmt_spread(r.prefill_s),
                _fmt_spread(r.llm_s),
                _fmt_pair(r.speedup.get("llm"), r.ideal_speedup.get("llm")),
                _fmt_pair(r.speedup.get("prefill"), r.ideal_speedup.get("prefill")),
                _fmt_spread(r.ttft_s),
                _fmt_spread(r.decode_tokens_per_s, "{:.1f}"),
                _fmt_peaks(r),
                f"{r.kv_cache_bytes / 2**20:.1f}",
                "-"
                if r.overhead_fraction.get("prefill") is None
                else f"{r.overhead_fraction['prefill']:.1%}",
                "-" if r.fidelity.get("kl_first_token") is None else f"{r.fidelity['kl_first_token']:.3g}",
                "-"
                if r.fidelity.get("greedy_agreement") is None
                else f"{r.fidelity['greedy_agreement']:.0%}",
            )
        return t


def _fmt_peaks(r: ScheduleResult) -> str:
    """``whole (LLM)`` peak memory growth in MiB."""

    def mib(sp: Spread | None) -> str:
        return "-" if sp is None else f"{sp.median / 2**20:.0f}"

    return f"{mib(r.peak_memory_bytes)} ({mib(r.llm_peak_memory_bytes)})"


def _fmt_spread(s: Spread | None, fmt: str = "{:.3g}") -> str:
    if s is None:
        return "-"
    return f"{fmt.format(s.median)} [{fmt.format(s.min)}–{fmt.format(s.max)}]"


def _fmt_pair(measured: float | None, ideal: float | None) -> str:
    m = "-" if measured is None else f"{measured:.2f}×"
    i = "-" if ideal is None else f"{ideal:.2f}×"
    return f"{m} ({i})"


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------
def load_schedule(spec: Any) -> Schedule:
    """A schedule from a spec: anything `Schedule.coerce` takes (a `Schedule`, a `Stage`, a list of stages or
    stage dicts, a preset name), a JSON or YAML file (`Schedule.from_file`), or ``"package.module:attr"``
    naming a Schedule or a function returning one.

    Raises:
        ScheduleError: The spec names no preset, file or importable object, or what it names is refused
            (a `ValueError`, as before).
    """
    if not isinstance(spec, str):
        return Schedule.coerce(spec)
    from . import registry

    if spec in registry.presets():
        return Schedule.preset(spec)
    path = Path(spec)
    if path.suffix.lower() in (".json", ".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise ScheduleError(f"schedule file {spec} does not exist")
        return Schedule.from_file(path)
    if ":" in spec:
        mod_name, attr = spec.split(":", 1)
        try:
            obj: Any = importlib.import_module(mod_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as exc:
            raise ScheduleError(f"schedule {spec!r}: cannot import it: {type(exc).__name__}: {exc}") from None
        if callable(obj) and not isinstance(obj, Schedule):
            obj = obj()
        return load_schedule(obj)
    raise ScheduleError(
        f"unknown schedule {spec!r}{suggest(spec, registry.presets())}: use a preset name ({', '.join(sorted(registry.presets()))}), a JSON or "
        "YAML file, or 'module:attr'"
    )


def _describe(schedule: Schedule, model: torch.nn.Module) -> dict[str, Any]:
    from .runtime import find_adapter

    adapter = find_adapter(model)
    stages = schedule.resolve(adapter)
    out: dict[str, Any] = {"preset": getattr(schedule, "name", None), "stages": []}
    for s in stages:
        layers = list(s.layers)
        span = f"{layers[0]}..{layers[-1]}" if len(layers) > 2 else ",".join(map(str, layers))
        out["stages"].append(
            {
                "label": s.label,
                "site": s.site,
                "layers": layers,
                "params": _jsonable(s.strategy.params()),
                "text": f"{s.label}[{span}]",
            }
        )
    out["text"] = " + ".join(st["text"] for st in out["stages"]) or "(none)"
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    return repr(v)


# ---------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------
@dataclass
class _Rep:
    prefill: float
    vision: float | None
    llm: float | None
    ttft: float
    decode: float | None
    peak: int | None
    llm_peak: int | None
    overhead: float
    cache_bytes: int | None
    cache_lengths: list[int]


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    lp = torch.log_softmax(p_logits.float(), -1)
    lq = torch.log_softmax(q_logits.float(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


class _Runner:
    def __init__(
        self, model: torch.nn.Module, inputs: Mapping[str, Any], new_tokens: int, device: str
    ) -> None:
        self.model = model
        self.inputs = dict(inputs)
        self.new_tokens = new_tokens
        self.memory = _Memory(device)
        self.probe = _Probe(model, self.memory, sync=device.startswith("cuda") and torch.cuda.is_available())
        self.prompt_len = int(self.inputs["input_ids"].shape[1])

    def generate(self, schedule: Schedule | None, *, memory: bool = False) -> tuple[_Rep, Any, Report | None]:
        """One generate() call; ``memory``: measure peak memory (returns freed memory to the OS first,
        which costs page faults afterwards, so timed rounds do not)."""
        import tokcomp as tc

        probe = self.probe
        probe.reset()
        gen = {
            "max_new_tokens": self.new_tokens,
            "min_new_tokens": self.new_tokens,
            "do_sample": False,
            "return_dict_in_generate": True,
            "output_logits": True,
            "logits_processor": [probe.logits_processor()],
        }
        report = None
        overhead = 0.0
        ctx = tc.compress(self.model, schedule) if schedule is not None else contextlib.nullcontext()
        if memory:
            self.memory.start()
        with torch.no_grad(), ctx as run:
            t0 = probe._now()
            out = self.model.generate(**self.inputs, **gen)
            if run is not None:
                report = run.report()
                overhead = report.overhead_s
        prefill, vision, llm = probe.prefill_parts()
        times = probe.token_times
        decode = None
        if len(times) >= 2 and times[-1] > times[0]:
            decode = (len(times) - 1) / (times[-1] - times[0])
        rep = _Rep(
            prefill,
            vision,
            llm,
            times[0] - t0,
            decode,
            probe.peak,
            probe.llm_peak,
            overhead,
            probe.cache_bytes,
            list(probe.cache_lengths),
        )
        self.memory.stop()
        return rep, out, report


def _ratio(num: Spread | None, den: Spread | None, stat: str = "median") -> float | None:
    if num is None or den is None or getattr(den, stat) <= 0:
        return None
    return float(getattr(num, stat) / getattr(den, stat))


def _spread(vals: list[Any]) -> Spread | None:
    vals = [v for v in vals if v is not None]
    return Spread.of(vals) if vals else None


def run_bench(
    model: torch.nn.Module,
    inputs: Mapping[str, Any],
    schedules: Mapping[str, Any],
    repeats: int = 3,
    new_tokens: int = 8,
    *,
    progress: bool = True,
    device: str | None = None,
    model_info: Mapping[str, Any] | None = None,
    inputs_info: Mapping[str, Any] | None = None,
) -> BenchResult:
    """Benchmark ``schedules`` against the uncompressed model on the same inputs, in one process.

    One warm-up ``generate()`` per schedule (untimed: it also gives the token counts, the FLOPs and the
    fidelity numbers), then ``repeats`` rounds in which the uncompressed model and every schedule run in
    turn (uncompressed, schedule 1, ..., uncompressed, schedule 1, ...), so slow drifts of the machine
    hit all of them alike. Each run is one ``generate(max_new_tokens=new_tokens)``; what is measured in it
    is described in the module docstring.

    Args:
        model: A model tokcomp supports, on its device and dtype.
        inputs: Processor outputs (``input_ids``, pixels, ...) on the same device.
        schedules: Name → schedule (a `Schedule`, a list of `Stage`, or anything `load_schedule` takes).
            A schedule that fails validation is recorded with its ``error`` and skipped.
        repeats: Timed rounds (>= 1).
        new_tokens: Tokens to generate per run (>= 2 to measure decoding).
        progress: Show a progress bar (tqdm, on stderr).
        device: Where the model is (default: the device of its first parameter).
        model_info: Extra description of the model for the result (e.g. the shape and reductions).
        inputs_info: Extra description of the inputs.

    Returns:
        A `BenchResult`.
    """
    import tokcomp as tc

    if repeats < 1:
        raise UsageError("repeats must be >= 1")
    if new_tokens < 1:
        raise UsageError("new_tokens must be >= 1")
    t_start = time.perf_counter()
    dev = device or str(next(model.parameters()).device)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    machine = machine_info(dev)
    runner = _Runner(model, inputs, new_tokens, dev)
    loaded: dict[str, Schedule] = {}
    results: dict[str, ScheduleResult] = {}
    for name, spec in schedules.items():
        try:
            sched = load_schedule(spec)
            desc = _describe(sched, model)
            tc.compress(model, sched)  # validates
            loaded[name] = sched
            results[name] = ScheduleResult(name, desc)
        except Exception as exc:  # noqa: BLE001 - any failure is reported, the others still run
            results[name] = ScheduleResult(name, {"text": str(spec)}, error=f"{type(exc).__name__}: {exc}")
    baseline = ScheduleResult("uncompressed", {"preset": None, "stages": [], "text": "(none)"})
    order: list[tuple[str, Schedule | None]] = [("uncompressed", None), *loaded.items()]
    reps: dict[str, list[_Rep]] = {name: [] for name, _ in order}
    warm: dict[str, tuple[Any, Report | None]] = {}
    peaks: dict[str, tuple[int | None, int | None]] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(order) * (repeats + 1), desc="tokcomp bench", unit="run", leave=False)
    runner.probe.install()
    try:
        for name, sched in order:
            if bar is not None:
                bar.set_postfix_str(f"warm-up {name}")
            # the baseline's warm-up runs under an empty schedule: identical outputs, and a report
            rep, out, report = runner.generate(sched if sched is not None else Schedule([]), memory=True)
            warm[name] = (out, report)
            peaks[name] = (rep.peak, rep.llm_peak)
            if bar is not None:
                bar.update(1)
        for r in range(repeats):
            for name, sched in order:
                if bar is not None:
                    bar.set_postfix_str(f"round {r + 1}/{repeats} {name}")
                rep, _, _ = runner.generate(sched)
                reps[name].append(rep)
                if bar is not None:
                    bar.update(1)
    finally:
        runner.probe.remove()
        if bar is not None:
            bar.close()
    base_out, base_report = warm["uncompressed"]
    for name, _ in order:
        res = baseline if name == "uncompressed" else results[name]
        rs = reps[name]
        res.prefill_s = _spread([x.prefill for x in rs])
        res.vision_s = _spread([x.vision for x in rs])
        res.llm_s = _spread([x.llm for x in rs])
        res.ttft_s = _spread([x.ttft for x in rs])
        res.decode_tokens_per_s = _spread([x.decode for x in rs])
        res.peak_memory_bytes = _spread([peaks[name][0]])
        res.llm_peak_memory_bytes = _spread([peaks[name][1]])
        res.overhead_s = _spread([x.overhead for x in rs])
        res.kv_cache_bytes = int(rs[-1].cache_bytes or 0)
        res.kv_cache_lengths = rs[-1].cache_lengths
        out, report = warm[name]
        assert report is not None
        res.visual_tokens = [list(x) for x in report.visual_tokens]
        res.encoder_tokens = dict(report.encoder_tokens)
        res.retained_fraction = report.retained_fraction()
        res.flops = flops_breakdown(model, report, inputs=inputs)
        tokens = out.sequences[:, runner.prompt_len :]
        base_tokens = base_out.sequences[:, runner.prompt_len :]
        res.fidelity = {
            "kl_first_token": _kl(base_out.logits[0], out.logits[0]),
            "greedy_agreement": float((tokens == base_tokens).float().mean()),
            "tokens": tokens.tolist(),
        }
    for res in [baseline, *[results[n] for n in loaded]]:
        fl = res.flops
        res.speedup = {
            "prefill": _ratio(baseline.prefill_s, res.prefill_s),
            "llm": _ratio(baseline.llm_s, res.llm_s),
            "vision": _ratio(baseline.vision_s, res.vision_s),
            "ttft": _ratio(baseline.ttft_s, res.ttft_s),
            "decode": _ratio(res.decode_tokens_per_s, baseline.decode_tokens_per_s),
        }
        res.speedup_best = {
            "prefill": _ratio(baseline.prefill_s, res.prefill_s, "min"),
            "llm": _ratio(baseline.llm_s, res.llm_s, "min"),
            "vision": _ratio(baseline.vision_s, res.vision_s, "min"),
            "ttft": _ratio(baseline.ttft_s, res.ttft_s, "min"),
            "decode": _ratio(res.decode_tokens_per_s, baseline.decode_tokens_per_s, "max"),
        }
        ideal_vision = fl["vision"]["ideal_speedup"] if fl.get("vision") else None
        res.ideal_speedup = {
            "llm": fl["llm"]["ideal_speedup"],
            "vision": ideal_vision,
            "prefill": fl["total"]["ideal_speedup"],
        }
        res.efficiency = {
            k: (res.speedup[k] / res.ideal_speedup[k])  # type: ignore[operator]
            if res.speedup.get(k) and res.ideal_speedup.get(k)
            else None
            for k in ("llm", "prefill")
        }
        res.overhead_fraction = {
            "prefill": _ratio(res.overhead_s, res.prefill_s),
            "llm": _ratio(res.overhead_s, res.llm_s),
        }
    info = {"class": type(model).__name__, **(model_info or {})}
    info.setdefault("description", info["class"])
    inp = {
        "batch": int(inputs["input_ids"].shape[0]),
        "sequence_length": runner.prompt_len,
        "visual_tokens": list(base_report.baseline_visual) if base_report else None,
        "text_tokens": list(base_report.text_tokens) if base_report else None,
        **(inputs_info or {}),
    }
    notes = [
        (
            "prefill = vision tower + the first forward of generate() over the prompt (forward hooks); "
            "LLM = the language model alone, tokcomp's hooks included"
        ),
        "speed-ups are ratios of medians over the timed rounds; ideal = FLOPs ratio (tokcomp.flops)",
        (
            "peak memory = growth of peak RSS (VmHWM) from generate() start to the end of the prefill "
            "(warm-up run)"
            if not dev.startswith("cuda")
            else "peak memory = torch.cuda.max_memory_allocated growth"
        ),
    ]
    if not runner.memory.ok:
        notes.append("peak memory could not be measured on this platform")
    return BenchResult(
        model=info,
        inputs=inp,
        dtype=dtype,
        device=dev,
        repeats=repeats,
        new_tokens=new_tokens,
        machine=machine,
        baseline=baseline,
        schedules=results,
        wall_s=time.perf_counter() - t_start,
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------------------
def plot_speedups(
    results: BenchResult | list[BenchResult],
    path: str | Path,
    *,
    title: str | None = None,
    labels: list[str] | None = None,
) -> Any:
    """A PNG of measured speed-up against the retained visual-token fraction, one point per schedule.

    One colour per benchmark (e.g. per model or token count). Filled circles: measured LLM prefill
    speed-up; hollow squares: measured whole-prefill speed-up (vision included); crosses: the FLOPs-ideal
    LLM speed-up of the same run. Points are labelled with the schedule names.

    Args:
        results: One benchmark or several; each adds its schedules.
        path: Where to write the PNG.
        title: Figure title.
        labels: One legend label per benchmark (default: model and visual tokens).

    Returns:
        The matplotlib ``Figure``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    runs = results if isinstance(results, list) else [results]
    fig, ax = plt.subplots(figsize=(8.0, 5.5), dpi=120)
    colors = plt.get_cmap("tab10")
    handles = []
    for k, res in enumerate(runs):
        c = colors(k % 10)
        if labels is not None:
            label = labels[k]
        else:
            short = res.model.get("short", res.model["class"])
            label = f"{short}, {sum(res.inputs.get('visual_tokens') or [0])} visual tokens"
        pts = [r for r in res.schedules.values() if not r.error]
        xs = [r.retained_fraction for r in pts]
        ax.scatter(xs, [r.speedup.get("llm") or math.nan for r in pts], color=c, s=28, zorder=3)
        ax.scatter(
            xs,
            [r.speedup.get("prefill") or math.nan for r in pts],
            facecolors="none",
            edgecolors=c,
            marker="s",
        )
        ax.scatter(xs, [r.ideal_speedup.get("llm") or math.nan for r in pts], color=c, marker="x", alpha=0.8)
        for r, x in zip(pts, xs):
            y = r.speedup.get("llm")
            if y:
                ax.annotate(r.name, (x, y), textcoords="offset points", xytext=(4, 3), fontsize=6.5, color=c)
        handles.append(Line2D([], [], color=c, marker="o", linestyle="", label=label))
    handles += [
        Line2D([], [], color="k", marker="o", linestyle="", label="LLM prefill, measured"),
        Line2D(
            [], [], color="k", marker="s", markerfacecolor="none", linestyle="", label="prefill, measured"
        ),
        Line2D([], [], color="k", marker="x", linestyle="", label="LLM prefill, FLOPs-ideal"),
    ]
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("retained visual-token fraction (over LLM layers)")
    ax.set_ylabel("speed-up over uncompressed (×)")
    ax.set_xlim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=7.5, loc="upper right")
    ax.set_title(title or "tokcomp bench: measured vs FLOPs-ideal speed-up", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    return fig


# ---------------------------------------------------------------------------------------------------------
# Command line: ``tokcomp bench``
# ---------------------------------------------------------------------------------------------------------
_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def add_arguments(p: Any) -> None:
    """The options of ``tokcomp bench`` (an ``argparse`` parser)."""
    p.add_argument(
        "-s",
        "--schedule",
        action="append",
        default=None,
        help="a preset name, a JSON schedule file or 'module:attr' (repeatable; default: luvc on "
        "Qwen models, spu otherwise)",
    )
    p.add_argument(
        "--model",
        default="tiny:qwen2_vl",
        help="tiny:ARCH (tokcomp.testing), a real shape with random weights (qwen2-vl-2b, "
        "qwen2.5-vl-3b, llava-ov-0.5b, internvl2.5-1b), or a local checkpoint folder",
    )
    p.add_argument("--layers", type=int, default=None, help="build only N LLM layers (shapes, tiny models)")
    p.add_argument("--vision-blocks", type=int, default=None, help="build only N vision blocks (shapes)")
    p.add_argument(
        "--visual-tokens",
        type=int,
        default=1024,
        help="visual tokens per sample (shapes and checkpoints: picks the image size)",
    )
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default="bf16", choices=sorted(_DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the full result as JSON")
    p.add_argument("--plot", default=None, metavar="PATH", help="write a PNG of speed-up vs tokens kept")
    p.add_argument("--no-progress", action="store_true")


def build_model_and_inputs(
    spec: str,
    *,
    layers: int | None = None,
    vision_blocks: int | None = None,
    visual_tokens: int = 1024,
    batch: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
) -> tuple[torch.nn.Module, Any, dict[str, Any], dict[str, Any]]:
    """The model and inputs ``tokcomp bench --model SPEC`` measures.

    Args:
        spec: ``"tiny:ARCH"`` (`tokcomp.testing`), a `tokcomp.shapes.SHAPES` name, or a local checkpoint
            folder (loaded with ``from_pretrained``; nothing is downloaded).
        layers: LLM layers to build (tiny models and shapes; default: 8 for tiny, all for shapes).
        vision_blocks: Vision blocks to build (shapes).
        visual_tokens: Visual tokens per sample (shapes and checkpoints).
        batch: Samples.
        dtype: Parameter dtype.
        device: Where to put model and inputs.

    Returns:
        ``(model, inputs, model_info, inputs_info)``.

    Raises:
        ValueError: If the spec is neither a known name nor an existing folder.
    """
    from . import shapes, testing

    if spec.startswith("tiny:") or spec in testing.ARCHITECTURES:
        arch = spec.removeprefix("tiny:")
        n = layers or 8
        model = testing.tiny_model(arch, num_hidden_layers=n, dtype=dtype)
        images = [[testing.make_image(*testing._DEFAULT_SIZES[i % 2], seed=i)] for i in range(batch)]
        inputs = testing.tiny_inputs(arch, images, dtype=dtype)
        minfo = {
            "short": f"tiny {arch}",
            "description": f"tiny {arch} (tokcomp.testing, random weights), {n} LLM layers",
        }
        iinfo: dict[str, Any] = {"images": [list(testing._DEFAULT_SIZES[i % 2]) for i in range(batch)]}
    elif spec in shapes.SHAPES:
        shape = shapes.SHAPES[spec]
        model = shapes.shape_model(spec, layers=layers, vision_blocks=vision_blocks, dtype=dtype)
        inputs, iinfo = shapes.shape_inputs(spec, visual_tokens, batch=batch, dtype=dtype)
        minfo = {
            "short": spec,
            "description": shape.describe(layers, vision_blocks),
            "shape": spec,
            "checkpoint": shape.checkpoint,
            "layers": layers or shape.num_layers,
            "published_layers": shape.num_layers,
            "vision_blocks": vision_blocks or shape.num_vision_blocks,
            "published_vision_blocks": shape.num_vision_blocks,
            "vocabulary": "tokcomp.testing's 256 ids (the vocabulary does not change compression cost)",
        }
    elif Path(spec).is_dir():
        model, inputs, minfo, iinfo = _from_checkpoint(spec, visual_tokens, batch, dtype)
    else:
        raise UsageError(
            f"--model {spec!r}: not tiny:ARCH, not a shape ({', '.join(shapes.SHAPES)}) and not an existing "
            "folder (checkpoints are only loaded from local paths; nothing is downloaded)"
        )
    model = model.to(device)
    inputs = inputs.to(device)
    return model, inputs, minfo, iinfo


def _from_checkpoint(path: str, visual_tokens: int, batch: int, dtype: torch.dtype) -> tuple[Any, ...]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from . import testing

    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype, attn_implementation="sdpa", local_files_only=True
    ).eval()
    side = 28 * max(1, round(math.sqrt(visual_tokens)))  # Qwen: (H/28)·(W/28) tokens; others resize anyway
    images = [testing.make_image(side, side, seed=i) for i in range(batch)]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}
    ]
    try:
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - no chat template: the image token and the question
        text = f"{getattr(processor, 'image_token', '<image>')} Describe the image."
    imgs: Any = [[im] for im in images] if model.config.model_type == "llava_onevision" else images
    inputs = processor(text=[text] * batch, images=imgs, padding=True, return_tensors="pt")
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(dtype)
    minfo = {"short": Path(path).name, "description": f"checkpoint {path}", "checkpoint": path}
    return model, inputs, minfo, {"image_size": [side, side]}


def cli(args: Any) -> int:
    """Run ``tokcomp bench`` with parsed arguments; prints a table, writes ``--json`` / ``--plot``.

    Returns:
        0; 1 when a schedule failed on the model (its error is printed with the table).

    Raises:
        ScheduleError: A ``--schedule`` does not load (checked before the model is built).
    """
    from rich.console import Console

    if args.threads:
        torch.set_num_threads(args.threads)
    for spec in args.schedule or ():
        load_schedule(spec)  # a schedule that does not load stops the command here (exit status 2)
    console = Console(stderr=False)
    model, inputs, minfo, iinfo = build_model_and_inputs(
        args.model,
        layers=args.layers,
        vision_blocks=args.vision_blocks,
        visual_tokens=args.visual_tokens,
        batch=args.batch,
        dtype=_DTYPES[args.dtype],
        device=args.device,
    )
    specs = args.schedule or (
        ["luvc"] if getattr(model.config, "model_type", "").startswith("qwen2") else ["spu"]
    )
    names = [Path(s).stem if Path(s).suffix.lower() in (".json", ".yaml", ".yml") else s for s in specs]
    res = run_bench(
        model,
        inputs,
        dict(zip(names, specs)),
        repeats=args.repeats,
        new_tokens=args.new_tokens,
        progress=not args.no_progress,
        device=args.device,
        model_info=minfo,
        inputs_info=iinfo,
    )
    if not console.is_terminal:
        console = Console(width=200)
    console.print(res.table())
    console.print(f"model: {res.model['description']}")
    console.print(
        f"inputs: batch {res.inputs['batch']}, {res.inputs['sequence_length']} tokens, visual "
        f"{res.inputs['visual_tokens']}; {res.dtype} on {res.device}; {res.repeats} rounds, "
        f"{res.new_tokens} new tokens; wall {res.wall_s:.1f} s"
    )
    for note in res.notes:
        console.print(f"[dim]- {note}[/dim]")
    failed = [r for r in res.schedules.values() if r.error]
    for r in failed:
        console.print(f"[red]{r.name}: {r.error}[/red]")
    if args.json:
        res.save_json(args.json)
        console.print(f"wrote {args.json}")
    if args.plot:
        plot_speedups(res, args.plot)
        console.print(f"wrote {args.plot}")
    return 1 if failed else 0
