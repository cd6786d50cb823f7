"""Accuracy under compression: ``tokcomp eval`` and `evaluate`.

Every schedule answers the same held-out questions of the synthetic VQA task (`tokcomp.vqa`) as the
uncompressed model, through ``generate()`` in left-padded batches. Per schedule the result holds the
accuracy of every question type with a 95% Wilson interval, the share of answers equal to the
uncompressed model's, the visual tokens it really kept (over the LLM layers, from its `Report`) and
the measured prefill speed-up: the time to the first generated token, the uncompressed model being
timed on the same batches in the same process, interleaved with the schedules.

Typical use:

```bash
tokcomp eval                                   # shipped model, presets + every strategy at 50/25/11%
tokcomp eval -s fastv -s my_plugin:schedule --budgets 0.5 --examples 140 --out results/
tokcomp eval --model path/to/checkpoint        # a folder written by `python -m tokcomp.train`
```

Examples:
    >>> from tokcomp.evaluate import wilson
    >>> lo, hi = wilson(9, 10)
    >>> round(lo, 3), round(hi, 3)
    (0.596, 0.982)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import vqa

__all__ = [
    "DEFAULT_BUDGETS",
    "Accuracy",
    "EvalResult",
    "ScheduleEval",
    "add_arguments",
    "cli",
    "default_schedules",
    "evaluate",
    "plot_accuracy",
    "wilson",
]

DEFAULT_BUDGETS: tuple[float, ...] = (0.5, 0.25, 0.11)
"""Budgets of the equal-budget strategies (mean fraction of visual tokens kept over the LLM layers)."""
FLOORS = ("random", "downsample")
"""The strategies a method has to beat: random pruning and plain spatial downsampling."""


def wilson(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% for ``z = 1.96``).

    Args:
        correct: Successes.
        total: Trials.
        z: Standard-normal quantile of the confidence level.

    Returns:
        ``(low, high)``; ``(0.0, 1.0)`` when ``total`` is 0.
    """
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class Accuracy:
    """Correct answers out of a number of questions.

    Attributes:
        correct: Questions answered right.
        total: Questions asked.
    """

    correct: int = 0
    total: int = 0

    @property
    def value(self) -> float:
        """The accuracy (0 when nothing was asked)."""
        return self.correct / self.total if self.total else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        """The 95% Wilson interval."""
        return wilson(self.correct, self.total)

    def to_dict(self) -> dict[str, Any]:
        """``{"correct", "total", "accuracy", "ci95": [low, high]}``."""
        lo, hi = self.interval
        return {"correct": self.correct, "total": self.total, "accuracy": self.value, "ci95": [lo, hi]}


@dataclass
class ScheduleEval:
    """How one schedule did.

    Attributes:
        name: The name it was given (``"uncompressed"`` for the reference).
        kind: ``"uncompressed"``, ``"preset"``, ``"budget"`` (a strategy at an equal budget) or
            ``"custom"``.
        strategy: For budget schedules, the strategy (``"fastv"``); else ``None``.
        budget: For budget schedules, the target fraction; else ``None``.
        description: The stages, as ``tokcomp bench`` prints them.
        per_type: Accuracy per question type.
        overall: Accuracy over all questions.
        agreement: Share of answers equal to the uncompressed model's.
        retained: Visual tokens kept over the LLM layers and samples, relative to no compression
            (`Report.retained_fraction`, encoder-side reductions included), averaged over batches.
        prefill_s: Summed time to the first generated token over the batches.
        speedup: Uncompressed ``prefill_s`` over this one's.
        answers: The answer word of every question, in order.
        error: The error that stopped this schedule, if any (its numbers are then empty).
    """

    name: str
    kind: str
    strategy: str | None = None
    budget: float | None = None
    description: str = ""
    per_type: dict[str, Accuracy] = field(default_factory=dict)
    overall: Accuracy = field(default_factory=Accuracy)
    agreement: float | None = None
    retained: float | None = None
    prefill_s: float = 0.0
    speedup: float | None = None
    answers: list[str] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "name": self.name,
            "kind": self.kind,
            "strategy": self.strategy,
            "budget": self.budget,
            "description": self.description,
            "overall": self.overall.to_dict(),
            "per_type": {k: v.to_dict() for k, v in self.per_type.items()},
            "agreement": self.agreement,
            "retained": self.retained,
            "prefill_s": self.prefill_s,
            "speedup": self.speedup,
            "answers": self.answers,
            "error": self.error,
        }


