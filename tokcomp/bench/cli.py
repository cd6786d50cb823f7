"""``tokcomp bench``: its options and the command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .measure import run_bench
from .models import DTYPES, build_model_and_inputs
from .plots import plot_speedups
from .schedules import load_schedule
from .tables import FORMATS, render, rich_table

__all__ = ["add_arguments", "cli"]


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
    p.add_argument("--batch", type=int, default=1, help="samples per generate() call")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="parameter dtype")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per schedule (after one warm-up)")
    p.add_argument("--new-tokens", type=int, default=8, help="tokens generated per round")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--format", default="table", choices=FORMATS,
                   help="table: for a terminal; markdown: a pipe table; csv: every number, one row per "
                   "schedule; json: the whole result (as --json writes it)")
    p.add_argument("--wide", action="store_true",
                   help="table and markdown: every column with spreads (the default fits 100 columns)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the full result as JSON")
    p.add_argument("--plot", default=None, metavar="PATH", help="write a PNG of speed-up vs tokens kept")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def cli(args: Any) -> int:
    """Run ``tokcomp bench`` with parsed arguments; prints the result in ``--format`` (the narrow table by
    default, ``--wide`` for every column), writes ``--json`` / ``--plot``. With ``--format csv|json`` stdout
    holds the data alone and the notes go to stderr.

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
        dtype=DTYPES[args.dtype],
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
    failed = [r for r in res.schedules.values() if r.error]
    if args.format in ("csv", "json"):
        # stdout carries the data alone, for a pipe; the rest goes to stderr
        print(render(res, args.format))
        info = Console(stderr=True)
    else:
        if not console.is_terminal:  # a file or a pipe: the narrow table in 100 columns, the wide one in 200
            console = Console(width=200 if args.wide else 100)
        if args.format == "markdown":
            print(render(res, "markdown", wide=args.wide))
        else:
            console.print(rich_table(res, wide=args.wide))
        info = console
    info.print(f"model: {res.model['description']}", soft_wrap=True)
    info.print(
        f"inputs: batch {res.inputs['batch']}, {res.inputs['sequence_length']} tokens, visual "
        f"{res.inputs['visual_tokens']}; {res.dtype} on {res.device}; {res.repeats} rounds, "
        f"{res.new_tokens} new tokens; wall {res.wall_s:.1f} s"
    )
    for note in res.notes:
        info.print(f"[dim]- {note}[/dim]")
    for r in failed:
        info.print(f"[red]{r.name}: {r.error}[/red]")
    if args.json:
        res.save_json(args.json)
        info.print(f"wrote {args.json}")
    if args.plot:
        plot_speedups(res, args.plot)
        info.print(f"wrote {args.plot}")
    return 1 if failed else 0
