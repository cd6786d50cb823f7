"""The runtime: `compress` validates a schedule against a model and installs hooks that apply it.

Everything is done with forward pre-hooks on module *instances* (no library class is patched): one on the
model (to see each call's inputs), one on the language model (to see the 2-D attention mask generate()
grows), and one on each decoder layer from the first LLM stage on. All are removed when the ``with`` block
ends, also on exceptions.

How LLM-side removal works (the invariants the tests hold):

* Every sequence slot keeps the index of the original token it holds. RoPE ``(cos, sin)`` are gathered
  from the full-length tensors by that index, so kept tokens keep their original positions (1-D RoPE and
  Qwen2-VL's 3-D M-RoPE alike, since the rotary embedding is computed once before the layers).
* Samples of a batch may keep different numbers of tokens. Rows are left-padded with *dead* slots that no
  query may attend to, so a batch computes what its samples compute alone.
* The attention mask of every hooked layer is rebuilt from the slots: causal on original indices, padding
  and dead slots hidden, plus ``log size`` for merged tokens (proportional attention). It is handed to the
  layer in the format of the model's attention backend (bool for SDPA, additive float for eager, 2-D for
  FlashAttention), so no backend is switched.
* Decoding with the KV cache: each layer's cache holds its own number of slots. What decoding needs (valid
  slots and bias per layer, the position shift) is written onto the cache after the prefill
  (`tokcomp.kvcache`), so hand-written loops, ``copy.deepcopy`` of a cache and multi-turn continuation work,
  and the cache reports the logical (uncompressed) length that ``generate()`` slices and numbers positions
  by. When layer 0 itself is shorter (encoder/projector stages, a stage at layer 0) the 2-D mask is
  re-indexed to the slots it holds; the per-layer mask is extended with the new tokens.
* ``generate()`` encoding the images once and then repeating the batch for beams or return sequences is
  followed by `tokcomp.generation` (the LLM input is computed per sample and repeated).

Outputs under compression (the contract; docs page "Generation, scoring and KV caches"): a compressed
forward returns the sequence the last layer computed. Slots hold the surviving tokens in original order,
removed tokens and padding are gone, and rows are packed to the right (shorter rows start with dead slots),
so position ``-k`` of every row is its ``k``-th last surviving token and text tokens (never removed) are
scored by counting from the end. ``run.kept_positions(layer)`` maps slots to original positions; the logits
follow the last layer, ``hidden_states[i + 1]`` the output of layer ``i`` (``[0]``: the slots of layer 0),
``attentions[i]`` layer ``i``'s slots. ``labels`` are compacted the same way (dead slots: -100) and the loss
is the model's own loss function on them. A prefill in which nothing was removed returns the model's own
layout.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from typing_extensions import Self

from . import registry
from .checks import checked_select
from .compat import cache_of, check_transformers_version
from .contracts import Adapter, LLMStrategy, LLMView, Projections, SampleLayout
from .encoder import BIAS_PREFIX, VisionSession, enable_bias_attention, hidden_states_of, with_hidden_states
from .errors import RuntimeStateError, ScheduleError, UnsupportedModelError
from .generation import Expansion, compact_labels, llm_input_expanded, watch_expansion
from .kvcache import CacheRecord, LayerSlots, attach, new_run_id, record_of, set_live, stored_length
from .report import Report, StageEvent
from .schedule import ResolvedStage, Schedule, Stage

__all__ = ["SUPPORTED_ATTENTION", "CompressionRun", "compress", "find_adapter"]

SUPPORTED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")
"""LLM attention backends the runtime builds masks for (flash ones: GPU only, not exercised by CI)."""


def find_adapter(model: nn.Module) -> Adapter:
    """The registered adapter that supports ``model``, instantiated for it.

    Raises:
        UnsupportedModelError: No adapter recognises the model; the message lists the supported classes, or
            says why an adapter of a related family refuses it (`Adapter.refused_classes`).
    """
    reg, problems = registry.select_adapter(model)  # fixed order; a raising supports() is skipped, named
    for p in problems:
        warnings.warn(f"{p}; it was skipped", stacklevel=2)
    if reg is not None:
        return reg.obj(model)
    regs = registry.adapters()
    for r in regs.values():
        reason = r.obj.refused_classes.get(type(model).__name__)
        if reason:
            raise UnsupportedModelError(f"{type(model).__name__} is not supported: {reason}")
    known = sorted({c for r in regs.values() for c in r.obj.model_classes})
    raise UnsupportedModelError(
        f"no tokcomp adapter supports {type(model).__name__}. Supported model classes: {', '.join(known)}. "
        "Load the model with one of those classes (e.g. Qwen2VLForConditionalGeneration, not AutoModel for "
        "the bare backbone), or write an adapter plugin (docs: 'Adding an adapter')."
        + "".join(f" Note: {p}." for p in problems)
    )


def compress(
    model: nn.Module,
    schedule: Schedule | list[Stage] | None = None,
    *,
    allow_untested_transformers: bool = False,
) -> CompressionRun:
    """Validate ``schedule`` against ``model`` and return a context manager that applies it.

    Args:
        model: A supported `transformers` model (e.g. ``Qwen2VLForConditionalGeneration``).
        schedule: The stages to apply: a `Schedule`, a `Stage`, a list of stages or stage dicts, a schedule
            dict or a preset name (`Schedule.coerce`); ``None`` or an empty schedule runs the model unchanged
            (but still reports token counts).
        allow_untested_transformers: Run on a `transformers` release outside
            `tokcomp.compat.TESTED_TRANSFORMERS`, with a warning, instead of refusing it.

    Returns:
        A `CompressionRun`; use it as ``with tokcomp.compress(model, schedule) as run: ...``.

    Raises:
        UnsupportedModelError: No adapter supports the model.
        ScheduleError: The schedule cannot run on this model; the message says what to change.
        UnsupportedVersionError: The installed `transformers` is outside the tested range.
    """
    check_transformers_version(allow_untested_transformers)
    schedule = Schedule.coerce(schedule)  # a Stage, stage dicts, a schedule dict or a preset name too
    adapter = find_adapter(model)
    stages = schedule.resolve(adapter)
    impl = adapter.attn_implementation
    if any(s.site == "llm" for s in stages):
        if impl not in SUPPORTED_ATTENTION:
            raise ScheduleError(
                f"the model's LLM uses attn_implementation={impl!r}; LLM-side stages support "
                f"{', '.join(SUPPORTED_ATTENTION)}. Load the model with attn_implementation='sdpa'."
            )
        layer_types = getattr(adapter.language_model.config, "layer_types", None) or []
        if any(t != "full_attention" for t in layer_types):
            raise ScheduleError(
                "the LLM has sliding-window layers (config.layer_types); LLM-side stages need full attention. "
                "Disable use_sliding_window in the text config."
            )
    return CompressionRun(model, adapter, stages)


# --------------------------------------------------------------------------------------------------------
# state


@dataclass
class _Prefill:
    """State of one prefill call (and the decode steps that follow it)."""

    batch: int
    length: int
    valid0: torch.Tensor  # (B, L) bool
    layouts: list[SampleLayout]
    vis_rank: torch.Tensor  # (B, L) long: index among the sample's visual tokens, -1 for others
    cache: Any
    index: torch.Tensor | None = None  # (B, S) original position per slot, -1 for dead
    sizes: torch.Tensor | None = None  # (B, S) float, None while all ones
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None
    position_ids: torch.Tensor | None = None  # the layers' position_ids kwarg at full length
    records: dict[int, LayerSlots] = field(default_factory=dict)
    captured: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor]] = field(
        default_factory=dict
    )
    visual_per_layer: list[list[int]] = field(default_factory=list)  # [layer][sample]
    slots_per_layer: list[int] = field(default_factory=list)
    index_per_layer: dict[int, torch.Tensor] = field(default_factory=dict)
    events: list[StageEvent] = field(default_factory=list)
    overhead_s: float = 0.0
    call: dict[str, Any] = field(default_factory=dict)
    initial_keep: torch.Tensor | None = None  # (B, L) slots carrying a real token after encoder stages
    decode_shift: torch.Tensor | None = None  # (B,) position shift of decoding steps (new grids' M-RoPE)
    vision: list[Any] = field(default_factory=list)  # the vision-tower results this prefill consumed
    uncompressed_visual: list[int] = field(default_factory=list)
    mask_cache: tuple[Any, ...] | None = None  # (index, sizes, valid, bias, mask) of the last built mask


def _gather(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` restricted along ``dim`` to ``index`` (B, S'), per batch row (dead slots, -1, read slot 0)."""
    if x.shape[0] == 1 and index.shape[0] > 1:  # e.g. cos/sin shared by a batch called without positions
        x = x.expand(index.shape[0], *x.shape[1:])
    idx = index.clamp(min=0)
    if dim == 1:  # advanced indexing copies rows; gather would first build an index as large as the output
        return x[torch.arange(x.shape[0], device=x.device)[:, None], idx]
    shape = [1] * x.dim()
    shape[0], shape[dim] = idx.shape[0], idx.shape[1]
    idx = idx.view(shape)
    size = list(x.shape)
    size[dim] = index.shape[1]
    return x.gather(dim, idx.expand(size))


