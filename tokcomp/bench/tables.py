"""A benchmark's table in every output format of ``tokcomp bench --format``.

* ``table``: a `rich` table. The default has the columns a reader compares first (tokens kept, prefill time,
  the LLM and prefill speed-ups with their FLOPs-ideal values, time to first token, fidelity) and fits a
  100-column terminal; ``wide`` adds the spreads, decode rate, memory, KV cache and overhead.
* ``markdown``: the same columns as a pipe table (for a README or an issue).
* ``csv``: one row per schedule with every measured number, unformatted (seconds, bytes, ratios).
* ``json``: the whole `BenchResult.to_dict`, as ``--json`` writes it.

Examples:
    >>> from tokcomp.bench.tables import NARROW, WIDE
    >>> [c.header for c in NARROW][:3]
    ['schedule', 'kept', 'prefill s']
    >>> set(c.header for c in NARROW) <= set(c.header for c in WIDE)
    True
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .results import BenchResult, ScheduleResult, Spread, _finite

__all__ = ["FORMATS", "NARROW", "WIDE", "Column", "csv_rows", "markdown_table", "render", "rich_table"]

FORMATS: tuple[str, ...] = ("table", "markdown", "csv", "json")
"""The values of ``tokcomp bench --format``."""


@dataclass(frozen=True)
class Column:
    """One column of the human-readable tables.

    Attributes:
        header: The column title.
        cell: The cell's text for one schedule's result.
    """

    header: str
    cell: Callable[[ScheduleResult], str]


def _median(s: Spread | None, fmt: str = "{:.3g}") -> str:
    return "-" if s is None else fmt.format(s.median)


def _spread(s: Spread | None, fmt: str = "{:.3g}") -> str:
    if s is None:
        return "-"
    return f"{fmt.format(s.median)} [{fmt.format(s.min)}–{fmt.format(s.max)}]"


def _pair(measured: float | None, ideal: float | None) -> str:
    m = "-" if measured is None else f"{measured:.2f}×"
    i = "-" if ideal is None else f"{ideal:.2f}×"
    return f"{m} ({i})"


def _peaks(r: ScheduleResult) -> str:
    """``whole (LLM)`` peak memory growth in MiB."""

    def mib(sp: Spread | None) -> str:
        return "-" if sp is None else f"{sp.median / 2**20:.0f}"

    return f"{mib(r.peak_memory_bytes)} ({mib(r.llm_peak_memory_bytes)})"


def _opt(v: Any, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


_KEPT = Column("kept", lambda r: f"{r.retained_fraction:.3f}")
_LLM_X = Column("LLM × (ideal)", lambda r: _pair(r.speedup.get("llm"), r.ideal_speedup.get("llm")))
_PREFILL_X = Column("prefill × (ideal)", lambda r: _pair(r.speedup.get("prefill"), r.ideal_speedup.get("prefill")))
_KL = Column("KL", lambda r: _opt(r.fidelity.get("kl_first_token"), "{:.3g}"))
_AGREE = Column("agree", lambda r: _opt(r.fidelity.get("greedy_agreement"), "{:.0%}"))

NARROW: tuple[Column, ...] = (
    Column("schedule", lambda r: r.name),
    _KEPT,
    Column("prefill s", lambda r: _median(r.prefill_s)),
    _LLM_X,
    _PREFILL_X,
    Column("TTFT s", lambda r: _median(r.ttft_s)),
    _KL,
    _AGREE,
)
"""The default columns (medians only): they fit 100 terminal columns for schedule names up to ~20 characters."""

WIDE: tuple[Column, ...] = (
    Column("schedule", lambda r: r.name),
    _KEPT,
    Column("prefill s", lambda r: _spread(r.prefill_s)),
    Column("LLM s", lambda r: _spread(r.llm_s)),
    _LLM_X,
    _PREFILL_X,
    Column("TTFT s", lambda r: _spread(r.ttft_s)),
    Column("decode tok/s", lambda r: _spread(r.decode_tokens_per_s, "{:.1f}")),
    Column("peak MiB (LLM)", _peaks),
    Column("KV MiB", lambda r: f"{r.kv_cache_bytes / 2**20:.1f}"),
    Column("overhead", lambda r: _opt(r.overhead_fraction.get("prefill"), "{:.1%}")),
    _KL,
    _AGREE,
)
"""Every column, with ``median [min–max]`` spreads (``--wide``)."""


def _cells(res: BenchResult, wide: bool) -> tuple[list[str], list[list[str]]]:
    cols = WIDE if wide else NARROW
    rows = []
    for r in res.rows():
        if r.error:
            rows.append([r.name, "error", *[""] * (len(cols) - 2)])
        else:
            rows.append([c.cell(r) for c in cols])
    return [c.header for c in cols], rows


def rich_table(res: BenchResult, *, wide: bool = False) -> Any:
    """A `rich.table.Table` of the result (`NARROW` columns, or `WIDE`)."""
    from rich.table import Table

    title = f"tokcomp bench: {res.model.get('short') or res.model.get('class')}"
    t = Table(title=title, title_justify="left")
    headers, rows = _cells(res, wide)
    for h in headers:
        t.add_column(h, justify="left" if h == "schedule" else "right", no_wrap=h != "schedule")
    for row in rows:
        if row[1] == "error":
            row = [row[0], "[red]error[/red]", *row[2:]]
        t.add_row(*row)
    return t


def markdown_table(res: BenchResult, *, wide: bool = False) -> str:
    """The result as a markdown pipe table (`NARROW` columns, or `WIDE`)."""
    headers, rows = _cells(res, wide)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


CSV_FIELDS: tuple[str, ...] = (
    "schedule", "retained_fraction", "prefill_s", "prefill_s_min", "prefill_s_max", "vision_s", "llm_s",
    "ttft_s", "decode_tokens_per_s", "speedup_llm", "ideal_speedup_llm", "speedup_prefill",
    "ideal_speedup_prefill", "peak_memory_bytes", "llm_peak_memory_bytes", "kv_cache_bytes",
    "overhead_fraction", "kl_first_token", "greedy_agreement", "error",
)
"""The columns of ``--format csv`` (times in seconds at the median unless named ``_min``/``_max``)."""


def csv_rows(res: BenchResult) -> list[dict[str, Any]]:
    """One record per schedule (the baseline first) with the fields of `CSV_FIELDS`, as numbers."""

    def med(s: Spread | None) -> float | None:
        return None if s is None else s.median

    out = []
    for r in res.rows():
        out.append({
            "schedule": r.name,
            "retained_fraction": r.retained_fraction,
            "prefill_s": med(r.prefill_s),
            "prefill_s_min": None if r.prefill_s is None else r.prefill_s.min,
            "prefill_s_max": None if r.prefill_s is None else r.prefill_s.max,
            "vision_s": med(r.vision_s),
            "llm_s": med(r.llm_s),
            "ttft_s": med(r.ttft_s),
            "decode_tokens_per_s": med(r.decode_tokens_per_s),
            "speedup_llm": r.speedup.get("llm"),
            "ideal_speedup_llm": r.ideal_speedup.get("llm"),
            "speedup_prefill": r.speedup.get("prefill"),
            "ideal_speedup_prefill": r.ideal_speedup.get("prefill"),
            "peak_memory_bytes": med(r.peak_memory_bytes),
            "llm_peak_memory_bytes": med(r.llm_peak_memory_bytes),
            "kv_cache_bytes": r.kv_cache_bytes,
            "overhead_fraction": r.overhead_fraction.get("prefill"),
            "kl_first_token": r.fidelity.get("kl_first_token"),
            "greedy_agreement": r.fidelity.get("greedy_agreement"),
            "error": r.error,
        })
    return out


def render(res: BenchResult, fmt: str = "markdown", *, wide: bool = False) -> str:
    """The result as text in one of `FORMATS` other than ``table`` (which `rich_table` draws).

    Args:
        res: The benchmark.
        fmt: ``"markdown"``, ``"csv"`` or ``"json"``.
        wide: Markdown only: every column.

    Raises:
        ValueError: An unknown format.
    """
    if fmt == "markdown":
        return markdown_table(res, wide=wide)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
        writer.writeheader()
        for row in csv_rows(res):
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
        return buf.getvalue().rstrip("\n")
    if fmt == "json":
        return json.dumps(_finite(res.to_dict()), indent=1)
    raise ValueError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