@dataclass
class EvalResult:
    """Everything `evaluate` measured.

    Attributes:
        model: What model was evaluated (a path or ``"shipped"``).
        task: ``{"seed", "split", "examples", "qtypes", "chance"}``.
        batch: Batch size.
        budgets: The equal-budget fractions.
        num_layers: LLM depth.
        visual_tokens: Visual tokens per sample at the LLM input, uncompressed.
        schedules: The uncompressed reference first, then every schedule in the order given.
        wall_s: Wall time of the whole evaluation.
        machine: `tokcomp.bench.machine_info` at the start (CPU, threads, versions, load average), and
            ``load_average_end``.
    """

    model: str
    task: dict[str, Any]
    batch: int
    budgets: list[float]
    num_layers: int
    visual_tokens: int
    schedules: list[ScheduleEval]
    wall_s: float
    machine: dict[str, Any]

    @property
    def uncompressed(self) -> ScheduleEval:
        """The reference run."""
        return self.schedules[0]

    def by_name(self, name: str) -> ScheduleEval:
        """One schedule's result.

        Raises:
            KeyError: If no schedule has that name.
        """
        for s in self.schedules:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (every field; ``schedules`` as a list)."""
        return {
            "model": self.model,
            "task": self.task,
            "batch": self.batch,
            "budgets": self.budgets,
            "num_layers": self.num_layers,
            "visual_tokens": self.visual_tokens,
            "wall_s": self.wall_s,
            "machine": self.machine,
            "schedules": [s.to_dict() for s in self.schedules],
        }

    def save_json(self, path: str | Path) -> None:
        """Write `to_dict` as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    def table(self) -> Any:
        """A `rich.table.Table`: one row per schedule, accuracy per type with the 95% interval."""
        from rich.table import Table

        qtypes = self.task["qtypes"]
        t = Table(title=f"accuracy on {self.task['examples']} held-out questions ({self.model})")
        t.add_column("schedule")
        t.add_column("kept", justify="right")
        t.add_column("all (95% CI)", justify="right")
        for q in qtypes:
            t.add_column(q, justify="right")
        t.add_column("same as uncompr.", justify="right")
        t.add_column("prefill speed-up", justify="right")
        for s in self.schedules:
            if s.error:
                t.add_row(s.name, "", f"[red]error: {s.error[:60]}[/red]")
                continue
            lo, hi = s.overall.interval
            t.add_row(
                s.name,
                "" if s.retained is None else f"{s.retained:.0%}",
                f"{s.overall.value:.1%} ({lo:.0%}-{hi:.0%})",
                *(f"{s.per_type[q].value:.0%}" if q in s.per_type else "" for q in qtypes),
                "" if s.agreement is None else f"{s.agreement:.0%}",
                "" if s.speedup is None else f"{s.speedup:.2f}x",
            )
        return t


# ---------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------
def default_schedules(
    num_layers: int, visual_tokens: int, budgets: Sequence[float] = DEFAULT_BUDGETS, presets: bool = True
) -> dict[str, Any]:
    """The default line-up: every registered preset, then every strategy at every budget.

    Args:
        num_layers: LLM depth (the budgets' configurations depend on it).
        visual_tokens: Visual tokens per sample at the LLM input.
        budgets: Mean retained fractions (`tokcomp.budgets.budget_schedules`).
        presets: Include the registered presets.

    Returns:
        ``{name: schedule spec}``: preset names map to themselves, budget entries (``"fastv@0.25"``) to
        a `Schedule`. ToMe appears once (``"tome@0.50"``), its only budget.
    """
    from . import registry
    from .budgets import budget_schedules

    out: dict[str, Any] = {p: p for p in sorted(registry.presets())} if presets else {}
    for f in budgets:
        out.update(budget_schedules(num_layers, visual_tokens, f))
    return out


