"""The encoder- and projector-site runtime shared by the adapters.

An adapter unpacks its vision tower's token layout into `VisualTokens` at the blocks where stages run,
calls `VisionSession.run` and packs the result back; the session applies the stages, keeps the record of
token counts per block, and provides proportional attention for the blocks that follow a merge.

Proportional attention (``log size`` added to the attention logits of each key) is applied through
`transformers`' own extension point for attention functions: two functions, ``tokcomp_sdpa`` and
``tokcomp_eager``, are registered in ``AttentionInterface`` (a registry of named functions, not a patch of
any class); while a merged vision tower runs, its attention modules' config names one of them, which adds
the bias and calls the backend the user chose. The config is restored when the ``with`` block ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .contracts import VisualStrategy
from .errors import RuntimeStateError
from .schedule import ResolvedStage
from .tokens import VisualItemTokens, VisualTokens

__all__ = ["BIAS_PREFIX", "ChunkedBias", "VisionCallResult", "VisionSession", "enable_bias_attention"]

BIAS_PREFIX = "tokcomp_"
"""Prefix of the attention functions tokcomp registers with transformers (``tokcomp_sdpa``, ...)."""


class ChunkedBias:
    """A per-token additive key bias over a packed sequence, consumed chunk by chunk.

    Vision towers that pack images into one sequence run attention once per image (or window) in order;
    each call takes the next ``n`` entries.
    """

    def __init__(self, bias: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> None:
        self.bias = bias
        self.offset = 0
        self.bounds = None if cu_seqlens is None else [int(v) for v in cu_seqlens.tolist()]

    def take(self, n: int) -> torch.Tensor:
        """The next ``n`` entries, shaped ``(1, 1, 1, n)`` for broadcasting over heads and queries."""
        if self.offset + n > self.bias.numel():
            self.offset = 0  # a new pass over the same sequence (e.g. gradient checkpointing)
        out = self.bias[self.offset:self.offset + n]
        self.offset += n
        return out.view(1, 1, 1, n)


def _bias_attention(base: str) -> Callable[..., Any]:
    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> Any:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        bias: ChunkedBias | None = kwargs.pop("tokcomp_bias", None)
        if bias is not None:
            b = bias.take(key.shape[-2]).to(query.dtype)
            if attention_mask is None:
                attention_mask = b
            elif attention_mask.dtype == torch.bool:
                neg = torch.finfo(query.dtype).min
                attention_mask = torch.zeros_like(b).expand_as(attention_mask).masked_fill(~attention_mask, neg) + b
            else:
                attention_mask = attention_mask + b
            if attention_mask.shape[-2] == 1:
                attention_mask = attention_mask.expand(*attention_mask.shape[:-2], query.shape[-2], key.shape[-2])
        if base == "eager":
            fn = _eager
        else:
            fn = ALL_ATTENTION_FUNCTIONS[base]
        return fn(module, query, key, value, attention_mask, **kwargs)

    return attention


def _eager(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
           **_: Any) -> tuple[torch.Tensor, torch.Tensor]:
    # The same computation as transformers' eager attention (which lives per model file).
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    w = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        w = w + attention_mask
    w = torch.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(w, value).transpose(1, 2).contiguous()
    return out, w


_registered = False


def enable_bias_attention() -> None:
    """Register ``tokcomp_sdpa`` and ``tokcomp_eager`` with transformers' ``AttentionInterface`` (once)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface

    AttentionInterface.register(BIAS_PREFIX + "sdpa", _bias_attention("sdpa"))
    AttentionInterface.register(BIAS_PREFIX + "eager", _bias_attention("eager"))
    _registered = True


@dataclass
class VisionCallResult:
    """What one call of the vision tower emitted, per item, for the LLM input to follow.

    Attributes:
        original_units: ``[item]`` tokens the projector would have emitted without compression.
        units: ``[item]`` tokens it emits now (the first ``units[i]`` of the item's run are real).
        grids: ``[item]`` the new ``(t, h, w)`` in LLM tokens, or None where the item is no longer a grid.
        anchors: ``[item]`` for non-grid items: the original token index whose position each output
            token takes; None for grid items.
        provenance: ``[item][frame]`` owner maps (original patch → final LLM token of that frame).
        encoder_tokens: ``{block: [item tokens]}`` tokens entering each encoder block.
        features: ``[item]`` the projected features the LLM receives (``units[i]`` rows each).
        events: The stage decisions taken during this call.
    """

    original_units: list[int]
    units: list[int]
    grids: list[tuple[int, int, int] | None]
    anchors: list[torch.Tensor | None]
    provenance: list[list[torch.Tensor]] = field(default_factory=list)
    encoder_tokens: dict[int, list[int]] = field(default_factory=dict)
    features: list[torch.Tensor] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)