def _merge_block_counts(results: list[Any]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for r in results:
        for block, counts in r.encoder_tokens.items():
            out.setdefault(block, []).extend(counts)
    return out


def _left_packed(keep: torch.Tensor) -> torch.Tensor:
    """(B, S) indices of the True slots of each row, left-padded with -1 to a common width."""
    counts = keep.sum(1)
    width = int(counts.max()) if keep.numel() else 0
    out = torch.full((keep.shape[0], width), -1, dtype=torch.long, device=keep.device)
    for b in range(keep.shape[0]):
        sl = keep[b].nonzero().squeeze(1)
        out[b, width - sl.numel():] = sl
    return out


class CompressionRun:
    """A schedule bound to a model; a context manager that installs and removes its hooks.

    Created by `compress`. Inside the ``with`` block every forward call of the model (directly or through
    ``generate()``) is compressed. `report` describes the last prefill.
    """

    def __init__(self, model: nn.Module, adapter: Adapter, stages: list[ResolvedStage]) -> None:
        self.model = model
        self.adapter = adapter
        self.stages = stages
        self.llm_stages = [s for s in stages if s.site == "llm"]
        self._handles: list[Any] = []
        self._state: _Prefill | None = None
        self._active = False
        self.num_prefills = 0
        by_layer: dict[int, list[ResolvedStage]] = {}
        for s in self.llm_stages:
            for layer in s.layers:
                by_layer.setdefault(layer, []).append(s)
        self._by_layer = by_layer
        self._first = min(by_layer) if by_layer else None
        depth = self._vision_depth(adapter, stages)
        self.vision = VisionSession(stages, depth, adapter.grid_multiple, bool(depth) and adapter.vision_has_cls)
        self._saved_attn: list[tuple[Any, str]] = []
        self.run_id = new_run_id()
        self._mask2d: torch.Tensor | None = None  # generate()'s 2-D mask for the current call
        self._labels: torch.Tensor | None = None  # labels held back from the model at a compressed prefill
        self._expansion: Expansion | None = None  # generate() expanded the batch after the tower ran
        self._reused_expansion: Expansion | None = None  # the expansion of the tower results in use
        if self.vision.active:
            self._first = 0  # the LLM input itself shrinks: every layer needs the per-slot bookkeeping
        # layers whose input is kept for score computation at the next layer
        self._capture = {
            layer - 1
            for layer, ss in by_layer.items()
            for s in ss
            if (s.strategy.needs_scores or s.strategy.needs_previous_projections) and layer >= 1
        }
        for layer, ss in by_layer.items():
            for s in ss:
                if (s.strategy.needs_scores or s.strategy.needs_previous_projections) and layer == 0:
                    raise ScheduleError(
                        f"stage {s.index} ({type(s.strategy).name} at site 'llm'): {type(s.strategy).name} scores tokens with the attention of the "
                        "previous layer, so it cannot run at layer 0; use layers >= 1"
                    )

    @staticmethod
    def _vision_depth(adapter: Adapter, stages: list[ResolvedStage]) -> int:
        if not any(s.site in ("encoder", "projector") for s in stages):
            return 0
        return adapter.num_vision_blocks

    # -- context manager -----------------------------------------------------------------------------
    def __enter__(self) -> Self:
        if self._active:
            raise RuntimeStateError("this CompressionRun is already active")
        if getattr(self.model, "_tokcomp_active", False):
            raise RuntimeStateError("the model is already inside a tokcomp.compress block; nest none")
        self._active = True
        set_live(self.run_id, True)
        try:
            self._install()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()

    def _install(self) -> None:
        self.model._tokcomp_active = True
        h = self.model.register_forward_pre_hook(self._model_hook, with_kwargs=True)
        self._handles.append(h)
        self._handles.append(self.model.register_forward_hook(self._model_done, with_kwargs=True))
        lm = self.adapter.language_model
        self._handles.append(lm.register_forward_pre_hook(self._lm_hook, with_kwargs=True))
        self._handles.append(lm.register_forward_hook(self._lm_done, with_kwargs=True))
        if self.vision.active:
            watch = watch_expansion(self.model, self._expanded)
            if watch is not None:
                self._handles.append(watch)
            self._handles.extend(self.adapter.install_vision(self.vision))
            if self.vision.proportional:
                self._use_bias_attention()
        if self._first is None:
            return
        start = min([self._first, *self._capture])
        for i, layer in enumerate(self.adapter.decoder_layers):
            if i >= start:
                self._handles.append(layer.register_forward_pre_hook(self._layer_hook(i), with_kwargs=True))
        # the adapter's own LLM hooks (e.g. DeepStack), told of every slot change through slots_changed
        self._handles.extend(self.adapter.install_llm())

    def _use_bias_attention(self) -> None:
        """Point the vision tower's attention at tokcomp's bias-aware wrapper of the same backend."""
        enable_bias_attention()
        for cfg in self.adapter.vision_attention_configs():
            impl = cfg._attn_implementation_internal
            if impl not in ("sdpa", "eager"):
                raise ScheduleError(
                    f"proportional attention in the vision tower supports sdpa and eager, not {impl!r}; "
                    "set proportional_attention=False on the encoder strategy"
                )
            self._saved_attn.append((cfg, impl))
            cfg._attn_implementation_internal = BIAS_PREFIX + impl

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for cfg, impl in reversed(self._saved_attn):
            cfg._attn_implementation_internal = impl
        self._saved_attn.clear()
        if "_tokcomp_active" in self.model.__dict__:
            del self.model.__dict__["_tokcomp_active"]
        self._active = False
        set_live(self.run_id, False)
        self._labels = None
        self._expansion = self._reused_expansion = None

    # -- results -------------------------------------------------------------------------------------
    def report(self) -> Report:
        """What the last prefill did: visual tokens entering every LLM layer per sample, and each stage's
        decisions."""
        st = self._state
        if st is None:
            raise RuntimeStateError("nothing ran yet: call the model (or generate) inside the with block")
        return Report(
            num_layers=self.adapter.num_layers,
            visual_tokens=[list(x) for x in st.visual_per_layer],
            sequence_slots=list(st.slots_per_layer),
            original_visual=[lay.num_visual for lay in st.layouts],
            events=list(st.events),
            stages=[s.label for s in self.stages],
            overhead_s=st.overhead_s + self.vision.overhead_s,
            num_prefills=self.num_prefills,
            text_tokens=[
                int((st.initial_keep if st.initial_keep is not None else st.valid0)[b].sum()) - lay.num_visual
                for b, lay in enumerate(st.layouts)
            ],
            encoder_tokens=_merge_block_counts(st.vision),
            vision_events=[e for r in st.vision for e in r.events],
            emitted_visual=[u for r in st.vision for u in r.units],
            uncompressed_visual=list(st.uncompressed_visual),
        )

    def kept_positions(self, layer: int) -> torch.Tensor:
        """``(B, S)`` original sequence index of every slot entering ``layer`` in the last prefill (-1: dead
        padding slot). Layers before the first stage see every position. The returned logits have the slots
        of the last layer, ``hidden_states[layer + 1]`` those of ``layer`` (module docstring: outputs under
        compression)."""
        st = self._require_state()
        if layer in st.index_per_layer:
            return st.index_per_layer[layer].clone()
        return torch.arange(st.length).expand(st.batch, -1).clone()

    def _require_state(self) -> _Prefill:
        if self._state is None:
            raise RuntimeStateError("nothing ran yet: call the model (or generate) inside the with block")
        return self._state

    # -- hooks ---------------------------------------------------------------------------------------
    def _model_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        call = dict(kwargs)
        if args:
            call.setdefault("input_ids", args[0])
        cache = cache_of(call)
        if cache is not None and getattr(cache, "is_compileable", False) and self._first is not None:
            raise RuntimeStateError(
                f"{type(cache).__name__} pre-allocates every layer at one length, which cannot hold layers with "
                "different token counts; use the default DynamicCache (cache_implementation=None)"
            )
        past = cache.get_seq_length() if cache is not None else 0
        if past > 0:
            self._check_continued(cache, past)
            return None
        self._start_prefill(call, cache)
        if kwargs.get("labels") is not None and self._first is not None:
            # The logits come back compacted; the loss is computed on them with labels compacted alike
            # (_model_done), instead of inside the model, where the lengths would not match.
            self._labels = kwargs.pop("labels")
            return args, kwargs
        return None

    def _check_continued(self, cache: Any, past: int) -> None:
        """A call continuing a cache that already holds ``past`` tokens: it must be one this block filled."""
        rec = record_of(cache)
        if rec is not None and rec.run_id != self.run_id:
            raise RuntimeStateError(
                "the KV cache passed in was filled inside another tokcomp.compress block, which has ended: its "
                "layers hold the tokens that block kept. Continue a compressed cache inside the with block "
                "that filled it, or run the prompt again inside this one"
            )
        if rec is None and self._first is not None:
            raise RuntimeStateError(
                f"the KV cache passed in already holds {past} tokens that were not computed inside this "
                "tokcomp.compress block (it was filled outside any compress block, or by a block with an empty "
                "schedule), so they are uncompressed and tokcomp has no record of them. Run the prompt inside "
                "this with block (model(..., use_cache=True) or generate()), then continue its cache (or a "
                "copy.deepcopy of it) here"
            )

    def _model_done(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        labels, self._labels = self._labels, None
        if labels is None:
            return None
        logits = out["logits"] if not isinstance(out, tuple) else out[0]
        compact = compact_labels(labels, self.kept_positions(self.adapter.num_layers - 1))
        extra = {k: kwargs[k] for k in ("num_items_in_batch", "ignore_index") if kwargs.get(k) is not None}
        vocab = module.config.get_text_config().vocab_size
        loss = module.loss_function(logits=logits, labels=compact, vocab_size=vocab, **extra)
        if isinstance(out, tuple):
            return (loss, *out)
        out["loss"] = loss
        return out

    def _start_prefill(self, call: dict[str, Any], cache: Any) -> None:
        ids = call.get("input_ids")
        if ids is None:
            raise RuntimeStateError(
                "tokcomp needs input_ids to find the visual tokens; pass input_ids (not only inputs_embeds)"
            )
        mask = call.get("attention_mask")
        B, L = ids.shape
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            valid0 = mask.bool()
        elif mask is None:
            valid0 = torch.ones(B, L, dtype=torch.bool, device=ids.device)
        else:
            raise RuntimeStateError("tokcomp needs a 2-D attention_mask (or none); got a pre-built mask")
        layouts = self.adapter.layouts(call)
        vis_rank = torch.full((B, L), -1, dtype=torch.long, device=ids.device)
        for b, lay in enumerate(layouts):
            vis_rank[b, lay.positions] = torch.arange(lay.num_visual, device=ids.device)
        self._state = _Prefill(B, L, valid0, layouts, vis_rank, cache)
        self.adapter.slots_changed(None)
        st = self._state
        st.call = call
        st.uncompressed_visual = [lay.num_visual for lay in layouts]
        st.visual_per_layer = [[lay.num_visual for lay in layouts] for _ in range(self.adapter.num_layers)]
        st.slots_per_layer = [L] * self.adapter.num_layers
        self.num_prefills += 1

    def _expanded(self, expansion: Expansion) -> None:
        self._expansion = expansion

    def _lm_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        mask = kwargs.get("attention_mask")
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2) and self._first is not None:
            raise RuntimeStateError("tokcomp needs the 2-D attention mask; got a pre-built 4-D or dict mask")
        self._mask2d = mask if isinstance(mask, torch.Tensor) else None
        cache = cache_of(kwargs)
        rec = record_of(cache)
        if rec is not None and stored_length(cache) > 0:
            self._continue_lm(rec, cache, kwargs)
            return args, kwargs
        if self._state is None:
            return None
        if self.vision.active:
            self._follow_vision(kwargs)
        return args, kwargs

    def _continue_lm(self, rec: CacheRecord, cache: Any, kwargs: dict) -> None:
        """Language-model input of a call that continues a compressed cache (decoding, a new turn)."""
        mask = self._mask2d
        if rec.decode_shift is not None:
            shift = rec.decode_shift
            pid = kwargs.get("position_ids")
            if pid is None:
                # The language model would number the new tokens from the cache's (logical) length; number them
                # from there, moved like the prompt was.
                x = kwargs.get("inputs_embeds")
                x = kwargs.get("input_ids") if x is None else x
                past = cache.get_seq_length()
                pid = torch.arange(past, past + x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
            if pid.dim() == 3:
                pid = pid.clone()
                pid[-3:] += shift.to(pid.device)[None, :, None]
                kwargs["position_ids"] = pid
            else:  # 1-D RoPE (LLaVA, InternVL, LLaVA-OV)
                kwargs["position_ids"] = pid + shift.to(pid.device, pid.dtype)[:, None]
        if 0 in rec.index and mask is not None:
            # Layer 0's cache is short too, so the model sizes its masks from the compressed length; hand it
            # the 2-D mask restricted to the slots layer 0 holds plus the new tokens.
            extra = torch.arange(rec.length, mask.shape[1], device=mask.device).expand(mask.shape[0], -1)
            idx = torch.cat([rec.index[0].to(mask.device), extra], 1)
            valid = torch.cat([rec.layers[0].valid.to(mask.device), torch.ones_like(extra, dtype=torch.bool)], 1)
            kwargs["attention_mask"] = (_gather(mask, idx, 1).bool() & valid).to(mask.dtype)

    def _lm_done(self, module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        """After a prefill: write the compression state onto the cache it filled (see `tokcomp.kvcache`)."""
        st = self._state
        if st is None or st.index is None or st.cache is None or record_of(st.cache) is not None:
            return
        layers = {i: LayerSlots(r.valid, r.bias) for i, r in st.records.items()}
        attach(st.cache, CacheRecord(self.run_id, st.length, list(st.slots_per_layer), layers,
                                     dict(st.index_per_layer), st.decode_shift))

    def _follow_vision(self, kwargs: dict) -> None:
        """Prefill after encoder/projector stages: which slots are real, the new layouts and positions."""
        st = self._state
        assert st is not None
        if self.vision.pending:  # a new tower call: the expansion generate() made after it (if any) applies
            self._reused_expansion, self._expansion = self._expansion, None
        expansion = self._reused_expansion  # else the features are reused, expanded as before
        if not any(st.uncompressed_visual):
            return
        results = self.vision.take()
        if not results:
            raise RuntimeStateError(
                "the schedule has encoder/projector stages but the vision tower did not run inside this "
                "tokcomp.compress block (were the image features computed before it?); pass pixel values "
                "to the model inside the with block"
            )
        if expansion is not None:
            inp = llm_input_expanded(lambda c, kw: self.adapter.llm_input(c, kw, results), st.call, kwargs,
                                     expansion)
        else:
            inp = self.adapter.llm_input(st.call, kwargs, results)
        st.vision = results
        st.layouts = inp.layouts
        st.vis_rank = torch.full_like(st.vis_rank, -1)
        for b, lay in enumerate(inp.layouts):
            st.vis_rank[b, lay.positions] = torch.arange(lay.num_visual, device=st.vis_rank.device)
        st.visual_per_layer = [[lay.num_visual for lay in inp.layouts] for _ in range(self.adapter.num_layers)]
        st.initial_keep = inp.keep & st.valid0
        st.decode_shift = inp.decode_shift
        if inp.position_ids is not None:
            kwargs["position_ids"] = inp.position_ids

    def _layer_hook(self, i: int) -> Callable[..., tuple[tuple, dict]]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hs = hidden_states_of(args, kwargs)
            cache = cache_of(kwargs)
            rec = record_of(cache)
            if rec is not None and stored_length(cache, i) > 0:
                kwargs = self._decode_kwargs(i, hs, kwargs, rec, cache)
                return with_hidden_states(args, kwargs, hs)
            st = self._state
            if st is None:
                return args, kwargs
            if st.cache is None:
                st.cache = cache  # created inside the model (a direct call with use_cache=True)
            hs, kwargs = self._prefill_layer(i, hs, kwargs)
            return with_hidden_states(args, kwargs, hs)

        return hook

    # -- prefill -------------------------------------------------------------------------------------
    def _prefill_layer(self, i: int, hs: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, dict]:
        st = self._state
        assert st is not None
        if hs.shape[1] != (st.length if st.index is None else st.index.shape[1]):
            raise RuntimeStateError(
                f"layer {i} received {hs.shape[1]} tokens where tokcomp expected "
                f"{st.length if st.index is None else st.index.shape[1]}; another hook may be changing the "
                "sequence"
            )
        if st.index is None:
            st.index = torch.arange(st.length, device=hs.device).expand(st.batch, -1)
            if st.initial_keep is not None and not bool(st.initial_keep[st.valid0].all()):
                # encoder/projector stages left unused placeholder slots: remove them before layer 0
                st.index = _left_packed(st.initial_keep)
                hs = _gather(hs, st.index, 1).masked_fill((st.index < 0).unsqueeze(-1), 0)
            self.adapter.slots_changed(st.index)
            pe = kwargs.get("position_embeddings")
            if pe is None:
                raise RuntimeStateError(f"decoder layer {i} got no position_embeddings; unsupported model")
            st.cos_sin = (pe[0], pe[1])
            pid = kwargs.get("position_ids")
            st.position_ids = pid if isinstance(pid, torch.Tensor) and pid.shape[-1] == st.length else None
        changed = False
        for stage in self._by_layer.get(i, []):
            hs = self._apply_stage(stage, i, hs, kwargs)
            changed = True
        index = st.index
        if not changed and i not in st.index_per_layer and torch.equal(
            index, torch.arange(st.length, device=index.device).expand(st.batch, -1)
        ) and st.sizes is None:
            # nothing removed yet: leave the layer exactly as the model called it
            if i in self._capture:
                st.captured[i] = (hs, kwargs["position_embeddings"], index)
            return hs, kwargs
        cos, sin = st.cos_sin  # type: ignore[misc]
        kwargs["position_embeddings"] = (_gather(cos, index, 1), _gather(sin, index, 1))
        if st.position_ids is not None:
            kwargs["position_ids"] = _gather(st.position_ids, index, st.position_ids.dim() - 1)
        cached = st.mask_cache
        if cached is not None and cached[0] is index and cached[1] is st.sizes:
            valid, bias, mask = cached[2], cached[3], cached[4]  # no stage since: same slots, same mask
        else:
            valid = (index >= 0) & st.valid0.gather(1, index.clamp(min=0))
            bias = None if st.sizes is None else st.sizes.clamp(min=1e-6).log()
            mask = self._prefill_mask(index, valid, bias, hs.dtype)
            st.mask_cache = (index, st.sizes, valid, bias, mask)
        kwargs["attention_mask"] = mask
        st.records[i] = LayerSlots(valid, bias)
        st.index_per_layer[i] = index
        st.slots_per_layer[i] = index.shape[1]
        isvis = (st.vis_rank.gather(1, index.clamp(min=0)) >= 0) & (index >= 0)
        st.visual_per_layer[i] = [int(x) for x in isvis.sum(1).tolist()]
        if i in self._capture:
            st.captured[i] = (hs, kwargs["position_embeddings"], index)
        return hs, kwargs

    def _prefill_mask(
        self, index: torch.Tensor, valid: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor | None:
        S = index.shape[1]
        impl = self.adapter.attn_implementation
        if bias is None and impl != "eager" and bool(valid.all()):
            # Slots keep their original order, so causality over slots is causality over positions: with
            # nothing to hide, SDPA/FlashAttention can take their fused causal path.
            return None
        if impl.startswith("flash"):
            if bias is not None:
                raise RuntimeStateError(
                    "proportional attention (merged tokens) needs an additive attention bias, which "
                    f"{impl} cannot take; set proportional_attention=False on the strategy or use sdpa"
                )
            return valid.long()
        causal = index.unsqueeze(1) <= index.unsqueeze(2)  # (B, q, k): key's original index <= query's
        allowed = causal & valid.unsqueeze(1)
        allowed |= torch.eye(S, dtype=torch.bool, device=index.device)  # no fully-masked row (NaN-free)
        return self._format_mask(allowed, bias, dtype)

    def _format_mask(self, allowed: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        allowed = allowed.unsqueeze(1)  # (B, 1, q, k)
        if bias is None and self.adapter.attn_implementation == "sdpa":
            return allowed
        neg = torch.finfo(dtype).min
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, neg)
        if bias is not None:
            mask = mask + bias.to(dtype)[:, None, None, :].masked_fill(~allowed, 0)
        return mask

    def _apply_stage(self, stage: ResolvedStage, layer: int, hs: torch.Tensor, kwargs: dict) -> torch.Tensor:
        st = self._state
        assert st is not None and st.index is not None
        strategy = stage.strategy
        if not isinstance(strategy, LLMStrategy):
            raise RuntimeStateError(f"{stage.label}: {type(strategy).__name__} is not an LLMStrategy")
        t0 = time.perf_counter()
        index = st.index
        B, S = index.shape
        present = index >= 0
        rank = torch.where(present, st.vis_rank.gather(1, index.clamp(min=0)), torch.full_like(index, -1))
        sizes = st.sizes if st.sizes is not None else torch.ones(B, S, device=hs.device)
        scores_fn = self._scores_fn(stage, layer, hs) if strategy.needs_scores else None
        rows: list[torch.Tensor] = []
        new_hidden: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        new_sizes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for b in range(B):
            vis_slots = (rank[b] >= 0).nonzero().squeeze(1)
            # padding slots go too: no query may attend them, and dropping them lets the batch shrink
            valid_text = (present[b] & (rank[b] < 0) & st.valid0[b, index[b].clamp(min=0)]).nonzero().squeeze(1)
            n = vis_slots.numel()
            if n == 0:
                rows.append(valid_text)
                continue
            view = LLMView(
                layer=layer,
                num_layers=self.adapter.num_layers,
                stage_layers=stage.layers,
                hidden=hs[b, vis_slots],
                text_hidden=hs[b, valid_text],
                index=rank[b, vis_slots],
                sizes=sizes[b, vis_slots],
                layout=st.layouts[b],
                sample=b,
                _scores=(lambda q, b=b, vs=vis_slots: scores_fn(q)[b, vs]) if scores_fn else None,
                _projections=(lambda b=b: self._projections(layer, hs, b, rank[b])),
                _previous_projections=(
                    (lambda b=b: self._previous_projections(layer, b, rank[b]))
                    if strategy.needs_previous_projections else None
                ),
                _final_norm=lambda x: self.adapter.final_norm(x),  # looked up on use only
            )
            decision = checked_select(stage.label, layer, strategy, view)
            keep = decision.keep
            kept_slots = vis_slots[keep]
            if decision.hidden is not None:
                new_hidden[b] = (kept_slots, decision.hidden)
            if decision.sizes is not None:
                new_sizes[b] = (kept_slots, decision.sizes)
            if decision.members is not None:
                joined = decision.members >= 0
                counts = torch.bincount(decision.members[joined], minlength=keep.numel())
                # only clusters of two or more: a token merged with no other keeps its own inputs
                merged = joined & (counts[decision.members.clamp(min=0)] > 1)
                if bool(merged.any()):
                    orig = index[b, vis_slots]
                    self.adapter.tokens_merged(b, orig[keep[decision.members[merged]]], orig[merged])
            rows.append(torch.cat([valid_text, kept_slots]).sort().values)
            st.events.append(
                StageEvent(stage.label, layer, b, n, int(keep.numel()), dict(decision.info))
            )
        if new_hidden or new_sizes:
            hs = hs.clone()
            for b, (slots, values) in new_hidden.items():
                hs[b, slots] = values.to(hs.dtype)
            if new_sizes:
                sizes = sizes.clone()
                for b, (slots, values) in new_sizes.items():
                    sizes[b, slots] = values.to(sizes.dtype)
                st.sizes = sizes
        width = max(r.numel() for r in rows)
        slots = torch.full((B, width), -1, dtype=torch.long, device=hs.device)
        for b, r in enumerate(rows):
            slots[b, width - r.numel():] = r  # dead slots on the left, like left padding
        new_index = torch.where(slots >= 0, index.gather(1, slots.clamp(min=0)), torch.full_like(slots, -1))
        hs = _gather(hs, slots, 1)
        dead = slots < 0
        if bool(dead.any()):  # a full copy of the hidden states: only when some sample has dead slots
            hs = hs.masked_fill(dead.unsqueeze(-1), 0)
        if st.sizes is not None:
            st.sizes = _gather(st.sizes, slots, 1).masked_fill(slots < 0, 1.0)
            if bool((st.sizes == 1).all()):
                st.sizes = None
        st.index = new_index
        self.adapter.slots_changed(new_index)
        st.overhead_s += time.perf_counter() - t0
        return hs

    def _rope(self, layer: int) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
        attn = self.adapter.decoder_layers[layer].self_attn
        return sys.modules[type(attn).__module__].apply_rotary_pos_emb

    def _qk(self, layer: int, hs: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Pre- and post-RoPE q and k of ``layer`` for hidden states ``hs`` (B, S, D)."""
        parts = self.adapter.attention_parts(layer)
        B, S, _ = hs.shape
        x = parts.norm(hs)
        q = parts.q_proj(x).view(B, S, parts.num_heads, parts.head_dim)
        k = parts.k_proj(x).view(B, S, parts.num_kv_heads, parts.head_dim)
        if parts.q_norm is not None:  # per-head norms before RoPE (Qwen3)
            q = parts.q_norm(q)
        if parts.k_norm is not None:
            k = parts.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        qr, kr = self._rope(layer)(q, k, cos, sin)
        return q, k, qr, kr, parts.scaling, parts.num_heads // parts.num_kv_heads

    def _scores_fn(self, stage: ResolvedStage, layer: int, hs: torch.Tensor) -> Callable[[str], torch.Tensor]:
        st = self._state
        assert st is not None
        cache: dict[str, torch.Tensor] = {}

        def scores(query: str) -> torch.Tensor:
            if query not in cache:
                cache[query] = self._attention_received(layer - 1, query)
            return cache[query]

        return scores

    @torch.no_grad()
    def _attention_received(self, layer: int, query: str) -> torch.Tensor:
        """(B, S_now) head-averaged attention each slot of the current layer input received at ``layer``
        (the previous layer), from the last valid query row or averaged over all valid rows."""
        st = self._state
        assert st is not None and st.index is not None
        hs, (cos, sin), index = st.captured[layer]
        _, _, q, k, scaling, groups = self._qk(layer, hs, cos, sin)
        k = k.repeat_interleave(groups, dim=1).float()
        q = q.float()
        valid = (index >= 0) & st.valid0.gather(1, index.clamp(min=0))
        bias = None
        rec = st.records.get(layer)
        if rec is not None and rec.bias is not None:
            bias = rec.bias.float()
        B, S = index.shape
        if query == "last":
            last = (valid.long() * torch.arange(S, device=index.device)).argmax(1)  # last valid slot
            qrow = q[torch.arange(B), :, last].unsqueeze(2)  # (B, H, 1, d)
            logits = (qrow @ k.transpose(-1, -2)) * scaling  # (B, H, 1, S)
            allowed = valid & (index <= index.gather(1, last[:, None]))
            if bias is not None:
                logits = logits + bias[:, None, None, :]
            logits = logits.masked_fill(~allowed[:, None, None, :], float("-inf"))
            probs = logits.softmax(-1)[:, :, 0].mean(1)  # (B, S)
        elif query == "mean":
            total = torch.zeros(B, S, device=hs.device)
            chunk = 512
            for s0 in range(0, S, chunk):
                qq = q[:, :, s0:s0 + chunk]
                logits = (qq @ k.transpose(-1, -2)) * scaling  # (B, H, c, S)
                allowed = valid[:, None, :] & (index[:, None, :] <= index[:, s0:s0 + chunk, None])
                allowed |= torch.eye(S, device=hs.device, dtype=torch.bool)[s0:s0 + chunk][None]
                if bias is not None:
                    logits = logits + bias[:, None, None, :]
                logits = logits.masked_fill(~allowed[:, None], float("-inf"))
                p = logits.softmax(-1).mean(1)  # (B, c, S)
                p = p * valid[:, s0:s0 + chunk, None]
                total += p.sum(1)
            probs = total / valid.sum(1, keepdim=True).clamp(min=1)
        else:
            raise ValueError(f"unknown score query {query!r}; use 'last' or 'mean'")
        # map the previous layer's slots onto the current ones (a stage earlier at this layer may differ)
        now = st.index
        if not torch.equal(now, index):
            pos = torch.full((B, st.length + 1), -1, dtype=torch.long, device=index.device)
            pos.scatter_(1, index.clamp(min=0) + (index < 0).long() * st.length, torch.arange(S).expand(B, -1))
            src = pos.gather(1, now.clamp(min=0))
            probs = torch.where(src >= 0, probs.gather(1, src.clamp(min=0)), torch.zeros_like(src, dtype=probs.dtype))
        return probs

    @torch.no_grad()
    def _projections(self, layer: int, hs: torch.Tensor, b: int, rank_b: torch.Tensor) -> Projections:
        st = self._state
        assert st is not None and st.index is not None and st.cos_sin is not None
        index = st.index[b:b + 1]
        sel = ((index[0] >= 0) & st.valid0[b, index[0].clamp(min=0)]).nonzero().squeeze(1)
        idx = index[:, sel]
        cos, sin = st.cos_sin
        cos_b = _gather(cos[b:b + 1] if cos.shape[0] > 1 else cos, idx, 1)
        sin_b = _gather(sin[b:b + 1] if sin.shape[0] > 1 else sin, idx, 1)
        q, k, qr, kr, scaling, _ = self._qk(layer, hs[b:b + 1, sel], cos_b, sin_b)
        return Projections(q[0], k[0], qr[0], kr[0], rank_b[sel] >= 0, hs[b, sel], scaling,
                           self._sequence_index(b, idx[0]))

    # -- previous layer's projections (needs_previous_projections) ------------------------------------
    def _sequence_index(self, b: int, original: torch.Tensor) -> torch.Tensor:
        """Index of each original slot ``original`` in sample ``b``'s sequence as it entered the LLM (no
        padding, no unused placeholder slots)."""
        st = self._state
        assert st is not None
        entered = st.valid0[b] if st.initial_keep is None else st.initial_keep[b]
        return (entered.long().cumsum(0) - 1)[original]

    @torch.no_grad()
    def _previous_projections(self, layer: int, b: int, rank_b: torch.Tensor) -> Projections:
        """`Projections` of layer ``layer - 1`` for sample ``b``'s valid tokens present now, from that layer's
        captured input (the same tokens and order as `_projections`)."""
        st = self._state
        assert st is not None and st.index is not None
        prev_hs, (cos, sin), prev_index = st.captured[layer - 1]
        index = st.index[b]
        sel = ((index >= 0) & st.valid0[b, index.clamp(min=0)]).nonzero().squeeze(1)
        idx = index[sel]
        # the slot of each current token in the previous layer's input (a token present now was present then)
        where = torch.full((st.length,), -1, dtype=torch.long, device=idx.device)
        prev = prev_index[b]
        live = prev >= 0
        where[prev[live]] = live.nonzero().squeeze(1)
        slots = where[idx]
        if bool((slots < 0).any()):
            raise RuntimeStateError(f"layer {layer}: a token present now was not in layer {layer - 1}'s input")
        cos_b = (cos[b:b + 1] if cos.shape[0] > 1 else cos)[:, slots]
        sin_b = (sin[b:b + 1] if sin.shape[0] > 1 else sin)[:, slots]
        x = prev_hs[b:b + 1, slots]
        q, k, qr, kr, scaling, _ = self._qk(layer - 1, x, cos_b, sin_b)
        return Projections(q[0], k[0], qr[0], kr[0], rank_b[sel] >= 0, x[0], scaling, self._sequence_index(b, idx))

    # -- decode --------------------------------------------------------------------------------------
    def _decode_kwargs(self, i: int, hs: torch.Tensor, kwargs: dict, record: CacheRecord, cache: Any) -> dict:
        """Layer ``i``'s mask for new tokens over the compressed cache: the prefill's valid slots (with their
        bias), then every later token, causal among the new ones."""
        rec = record.layers.get(i)
        if rec is None:  # this layer saw no removal in prefill: the model's own mask is right
            return kwargs
        q = hs.shape[1]
        S = rec.valid.shape[1]
        t_prev = stored_length(cache, i) - S
        B = rec.valid.shape[0]
        m2 = self._mask2d
        if m2 is not None:
            appended = m2[:, record.length:].bool()
            if appended.shape[1] != t_prev + q:
                raise RuntimeStateError(
                    f"layer {i}: the attention mask has {m2.shape[1]} columns, expected "
                    f"{record.length + t_prev + q} (prompt {record.length} + {t_prev} generated + {q} new): "
                    "pass the 2-D attention mask of the whole conversation (prompt, generated and new tokens)"
                )
        else:
            appended = torch.ones(B, t_prev + q, dtype=torch.bool, device=hs.device)
        rec = LayerSlots(rec.valid.to(hs.device), None if rec.bias is None else rec.bias.to(hs.device))
        impl = self.adapter.attn_implementation
        key_valid = torch.cat([rec.valid, appended], 1)
        if impl.startswith("flash"):
            kwargs["attention_mask"] = key_valid.long()
            return kwargs
        if q == 1 and rec.bias is None and bool(key_valid.all()):
            kwargs["attention_mask"] = None  # every cached key visible: the backends' fast path
            return kwargs
        ar = torch.arange(t_prev + q, device=hs.device)
        causal_new = ar[None, :] <= (t_prev + torch.arange(q, device=hs.device))[:, None]  # (q, t_prev+q)
        allowed = torch.cat(
            [rec.valid[:, None, :].expand(B, q, S), appended[:, None, :] & causal_new[None]], 2
        )
        allowed[:, torch.arange(q), S + t_prev + torch.arange(q)] = True
        bias = None
        if rec.bias is not None:
            bias = torch.cat([rec.bias, torch.zeros(B, t_prev + q, device=hs.device)], 1)
        kwargs["attention_mask"] = self._format_mask(allowed, bias, hs.dtype)
        return kwargs
