"""The encoder- and projector-site runtime shared by the adapters.

An adapter unpacks its vision tower's token layout into `VisualTokens` at the blocks where stages run,
calls `VisionSession.run` and packs the result back; the session applies the stages, keeps the record of
token counts per block, and provides proportional attention for the blocks that follow a merge.

Proportional attention (``log size`` added to the attention logits of each key) is applied through
`transformers`' own extension point for attention functions: two functions, ``tokcomp_sdpa`` and
``tokcomp_eager``, are registered in ``AttentionInterface`` (a registry of named functions, not a patch of
any class); while a merged vision tower runs, its attention modules' config names one of them, which adds
the bias and calls the backend the user chose. The config is restored when the ``with`` block ends.

Besides the session, this module holds what the adapters of *row towers* share: fixed-resolution ViTs
(CLIP, SigLIP, InternViT) that run every image or tile as one row of a ``(n, P + h*w, C)`` batch, with ``P``
leading non-patch tokens (CLS). `RowTower` describes such a tower and `RowTowerHooks` implements the
encoder and projector sites on it; `first_slots_input` carries the result to an LLM with 1-D positions.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .checks import checked_reduce
from .contracts import AttentionSite, EncoderAttention, LLMInput, SampleLayout, VisualItem, VisualStrategy
from .errors import RuntimeStateError, ScheduleError
from .schedule import ResolvedStage
from .tokens import FrameGrid, VisualItemTokens, VisualTokens
from .vision_attention import call_rows, current_rows, needs_by_block

__all__ = [
    "BIAS_PREFIX",
    "ChunkedBias",
    "RowBias",
    "RowTower",
    "RowTowerHooks",
    "VisionCallResult",
    "VisionSession",
    "compact_positions",
    "enable_bias_attention",
    "feature_index",
    "first_slots_input",
    "hidden_states_of",
    "install_row_tower",
    "layout_first_slots_input",
    "unit_frame",
    "valid_slots",
    "with_hidden_states",
]

BIAS_PREFIX = "tokcomp_"
"""Prefix of the attention functions tokcomp registers with transformers (``tokcomp_sdpa``, ...)."""


def hidden_states_of(args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a module's forward pre-hook received (first positional, or the keyword)."""
    return args[0] if args else kwargs["hidden_states"]


def with_hidden_states(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    """The (args, kwargs) a forward pre-hook returns to replace the module's hidden-states input."""
    if args:
        return (hidden, *args[1:]), kwargs
    kwargs["hidden_states"] = hidden
    return args, kwargs


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


class RowBias:
    """A per-token additive key bias for towers that run every image as one row of a batch.

    ``bias`` is ``(n, T)``; every attention call of the tower takes all of it, shaped ``(n, 1, 1, T)``.
    """

    def __init__(self, bias: torch.Tensor) -> None:
        self.bias = bias

    def take(self, n: int) -> torch.Tensor:
        """The bias of every row for keys of length ``n`` (which must be the row length)."""
        if n != self.bias.shape[1]:
            raise RuntimeStateError(f"attention over {n} keys, but the bias covers {self.bias.shape[1]} tokens")
        return self.bias[:, None, None, :]


def _bias_attention(base: str) -> Callable[..., Any]:
    def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs: Any) -> Any:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        bias: ChunkedBias | None = kwargs.pop("tokcomp_bias", None)
        if bias is not None:
            attention_mask = _with_bias(attention_mask, bias.take(key.shape[-2]).to(query.dtype))
            if attention_mask.shape[-2] == 1:
                attention_mask = attention_mask.expand(*attention_mask.shape[:-2], query.shape[-2], key.shape[-2])
        if base == "eager":
            fn = _eager
        else:
            fn = ALL_ATTENTION_FUNCTIONS[base]
        return fn(module, query, key, value, attention_mask, **kwargs)

    return attention