class VisionSession:
    """Applies the encoder/projector stages of a run; one per `tokcomp.compress` block.

    Attributes:
        encoder_stages: Stages at the encoder site.
        projector_stages: Stages at the projector site.
        pending: Results of vision-tower calls not yet matched to an LLM input.
        last: The most recent results (reused when generate() runs the LLM again on cached features).
    """

    def __init__(self, stages: Sequence[ResolvedStage], num_blocks: int, multiple: int) -> None:
        self.encoder_stages = [s for s in stages if s.site == "encoder"]
        self.projector_stages = [s for s in stages if s.site == "projector"]
        self.num_blocks = num_blocks
        self.multiple = multiple
        self.pending: list[VisionCallResult] = []
        self.last: list[VisionCallResult] = []
        self.events: list[dict[str, Any]] = []
        self.overhead_s = 0.0
        self.proportional = any(getattr(s.strategy, "proportional_attention", False) for s in stages)

    @property
    def active(self) -> bool:
        """Whether any encoder/projector stage exists."""
        return bool(self.encoder_stages or self.projector_stages)

    def encoder_blocks(self) -> set[int]:
        """Blocks at whose input an encoder stage runs."""
        return {b for s in self.encoder_stages for b in s.layers}

    def needs_keys(self) -> bool:
        """Whether some stage measures similarity on attention keys."""
        return any(getattr(s.strategy, "metric", "") == "keys" for s in self.encoder_stages)

    def run(self, site: str, layer: int, tokens: list[VisualItemTokens]) -> list[VisualItemTokens]:
        """Apply every stage of ``site`` scheduled at ``layer`` to ``tokens``."""
        stages = self.encoder_stages if site == "encoder" else self.projector_stages
        t0 = time.perf_counter()
        for stage in stages:
            if site == "encoder" and layer not in stage.layers:
                continue
            strategy = stage.strategy
            if not isinstance(strategy, VisualStrategy):
                raise RuntimeStateError(f"{stage.label}: {type(strategy).__name__} cannot run at {site}")
            before = [it.num_tokens for it in tokens]
            multiple = self.multiple if site == "encoder" else 1
            vt = VisualTokens(tokens, site, layer, self.num_blocks, stage.layers, multiple)
            out = strategy.reduce(vt)
            for it, old in zip(out.items, tokens):
                shapes = {f.shape for f in it.frames}
                if len(shapes) != 1 or len(it.frames) != len(old.frames):
                    raise RuntimeStateError(f"{stage.label}: frames of one item must keep one shape")
                if it.frames[0].is_grid and multiple > 1:
                    h, w = it.frames[0].shape
                    if h % multiple or w % multiple:
                        raise RuntimeStateError(
                            f"{stage.label}: produced a {h}x{w} grid; the projector needs sides divisible by "
                            f"{multiple}"
                        )
            tokens = out.items
            self.events.append({
                "stage": stage.label, "site": site, "layer": layer, "tokens_in": before,
                "tokens_out": [it.num_tokens for it in tokens], "info": dict(out.info),
                # provenance after this stage: per item, per frame, original patch -> current token
                "provenance": [[fr.owner.detach().cpu() for fr in it.frames] for it in tokens],
                "grids": [it.grid for it in tokens],
            })
        self.overhead_s += time.perf_counter() - t0
        return tokens

    def finish_call(self, result: VisionCallResult) -> None:
        """Queue one tower call's result for the LLM input, with the decisions taken during the call."""
        result.events, self.events = self.events, []
        self.pending.append(result)

    def take(self) -> list[VisionCallResult]:
        """The results waiting for an LLM input (or the last ones when the tower did not run again)."""
        if self.pending:
            self.last, self.pending = self.pending, []
        return self.last

    def reset(self) -> None:
        """Forget everything recorded."""
        self.pending, self.last, self.events = [], [], []
        self.overhead_s = 0.0
