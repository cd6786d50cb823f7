"""The ``tokcomp`` command line: ``tokcomp demo``, ``list``, ``bench``, ``visualize``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import TokcompError

__all__ = ["DemoResult", "main", "run_demo"]


@dataclass
class DemoResult:
    """What `run_demo` measured.

    Attributes:
        arch: The tiny architecture used.
        schedule: The schedule's description.
        visual_tokens: ``[layer][sample]`` visual tokens entering each LLM layer, compressed.
        original_visual: ``[sample]`` visual tokens at the LLM input.
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


def run_demo(
    arch: str = "qwen2_vl", preset: str = "spu", new_tokens: int = 8, num_layers: int = 8
) -> DemoResult:
    """Run a tiny model uncompressed and under a preset, and compare.

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
    return DemoResult(
        arch=arch,
        schedule=preset,
        visual_tokens=rep.visual_tokens,
        original_visual=rep.original_visual,
        flops_ratio=rep.llm_flops_ratio(shape),
        agreement=float((ref == out).float().mean()),
        tokens_uncompressed=ref.tolist(),
        tokens_compressed=out.tolist(),
        text_tokens=rep.text_tokens,
    )


def _print_demo(res: DemoResult) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=120)
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
                  "trained model stays. `tokcomp list` shows every strategy, adapter and preset.[/dim]")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tokcomp`` console script."""
    parser = argparse.ArgumentParser(prog="tokcomp", description="visual-token compression for VLMs")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compare a tiny built-in model with and without compression")
    demo.add_argument("--arch", default="qwen2_vl")
    demo.add_argument("--preset", default="spu")
    demo.add_argument("--new-tokens", type=int, default=8)
    demo.add_argument("--layers", type=int, default=8)
    demo.add_argument("--json", action="store_true", help="print JSON instead of tables")
    sub.add_parser("list", help="registered strategies, adapters and presets")
    from tokcomp import bench, viz  # measurement commands (tokcomp.bench, tokcomp.viz)

    bench.add_arguments(sub.add_parser("bench", help="time a schedule against the uncompressed model"))
    viz.add_arguments(sub.add_parser("visualize", help="draw which image patches survive each stage (PNG)"))
    args = parser.parse_args(argv)  # bad arguments: argparse prints the usage and exits with status 2
    try:
        return _run(args)
    except (TokcompError, OSError) as exc:  # a user's mistake (bad schedule, layer, file): one line, no traceback
        print(f"tokcomp {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from tokcomp import bench, viz

    if args.command == "bench":
        return bench.cli(args)
    if args.command == "visualize":
        return viz.cli(args)
    if args.command == "demo":
        res = run_demo(args.arch, args.preset, args.new_tokens, args.layers)
        if args.json:
            print(json.dumps(res.__dict__))
        else:
            _print_demo(res)
        return 0
    if args.command == "list":
        from tokcomp import registry

        print(registry.describe())
        return 0
    return 2  # pragma: no cover - argparse rejects unknown commands