def _with_bias(mask: torch.Tensor | None, bias: torch.Tensor) -> torch.Tensor:
    """An attention mask (None, boolean "may attend", or additive) with an additive ``bias`` added."""
    if mask is None:
        return bias
    if mask.dtype == torch.bool:
        neg = torch.finfo(bias.dtype).min
        return torch.zeros_like(bias).expand_as(mask).masked_fill(~mask, neg) + bias
    return mask + bias


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

    def __init__(self, stages: Sequence[ResolvedStage], num_blocks: int, multiple: int, has_cls: bool = False) -> None:
        self.encoder_stages = [s for s in stages if s.site == "encoder"]
        self.projector_stages = [s for s in stages if s.site == "projector"]
        self.num_blocks = num_blocks
        self.multiple = multiple
        self.pending: list[VisionCallResult] = []
        self.last: list[VisionCallResult] = []
        self.events: list[dict[str, Any]] = []
        self.overhead_s = 0.0
        self.proportional = any(getattr(s.strategy, "proportional_attention", False) for s in stages)
        self.has_cls = has_cls

    @property
    def active(self) -> bool:
        """Whether any encoder/projector stage exists."""
        return bool(self.encoder_stages or self.projector_stages)

    def encoder_blocks(self) -> set[int]:
        """Blocks at whose input an encoder stage runs."""
        return {b for s in self.encoder_stages for b in s.layers}

    def needs_keys(self) -> bool:
        """Whether some stage measures similarity on attention keys."""
        return any(getattr(s.strategy, "metric", "") in ("keys", "auto") for s in self.encoder_stages)

    def attention_needs(self, site: str, layer: int) -> list[EncoderAttention]:
        """The `EncoderAttention` requests of the stages of ``site`` that run at ``layer`` (the projector: any)."""
        stages = self.encoder_stages if site == "encoder" else self.projector_stages
        out: list[EncoderAttention] = []
        for st in stages:
            if site == "encoder" and layer not in st.layers:
                continue
            if isinstance(st.strategy, VisualStrategy):
                at = AttentionSite(site, layer if site == "encoder" else self.num_blocks, self.num_blocks, self.has_cls)
                out.extend(n for n in st.strategy.attention_needs(at) if n not in out)
        return out

    def attention_blocks(self) -> dict[int, set[str]]:
        """``{block: {query, ...}}``: the encoder attention to compute while the tower runs (every stage's)."""
        needs = [n for b in sorted(self.encoder_blocks()) for n in self.attention_needs("encoder", b)]
        needs += self.attention_needs("projector", self.num_blocks)
        return needs_by_block(needs)

    def run(self, site: str, layer: int, tokens: list[VisualItemTokens], prefix: int = 0) -> list[VisualItemTokens]:
        """Apply every stage of ``site`` scheduled at ``layer`` to ``tokens`` (``prefix``: `VisualTokens.prefix`)."""
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
            vt = VisualTokens(tokens, site, layer, self.num_blocks, stage.layers, multiple, prefix=prefix)
            out = checked_reduce(stage.label, strategy, vt)
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

    def attach_events(self, result: VisionCallResult) -> None:
        """Give ``result`` the decisions recorded since the last call (stages run outside a tower call, e.g.
        on the packed LLM input), replacing the ones it had."""
        result.events, self.events = self.events, []

    def take(self) -> list[VisionCallResult]:
        """The results waiting for an LLM input (or the last ones when the tower did not run again: generate()
        with ``use_cache=False`` runs every step's prefill on the features it computed once).

        Shallow copies are returned, so an adapter that annotates them for the report leaves the originals as
        the tower left them for a later reuse.
        """
        if self.pending:
            self.last, self.pending = self.pending, []
        return [copy.copy(r) for r in self.last]

    def reset(self) -> None:
        """Forget everything recorded."""
        self.pending, self.last, self.events = [], [], []
        self.overhead_s = 0.0


