"""The ``tokcomp`` command line: ``tokcomp demo``, ``list``, ``bench``, ``eval``, ``visualize``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .errors import TokcompError

__all__ = ["DemoResult", "RandomDemoResult", "main", "run_demo", "run_random_demo"]


@dataclass
class DemoResult:
    """What `run_demo` measured on the shipped trained model.

    Attributes:
        schedule: The preset's name.
        description: The preset's stages.
        questions: The first few questions: ``{"question", "answer", "uncompressed", "compressed"}``.
        examples: Held-out questions scored.
        accuracy_uncompressed: Accuracy of the uncompressed model on them.
        accuracy_compressed: Accuracy under the preset.
        ci_uncompressed: 95% Wilson interval of ``accuracy_uncompressed``.
        ci_compressed: 95% Wilson interval of ``accuracy_compressed``.
        per_type: Question type -> ``[uncompressed, compressed]`` accuracy.
        agreement: Share of answers equal to the uncompressed model's.
        retained: Visual tokens kept over the LLM layers (measured, `Report.retained_fraction`).
        speedup: Measured prefill speed-up (time to first token, uncompressed over compressed).
        visual_tokens: Visual tokens entering each LLM layer for the first question, compressed.
        uncompressed_visual: Visual tokens the LLM gets without compression, for that question.
        flops_ratio: Compressed over uncompressed LLM prefill FLOPs for that question.
    """

    schedule: str
    description: str
    questions: list[dict[str, str]]
    examples: int
    accuracy_uncompressed: float
    accuracy_compressed: float
    ci_uncompressed: tuple[float, float]
    ci_compressed: tuple[float, float]
    per_type: dict[str, list[float]]
    agreement: float
    retained: float
    speedup: float | None
    visual_tokens: list[int]
    uncompressed_visual: int
    flops_ratio: float


def run_demo(preset: str = "spu", examples: int = 70, show: int = 6, model: str | None = None) -> DemoResult:
    """Answer held-out questions with the shipped trained model, uncompressed and under a preset.

    Args:
        preset: A registered preset name (or any `tokcomp.bench.load_schedule` spec).
        examples: Held-out questions to score (`tokcomp.vqa`, seed 0).
        show: Questions to print with both answers.
        model: A checkpoint folder from ``python -m tokcomp.train`` instead of the shipped model.
    """
    import torch

    import tokcomp as tc
    from tokcomp import testing
    from tokcomp.bench import load_schedule
    from tokcomp.evaluate import evaluate
    from tokcomp.flops import LayerShape
    from tokcomp.train import encode, load_checkpoint
    from tokcomp.vqa import make_examples

    net, processor = load_checkpoint(model) if model else testing.trained_model()
    res = evaluate(net, processor, {preset: preset}, budgets=(), examples=examples, batch=35, progress=False,
                   model_name=model or "shipped")
    base, comp = res.uncompressed, res.by_name(preset)
    if comp.error:
        raise RuntimeError(f"preset {preset!r} failed: {comp.error}")
    items = make_examples(examples, seed=0, split="test")
    with torch.no_grad(), tc.compress(net, load_schedule(preset)) as run:
        net.generate(**encode(processor, items[:1]), max_new_tokens=1, do_sample=False)
    rep = run.report()
    shape = LayerShape.from_text_config(tc.find_adapter(net).language_model.config)
    return DemoResult(
        schedule=preset,
        description=comp.description,
        questions=[
            {"question": e.question, "answer": e.answer, "uncompressed": u, "compressed": c}
            for e, u, c in list(zip(items, base.answers, comp.answers))[:show]
        ],
        examples=len(items),
        accuracy_uncompressed=base.overall.value,
        accuracy_compressed=comp.overall.value,
        ci_uncompressed=base.overall.interval,
        ci_compressed=comp.overall.interval,
        per_type={q: [base.per_type[q].value, comp.per_type[q].value] for q in base.per_type},
        agreement=comp.agreement or 0.0,
        retained=comp.retained or 0.0,
        speedup=comp.speedup,
        visual_tokens=rep.tokens_for(0),
        uncompressed_visual=rep.baseline_visual[0],
        flops_ratio=rep.llm_flops_ratio(shape),
    )


def _console() -> Any:
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=120)


def _print_demo(res: DemoResult) -> None:
    from rich.table import Table

    console = _console()
    console.print(f"[bold]tokcomp demo[/bold]: a small Qwen2-VL trained on tokcomp's synthetic VQA task "
                  f"(144 visual tokens per image), preset {res.schedule!r}: {res.description}")
    t = Table(title="held-out questions", min_width=70)
    for col in ("question", "truth", "uncompressed", res.schedule):
        t.add_column(col)
    for q in res.questions:
        t.add_row(q["question"], q["answer"], q["uncompressed"], q["compressed"])
    console.print(t)
    lo_u, hi_u = res.ci_uncompressed
    lo_c, hi_c = res.ci_compressed
    console.print(f"accuracy on {res.examples} held-out questions: uncompressed {res.accuracy_uncompressed:.1%} "
                  f"({lo_u:.0%}-{hi_u:.0%}), {res.schedule} {res.accuracy_compressed:.1%} ({lo_c:.0%}-{hi_c:.0%}, "
                  "95% CI)")
    console.print("per question type (uncompressed -> compressed): " + ", ".join(
        f"{q} {u:.0%}->{c:.0%}" for q, (u, c) in res.per_type.items()))
    speed = f"{res.speedup:.2f}x" if res.speedup else "n/a"
    console.print(f"visual tokens kept over the LLM layers: {res.retained:.0%}; measured prefill speed-up {speed}; "
                  f"LLM prefill FLOPs {res.flops_ratio:.2f} of uncompressed; same answer as uncompressed "
                  f"{res.agreement:.0%}")
    console.print(f"visual tokens entering each LLM layer (first question): uncompressed {res.uncompressed_visual}, "
                  f"{res.schedule} {res.visual_tokens}")
    console.print("[dim]`tokcomp eval` runs every preset and strategy on more questions; "
                  "`tokcomp demo --arch qwen2_vl` shows the pipeline on a random-weight tiny model.[/dim]")


@dataclass
class RandomDemoResult:
    """What `run_random_demo` measured.

    Attributes:
        arch: The tiny architecture used.
        schedule: The schedule's description.
        visual_tokens: ``[layer][sample]`` visual tokens entering each LLM layer, compressed.
        original_visual: ``[sample]`` visual tokens the LLM gets without compression (before any
            encoder-side stage).
        flops_ratio: Compressed over uncompressed LLM prefill FLOPs.
        agreement: Fraction of generated tokens equal to the uncompressed model's, position by position.
        tokens_uncompressed: Greedy tokens of the uncompressed model, per sample.
        tokens_compressed: Greedy tokens under the schedule, per sample.
        text_tokens: ``[sample]`` non-visual tokens (for recomputing the FLOPs from the counts).
    """

    arch: str
    schedule: str
    visual_tokens: list[list[int]]
    original_visual: list[int]
    flops_ratio: float
    agreement: float
    tokens_uncompressed: list[list[int]]
    tokens_compressed: list[list[int]]
    text_tokens: list[int]


def run_random_demo(
    arch: str = "qwen2_vl", preset: str = "spu", new_tokens: int = 8, num_layers: int = 8
) -> RandomDemoResult:
    """Run a tiny random-weight model uncompressed and under a preset, and compare (the pipeline only).

    Args:
        arch: One of `tokcomp.testing.ARCHITECTURES` supported by an adapter.
        preset: A registered preset name.
        new_tokens: Greedy tokens to generate.
        num_layers: Depth of the tiny LLM.
    """
    import torch

    import tokcomp as tc
    from tokcomp import testing
    from tokcomp.flops import LayerShape

    model = testing.tiny_model(arch, num_hidden_layers=num_layers)
    inputs = testing.tiny_inputs(arch)
    gen = {"max_new_tokens": new_tokens, "do_sample": False}
    with torch.no_grad():
        ref = model.generate(**inputs, **gen)[:, inputs["input_ids"].shape[1]:]
        with tc.compress(model, tc.Schedule.preset(preset)) as run:
            out = model.generate(**inputs, **gen)[:, inputs["input_ids"].shape[1]:]
    rep = run.report()
    shape = LayerShape.from_text_config(tc.find_adapter(model).language_model.config)
    return RandomDemoResult(
        arch=arch,
        schedule=preset,
        visual_tokens=rep.visual_tokens,
        # The uncompressed counts (an encoder stage such as luvc's OIM shrinks original_visual).
        original_visual=list(rep.baseline_visual),
        flops_ratio=rep.llm_flops_ratio(shape),
        agreement=float((ref == out).float().mean()),
        tokens_uncompressed=ref.tolist(),
        tokens_compressed=out.tolist(),
        text_tokens=rep.text_tokens,
    )


def _print_random_demo(res: RandomDemoResult) -> None:
    from rich.table import Table

    console = _console()
    console.print(f"[bold]tokcomp demo[/bold]: tiny {res.arch} (random weights), preset {res.schedule!r}")
    t = Table(title="visual tokens entering each LLM layer (sample 0, sample 1, ...)", min_width=70)
    t.add_column("layer", justify="right")
    t.add_column("uncompressed", justify="right")
    t.add_column(res.schedule, justify="right")
    for layer, row in enumerate(res.visual_tokens):
        t.add_row(str(layer), ", ".join(map(str, res.original_visual)), ", ".join(map(str, row)))
    console.print(t)
    console.print(f"LLM prefill FLOPs: {res.flops_ratio:.3f} of uncompressed "
                  f"(ideal speed-up {1 / res.flops_ratio:.2f}x)")
    console.print(f"greedy-token agreement with the uncompressed model: {res.agreement:.0%}")
    for b, (u, c) in enumerate(zip(res.tokens_uncompressed, res.tokens_compressed)):
        console.print(f"  sample {b}: uncompressed {u}\n            compressed   {c}")
    console.print("[dim]Random weights: agreement here says the pipeline runs end to end, not how accurate a "
                  "trained model stays (`tokcomp demo` without --arch uses the trained model). "
                  "`tokcomp list` shows every strategy, adapter and preset.[/dim]")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tokcomp`` console script."""
    from tokcomp import __version__
    from tokcomp.testing import ARCHITECTURES

    # Every option's help shows its default (the formatter appends it to each help text).
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="tokcomp", description="visual-token compression for VLMs",
                                     formatter_class=fmt)
    parser.add_argument("--version", action="version", version=f"tokcomp {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", formatter_class=fmt, help="answer held-out questions with the trained model, with and without "
                          "compression")
    demo.add_argument("--preset", default="spu", help="a registered preset (tokcomp list shows them)")
    demo.add_argument("--examples", type=int, default=70, help="held-out questions to score")
    demo.add_argument("--model", default=None, help="a checkpoint folder instead of the shipped model")
    demo.add_argument("--arch", default=None, choices=ARCHITECTURES, help="instead: a tiny random-weight model of this architecture "
                      "(tokcomp.testing), the pipeline only")
    demo.add_argument("--new-tokens", type=int, default=8, help="with --arch: greedy tokens")
    demo.add_argument("--layers", type=int, default=8, help="with --arch: LLM depth")
    demo.add_argument("--json", action="store_true", help="print JSON instead of tables")
    sub.add_parser("list", formatter_class=fmt, help="registered strategies, adapters and presets")
    from tokcomp import bench, evaluate, viz  # measurement commands (tokcomp.bench, .evaluate, .viz)

    bench.add_arguments(sub.add_parser("bench", formatter_class=fmt, help="time a schedule against the uncompressed model"))
    evaluate.add_arguments(sub.add_parser("eval", formatter_class=fmt, help="accuracy per question type under every schedule "
                                          "(trained model, synthetic VQA)"))
    viz.add_arguments(sub.add_parser("visualize", formatter_class=fmt, help="draw which image patches survive each stage (PNG)"))
    args = parser.parse_args(argv)  # bad arguments: argparse prints the usage and exits with status 2
    try:
        return _run(args)
    except (TokcompError, OSError) as exc:  # a user's mistake (bad schedule, layer, file): one line, no traceback
        print(f"tokcomp {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from tokcomp import bench, evaluate, viz

    if args.command == "bench":
        return bench.cli(args)
    if args.command == "visualize":
        return viz.cli(args)
    if args.command == "eval":
        return evaluate.cli(args)
    if args.command == "demo":
        if args.arch:
            rand = run_random_demo(args.arch, args.preset, args.new_tokens, args.layers)
            print(json.dumps(asdict(rand))) if args.json else _print_random_demo(rand)
        else:
            res = run_demo(args.preset, args.examples, model=args.model)
            print(json.dumps(asdict(res))) if args.json else _print_demo(res)
        return 0
    if args.command == "list":
        from tokcomp import registry

        print(registry.describe())
        return 0
    return 2  # pragma: no cover - argparse rejects unknown commands
