"""What a benchmark returns: `Spread` (median and spread of repeated measurements), `ScheduleResult` (one
schedule) and `BenchResult` (the whole benchmark), each with a JSON round trip."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["BenchResult", "ScheduleResult", "Spread"]


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

    def table(self, *, wide: bool = False) -> Any:
        """A `rich.table.Table` of the medians and speed-ups (`tokcomp.bench.tables.rich_table`).

        Args:
            wide: Every column, with spreads (``tokcomp bench --wide``); the default fits 100 columns.
        """
        from .tables import rich_table

        return rich_table(self, wide=wide)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