# ----------------------------------------------------------------------------------------------------------
# Row towers: fixed-resolution ViTs that run every image (tile, frame) as one row of a batch.
#
# Encoder site: at a block where a stage runs, each row's patch tokens become one grid (the leading CLS
# token(s) are kept aside: never merged, size 1), the stages run, and the rows are packed back as
# ``[CLS, tokens in raster order (or the strategy's order for 1-D frames)]``. Every row must keep the same
# number of tokens (they share one tensor). Later blocks get a `RowBias` of ``log size`` when proportional
# attention is on. The tower's outputs (``last_hidden_state`` and the ``hidden_states`` the features are read
# from) are spread back to the original row length, so the model's own reshapes and checks pass:
# ``"first"`` puts the tokens in the first slots and zeros after them (per-token projectors), ``"corner"``
# puts the merged ``h' x w'`` grid in the top-left corner of the original ``h x w`` canvas (projectors with a
# local ``m x m`` window such as pixel shuffle: the top-left ``h'/m x w'/m`` units then read only real tokens).
#
# Projector site (and the record of every call): on the projector's output, each row's real units are read
# back as one grid (or 1-D list), the projector stages run, and the row is rewritten with its real units in
# its first slots (after any leading non-grid rows, e.g. a CLS fed to the LLM) and zeros after them. The LLM
# input then keeps the first ``units`` slots of every item (`first_slots_input`).


@dataclass
class RowTower:
    """Where the parts of a row tower are (built by the adapter for one model).

    Attributes:
        tower: The vision model: its call starts a record, its output is spread back.
        blocks: The encoder blocks, in order.
        attention: Per block, the module that calls the attention function (receives ``tokcomp_bias``).
        keys: Per block, a module whose output is the block's attention keys ``(n, T, heads * head_dim)``.
        num_heads: Attention heads of the tower.
        grid: ``(h, w)`` patches per row.
        prefix: Leading non-patch tokens per row (1 for a CLS token, 0 for SigLIP).
        projector: The module whose output ``(n, P_out + h/m * w/m, D)`` the LLM receives per row.
        unit: ``m``, the side of the projector's square window (1: per token, 2: pixel shuffle 0.5).
        canvas: ``"first"`` or ``"corner"``: how merged tokens are spread back (see the section comment).
        feature_index: The tower hidden state the LLM features are read from, as an index into
            ``hidden_states`` (``0``: the input of block 0, ``len(blocks)``: the last block's output); encoder
            stages must run at blocks ``<= feature_index``.
        projector_stages: Run the projector-site stages on each row's projected tokens (False when the
            adapter runs them elsewhere, e.g. LLaVA-OneVision on the packed LLM input).
        bias_in_mask: Hand proportional attention's ``log size`` to the attention modules as their additive
            ``attention_mask`` (for attention modules that do not pass extra kwargs on to the attention
            function, e.g. SigLIP's); otherwise as the ``tokcomp_bias`` kwarg of ``tokcomp_sdpa``/``_eager``.
        queries: Per block, a module whose output is the block's attention queries ``(n, T, heads *
            head_dim)`` as the attention function receives them (after any q norm); with ``keys`` (which must
            then be the keys as the attention receives them) it lets the runtime compute
            `tokcomp.contracts.EncoderAttention` requests. None: the tower cannot provide them.
    """

    tower: nn.Module
    blocks: Sequence[nn.Module]
    attention: Sequence[nn.Module]
    keys: Sequence[nn.Module]
    num_heads: int
    grid: tuple[int, int]
    prefix: int
    projector: nn.Module
    unit: int = 1
    canvas: str = "first"
    feature_index: int | None = None
    projector_stages: bool = True
    bias_in_mask: bool = False
    queries: Sequence[nn.Module] | None = None


def feature_index(vision_feature_layer: int | Sequence[int], depth: int) -> int:
    """The index into a tower's ``hidden_states`` (``depth + 1`` entries) that a model's
    ``vision_feature_layer`` reads; the earliest one when it concatenates several."""
    if isinstance(vision_feature_layer, int):
        return vision_feature_layer % (depth + 1)
    return min(int(v) % (depth + 1) for v in vision_feature_layer)


def install_row_tower(spec: RowTower, session: VisionSession, where: str) -> list[Any]:
    """Check ``spec`` against the session's encoder stages and install its `RowTowerHooks`; return the
    handles. ``where`` names the caller in error messages (e.g. ``"the 'llava' adapter"``)."""
    hooks = RowTowerHooks(spec, session)
    hooks.check(where)
    return hooks.install()


