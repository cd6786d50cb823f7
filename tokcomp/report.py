"""What a compressed run did, per layer and per stage (``run.report()``)."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Report", "StageEvent"]


@dataclass(frozen=True)
class StageEvent:
    """One stage acting on one sample at one layer.

    Attributes:
        stage: The stage's label (``"0:spu@llm"``).
        layer: The layer (decoder layer for ``llm``) at whose input it acted.
        sample: Row of the batch.
        tokens_in: Visual tokens present before.
        tokens_out: Visual tokens kept.
        info: Numbers the strategy reported.
    """

    stage: str
    layer: int
    sample: int
    tokens_in: int
    tokens_out: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    """The last prefill of a `tokcomp.runtime.CompressionRun`.

    Attributes:
        num_layers: LLM depth.
        visual_tokens: ``[layer][sample]`` visual tokens entering each decoder layer.
        sequence_slots: ``[layer]`` sequence length (batch width, padding included) entering each layer.
        original_visual: ``[sample]`` visual tokens at the LLM input.
        events: Every stage decision.
        stages: The stage labels of the schedule.
        overhead_s: Wall time spent inside the strategies (their own cost).
        num_prefills: Prefill calls seen by the run (one per ``generate()``).
        text_tokens: ``[sample]`` non-visual, non-padding tokens (never removed by LLM-side stages).
        encoder_tokens: ``{block: [item]}`` tokens entering each vision-encoder block from the first
            encoder stage on (items of all tower calls in order: images, then videos). An item is what the
            tower attends over as one group: an image or video (Qwen2-VL), an image (LLaVA), a tile
            (InternVL), a tile or video frame (LLaVA-OneVision, whose LLM items are packed from several).
        vision_events: Every encoder/projector stage decision (stage, site, layer, tokens in/out per item).
        emitted_visual: ``[item]`` LLM tokens the vision tower emitted per item (after every vision stage).
        uncompressed_visual: ``[sample]`` visual tokens the LLM would get without any compression.
    """

    num_layers: int
    visual_tokens: list[list[int]]
    sequence_slots: list[int]
    original_visual: list[int]
    events: list[StageEvent]
    stages: list[str]
    overhead_s: float = 0.0
    num_prefills: int = 0
    text_tokens: list[int] = field(default_factory=list)
    encoder_tokens: dict[int, list[int]] = field(default_factory=dict)
    vision_events: list[dict[str, Any]] = field(default_factory=list)
    emitted_visual: list[int] = field(default_factory=list)
    uncompressed_visual: list[int] = field(default_factory=list)

    @property
    def batch(self) -> int:
        """Number of samples."""
        return len(self.original_visual)

    def tokens_for(self, sample: int) -> list[int]:
        """Visual tokens entering each LLM layer for one sample."""
        return [row[sample] for row in self.visual_tokens]

    @property
    def baseline_visual(self) -> list[int]:
        """``[sample]`` visual tokens without compression (``uncompressed_visual``, else ``original_visual``)."""
        return self.uncompressed_visual or self.original_visual

    def retained_fraction(self) -> float:
        """Visual tokens processed over all LLM layers and samples, relative to no compression at all
        (encoder-side reductions included)."""
        total = sum(self.baseline_visual) * self.num_layers
        return sum(sum(r) for r in self.visual_tokens) / total if total else 1.0

    def tokens_per_layer(self, sample: int) -> list[int]:
        """All tokens (text + visual) entering each LLM layer for one sample."""
        return [self.text_tokens[sample] + v for v in self.tokens_for(sample)]

    def llm_flops(self, shape: Any, *, baseline: bool = False) -> int:
        """LLM prefill FLOPs of the batch (sum over samples, padding excluded), by `tokcomp.flops`.

        Args:
            shape: The decoder-layer shape (`tokcomp.flops.LayerShape.from_text_config`).
            baseline: Count the uncompressed run instead (every visual token at every layer).
        """
        from .flops import llm_prefill_flops

        total = 0
        for b in range(self.batch):
            counts = (
                [self.text_tokens[b] + self.baseline_visual[b]] * self.num_layers
                if baseline
                else self.tokens_per_layer(b)
            )
            total += llm_prefill_flops(shape, counts)["total"]
        return total

    def llm_flops_ratio(self, shape: Any) -> float:
        """Compressed over uncompressed LLM prefill FLOPs."""
        base = self.llm_flops(shape, baseline=True)
        return self.llm_flops(shape) / base if base else 1.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (provenance tensors are left out; see ``vision_events`` in Python)."""
        d = asdict(self)
        d["vision_events"] = [{k: v for k, v in e.items() if k != "provenance"} for e in self.vision_events]
        d["retained_fraction"] = self.retained_fraction()
        return d

    def table(self) -> Any:
        """A `rich.table.Table` of visual tokens per layer and sample."""
        from rich.table import Table

        t = Table(title="visual tokens entering each LLM layer")
        t.add_column("layer", justify="right")
        for b in range(self.batch):
            t.add_column(f"sample {b}", justify="right")
        for layer, row in enumerate(self.visual_tokens):
            t.add_row(str(layer), *[str(x) for x in row])
        return t

    def __str__(self) -> str:
        from rich.console import Console

        buf = io.StringIO()
        console = Console(file=buf, width=100, force_terminal=False, color_system=None)
        console.print(self.table())
        acted: dict[str, list[StageEvent]] = {}
        for e in self.events:
            acted.setdefault(e.stage, []).append(e)
        for block, counts in sorted(self.encoder_tokens.items()):
            console.print(f"encoder block {block}: tokens per item {counts}")
        if self.emitted_visual:
            console.print(f"LLM tokens emitted per visual item: {self.emitted_visual}")
        for ev in self.vision_events:
            console.print(f"{ev['stage']} at {ev['site']} block {ev['layer']}: tokens per item "
                          f"{ev['tokens_in']} -> {ev['tokens_out']}")
        for stage, evs in acted.items():
            layers = sorted({e.layer for e in evs})
            console.print(
                f"{stage}: {len(evs)} decisions at layers {layers[0]}..{layers[-1]}, "
                f"{sum(e.tokens_in - e.tokens_out for e in evs)} tokens removed"
            )
        console.print(f"retained visual-token fraction over layers: {self.retained_fraction():.3f}; "
                      f"strategy overhead {self.overhead_s * 1e3:.1f} ms")
        return buf.getvalue()