def _kind(name: str, spec: Any, budget_names: set[str]) -> tuple[str, str | None, float | None]:
    from . import registry

    if name in budget_names:
        strategy, tag = name.split("@")
        return "budget", strategy, float(tag)
    if isinstance(spec, str) and spec in registry.presets():
        return "preset", None, None
    return "custom", None, None


class _FirstTokenClock:
    """A logits processor that notes when generate() has the prefill's logits (time to first token)."""

    def __init__(self) -> None:
        self.first: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.first is None:
            self.first = time.perf_counter()
        return scores


# ---------------------------------------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------------------------------------
def evaluate(
    model: Any = None,
    processor: Any = None,
    schedules: Mapping[str, Any] | Sequence[Any] | None = None,
    *,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    examples: int = 210,
    seed: int = 0,
    split: str = "test",
    batch: int = 35,
    progress: bool = True,
    model_name: str | None = None,
) -> EvalResult:
    """Answers held-out questions uncompressed and under every schedule, and scores them.

    Args:
        model: A Qwen2-VL model trained on the task; default: the shipped one
            (`tokcomp.testing.trained_model`).
        processor: Its processor (required with ``model``).
        schedules: ``{name: spec}`` or a list of specs, each anything `tokcomp.bench.load_schedule`
            takes (a preset name, a JSON/YAML schedule file, ``"module:attr"``, a `Schedule`); default:
            every registered preset. The equal-budget strategies of ``budgets`` are added to them.
        budgets: Fractions for `tokcomp.budgets.budget_schedules` (``()`` for none).
        examples: Held-out questions (a multiple of 7 keeps the types balanced).
        seed: Seed of the task stream.
        split: ``"test"`` (held out) or ``"train"``.
        batch: Questions per ``generate()`` call.
        progress: Show a progress bar (tqdm, on stderr).
        model_name: How to name the model in the result.

    Returns:
        An `EvalResult`; a schedule that fails is reported with its ``error`` (the others still run).

    Raises:
        ValueError: If ``processor`` is missing for a given model, or a schedule spec cannot be loaded.
    """
    from tqdm.auto import tqdm

    import tokcomp as tc

    from .bench import load_schedule, machine_info
    from .bench.schedules import _describe
    from .train import encode

    t_start = time.perf_counter()
    machine = machine_info()
    if model is None:
        from .testing import trained_model

        model, processor = trained_model()
        model_name = model_name or "shipped (tokcomp.testing.trained_model_path())"
    elif processor is None:
        raise ValueError("pass the model's processor too (evaluate(model, processor, ...))")
    adapter = tc.find_adapter(model)
    num_layers = int(adapter.language_model.config.num_hidden_layers)
    items = vqa.make_examples(examples, seed=seed, split=split)
    batches = [items[k : k + batch] for k in range(0, len(items), batch)]
    encoded = [encode(processor, b) for b in batches]
    image_id = model.config.image_token_id
    visual = int((encoded[0]["input_ids"][0] == image_id).sum()) if encoded else 0

    if schedules is None:
        specs: dict[str, Any] = default_schedules(num_layers, visual, (), presets=True)
    elif isinstance(schedules, Mapping):
        specs = dict(schedules)
    else:
        specs = {(Path(s).stem if isinstance(s, str) and s.endswith((".json", ".yaml", ".yml")) else str(s)): s
                 for s in schedules}
    budget_specs = default_schedules(num_layers, visual, budgets, presets=False)
    for name, spec in budget_specs.items():
        specs.setdefault(name, spec)
    loaded = {name: load_schedule(spec) for name, spec in specs.items()}

    results = [ScheduleEval("uncompressed", "uncompressed", description="(none)")]
    for name, sched in loaded.items():
        kind, strategy, budget = _kind(name, specs[name], set(budget_specs))
        try:
            description = _describe(sched, model)["text"]
        except Exception as exc:  # noqa: BLE001 - reported per schedule, as for a failure while generating
            results.append(ScheduleEval(name, kind, strategy, budget, error=f"{type(exc).__name__}: {exc}"))
            continue
        results.append(ScheduleEval(name, kind, strategy, budget, description))
    for r in results:
        if not r.error:
            r.per_type = {q: Accuracy() for q in vqa.QTYPES if any(e.qtype == q for e in items)}
    retained: dict[str, list[float]] = {r.name: [] for r in results}
    pad = processor.tokenizer.pad_token_id
    gen = {"max_new_tokens": 2, "do_sample": False, "pad_token_id": pad}

    bar = tqdm(total=len(batches) * len(results), disable=not progress, desc="tokcomp eval", unit="run")
    with torch.no_grad():
        for k, (exs, inputs) in enumerate(zip(batches, encoded)):
            # Rotate the order every batch so that no schedule always runs right after the reference.
            order = results[k % len(results):] + results[: k % len(results)]
            for r in order:
                bar.update(1)
                if r.error:
                    continue
                clock = _FirstTokenClock()
                try:
                    ctx = tc.compress(model, loaded[r.name]) if r.kind != "uncompressed" else None
                    t0 = time.perf_counter()
                    if ctx is None:
                        out = model.generate(**inputs, **gen, logits_processor=[clock])
                    else:
                        with ctx as run:
                            out = model.generate(**inputs, **gen, logits_processor=[clock])
                        retained[r.name].append(run.report().retained_fraction())
                except Exception as exc:  # noqa: BLE001 - one broken schedule must not hide the others' numbers
                    r.error = f"{type(exc).__name__}: {exc}"
                    continue
                r.prefill_s += (clock.first or time.perf_counter()) - t0
                words = processor.tokenizer.convert_ids_to_tokens(out[:, inputs["input_ids"].shape[1]].tolist())
                r.answers += words
                for e, w in zip(exs, words):
                    r.per_type[e.qtype].total += 1
                    r.per_type[e.qtype].correct += int(w == e.answer)
    bar.close()

    base = results[0]
    for r in results:
        if r.error:
            r.per_type, r.answers = {}, []
            continue
        r.overall = Accuracy(sum(a.correct for a in r.per_type.values()), sum(a.total for a in r.per_type.values()))
        r.agreement = sum(a == b for a, b in zip(r.answers, base.answers)) / max(1, len(base.answers))
        r.retained = 1.0 if r.kind == "uncompressed" else sum(retained[r.name]) / max(1, len(retained[r.name]))
        r.speedup = base.prefill_s / r.prefill_s if r.prefill_s > 0 else None
    with contextlib.suppress(OSError):
        machine["load_average_end"] = list(os.getloadavg())
    return EvalResult(
        model=model_name or getattr(model, "name_or_path", "") or type(model).__name__,
        task={
            "seed": seed,
            "split": split,
            "examples": len(items),
            "qtypes": [q for q in vqa.QTYPES if any(e.qtype == q for e in items)],
            "chance": {q: vqa.chance_accuracy(q) for q in vqa.QTYPES},
        },
        batch=batch,
        budgets=list(budgets),
        num_layers=num_layers,
        visual_tokens=visual,
        schedules=results,
        wall_s=time.perf_counter() - t_start,
        machine=machine,
    )