def _hidden_state_indices(selection: Any, depth: int, last_block: int | None) -> set[int]:
    """Indices into a tower's ``hidden_states`` (``depth + 1`` entries) that an ``output_hidden_states``
    argument selects; ``True`` selects those at or after the last encoder stage."""
    if selection is None or selection is False:
        return set()
    if selection is True:
        return set(range(last_block or 0, depth + 1))
    values = [selection] if isinstance(selection, int) else list(selection)
    return {int(v) % (depth + 1) for v in values if -(depth + 1) <= int(v) <= depth}


class _RowCall:
    """State of one call of a row tower."""

    def __init__(self, rows: int, record: set[int]) -> None:
        self.rows = rows
        self.record = record  # hidden-state indices to spread back
        self.items: list[VisualItemTokens] | None = None  # patch-level state once a stage ran
        self.prefix: torch.Tensor | None = None  # (n, P, C) the leading tokens at the last unpack
        self.bias: torch.Tensor | None = None  # (n, T) log sizes, None while all sizes are 1
        self.keys: dict[int, torch.Tensor] = {}
        self.entering: dict[int, torch.Tensor] = {}
        self.tokens_per_block: dict[int, list[int]] = {}
        self.version = 0  # how many times a stage changed the tokens (bumped by _pack)
        self.qk: dict[int, dict[str, torch.Tensor]] = {}  # captured q/k of an attention block, until both exist
        self.attn: dict[EncoderAttention, tuple[torch.Tensor, int]] = {}  # (n, H, T) rows and the version


