"""Run tokcomp's benchmark suite and write ``docs/benchmarks.md``.

    python benchmarks/run.py --threads 1   # the full CPU suite (about 45 min on 2 cores, bf16)
    python benchmarks/run.py --quick    # a few-minute smoke run, written to benchmarks/results/quick.md
    python benchmarks/run.py --device cuda

Each case runs in a fresh process, one `tokcomp.bench.run_bench` call (the same call ``tokcomp bench``
makes); every table row names the ``tokcomp bench`` command that reproduces it. Models are real shapes with
random weights (`tokcomp.shapes`), reduced in depth on CPU; the page says so wherever it applies.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SCHEDULES = ROOT / "benchmarks" / "schedules"

BUDGET = 0.35  # retained visual-token fraction over LLM layers, about what the luvc preset keeps


@dataclass
class Case:
    """One `run_bench` call: a model shape at a depth, a token count, and its schedules."""

    key: str
    section: str
    shape: str
    layers: int | None
    vision_blocks: int | None
    visual_tokens: int
    schedules: dict[str, Any]
    repeats: int = 3
    new_tokens: int = 8
    note: str = ""
    files: dict[str, str] = field(default_factory=dict)  # schedule name -> JSON file for the command line


# Schedules at an equal budget: one shared definition (also used by `tokcomp eval`).
from tokcomp.budgets import budget_schedules

PRESETS = ["luvc", "luvc-video", "luvc-document", "spu", "fastv", "pact", "pact-qwen2-vl", "vtw", "dart", "divprune",
           "cdpruner", "visionzip-qwen", "vscan"]


def cases(quick: bool, device: str) -> list[Case]:
    """The suite. CPU depths are reduced so that it fits in about half an hour on 2 cores."""
    gpu = device.startswith("cuda")
    if quick:
        return [
            Case("quick-target", "targets", "qwen2-vl-2b", 2, 1, 1024, {"luvc": "luvc", "spu": "spu"}, 1, 3),
            Case(
                "quick-equal",
                "equal",
                "qwen2-vl-2b",
                4,
                1,
                1024,
                {
                    "luvc": "luvc",
                    **{
                        k: v
                        for k, v in budget_schedules(4, 1024).items()
                        if k.split("@")[0] in ("spu", "fastv", "oim", "tome")
                    },
                },
                1,
                3,
            ),
            Case("quick-ov", "shapes", "llava-ov-0.5b", 2, 1, 2048, {"spu": "spu", "fastv": "fastv"}, 1, 3),
        ]
    full = None if gpu else 28
    out = [
        Case(
            "target-1k",
            "targets",
            "qwen2-vl-2b",
            full,
            None if gpu else 2,
            1024,
            {"luvc": "luvc", "spu": "spu"},
        ),
        Case(
            "target-2k",
            "targets",
            "qwen2-vl-2b",
            full,
            None if gpu else 2,
            2048,
            {"luvc": "luvc", "spu": "spu"},
        ),
        Case(
            "target-4k",
            "targets",
            "qwen2-vl-2b",
            full,
            None if gpu else 1,
            4096,
            {"luvc": "luvc", "spu": "spu"},
            repeats=3 if gpu else 2,
            note=""
            if gpu
            else "One vision block only: the ViT's global attention over 16k patches costs "
            "10-20 s per block on this CPU.",
        ),
    ]
    if not gpu:  # the reduced towers above are projected to 32 blocks; this one measures it
        out.append(
            Case(
                "target-1k-full-vit",
                "targets",
                "qwen2-vl-2b",
                full,
                None,
                1024,
                {"luvc": "luvc"},
                repeats=2,
                note="The whole model: all 32 ViT blocks and all 28 LLM layers, so the prefill and the "
                "overhead's share of it are measured as the real model runs them (1k tokens keeps it to "
                "minutes on this CPU).",
            )
        )
    eq_layers = None if gpu else 8
    n_eq = 28 if gpu else 8
    out.append(
        Case(
            "equal-2k",
            "equal",
            "qwen2-vl-2b",
            eq_layers,
            None if gpu else 1,
            2048,
            {**{p: p for p in PRESETS}, **budget_schedules(n_eq, 2048)},
        )
    )
    small = None if gpu else 8
    out += [
        Case(
            "qwen25-2k",
            "shapes",
            "qwen2.5-vl-3b",
            small,
            None if gpu else 2,
            2048,
            {"luvc": "luvc", "spu": "spu", "fastv": "fastv", "pact-qwen2-vl": "pact-qwen2-vl"},
            repeats=2,
        ),
    ]
    # Qwen3-VL (DeepStack): luvc at 2k; on CPU 8 LLM layers (DeepStack adds after layers 0-2 are inside) and a
    # tower reduced to the first published DeepStack tap (2B: block 5, 8B: block 8) plus one block
    for shape, blocks in (("qwen3-vl-2b", 6), ("qwen3-vl-8b", 9)):
        out.append(
            Case(
                f"{shape}-2k",
                "shapes",
                shape,
                small,
                None if gpu else blocks,
                2048,
                {"luvc": "luvc"},
                repeats=2,
                note="" if gpu else f"Vision tower reduced to {blocks} blocks: the first DeepStack tap is inside.",
            )
        )
    # LLaVA-OneVision and InternVL: the same schedules at 2k (8 LLM layers, 4 ViT blocks) and 8k (4 and 2)
    llm_presets = {p: p for p in ("luvc", "spu", "fastv", "pact", "vtw")}
    for prefix, shape in (("ov", "llava-ov-0.5b"), ("internvl", "internvl2.5-1b")):
        out += [
            Case(f"{prefix}-2k", "shapes", shape, small, None if gpu else 4, 2048, dict(llm_presets), repeats=2),
            Case(f"{prefix}-8k", "shapes", shape, None if gpu else 4, None if gpu else 2, 8192, dict(llm_presets),
                 repeats=2),
    ]
    return out


def command(case: Case, device: str, dtype: str, threads: int | None = None) -> str:
    """The ``tokcomp bench`` command that measures the same case."""
    parts = ["tokcomp bench", f"--model {case.shape}"]
    if case.layers is not None:
        parts.append(f"--layers {case.layers}")
    if case.vision_blocks is not None:
        parts.append(f"--vision-blocks {case.vision_blocks}")
    parts += [
        f"--visual-tokens {case.visual_tokens}",
        f"--repeats {case.repeats}",
        f"--new-tokens {case.new_tokens}",
        f"--dtype {dtype}",
    ]
    if device != "cpu":
        parts.append(f"--device {device}")
    if threads:
        parts.append(f"--threads {threads}")
    for name, spec in case.schedules.items():
        parts.append(f"-s {case.files.get(name, spec)}")
    return " ".join(parts)


def write_schedule_files(case: Case) -> None:
    """Custom schedules as JSON files (``tokcomp bench -s FILE`` loads them; the file stem is the name)."""
    import tokcomp as tc

    for name, spec in case.schedules.items():
        if isinstance(spec, tc.Schedule):
            SCHEDULES.mkdir(parents=True, exist_ok=True)
            stem = f"{case.key}-{name.replace('@', '-at-')}"
            path = SCHEDULES / f"{stem}.json"
            path.write_text(json.dumps(spec.to_dict(), indent=1) + "\n")
            case.files[name] = str(path.relative_to(ROOT))


# ---------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------
def _x(v: float | None, nd: int = 2) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{nd}f}×"


def _s(sp: Any, nd: int = 2, scale: float = 1.0) -> str:
    if sp is None:
        return "–"
    return f"{sp.median * scale:.{nd}f} [{sp.min * scale:.{nd}f}–{sp.max * scale:.{nd}f}]"


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.1%}"


def _fmt_peaks(r: Any) -> str:
    def mib(sp: Any) -> str:
        return "–" if sp is None else f"{sp.median / 2**20:.0f}"

    return f"{mib(r.peak_memory_bytes)} ({mib(getattr(r, 'llm_peak_memory_bytes', None))})"


def case_table(res: Any) -> list[str]:
    """A markdown table of one benchmark."""
    head = (
        "| schedule | stages | kept | prefill s | LLM s | LLM × median / best (ideal) | prefill × (ideal) | "
        "TTFT s | decode tok/s | KV MiB | peak MiB (LLM) | overhead | KL | agree |"
    )
    lines = [head, "|" + "---|" * 14]
    for r in res.rows():
        if r.error:
            lines.append(f"| {r.name} | error: {r.error} |" + " |" * 12)
            continue
        peak = _fmt_peaks(r)
        stages = r.schedule.get("text", "")
        lines.append(
            f"| {r.name} | {stages} | {r.retained_fraction:.3f} | {_s(r.prefill_s)} | {_s(r.llm_s)} | "
            f"{_x(r.speedup.get('llm'))} / {_x(r.speedup_best.get('llm'))} "
            f"({_x(r.ideal_speedup.get('llm'))}) | "
            f"{_x(r.speedup.get('prefill'))} ({_x(r.ideal_speedup.get('prefill'))}) | {_s(r.ttft_s)} | "
            f"{_s(r.decode_tokens_per_s, 1)} | {r.kv_cache_bytes / 2**20:.1f} | {peak} | "
            f"{_s(r.overhead_s, 3)} s ({_pct(r.overhead_fraction.get('prefill'))}) | "
            f"{r.fidelity.get('kl_first_token', 0):.3g} | {r.fidelity.get('greedy_agreement', 0):.0%} |"
        )
    return boxed(lines)


def boxed(table: list[str]) -> list[str]:
    """A markdown table in its own horizontally scrolling box (``.bench-table`` in docs/assets/extra.css), so a
    wide table scrolls by itself instead of running off the page."""
    return ['<div class="bench-table" markdown>', "", *table, "", "</div>"]


def target_verdicts(results: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The three LUVC targets, checked on every Qwen2-VL-2B case with >= 2k visual tokens."""
    rows = [
        (
            "| case | LLM speed-up (median / best) | ≥ 2× | FLOPs-ideal | measured / ideal "
            "(median / best) | ≥ 0.9 | SPU+OIM overhead of the prefill (LLM only) | ≤ 3% |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for key, res in results.items():
        if not key.startswith("target-") or "luvc" not in res.schedules:
            continue
        r = res.schedules["luvc"]
        if r.error:
            continue
        tokens = sum(res.inputs["visual_tokens"])
        sp, best, ideal = r.speedup["llm"], r.speedup_best["llm"], r.ideal_speedup["llm"]
        eff, eff_best = sp / ideal, best / ideal
        ov, ov_llm = r.overhead_fraction["prefill"], r.overhead_fraction["llm"]
        ok1, ok2, ok3 = sp >= 2.0, eff >= 0.9, ov <= 0.03
        mark = {True: "met", False: "**not met**"}
        rows.append(
            f"| {key} ({tokens} visual tokens) | {sp:.2f}× / {best:.2f}× | {mark[ok1]} | {ideal:.2f}× | "
            f"{eff:.2f} / {eff_best:.2f} | {mark[ok2]} | {ov:.1%} ({ov_llm:.1%}) | {mark[ok3]} |"
        )
        if tokens >= 2000:
            verdicts.append(
                f"{key}: speed-up {'met' if ok1 else 'NOT met'}, efficiency "
                f"{'met' if ok2 else 'NOT met'}, overhead {'met' if ok3 else 'NOT met'}"
            )
    return boxed(rows), verdicts


def full_tower_projection(res: Any, name: str = "luvc") -> dict[str, float] | None:
    """Project a reduced-tower Qwen2-VL-2B case to the published 32-block ViT.

    Seconds per vision FLOP are calibrated on the uncompressed run's measured vision time (its blocks all
    run on every patch); the 32-block tower's FLOPs come from `tokcomp.flops.vision_flops`, with the
    schedule's OIM iterations placed where its default layers put them in 32 blocks. A projection, not a
    measurement: it assumes vision time proportional to FLOPs at these token counts.
    """
    from tokcomp.strategies import OIM
    from tokcomp.strategies.oim import rate_to_r

    import tokcomp as tc
    from tokcomp.flops import model_shapes, vision_flops
    from tokcomp.shapes import shape_config

    r, b = res.schedules.get(name), res.baseline
    if r is None or r.error or not b.vision_s or not r.vision_s or not b.flops.get("vision"):
        return None
    grid = res.inputs.get("grid_tokens")
    if not grid:
        return None
    cfg = shape_config(res.model.get("shape", "qwen2-vl-2b"))
    _, vshape, _, depth = model_shapes(cfg)
    h, w = 2 * int(grid[0]), 2 * int(grid[1])
    oims = [st.strategy for st in tc.Schedule.preset(name, 28).stages if isinstance(st.strategy, OIM)]
    tokens_at = {}
    if oims:
        oim = oims[0]
        layers = oim.default_layers(depth)
        total = oim.iterations or len(layers)
        per = -(-total // len(layers))
        for k, layer in enumerate(layers):
            for it in range(k * per, min((k + 1) * per, total)):
                if oim.axis_at(it) == "width":
                    w -= rate_to_r(w, oim.rate, 2)
                else:
                    h -= rate_to_r(h, oim.rate, 2)
            tokens_at[layer] = h * w
    hh, ww = 2 * int(grid[0]), 2 * int(grid[1])
    per_block, current = [], hh * ww
    for block in range(depth):
        current = tokens_at.get(block, current)
        per_block.append(current)
    base32 = vision_flops(vshape, [hh * ww] * depth)["total"]
    comp32 = vision_flops(vshape, per_block)["total"]
    s_per_flop = b.vision_s.median / b.flops["vision"]["baseline"]["total"]
    rest_b = b.prefill_s.median - b.llm_s.median - b.vision_s.median
    rest_c = r.prefill_s.median - r.llm_s.median - r.vision_s.median
    pre_b = b.llm_s.median + base32 * s_per_flop + rest_b
    pre_c = r.llm_s.median + comp32 * s_per_flop + rest_c
    return {
        "vision_s_base": base32 * s_per_flop,
        "vision_s_comp": comp32 * s_per_flop,
        "prefill_s_base": pre_b,
        "prefill_s_comp": pre_c,
        "prefill_speedup": pre_b / pre_c,
        "overhead_share": r.overhead_s.median / pre_c,
        "vision_ideal": base32 / comp32,
    }


def discussion(results: dict[str, Any]) -> list[str]:
    """Plain sentences on the targets, from the measured numbers (generated, not hand-written)."""
    out = ["### Discussion", ""]
    for key, res in results.items():
        if not key.startswith("target-") or "luvc" not in res.schedules or res.schedules["luvc"].error:
            continue
        r, b = res.schedules["luvc"], res.baseline
        tokens = sum(res.inputs["visual_tokens"])
        blocks = res.model.get("vision_blocks")
        full_vit = blocks == res.model.get("published_vision_blocks")
        proj = None if full_vit else full_tower_projection(res)
        sp, ideal, best = r.speedup["llm"], r.ideal_speedup["llm"], r.speedup_best["llm"]
        lines = [
            (
                f"- **{key}** ({tokens} visual tokens, {res.model.get('layers')} LLM layers, {blocks} of "
                f"{res.model.get('published_vision_blocks')} ViT blocks). LLM prefill {b.llm_s.median:.2f} "
                "s → "
                f"{r.llm_s.median:.2f} s: **{sp:.2f}×** (best-of-{res.repeats} {best:.2f}×) against a "
                "FLOPs-ideal "
                f"{ideal:.2f}×, i.e. {sp / ideal:.2f} of ideal. luvc keeps {r.retained_fraction:.1%} of the "
                "visual-token work over the LLM layers (OIM in the encoder, then SPU's cascade to zero)."
            ),
            (
                f"  The strategies' own time was {r.overhead_s.median:.3f} s: "
                f"{r.overhead_fraction['prefill']:.1%} "
                f"of the measured compressed prefill ({r.prefill_s.median:.2f} s, vision with {blocks} "
                "block(s)) "
                f"and {r.overhead_fraction['llm']:.1%} of the compressed LLM prefill alone."
            ),
        ]
        if full_vit:
            lines.append(
                f"  The full tower, measured: whole prefill {b.prefill_s.median:.1f} s → "
                f"{r.prefill_s.median:.1f} s ({r.speedup['prefill']:.2f}×, FLOPs-ideal "
                f"{r.ideal_speedup['prefill']:.2f}×), and the overhead {r.overhead_fraction['prefill']:.1%} of "
                "the compressed prefill. Compare the projections above."
            )
        if proj:
            lines.append(
                f"  Projected to the full 32-block ViT (vision time ∝ FLOPs, calibrated on this run's "
                f"uncompressed vision time; not measured): vision {proj['vision_s_base']:.0f} s → "
                f"{proj['vision_s_comp']:.0f} s (OIM merges only in the last third of the tower: "
                f"vision FLOPs ÷ {proj['vision_ideal']:.2f}), whole prefill "
                f"{proj['prefill_s_base']:.0f} s "
                f"→ {proj['prefill_s_comp']:.0f} s ({proj['prefill_speedup']:.2f}×), and the overhead "
                f"{proj['overhead_share']:.1%} of it."
            )
        out += lines
    out += [
        "",
        (
            "Reading these: the LLM-prefill targets are about the decoder layers, which these runs build "
            "at full depth; except in target-1k-full-vit the vision tower is cut to one or two blocks to "
            "keep CPU runs in minutes, which makes the fixed strategy overhead (OIM's merges, SPU's FFTs) a "
            "larger share of the measured prefill than it would be of the full model's, and the measured "
            "whole-prefill speed-up larger than the full model's (OIM then acts on a larger share of the "
            "tower). target-1k-full-vit measures the whole model instead of projecting it. Random weights "
            "do not change the cost; they do make the fidelity columns uninformative about answer quality."
        ),
        "",
    ]
    return out


def _loads(values: list[float] | None) -> str:
    return "n/a" if not values else ", ".join(f"{v:.2f}" for v in values)


def machine_lines(
    machine: dict[str, Any], load_end: list[float] | None, wall: float, commit: str = "n/a"
) -> list[str]:
    mem = machine.get("memory_bytes")
    return [
        (
            f"- CPU: {machine.get('cpu')} ({machine.get('logical_cpus')} logical CPUs; flags "
            f"{', '.join(machine.get('cpu_flags') or []) or 'n/a'}), "
            f"torch threads: {machine.get('torch_threads')}"
        ),
        f"- memory: {mem / 2**30:.0f} GiB" if mem else "- memory: n/a",
        (
            f"- Python {machine.get('python')}, torch {machine.get('torch')}, transformers "
            f"{machine.get('transformers')}; {machine.get('platform')}"
        ),
        (
            f"- load average (1, 5, 15 min) at the start: {_loads(machine.get('load_average'))}, "
            f"at the end: {_loads(load_end)}"
        ),
        f"- wall time of the whole suite: {wall / 60:.1f} min",
        f"- code: tokcomp at commit {commit}",
    ]


INTRO = """\
Generated by `{command}` (finished {date}). Every number comes from one run of `tokcomp.bench.run_bench` per
case, each case in a fresh process; under each table is the `tokcomp bench` command that measures it on
its own. The JSON of every case is in `benchmarks/results/`. What compression costs in answers, on a
small trained model, is on the [accuracy page](accuracy.md) (`tokcomp eval`).

!!! warning "Random weights, real shapes, reduced depth"
    The models have the published widths, heads and depths of the named checkpoints (`tokcomp.shapes`)
    with random weights and a 256-id vocabulary: cost depends on shapes, not weights, and the vocabulary
    does not change the cost of visual-token compression (the prefill computes the LM head for the last
    position only). **On CPU the LLM and the vision tower are built with fewer layers than the
    checkpoints** (said in every table); fidelity numbers (KL, greedy agreement) on random weights only
    show that the outputs move, not how a trained model's answers change.
"""

MEASURED = """\
The machine is shared with other work; its load average is given above. Repetitions are interleaved
(uncompressed, schedule 1, schedule 2, …, uncompressed, …) so that drifts hit every schedule alike; the
tables give the median with [min–max], and speed-ups both as ratios of medians and of the fastest runs
(best), the steadier estimate when other processes compete for the cores.

## What is measured

- **prefill s**: the vision tower plus the first forward of `generate()` over the whole prompt (forward
  hooks). **LLM prefill s**: the language model alone in that forward (its decoder layers, with tokcomp's
  own hooks and strategies inside).
- **TTFT**: from the `generate()` call to the first token's logits. **decode tok/s**: the tokens after the
  first over the time between the first and the last token's logits.
- **KV cache MiB**: keys and values in the `DynamicCache` right after the prefill. **peak MiB**: growth of
  the process's peak resident memory (Linux `VmHWM`, reset through `/proc/self/clear_refs` after
  `malloc_trim`) from the start of `generate()` to the end of the prefill — activations and caches, not
  weights — and, in parentheses, the same from the language model's input on (the LLM prefill alone, the
  part LLM-side compression changes; the whole-prefill peak is usually the vision tower's). Measured in each
  schedule's warm-up run with glibc's mmap threshold lowered to 64 KiB, so that freed tensors leave the
  resident set at once and the peak follows live tensors rather than the heap's history (timed runs use
  glibc's 32 MiB maximum). Compression lowers the LLM peak only when it acts before the first layers: the
  peak is set where the most tokens are, in the layers before the first LLM stage.
- **overhead**: the strategies' own wall time during the prefill (`report.overhead_s`, included in the
  timings), and its share of the compressed prefill.
- **FLOPs-ideal**: uncompressed over compressed FLOPs (`tokcomp.bench.flops_breakdown`, formulas in
  [FLOPs accounting](flops.md)): the LLM's from the tokens each layer processed; the prefill's adds the
  vision tower with the tokens each block ran on.
- **KL**: `KL(p_uncompressed ‖ p_compressed)` of the first generated token's distribution (nats);
  **greedy agreement**: the share of generated tokens equal to the uncompressed model's, position by
  position.
"""

TARGETS = """\
Targets: with ≥ 2k visual tokens, (1) LLM prefill ≥ 2× faster than uncompressed, (2) measured speed-up
≥ 0.9 × the FLOPs-ideal one, (3) SPU and OIM overhead ≤ 3% of the compressed prefill time. Model:
{model}; the vision depth of each case is in its section below (`target-1k-full-vit` runs the whole tower).
The verdicts below are computed from the medians by the script, not written by hand."""

EQUAL = """\
The presets at their own settings, then each strategy configured to keep about {budget} of the visual
tokens averaged over the LLM layers (the luvc preset's share; the *visual tokens kept* column gives what
each really kept). ToMe at the projector can merge at most half of the tokens in one application, so it
runs at 50%. PACT's clustering removes more than its keep ratio says."""


def render(results: dict[str, Any], cases_: list[Case], meta: dict[str, Any]) -> str:
    device, dtype = meta["device"], meta["dtype"]
    first = next(iter(results.values()))
    out = [
        "# Benchmarks",
        "",
        "<!-- generated by benchmarks/run.py; edit that script, not this page -->",
        "",
        INTRO.format(command=meta["command"], date=meta["date"]),
        "## Machine",
        "",
        *machine_lines(first.machine, meta.get("load_end"), meta["wall"], meta.get("commit", "n/a")),
        f"- dtype {dtype}, device {device}",
        "",
        MEASURED,
    ]
    rows, verdicts = target_verdicts(results)
    out += ["## LUVC targets", ""]
    tcases = [c for c in cases_ if c.section == "targets" and c.key in results]
    if tcases:
        c0 = tcases[0]
        out += [
            TARGETS.format(model=results[c0.key].model["description"].split(", vision")[0]),
            "",
            *rows,
            "",
            *(f"- {v}" for v in verdicts),
            "",
            *discussion(results),
        ]
    for section, title in (
        ("targets", None),
        ("equal", "Equal budget"),
        ("shapes", "Other model shapes"),
    ):
        sec = [c for c in cases_ if c.section == section and c.key in results]
        if not sec:
            continue
        if title:
            out += [f"## {title}", ""]
        if section == "equal":
            out += [EQUAL.format(budget=f"{BUDGET:.0%}"), ""]
        for c in sec:
            res = results[c.key]
            out += [f"### {c.key}", ""]
            inp = res.inputs
            out.append(
                f"Model: {res.model['description']}. Inputs: batch {inp['batch']}, "
                f"{inp['sequence_length']} prompt tokens of which visual "
                f"{inp['visual_tokens']} (requested {c.visual_tokens}; image {inp.get('image_size')}); "
                f"{res.repeats} timed rounds after one warm-up each; {res.new_tokens} new tokens; wall "
                f"{res.wall_s / 60:.1f} min.{' ' + c.note if c.note else ''}"
            )
            measured = {r.name for r in res.rows()}
            missing = [name for name in c.schedules if name not in measured]
            if missing:
                # added to the suite after this case last ran: say so rather than leave a silent gap
                out += ["", ("Not measured yet (in the suite since this case last ran; the command below "
                             "measures them): " + ", ".join(f"`{m}`" for m in missing) + ".")]
            out += [
                "",
                *case_table(res),
                "",
                "```bash",
                command(c, device, dtype, meta.get("threads")),
                "```",
                "",
            ]
    if meta.get("plot"):
        out += [
            "## Speed-up vs tokens kept",
            "",
            (
                "![measured and FLOPs-ideal speed-up against the retained visual-token fraction]"
                f"({meta['plot']})"
            ),
            "",
            (
                "Filled circles: measured LLM prefill speed-up; hollow squares: measured prefill speed-up "
                "(vision included); crosses: FLOPs-ideal LLM speed-up."
            ),
            "",
        ]
    out += [
        (
            "Where the time goes (strategy overhead, attention masks, the vision tower, threads) is in the "
            "[profiling notes](profiling.md)."
        ),
        "",
        "## Reproduce",
        "",
        "```bash",
        meta["command"],
        "```",
        "",
    ]
    return "\n".join(out)


def git_commit() -> str:
    """``HEAD``'s short hash, with ``+ local changes`` when tracked files other than this suite's own
    outputs differ from it (call it before measuring: the code that runs is the code at the start)."""
    outputs = [":!benchmarks/results", ":!benchmarks/schedules", ":!docs/benchmarks.md", ":!docs/assets"]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *outputs],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "n/a"
    return f"{head} + local changes" if dirty else head


def result_path(case: Case, quick: bool) -> Path:
    """Where a case's `BenchResult` JSON goes."""
    return RESULTS / f"{'quick-' if quick else ''}{case.key}.json"


def make_plot(results: dict[str, Any], suite: list[Case], out_md: Path) -> str | None:
    """The page's figure: the Qwen2-VL-2B cases (targets and equal budget), one colour per case."""
    from tokcomp.bench import plot_speedups

    keys = [c.key for c in suite if c.shape == "qwen2-vl-2b" and c.key in results]
    if not keys:
        return None
    labels = []
    for key in keys:
        res = results[key]
        labels.append(
            f"{key}: {sum(res.inputs['visual_tokens'])} visual tokens, {res.model.get('layers')} LLM layers"
        )
    assets = out_md.parent / "assets"  # docs/assets/*.png are the only images the repository keeps
    assets.mkdir(exist_ok=True)
    png = assets / (out_md.stem + "-speedup.png")
    plot_speedups(
        [results[k] for k in keys],
        png,
        labels=labels,
        title="Qwen2-VL-2B shapes, random weights (reduced ViT depth on CPU)",
    )
    return f"assets/{png.name}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (not written to the docs)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32", "fp16"])
    parser.add_argument(
        "--out",
        default=None,
        help="markdown to write (default docs/benchmarks.md; --quick: benchmarks/results/quick.md)",
    )
    parser.add_argument("--only", default=None, help="comma-separated case keys to run")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # internal: run one case here
    parser.add_argument(
        "--render-only",
        action="store_true",
        help="write the page from the JSON of an earlier run (benchmarks/results/) instead of running",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from tokcomp.bench import DTYPES as _DTYPES
    from tokcomp.bench import BenchResult, build_model_and_inputs, run_bench

    dtype = _DTYPES[args.dtype]
    out_md = (
        Path(args.out)
        if args.out
        else (RESULTS / "quick.md" if args.quick else ROOT / "docs" / "benchmarks.md")
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    suite = cases(args.quick, args.device)
    if args.only:
        keep = set(args.only.split(","))
        suite = [c for c in suite if c.key in keep]
    t0 = time.perf_counter()
    commit = git_commit()
    results: dict[str, Any] = {}
    if args.render_only:
        for case in suite:
            write_schedule_files(case)
            path = result_path(case, args.quick)
            if path.exists():
                results[case.key] = BenchResult.load_json(path)
        meta_path = RESULTS / ("quick-meta.json" if args.quick else "meta.json")
        meta = json.loads(meta_path.read_text())
        meta["plot"] = make_plot(results, suite, out_md)
        out_md.write_text(render(results, suite, meta))
        print(f"wrote {out_md} from {len(results)} saved results")
        return 0
    if args.case:  # one case in this (fresh) process: the parent runs every case like this
        case = next(c for c in suite if c.key == args.case)
        write_schedule_files(case)
        model, inputs, minfo, iinfo = build_model_and_inputs(
            case.shape,
            layers=case.layers,
            vision_blocks=case.vision_blocks,
            visual_tokens=case.visual_tokens,
            dtype=dtype,
            device=args.device,
        )
        res = run_bench(
            model,
            inputs,
            case.schedules,
            repeats=case.repeats,
            new_tokens=case.new_tokens,
            progress=sys.stderr.isatty(),
            device=args.device,
            model_info=minfo,
            inputs_info=iinfo,
        )
        res.save_json(result_path(case, args.quick))
        return 0
    for i, case in enumerate(suite):
        write_schedule_files(case)
        print(
            f"[{i + 1}/{len(suite)}] {case.key}: {command(case, args.device, args.dtype, args.threads)}",
            flush=True,
        )
        tc0 = time.perf_counter()
        # Each case in its own process: a long process's heap and library caches (earlier, larger models)
        # would leak into the next case's memory peaks and timings.
        child = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--case",
            case.key,
            "--device",
            args.device,
            "--dtype",
            args.dtype,
        ]
        if args.quick:
            child.append("--quick")
        if args.threads:
            child += ["--threads", str(args.threads)]
        proc = subprocess.run(child, check=False)
        if proc.returncode != 0:
            print(f"    case {case.key} failed (exit {proc.returncode})", flush=True)
            continue
        res = BenchResult.load_json(result_path(case, args.quick))
        results[case.key] = res
        for r in res.rows():
            if r.error:
                print(f"    {r.name}: {r.error}", flush=True)
            else:
                print(
                    f"    {r.name:>16}: kept {r.retained_fraction:.3f} LLM {r.llm_s.median:.3f}s "
                    f"x{r.speedup['llm']:.2f} (best x{r.speedup_best['llm']:.2f}, ideal "
                    f"x{r.ideal_speedup['llm']:.2f}) prefill {r.prefill_s.median:.3f}s overhead "
                    f"{r.overhead_s.median:.3f}s",
                    flush=True,
                )
        print(f"    case wall {time.perf_counter() - tc0:.0f} s (incl. model build)", flush=True)
    wall = time.perf_counter() - t0
    plot_rel = make_plot(results, suite, out_md)
    argv_used = " ".join(["python benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])])
    meta = {
        "device": args.device,
        "dtype": args.dtype,
        "command": argv_used.strip(),
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "wall": wall,
        "plot": plot_rel,
        "load_end": list(os.getloadavg()),
        "threads": args.threads,
        "commit": commit,
    }
    (RESULTS / ("quick-meta.json" if args.quick else "meta.json")).write_text(json.dumps(meta, indent=1))
    out_md.write_text(render(results, suite, meta))
    print(f"wrote {out_md} ({wall / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