# ---------------------------------------------------------------------------------------------------------
# The figure
# ---------------------------------------------------------------------------------------------------------
def plot_accuracy(result: EvalResult, path: str | Path, qtype: str | None = None) -> None:
    """Accuracy against visual tokens kept, one line per equal-budget strategy, presets as points.

    The uncompressed accuracy is the horizontal line at 100% kept; ``random`` and ``downsample``
    (the floor to beat) are drawn dashed in grey. Error bars are the 95% Wilson intervals.

    Args:
        result: From `evaluate`.
        path: The PNG to write.
        qtype: Plot one question type's accuracy instead of the overall one.

    Raises:
        ImportError: If matplotlib is not installed (``pip install matplotlib``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the accuracy plot needs matplotlib: pip install matplotlib") from exc

    def acc(s: ScheduleEval) -> Accuracy:
        return s.per_type[qtype] if qtype else s.overall

    fig, ax = plt.subplots(figsize=(8, 5.2), dpi=110)
    base = acc(result.uncompressed).value
    ax.axhline(base, color="black", lw=1.2, label=f"uncompressed ({base:.1%})")
    if qtype:
        ax.axhline(vqa.chance_accuracy(qtype), color="grey", lw=0.8, ls=":", label="chance")
    lines: dict[str, list[ScheduleEval]] = {}
    for s in result.schedules:
        if s.kind == "budget" and not s.error:
            lines.setdefault(s.strategy or s.name, []).append(s)
    for name, pts in sorted(lines.items()):
        pts.sort(key=lambda s: s.retained or 0)
        xs = [s.retained for s in pts]
        ys = [acc(s).value for s in pts]
        err = [[acc(s).value - acc(s).interval[0] for s in pts], [acc(s).interval[1] - acc(s).value for s in pts]]
        style = {"color": "grey", "ls": "--"} if name in FLOORS else {}
        ax.errorbar(xs, ys, yerr=err, marker="o", ms=4, capsize=2, lw=1.3, label=name, **style)
    for s in result.schedules:
        if s.kind in ("preset", "custom") and not s.error:
            ax.plot([s.retained], [acc(s).value], marker="*", ms=10, ls="none", color="black", alpha=0.7)
            ax.annotate(s.name, (s.retained or 0, acc(s).value), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
    ax.set_xlabel("visual tokens kept (mean over LLM layers, measured)")
    ax.set_ylabel(f"accuracy ({qtype})" if qtype else "accuracy (all question types)")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"tokcomp eval: {result.task['examples']} held-out questions, presets as stars", fontsize=10)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------
def _budgets(text: str) -> list[float]:
    import argparse

    if text.strip().lower() in ("", "none"):
        return []
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--budgets wants fractions like 0.5,0.25,0.11, got {text!r}") from None
    if not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"budgets are fractions in (0, 1], got {text!r}")
    return values


def add_arguments(p: Any) -> None:
    """The options of ``tokcomp eval`` (an ``argparse`` parser)."""
    p.add_argument("--model", default=None, help="a checkpoint folder from `python -m tokcomp.train` "
                   "(default: the shipped model)")
    p.add_argument("-s", "--schedule", action="append", default=None,
                   help="a preset name, a JSON/YAML schedule file or 'module:attr' (repeatable; default: "
                   "every registered preset)")
    p.add_argument("--budgets", type=_budgets, default=list(DEFAULT_BUDGETS),
                   help="equal-budget fractions for every strategy, comma-separated, or 'none' "
                   "(default 0.5,0.25,0.11)")
    p.add_argument("--examples", type=int, default=210, help="held-out questions (default 210, 30 per type)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="test", choices=vqa.SPLITS)
    p.add_argument("--batch", type=int, default=35)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", default=None, metavar="DIR", help="write eval.json and eval.png into DIR")
    p.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    p.add_argument("--no-progress", action="store_true")


def cli(args: Any) -> int:
    """Run ``tokcomp eval`` with parsed arguments: prints the table, writes ``--out`` files."""
    from rich.console import Console

    if args.examples <= 0:
        raise SystemExit("tokcomp eval: --examples must be positive")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = processor = None
    if args.model:
        from .train import load_checkpoint

        model, processor = load_checkpoint(args.model)
    result = evaluate(
        model,
        processor,
        args.schedule,
        budgets=args.budgets,
        examples=args.examples,
        seed=args.seed,
        split=args.split,
        batch=args.batch,
        progress=not args.no_progress,
        model_name=args.model,
    )
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        console = Console()
        if not console.is_terminal:
            console = Console(width=200)
        console.print(result.table())
        console.print(f"wall {result.wall_s:.1f} s, {result.machine['torch_threads']} threads; kept = visual tokens "
                      "over the LLM layers; speed-up = time to first token vs uncompressed")
        for s in result.schedules:
            if s.error:
                console.print(f"[red]{s.name}: {s.error}[/red]")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        result.save_json(out / "eval.json")
        plot_accuracy(result, out / "eval.png")
        if not args.json:
            print(f"wrote {out / 'eval.json'} and {out / 'eval.png'}")
    return 1 if any(s.error for s in result.schedules) else 0