class RowTowerHooks:
    """The encoder- and projector-site hooks on one row tower for the duration of a `tokcomp.compress` block."""

    def __init__(self, spec: RowTower, session: VisionSession) -> None:
        if spec.canvas not in ("first", "corner"):
            raise ValueError(f"canvas must be 'first' or 'corner', got {spec.canvas!r}")
        if spec.canvas == "first" and spec.unit != 1:
            raise ValueError("a projector with an m x m window (unit > 1) needs canvas='corner'")
        self.spec = spec
        self.session = session
        self.depth = len(spec.blocks)
        blocks = session.encoder_blocks()
        self.last_block = max(blocks) if blocks else None
        self.call: _RowCall | None = None

    def check(self, where: str) -> None:
        """Raise `ScheduleError` when an encoder stage runs after the block whose input the LLM reads."""
        idx = self.spec.feature_index
        if self.last_block is not None and idx is not None and self.last_block > idx:
            raise ScheduleError(
                f"{where} reads its image features from the vision tower's hidden_states[{idx}] (the input of "
                f"block {idx}), so an encoder stage at block {self.last_block} would change nothing the LLM "
                f"sees; schedule encoder stages at blocks 0..{idx}"
            )

    def install(self) -> list[Any]:
        """Register the hooks; return their handles."""
        spec, session = self.spec, self.session
        hs = [spec.tower.register_forward_pre_hook(self._start, with_kwargs=True),
              spec.tower.register_forward_hook(self._outputs, with_kwargs=True)]
        blocks = session.encoder_blocks()
        if blocks:
            for i in range(min(blocks), self.depth):
                hs.append(spec.blocks[i].register_forward_pre_hook(self._block_hook(i), with_kwargs=True))
                if session.proportional:
                    hs.append(spec.attention[i].register_forward_pre_hook(self._bias_hook, with_kwargs=True))
            if session.needs_keys():
                for b in sorted(blocks):
                    if b >= 1:
                        hs.append(spec.keys[b - 1].register_forward_hook(self._keys_hook(b)))
        attention = session.attention_blocks()
        if attention and spec.queries is None:
            raise ScheduleError("this vision tower cannot provide encoder attention (RowTower.queries is not set)")
        for c, queries in sorted(attention.items()):
            assert spec.queries is not None
            hs.append(spec.queries[c].register_forward_hook(self._qk_hook(c, "q", queries)))
            hs.append(spec.keys[c].register_forward_hook(self._qk_hook(c, "k", queries)))
        hs.append(spec.projector.register_forward_hook(self._project))
        return hs

    def _qk_hook(self, block: int, part: str, queries: set[str]) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            call = self.call
            if call is None:
                return
            got = call.qk.setdefault(block, {})
            got[part] = out.detach()
            if len(got) < 2:
                return
            del call.qk[block]
            heads = self.spec.num_heads
            n, t, c = got["q"].shape
            q = got["q"].reshape(n, t, heads, c // heads).transpose(1, 2)
            k = got["k"].reshape(n, t, heads, c // heads).transpose(1, 2)
            attn = self.spec.attention[block]
            scaling = float(getattr(attn, "scale", None) or getattr(attn, "scaling", None) or (c // heads) ** -0.5)
            bias = call.bias if self.session.proportional else None
            for query in queries:
                rows = torch.stack([
                    call_rows(q[j], k[j], scaling, query, None if bias is None else bias[j]) for j in range(n)
                ])
                if query == "mean":
                    rows = rows / t  # every query row of the tile: the prefix and the patches
                call.attn[EncoderAttention(block, query)] = (rows, call.version)

        return hook

    def _attach(self, frame: FrameGrid, j: int, needs: Sequence[EncoderAttention], where: str,
                unit: int = 1) -> FrameGrid:
        """``frame`` (row ``j``) with the requested attention rows, per token (pooled over ``unit x unit``)."""
        call = self.call
        assert call is not None
        if not needs:
            return frame
        P = self.spec.prefix
        out = dict(frame.attention)
        for need in needs:
            rows = current_rows(call.attn, need, call.version, where)
            a = rows[j, :, P:]
            hh, ww = frame.shape
            if unit > 1:
                a = a.reshape(-1, hh * unit, ww * unit)
                a = a.reshape(a.shape[0], hh, unit, ww, unit).mean((2, 4))
            out[need] = a.reshape(-1, hh, ww)
        return frame.with_values(attention=out)

    # -- tower ---------------------------------------------------------------------------------------------
    def _start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        pixels = args[0] if args else kwargs.get("pixel_values")
        rows = int(pixels.shape[0]) if isinstance(pixels, torch.Tensor) else 0
        record = _hidden_state_indices(kwargs.get("output_hidden_states"), self.depth, self.last_block)
        if self.last_block is not None:
            early = sorted(k for k in record if k < self.last_block)
            if early:
                raise RuntimeStateError(
                    f"the image features are read from the vision tower's hidden_states{early}, before the "
                    f"encoder stage at block {self.last_block}; schedule encoder stages at blocks <= {min(early)}"
                )
        self.call = _RowCall(rows, record)

    def _keys_hook(self, block: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if self.call is None:
                return
            n, t, c = out.shape
            self.call.keys[block] = out.reshape(n, t, self.spec.num_heads, c // self.spec.num_heads).mean(2).detach()

        return hook

    def _bias_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        call = self.call
        if call is None or call.bias is None:
            return None
        if not self.spec.bias_in_mask:
            kwargs["tokcomp_bias"] = RowBias(call.bias)
            return args, kwargs
        bias = call.bias[:, None, None, :].to(hidden_states_of(args, kwargs).dtype)
        kwargs["attention_mask"] = _with_bias(kwargs.get("attention_mask"), bias)
        return args, kwargs

    def _block_hook(self, i: int) -> Callable[..., tuple[tuple, dict] | None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            call = self.call
            if call is None:
                return None
            hs = hidden_states_of(args, kwargs)
            if i in self.session.encoder_blocks():
                items = self.session.run("encoder", i, self._unpack(hs, i), self.spec.prefix)
                hs = self._pack(items, hs)
            if call.items is not None:
                call.tokens_per_block[i] = [int(hs.shape[1])] * int(hs.shape[0])
            if i in call.record:
                call.entering[i] = hs
            return with_hidden_states(args, kwargs, hs)

        return hook

    def _unpack(self, hs: torch.Tensor, block: int) -> list[VisualItemTokens]:
        call = self.call
        assert call is not None
        P, (h, w) = self.spec.prefix, self.spec.grid
        n, _, c = hs.shape
        metric = call.keys.get(block)
        call.prefix = hs[:, :P]
        needs = self.session.attention_needs("encoder", block)
        where = f"encoder block {block}"
        if call.items is None:
            if hs.shape[1] != P + h * w:
                raise RuntimeStateError(
                    f"the vision tower runs {hs.shape[1]} tokens per row; expected {P} + {h}x{w} patches"
                )
            items = []
            for j in range(n):
                mt = None if metric is None else metric[j, P:].reshape(h, w, -1)
                frame = FrameGrid.fresh(hs[j, P:].reshape(h, w, c), mt).with_values(prefix_x=hs[j, :P])
                frame = self._attach(frame, j, needs, where)
                items.append(VisualItemTokens("image", [frame], (1, h, w)))
            return items
        for j, item in enumerate(call.items):
            fr = item.frames[0]
            mt = None if metric is None else metric[j, P:].reshape(*fr.shape, -1)
            fr = fr.with_values(x=hs[j, P:].reshape(*fr.shape, c), metric=mt, prefix_x=hs[j, :P])
            item.frames[0] = self._attach(fr, j, needs, where)
        return call.items

    def _pack(self, items: list[VisualItemTokens], hs: torch.Tensor) -> torch.Tensor:
        call = self.call
        assert call is not None and call.prefix is not None
        counts = [it.num_tokens for it in items]
        if any(len(it.frames) != 1 for it in items) or len(set(counts)) > 1:
            raise RuntimeStateError(
                f"the images of one vision-tower call share one tensor, so every image must keep the same "
                f"number of tokens; the encoder stage left {counts}. Use a strategy that removes the same "
                "number from every image (OIM, ToMe with a fixed r, downsample)"
            )
        c = hs.shape[-1]
        x = torch.stack([it.frames[0].x.reshape(-1, c) for it in items]).to(hs.dtype)
        x = torch.cat([call.prefix, x], 1)
        size = torch.stack([it.frames[0].size.reshape(-1).float() for it in items])
        call.items = items
        call.version += 1
        call.bias = None
        if not bool((size == 1).all()):
            ones = size.new_ones(size.shape[0], self.spec.prefix)
            call.bias = torch.cat([ones, size], 1).log()
        return x

    def _spread(self, t: torch.Tensor) -> torch.Tensor:
        """``(n, P + n', C)`` packed tokens back to ``(n, P + h*w, C)`` (see the section comment)."""
        call = self.call
        assert call is not None and call.items is not None
        P, (h, w) = self.spec.prefix, self.spec.grid
        n, _, c = t.shape
        full = t.new_zeros(n, P + h * w, c)
        if self.spec.canvas == "first":
            full[:, : t.shape[1]] = t
            return full
        full[:, :P] = t[:, :P]
        for j, item in enumerate(call.items):
            fr = item.frames[0]
            if not fr.is_grid:
                raise RuntimeStateError("this projector needs a 2-D grid; an encoder stage broke the layout")
            hh, ww = fr.shape
            canvas = t.new_zeros(h, w, c)
            canvas[:hh, :ww] = t[j, P:].reshape(hh, ww, c)
            full[j, P:] = canvas.reshape(h * w, c)
        return full

    def _outputs(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        call = self.call
        if call is None or call.items is None:
            return None
        if isinstance(out, tuple):
            raise RuntimeStateError("tokcomp needs the vision tower called with return_dict=True")
        states = getattr(out, "hidden_states", None)
        if states is not None:
            new = list(states)
            for k in sorted(call.record):
                if k < len(new) and new[k] is not None:
                    new[k] = self._spread(call.entering.get(k, new[k]) if k < self.depth else new[k])
            out.hidden_states = tuple(new)
        if getattr(out, "last_hidden_state", None) is not None:
            out.last_hidden_state = self._spread(out.last_hidden_state)
        call.entering.clear()
        return out

    # -- projector -----------------------------------------------------------------------------------------
    def _project(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        call = self.call if self.call is not None else _RowCall(int(out.shape[0]), set())
        self.call = None
        m, (h, w) = self.spec.unit, self.spec.grid
        hu, wu = h // m, w // m
        n, T, D = out.shape
        lead = T - hu * wu  # rows fed to the LLM that are not grid units (a CLS token)
        if lead < 0:
            raise RuntimeStateError(f"the projector emits {T} tokens per row, fewer than the {hu}x{wu} grid")
        units: list[VisualItemTokens] = []
        stages = bool(self.session.projector_stages) and self.spec.projector_stages
        needs = self.session.attention_needs("projector", self.depth) if stages else []
        self.call = call
        for j in range(n):
            if call.items is None:
                frame = unit_frame(out[j, lead:].reshape(hu, wu, D), None, m)
            else:
                fr = call.items[j].frames[0]
                if self.spec.canvas == "first":
                    x = out[j, lead:lead + fr.num_tokens]
                else:
                    x = out[j, lead:].reshape(hu, wu, D)[: fr.shape[0] // m, : fr.shape[1] // m]
                frame = unit_frame(x, fr, m)
            if needs and m > 1 and not frame.is_grid:
                raise RuntimeStateError(f"encoder attention at this {m}x{m} projector needs a 2-D grid")
            frame = self._attach(frame, j, needs, "the projector", m)
            units.append(VisualItemTokens("image", [frame], (1, hu, wu)))
        self.call = None
        if stages:
            units = self.session.run("projector", self.depth, units)
        changed = call.items is not None or stages
        new = out.clone() if changed else out
        result = VisionCallResult([hu * wu] * n, [], [], [])
        for j, it in enumerate(units):
            fr = it.frames[0]
            k = fr.num_tokens
            if changed:
                new[j, lead:] = 0
                new[j, lead:lead + k] = fr.x.reshape(k, D).to(new.dtype)
            result.units.append(k)
            result.features.append(new[j, lead:lead + k])
            result.grids.append(it.grid if fr.is_grid else None)
            result.anchors.append(None)
            result.provenance.append([fr.owner])
        result.encoder_tokens = dict(call.tokens_per_block)
        self.session.finish_call(result)
        return new if changed else None


def unit_frame(x: torch.Tensor, patches: FrameGrid | None, m: int) -> FrameGrid:
    """The projector's output for one frame as a `FrameGrid` of LLM units, each an ``m x m`` window of the
    patch-level grid ``patches`` (sizes summed, positions size-weighted and converted to unit coordinates,
    provenance mapped from patches to units). ``patches=None``: the frame was not reduced; ``m == 1``: units
    are the patch-level tokens themselves (1-D frames allowed)."""
    if patches is None:
        frame = FrameGrid.fresh(x)
        if m == 1:
            return frame
        hu, wu = frame.shape
        rows, cols = torch.meshgrid(torch.arange(hu * m), torch.arange(wu * m), indexing="ij")
        owner = ((rows // m) * wu + cols // m).reshape(-1).to(x.device)
        return frame.with_values(size=frame.size * m * m, owner=owner)
    if m == 1:
        return FrameGrid(x.reshape(*patches.shape, -1), patches.size, patches.pos, patches.owner, None,
                         patches.is_grid)
    if not patches.is_grid:
        raise RuntimeStateError(f"a projector with a {m}x{m} window needs a 2-D grid")
    h, w = patches.shape
    hu, wu = h // m, w // m
    s = patches.size.reshape(hu, m, wu, m).sum((1, 3))
    p = (patches.pos * patches.size[..., None]).reshape(hu, m, wu, m, 2).sum((1, 3)) / s[..., None]
    p = (p - (m - 1) / 2) / m  # patch units -> unit coordinates
    owner = (patches.owner // w // m) * wu + (patches.owner % w) // m
    return FrameGrid(x.reshape(hu, wu, -1), s, p, owner)


# ----------------------------------------------------------------------------------------------------------
# The LLM input of architectures with 1-D positions


def compact_positions(
    position_ids: torch.Tensor | None, keep: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D position ids as if the removed slots had never been in the prompt.

    Every slot moves back by the number of removed slots (valid, not kept) before it, so the kept tokens
    are numbered as the model would number the shorter prompt; decoding continues from there.

    Args:
        position_ids: ``(B, L)`` or ``(1, L)`` what the language model received, or None (then
            ``arange(L)``, what it would compute).
        keep: ``(B, L)`` bool, the slots that stay.
        valid: ``(B, L)`` bool, the non-padding slots.

    Returns:
        ``(position_ids (B, L), decode_shift (B,))``: the new positions and, per row, how far the last valid
        token moved (to add to the positions of every decoding step).
    """
    B, L = keep.shape
    dev = keep.device
    old = torch.arange(L, device=dev).expand(B, L) if position_ids is None else position_ids.expand(B, L)
    removed = (valid & ~keep).long()
    before = removed.cumsum(1) - removed
    new = old - before.to(old.dtype)
    last = torch.where(valid, torch.arange(L, device=dev), -1).max(1).values.clamp(min=0)
    rows = torch.arange(B, device=dev)
    shift = (new[rows, last] - old[rows, last]).long()
    return new, shift


def valid_slots(call: dict[str, Any]) -> torch.Tensor:
    """``(B, L)`` bool, the call's non-padding slots (all of them without an ``attention_mask``)."""
    ids: torch.Tensor = call["input_ids"]
    mask = call.get("attention_mask")
    return mask.bool() if isinstance(mask, torch.Tensor) else torch.ones_like(ids, dtype=torch.bool)


def layout_first_slots_input(
    layouts: Sequence[SampleLayout],
    call: dict[str, Any],
    lm_kwargs: dict[str, Any],
    results: Sequence[VisionCallResult],
) -> LLMInput:
    """`first_slots_input` for an adapter whose layout items are the tower's items, each one placeholder run
    (LLaVA: images, InternVL: tiles)."""
    slots = [[lay.positions[it.start:it.start + it.count] for it in lay.items] for lay in layouts]
    return first_slots_input(slots, results, valid_slots(call), lm_kwargs.get("position_ids"))


def first_slots_input(
    item_slots: Sequence[Sequence[torch.Tensor]],
    results: Sequence[VisionCallResult],
    valid: torch.Tensor,
    position_ids: torch.Tensor | None,
    kind: str = "image",
) -> LLMInput:
    """The LLM input when every item's real tokens fill the first ``units`` slots of its placeholder run.

    Args:
        item_slots: Per sample, per item (in sequence order), the sequence indices of the item's visual
            placeholder slots.
        results: The vision calls whose items, in order, are the items of the batch in sequence order.
        valid: ``(B, L)`` bool, non-padding slots.
        position_ids: What the language model received (1-D positions), or None.
        kind: The items' kind.

    Returns:
        The kept slots, the layouts over them (grid items in raster order, 1-D items as ``(1, 1, n)``), and
        positions renumbered contiguously (`compact_positions`) when something was removed.

    Raises:
        RuntimeStateError: The vision calls do not describe the placeholder runs.
    """
    flat = [(r, j) for r in results for j in range(len(r.units))]
    lengths = [int(s.numel()) for sample in item_slots for s in sample]
    emitted = [r.original_units[j] for r, j in flat]
    if emitted != lengths:
        raise RuntimeStateError(
            f"cannot match the vision tower's output to the placeholders: items of {lengths} tokens in the "
            f"prompt, tower calls for items of {emitted}"
        )
    keep = valid.clone()
    layouts = []
    k = 0
    for b, sample in enumerate(item_slots):
        items: list[VisualItem] = []
        positions = []
        for slots in sample:
            res, j = flat[k]
            k += 1
            units = res.units[j]
            keep[b, slots[units:]] = False
            grid = res.grids[j]
            items.append(VisualItem(kind, grid if grid is not None else (1, 1, units),
                                    sum(i.count for i in items), units))
            positions.append(slots[:units])
        pos = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long, device=valid.device)
        layouts.append(SampleLayout.from_items(pos, items))
    if bool(keep[valid].all()):
        return LLMInput(layouts, keep)
    new, shift = compact_positions(position_ids, keep, valid)
    return LLMInput(layouts, keep, new, shift)
