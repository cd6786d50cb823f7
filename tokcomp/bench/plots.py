"""`plot_speedups`: measured against FLOPs-ideal speed-up, per retained visual-token fraction (PNG)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .results import BenchResult

__all__ = ["plot_speedups"]


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
