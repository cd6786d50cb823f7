"""Adapter for Qwen3-VL and Qwen3-VL-MoE (``Qwen3VLForConditionalGeneration``,
``Qwen3VLMoeForConditionalGeneration``).

What differs from Qwen2-VL (transformers 5.23/5.24), and how the adapter follows it:

* **32 px per LLM token** (patch 16, merge 2) and a learned position grid interpolated to each image, added
  once before ViT block 0: merged tokens carry it like any other feature, nothing is recomputed.
* **Video: one placeholder run per temporal patch**, each preceded by ``<t seconds>`` text (the processor
  writes ``<t0 seconds><|vision_start|><|video_pad|>...<|vision_end|><t1 seconds>...``). Every temporal patch
  is one layout item of grid ``(1, h, w)``, as the model's own ``get_rope_index`` treats it (no temporal
  M-RoPE index: time lives in the timestamp text). After encoder/projector stages each run keeps its first
  ``h' * w'`` slots; the timestamp tokens stay, and M-RoPE is recomputed by ``get_rope_index`` for the new
  per-frame grids, so text after a run resumes at ``p + max(h', w')``.
* **Interleaved M-RoPE**: the language model builds one ``(cos, sin)`` from the three rows; the runtime
  gathers it per slot as for Qwen2-VL.
* **q_norm / k_norm** before RoPE: ``attention_parts`` hands them to the runtime's score computation.
* **DeepStack**: the outputs of ViT blocks ``deepstack_visual_indexes`` go through their own mergers and are
  *added* to the LLM hidden states at the visual positions after decoder layers ``0 .. n-1``.

  - LLM site: the adapter takes ``visual_pos_masks`` / ``deepstack_visual_embeds`` off the language model's
    call and adds the features itself after each of those layers, at the visual tokens the sequence still
    holds (the runtime tells it the slots through `Adapter.slots_changed`): a pruned token's feature is
    dropped with it. A token an LLM-site merge keeps (PACT) receives the plain mean of its members' features,
    as its hidden state is the mean of theirs (`Adapter.tokens_merged`); merges of merged tokens compose.
  - Encoder site: a tap taken before a merge block holds full-resolution features; at the end of the tower
    each tap is regrouped onto the final grid with the same token-to-cluster assignment (size-weighted mean
    over the original patches of each merged token) and sent through its merger again. A tap taken after
    the last merge already has the final grid. Projector-site stages regroup the taps' LLM-unit features
    the same way. The taps are then laid out like the main features (first slots of each run).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from einops import rearrange

from tokcomp.encoder import VisionSession
from tokcomp.errors import RuntimeStateError
from tokcomp.tokens import VisualItemTokens

from ._qwen_vl import QwenVLAdapterBase, _Call, _QwenVision

__all__ = ["QWEN3_5_REFUSAL", "Qwen3VLAdapter", "regroup"]

QWEN3_5_REFUSAL = (
    "Qwen3.5 (model_type qwen3_5 / qwen3_5_moe) is multimodal, with the Qwen3-VL vision tower, but 3 of every 4 "
    "LLM layers are Gated DeltaNet linear-attention layers. Their state is a fixed-size recurrence, not a "
    "per-token KV cache: pruning a token before such a layer means it is never written into the state, which "
    "no attention mask reproduces (a hidden token still decays the state), and tokcomp's runtime assumes "
    "per-token caches and 4-D masks in every layer it hooks. No tokcomp site is supported on Qwen3.5 yet "
    "(see the docs page 'Qwen3-VL and Qwen3.5'); use a Qwen3-VL or Qwen2.5-VL checkpoint, or run Qwen3.5 "
    "uncompressed."
)
"""Why `tokcomp.find_adapter` refuses the Qwen3.5 classes (the message of its `UnsupportedModelError`)."""


class Qwen3VLAdapter(QwenVLAdapterBase):
    """Qwen3-VL / Qwen3-VL-MoE: timestamped per-frame video runs, interleaved M-RoPE and DeepStack."""

    name: ClassVar[str] = "qwen3_vl"
    model_classes: ClassVar[tuple[str, ...]] = (
        "Qwen3VLForConditionalGeneration",
        "Qwen3VLMoeForConditionalGeneration",
    )
    refused_classes: ClassVar[dict[str, str]] = {
        cls: QWEN3_5_REFUSAL
        for cls in (
            "Qwen3_5ForConditionalGeneration",
            "Qwen3_5MoeForConditionalGeneration",
            "Qwen3_5ForCausalLM",
            "Qwen3_5MoeForCausalLM",
        )
    }

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self._slots: torch.Tensor | None = None
        self._deepstack: tuple[torch.Tensor, list[torch.Tensor]] | None = None
        # per sample, the merged tokens of this prefill as (target, source, weight) over original slots:
        # the feature of a present target is sum(weight * feature[source]).
        self._mix: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def deepstack_layers(self) -> int:
        """How many LLM layers receive DeepStack features (after layers ``0 .. n-1``)."""
        return len(self.model.model.visual.deepstack_visual_indexes)

    def _item_grids(self, call: dict[str, Any]) -> dict[str, list[tuple[int, int, int]]]:
        """Videos split into one ``(1, h, w)`` grid per temporal patch: one grid per placeholder run."""
        grids = super()._item_grids(call)
        grids["video"] = [(1, h, w) for t, h, w in grids["video"] for _ in range(t)]
        return grids

    def _vision_hooks(self, session: VisionSession) -> _QwenVision:
        return _Qwen3Vision(self, session)

    # -- DeepStack at the LLM site ---------------------------------------------------------------------
    def install_llm(self) -> list[Any]:
        """A pre-hook on the language model that takes the DeepStack inputs off its call, and a forward hook
        on each receiving decoder layer that adds them at the visual tokens still present."""
        lm = self.language_model
        hs = [lm.register_forward_pre_hook(self._take_deepstack, with_kwargs=True),
              lm.register_forward_hook(self._drop_deepstack)]
        for j in range(min(self.deepstack_layers, self.num_layers)):
            hs.append(self.decoder_layers[j].register_forward_hook(self._add_deepstack(j)))
        return hs

    def slots_changed(self, index: torch.Tensor | None) -> None:
        """Remember which original sequence slot each present slot holds (None: all, in order)."""
        self._slots = index
        if index is None:  # a new prefill: merges of an earlier call do not apply
            self._mix = {}

    def tokens_merged(self, sample: int, into: torch.Tensor, members: torch.Tensor) -> None:
        """Note that each ``into`` token now stands for the mean of its ``members`` (original slots), so
        that the DeepStack layers after the merge add the mean of the members' features there."""
        into, members = into.long().cpu(), members.long().cpu()
        _, inverse, counts = torch.unique(into, return_inverse=True, return_counts=True)
        share = 1.0 / counts[inverse].float()
        empty = torch.zeros(0, dtype=torch.long)
        tgt, src, w = self._mix.get(sample, (empty, empty, empty.float()))
        # A member merged before stands for its own sources: expand it, scaling their weights.
        size = int(max(into.max(), members.max(), tgt.max() if tgt.numel() else -1)) + 1
        member_at = torch.full((size,), -1, dtype=torch.long)
        member_at[members] = torch.arange(members.numel())
        expanded = member_at[tgt] >= 0
        at = member_at[tgt[expanded]]
        plain = torch.ones(members.numel(), dtype=torch.bool)
        plain[at] = False
        self._mix[sample] = (
            torch.cat([tgt[~expanded], into[at], into[plain]]),
            torch.cat([src[~expanded], src[expanded], members[plain]]),
            torch.cat([w[~expanded], w[expanded] * share[at], share[plain]]),
        )

    def _take_deepstack(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        embeds = kwargs.get("deepstack_visual_embeds")
        mask = kwargs.get("visual_pos_masks")
        if embeds is None or mask is None:
            self._deepstack = None
            return None
        self._deepstack = (mask, list(embeds))
        kwargs["deepstack_visual_embeds"] = None  # added by the layer hooks instead, at the present slots
        return args, kwargs

    def _drop_deepstack(self, module: torch.nn.Module, args: tuple, out: Any) -> None:
        self._deepstack = None  # the features of one call only; do not keep them alive between calls

    def _add_deepstack(self, j: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple, out: Any) -> Any:
            if self._deepstack is None:
                return None
            mask, embeds = self._deepstack
            hs = out[0] if isinstance(out, tuple) else out
            feats = embeds[j]
            mask = mask.to(hs.device)
            idx = self._slots
            if idx is not None:
                if idx.shape[1] != hs.shape[1]:
                    raise RuntimeStateError(
                        f"DeepStack after layer {j}: {hs.shape[1]} slots, but the runtime reported {idx.shape[1]}"
                    )
                # row-major rank of every visual position among the features, then restricted to the slots
                rank = (mask.flatten().long().cumsum(0) - 1).view_as(mask)
                at = idx.clamp(min=0)
                kept = mask.gather(1, at) & (idx >= 0)
                table = feats
                feats = feats[rank.gather(1, at)[kept].to(feats.device)]
                if self._mix:
                    feats = self._mixed(feats, table, rank, idx, kept)
                mask = kept
            # the model's own _deepstack_process, on the slots present
            feats = feats.to(hs.device, hs.dtype)
            hs = hs.clone()
            hs[mask, :] = hs[mask, :] + feats
            return (hs, *out[1:]) if isinstance(out, tuple) else hs

        return hook

    def _mixed(self, feats: torch.Tensor, table: torch.Tensor, rank: torch.Tensor, idx: torch.Tensor,
               kept: torch.Tensor) -> torch.Tensor:
        """``feats`` (one row per present visual slot, row-major over ``kept``) with each merged token's row
        replaced by the weighted sum of its sources' rows of the full ``table``."""
        rows = kept.nonzero()
        out = feats.clone()
        for b, (tgt, src, w) in self._mix.items():
            mine = (rows[:, 0] == b).nonzero().squeeze(1)
            row_of = torch.full((rank.shape[1],), -1, dtype=torch.long, device=rows.device)
            row_of[idx[b, rows[mine, 1]]] = mine
            tgt, src, w = tgt.to(rows.device), src.to(rows.device), w.to(rows.device)
            here = row_of[tgt] >= 0  # targets dropped by a later stage take no feature
            dest = row_of[tgt[here]]
            vals = table[rank[b, src[here]].to(table.device)].float() * w[here, None].to(table.device)
            acc = torch.zeros(feats.shape, dtype=torch.float32, device=table.device).index_add_(0, dest.to(table.device), vals)
            filled = dest.unique()
            out[filled] = acc[filled].to(feats.dtype)
        return out


def regroup(x: torch.Tensor, owner_from: torch.Tensor, owner_to: torch.Tensor, n_to: int) -> torch.Tensor:
    """Features of one partition of the original patches, re-expressed on another partition.

    Each original patch takes the feature of the token that holds it in the first partition; each token of
    the second partition gets the mean over its patches (a size-weighted mean of the first partition's
    tokens), computed in float32.

    Args:
        x: ``(n_from, D)`` features of the first partition's tokens.
        owner_from: ``(n_orig,)`` long, the token of the first partition holding each original patch
            (``-1`` where that token was pruned).
        owner_to: ``(n_orig,)`` long, the token of the second partition holding it (``-1``: pruned).
        n_to: Tokens of the second partition.

    Returns:
        ``(n_to, D)`` in ``x``'s dtype (tokens owning no patch get zeros).

    Examples:
        >>> import torch
        >>> x = torch.tensor([[1.0], [3.0], [5.0]])
        >>> regroup(x, torch.tensor([0, 1, 2, 2]), torch.tensor([0, 0, 0, 1]), 2).flatten().tolist()
        [3.0, 5.0]
    """
    held = (owner_from >= 0) & (owner_to >= 0)  # -1: the patch's token was pruned (FrameGrid.subset)
    owner_from, owner_to = owner_from[held], owner_to[held]
    vals = x.float()[owner_from]
    out = torch.zeros(n_to, x.shape[-1], device=x.device).index_add_(0, owner_to, vals)
    count = torch.zeros(n_to, device=x.device).index_add_(0, owner_to, torch.ones_like(owner_to, dtype=torch.float))
    return (out / count.clamp(min=1)[:, None]).to(x.dtype)


class _Qwen3Vision(_QwenVision):
    """The Qwen ViT hooks plus DeepStack taps (see the module docstring)."""

    frame_runs: ClassVar[bool] = True

    def install(self) -> list[Any]:
        hs = super().install()
        for j, merger in enumerate(self.visual.deepstack_merger_list):
            hs.append(merger.register_forward_pre_hook(self._tap(j)))
        return hs

    def _tap(self, j: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple) -> None:
            call = self.call
            if call is None:  # our own re-run of the merger in after_call
                return
            layout = None if call.items is None else [
                (it.grid, [fr.owner for fr in it.frames]) for it in call.items
            ]
            call.taps[j] = (call.version, args[0], layout)

        return hook

    def _tap_units(self, j: int, feats: torch.Tensor, call: _Call) -> list[torch.Tensor]:
        """Tap ``j``'s merger output on the final encoder grid: per item ``(t, h/m, w/m, D)``."""
        m = self.m
        final = call.grids if call.items is None else [it.grid for it in call.items]
        version, hs, layout = call.taps.get(j, (call.version, None, None))
        if version != call.version:  # a stage ran after this tap: regroup its patches onto the final grid
            assert call.items is not None and hs is not None
            grids = call.grids if layout is None else [g for g, _ in layout]
            parts = []
            for i, (x, it) in enumerate(zip(self._to_grids(hs, grids, None), call.items)):
                frames = []
                for f, fr in enumerate(it.frames):
                    src = x[f].reshape(-1, x.shape[-1])
                    own = torch.arange(src.shape[0], device=src.device) if layout is None else layout[i][1][f]
                    h, w = fr.shape
                    frames.append(regroup(src, own, fr.owner, h * w).reshape(h, w, -1))
                parts.append(torch.stack(frames))
            packed = torch.cat([rearrange(p, "t (hu a) (wu b) c -> (t hu wu a b) c", a=m, b=m) for p in parts])
            feats = self.visual.deepstack_merger_list[j](packed)
        sizes = [t * (h // m) * (w // m) for t, h, w in final]
        return [u.reshape(t, h // m, w // m, -1) for u, (t, h, w) in zip(torch.split(feats, sizes), final)]

    def after_call(self, out: Any, call: _Call, units_before: list[VisualItemTokens],
                   units: list[VisualItemTokens], counts: list[int], changed: bool) -> None:
        """Rewrite ``out.deepstack_features`` to follow the compressed grid (laid out like the main features)."""
        if not changed:
            return
        projected = bool(self.session.projector_stages)
        new = []
        for j, feats in enumerate(out.deepstack_features):
            full = feats.new_zeros(sum(counts), feats.shape[-1])
            offset = 0
            for i, per_item in enumerate(self._tap_units(j, feats, call)):
                n_part = counts[i] // per_item.shape[0]
                for f in range(per_item.shape[0]):
                    x = per_item[f].reshape(-1, per_item.shape[-1])
                    if projected:
                        fr = units[i].frames[f]
                        x = regroup(x, units_before[i].frames[f].owner, fr.owner, fr.num_tokens)
                    full[offset:offset + x.shape[0]] = x.to(full.dtype)
                    offset += n_part
            new.append(full)
        out.deepstack_features = new
