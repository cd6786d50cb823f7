"""What the Qwen-VL adapters share (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): a private helper of `tokcomp.adapters`.

These families lay visual tokens out the same way: ``<|image_pad|>``/``<|video_pad|>`` placeholder runs whose
grids come from ``image_grid_thw``/``video_grid_thw`` (or from the 3-D M-RoPE ``position_ids`` inside
``generate()``), a ViT that packs every image/frame into one merge-window-major sequence, attention per frame
via ``cu_seqlens``, 2-D rotary angles from each patch's ``(row, col)``, and an ``m x m`` patch merger.
`QwenVLAdapterBase` implements the LLM layouts, the encoder/projector sites on such a tower and the LLM input
that follows them; the public adapters (`tokcomp.adapters.qwen2_vl`, `tokcomp.adapters.qwen3_vl`) subclass it
and override the few places where their families differ.
"""

from __future__ import annotations

import sys
from typing import Any, ClassVar

import torch
from einops import rearrange

from tokcomp.contracts import (
    Adapter,
    CountItem,
    EncoderAttention,
    ItemShape,
    LLMInput,
    SampleLayout,
    ShapeFn,
    TokenCount,
    VisualItem,
)
from tokcomp.encoder import VisionCallResult, VisionSession, hidden_states_of, valid_slots, with_hidden_states
from tokcomp.errors import RuntimeStateError, ScheduleError
from tokcomp.tokens import FrameGrid, VisualItemTokens
from tokcomp.vision_attention import current_rows, packed_rows

__all__ = ["QwenVLAdapterBase"]


class QwenVLAdapterBase(Adapter):
    """The Qwen-VL families' visual token grids, vision tower and LLM input (subclassed per family)."""

    grid_multiple: ClassVar[int] = 2  # the 2x2 patch merger needs even grid sides
    sites: ClassVar[frozenset[str]] = frozenset({"encoder", "projector", "llm"})
    encoder_attention_sites: ClassVar[frozenset[str]] = frozenset({"encoder", "projector"})

    @property
    def language_model(self) -> torch.nn.Module:
        """``model.model.language_model`` (the family's ``...TextModel``)."""
        return self.model.model.language_model

    @property
    def merge_size(self) -> int:
        """Side of the patch merger's window (2: four ViT patches become one LLM token)."""
        return int(self.model.config.vision_config.spatial_merge_size)

    @property
    def num_vision_blocks(self) -> int:
        """Blocks of the ViT (``model.model.visual.blocks``)."""
        return len(self.model.model.visual.blocks)

    @property
    def vision_attn_implementation(self) -> str:
        """The ViT's attention backend."""
        return str(self.model.model.visual.config._attn_implementation)

    def vision_attention_configs(self) -> list[Any]:
        """The ViT blocks' attention config (one shared object)."""
        cfgs = {id(b.attn.config): b.attn.config for b in self.model.model.visual.blocks}
        return list(cfgs.values())

    def install_vision(self, session: VisionSession) -> list[Any]:
        """Hooks on the ViT blocks, the merger and the tower (see the section comment below)."""
        return self._vision_hooks(session).install()

    def _vision_hooks(self, session: VisionSession) -> _QwenVision:
        return _QwenVision(self, session)

    def _item_grids(self, call: dict[str, Any]) -> dict[str, list[tuple[int, int, int]]]:
        """The ``(t, h, w)`` patch grid of every image and video item of a call, in batch order (one item is
        one placeholder run, or ``t`` consecutive grids' worth of one run)."""
        return {"image": _rows(call.get("image_grid_thw")), "video": _rows(call.get("video_grid_thw"))}

    def llm_input(self, call: dict[str, Any], lm_kwargs: dict[str, Any], results: list[VisionCallResult]) -> LLMInput:
        """Drop the unused placeholder slots of each reduced item and recompute M-RoPE for the new grids.

        The positions are those the model would compute for the same prompt with each image at its new
        grid: `get_rope_index` runs on the prompt with the shortened placeholder runs, and text after an
        image moves accordingly. Decoding continues from the new positions (``decode_shift``).
        """
        ids: torch.Tensor = call["input_ids"]
        cfg = self.model.config
        B, L = ids.shape
        valid = valid_slots(call)
        kind_of = torch.zeros_like(ids)
        kind_of[ids == cfg.image_token_id] = 1
        kind_of[ids == cfg.video_token_id] = 2
        runs = [[(int(kind_of[b, r[0]]), r) for r in _runs((kind_of[b] > 0).nonzero().squeeze(1), kind_of[b])]
                for b in range(B)]
        queue = _match_calls(runs, results)
        keep = valid.clone()
        rope_keep = valid.clone()
        layouts: list[SampleLayout] = []
        grids: dict[int, list[tuple[int, int, int]]] = {1: [], 2: []}
        picks: list[list[tuple[torch.Tensor, torch.Tensor | None]]] = []
        m = self.merge_size
        for b in range(B):
            items: list[VisualItem] = []
            positions = []
            sample_picks = []
            for kind, run in runs[b]:
                res, j = queue[kind].pop(0)
                units = res.units[j]
                grid = res.grids[j]
                assert grid is not None
                rope_n = grid[0] * grid[1] * grid[2]
                keep[b, run[units:]] = False
                rope_keep[b, run[rope_n:]] = False
                grids[kind].append((grid[0], grid[1] * m, grid[2] * m))
                real = run[:units]
                anchors = res.anchors[j]
                sample_picks.append((run[:rope_n], anchors))
                shown = grid if anchors is None else (1, 1, units)
                items.append(VisualItem("image" if kind == 1 else "video", shown, sum(i.count for i in items), units))
                positions.append(real)
            picks.append(sample_picks)
            pos = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.long, device=ids.device)
            layouts.append(SampleLayout.from_items(pos, items))
        # M-RoPE of the prompt with the shortened runs, computed by the model's own get_rope_index
        width = int(rope_keep.sum(1).max())
        ids_c = torch.full((B, width), int(getattr(cfg, "pad_token_id", 0) or 0), dtype=ids.dtype, device=ids.device)
        mask_c = torch.zeros(B, width, dtype=torch.long, device=ids.device)
        slot_c = torch.full((B, width), -1, dtype=torch.long, device=ids.device)
        for b in range(B):
            sl = rope_keep[b].nonzero().squeeze(1)
            ids_c[b, width - sl.numel():] = ids[b, sl]
            mask_c[b, width - sl.numel():] = 1
            slot_c[b, width - sl.numel():] = sl
        mm = torch.zeros_like(ids_c, dtype=torch.int)
        mm[ids_c == cfg.image_token_id] = 1
        mm[ids_c == cfg.video_token_id] = 2
        dev = ids.device
        extra = {}
        if call.get("second_per_grid_ts") is not None:
            extra["second_per_grid_ts"] = call["second_per_grid_ts"]
        pos_c, _ = self.model.model.get_rope_index(
            ids_c, mm,
            image_grid_thw=torch.tensor(grids[1], device=dev) if grids[1] else None,
            video_grid_thw=torch.tensor(grids[2], device=dev) if grids[2] else None,
            attention_mask=mask_c, **extra,
        )
        old = lm_kwargs.get("position_ids")
        if not isinstance(old, torch.Tensor) or old.dim() != 3:
            raise RuntimeStateError("expected 3-D M-RoPE position_ids at the language model's input")
        new = old.clone()
        rows = new[-3:]
        shift = torch.zeros(B, dtype=torch.long, device=dev)
        for b in range(B):
            sel = slot_c[b] >= 0
            full = torch.zeros(3, L, dtype=rows.dtype, device=dev)
            full[:, slot_c[b, sel]] = pos_c[:, b, sel].to(rows.dtype)
            for run_slots, anchors in picks[b]:
                if anchors is not None:  # non-grid items take their anchor token's position
                    vals = full[:, run_slots[anchors.to(dev)]]
                    full[:, run_slots[: anchors.numel()]] = vals
            rows[:, b, keep[b]] = full[:, keep[b]]
            last = int(valid[b].nonzero().max()) if bool(valid[b].any()) else L - 1
            shift[b] = full[0, last] - old[-3][b, last]
        new[-3:] = rows
        return LLMInput(layouts, keep, new, shift)

    def count_items(self, call: dict[str, Any]) -> list[list[CountItem]]:
        """One item per placeholder run's grid, ``(t, h, w)`` in patches (the ``image_grid_thw`` /
        ``video_grid_thw`` rows; a video whose frames are separate runs gives one item per run)."""
        m = self.merge_size
        return [[CountItem(it.kind, (it.grid[0], it.grid[1] * m, it.grid[2] * m)) for it in lay.items]
                for lay in self.layouts(call)]

    def predict_tokens(self, item: CountItem, encoder: ShapeFn, projector: ShapeFn) -> TokenCount:
        """The encoder stages on the patch grid, the ``m x m`` merger (each side divided by ``m``), then the
        projector stages on the merged grid; one placeholder per token."""
        m = self.merge_size
        enc = encoder(ItemShape(*item.grid))
        if not enc.is_grid:
            raise ScheduleError(f"the {self.name!r} patch merger needs a grid after the encoder stages")
        n = projector(ItemShape(enc.t, enc.h // m, enc.w // m)).num_tokens
        return TokenCount(n, n)

    def layouts(self, call: dict[str, Any]) -> list[SampleLayout]:
        """Visual token runs of each sample with their grids.

        Grids come from ``image_grid_thw``/``video_grid_thw`` when the call has them (in batch order). Inside
        ``generate()`` the vision features are computed before the first forward call and the grids are not
        passed on; there each run's grid is read off the M-RoPE ``position_ids`` generate passes (rows t, h,
        w of a run span the item's grid).
        """
        ids: torch.Tensor = call["input_ids"]
        cfg = self.model.config
        m = self.merge_size
        grids = self._item_grids(call)
        from_kwargs = bool(grids["image"] or grids["video"])
        pos = call.get("position_ids")
        used = {"image": 0, "video": 0}
        out = []
        for b in range(ids.shape[0]):
            row = ids[b]
            kind_of = torch.zeros_like(row)
            kind_of[row == cfg.image_token_id] = 1
            kind_of[row == cfg.video_token_id] = 2
            positions = (kind_of > 0).nonzero().squeeze(1)
            items: list[VisualItem] = []
            for run in _runs(positions, kind_of):
                kind = "image" if int(kind_of[run[0]]) == 1 else "video"
                offset = 0
                while offset < run.numel():
                    if from_kwargs:
                        if used[kind] >= len(grids[kind]):
                            raise RuntimeStateError(
                                f"sample {b} has more {kind} placeholder tokens than {kind}_grid_thw describes"
                            )
                        t, h, w = grids[kind][used[kind]]
                        used[kind] += 1
                        grid = (t, h // m, w // m)
                    elif isinstance(pos, torch.Tensor) and pos.dim() == 3 and pos.shape[0] in (3, 4):
                        rc = pos[-3:, b if pos.shape[1] > 1 else 0, run]
                        h = int(rc[1].max() - rc[1].min()) + 1
                        w = int(rc[2].max() - rc[2].min()) + 1
                        grid = (run.numel() // (h * w), h, w)
                    else:
                        raise RuntimeStateError(
                            "cannot tell the visual grids: pass image_grid_thw/video_grid_thw (or the M-RoPE "
                            "position_ids) with input_ids"
                        )
                    count = grid[0] * grid[1] * grid[2]
                    items.append(VisualItem(kind, grid, sum(i.count for i in items), count))
                    offset += count
                if offset != run.numel():
                    raise RuntimeStateError(
                        f"sample {b}: a {kind} run of {run.numel()} tokens does not match its grids ({offset})"
                    )
            out.append(SampleLayout.from_items(positions, items))
        return out


def _match_calls(
    runs: list[list[tuple[int, torch.Tensor]]], results: list[VisionCallResult]
) -> dict[int, list[tuple[VisionCallResult, int]]]:
    """Assign the vision calls' items to the image (1) and video (2) placeholder runs, in batch order.

    The tower is called once for the images and once for the videos (images first); a call is matched to a
    kind by its items' original token counts.
    """
    lengths = {k: [int(r.numel()) for rs in runs for kind, r in rs if kind == k] for k in (1, 2)}
    queue: dict[int, list[tuple[VisionCallResult, int]]] = {1: [], 2: []}
    for res in results:
        for k in (1, 2):
            if not queue[k] and res.original_units == lengths[k]:
                queue[k] = [(res, j) for j in range(len(res.units))]
                break
    for k in (1, 2):
        if lengths[k] and len(queue[k]) != len(lengths[k]):
            raise RuntimeStateError(
                f"cannot match the vision tower's output to the {'image' if k == 1 else 'video'} placeholders: "
                f"runs of {lengths[k]} tokens, tower calls emitting {[r.original_units for r in results]}"
            )
    return queue


def _runs(positions: torch.Tensor, kind_of: torch.Tensor) -> list[torch.Tensor]:
    """Split ascending positions into runs of consecutive indices of one kind."""
    if positions.numel() == 0:
        return []
    kinds = kind_of[positions]
    breaks = ((positions[1:] != positions[:-1] + 1) | (kinds[1:] != kinds[:-1])).nonzero().squeeze(1) + 1
    return list(torch.tensor_split(positions, breaks.tolist()))


def _rows(grid: torch.Tensor | None) -> list[tuple[int, int, int]]:
    if grid is None:
        return []
    return [tuple(int(v) for v in r) for r in grid.tolist()]  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------------------
# Vision tower (encoder and projector sites)
#
# The ViT packs every image/frame into one sequence in *merge-window-major* order (each run of 4 tokens is
# one 2x2 window of the patch merger); Qwen2.5-VL further permutes those windows into attention windows.
# Attention is computed per frame (cu_seqlens) or per window (cu_window_seqlens), with 2-D rotary angles
# from each token's (row, col). At a block where a stage runs, the sequence is unpacked into per-frame
# grids, the stage merges them, and the result is packed back in the order the model itself would use for
# an image of the new grid size — with positions, cu_seqlens and (2.5) windows recomputed for that grid.
# Before the merger the new grid is spread back over the original number of windows (the unused ones are
# zeros), so that `get_image_features` splits, and the placeholder count check, see the sizes they expect;
# the runtime drops the unused LLM slots before decoder layer 0 and recomputes the M-RoPE positions.


def _vision_utils() -> Any:
    from transformers import vision_utils

    return vision_utils


class _Call:
    """State of one call of the vision tower."""

    def __init__(self, grids: list[tuple[int, int, int]]) -> None:
        self.grids = grids  # original (t, h, w) in patches
        self.items: list[VisualItemTokens] | None = None  # set once a stage ran
        self.order: torch.Tensor | None = None  # the tower's sequence order vs. merge-window-major order
        self.kw: dict[str, Any] = {}
        self.version = 0  # how many times a stage changed the tokens (bumped by _pack)
        self.taps: dict[int, Any] = {}  # subclasses' records of intermediate outputs (Qwen3-VL DeepStack)
        self.keys: dict[int, torch.Tensor] = {}
        self.tokens_per_block: dict[int, list[int]] = {}
        self.window_index: torch.Tensor | None = None
        self.attn_kw: dict[int, dict[str, Any]] = {}  # cu_seqlens / rotary an attention block was called with
        self.attn: dict[EncoderAttention, tuple[torch.Tensor, int]] = {}  # (H, N) rows, sequence order; version


class _QwenVision:
    """Hooks on one Qwen2-VL/2.5-VL vision tower for the duration of a `tokcomp.compress` block."""

    def __init__(self, adapter: QwenVLAdapterBase, session: VisionSession) -> None:
        self.adapter = adapter
        self.session = session
        self.visual = adapter.model.model.visual
        self.m = int(self.visual.spatial_merge_size)
        self.windowed = hasattr(self.visual, "fullatt_block_indexes")
        self.call: _Call | None = None

    # each frame of a video is its own placeholder run (Qwen3-VL), not one run per video (Qwen2-VL)
    frame_runs: ClassVar[bool] = False

    def install(self) -> list[Any]:
        v = self.visual
        hs = [v.register_forward_pre_hook(self._start, with_kwargs=True),
              v.register_forward_hook(self._finish, with_kwargs=True)]
        blocks = self.session.encoder_blocks()
        if blocks:
            first = min(blocks)
            for i, blk in enumerate(v.blocks):
                if i >= first:
                    hs.append(blk.register_forward_pre_hook(self._block_hook(i), with_kwargs=True))
            if self.session.needs_keys():
                for b in blocks:
                    if b >= 1:
                        hs.append(v.blocks[b - 1].attn.qkv.register_forward_hook(self._keys_hook(b)))
            hs.append(v.merger.register_forward_pre_hook(self._expand))
        for c, queries in sorted(self.session.attention_blocks().items()):
            attn = v.blocks[c].attn
            hs.append(attn.register_forward_pre_hook(self._attn_call_hook(c), with_kwargs=True))
            hs.append(attn.qkv.register_forward_hook(self._qkv_hook(c, queries)))
        return hs

    # -- encoder attention (tokcomp.contracts.EncoderAttention) ------------------------------------------
    def _attn_call_hook(self, block: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if self.call is not None:
                cu = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
                pe = kwargs.get("position_embeddings", args[2] if len(args) > 2 else None)
                self.call.attn_kw[block] = {"cu_seqlens": cu, "position_embeddings": pe}

        return hook

    def _qkv_hook(self, block: int, queries: set[str]) -> Any:
        def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            call = self.call
            if call is None:
                return
            attn = self.visual.blocks[block].attn
            kw = call.attn_kw.pop(block)
            n = out.shape[0]
            q, k, _ = out.detach().reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            cos, sin = kw["position_embeddings"]
            # the block's own rotary function, from the module that defines its attention class
            rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision
            q, k = rotary(q, k, cos, sin)
            q, k = q.transpose(0, 1), k.transpose(0, 1)  # (H, N, d)
            bounds = [int(x) for x in kw["cu_seqlens"].tolist()]
            grids = call.grids if call.items is None else [it.grid for it in call.items]
            frames = torch.tensor([h * w for t, h, w in grids for _ in range(t)], device=out.device)
            lengths = torch.repeat_interleave(frames, frames)  # frames stay contiguous in the tower's order
            log_size = call.kw.get("log_size") if self.session.proportional else None
            for query in queries:
                rows = packed_rows(q, k, float(attn.scaling), query, bounds, lengths, log_size)
                call.attn[EncoderAttention(block, query)] = (rows, call.version)

        return hook

    def _attention_grids(self, needs: list[EncoderAttention], where: str) -> list[dict[EncoderAttention, torch.Tensor]]:
        """Per item, each requested attention as ``(t, h, w, H)`` on the item's current patch grid."""
        call = self.call
        assert call is not None
        grids = call.grids if call.items is None else [it.grid for it in call.items]
        out: list[dict[EncoderAttention, torch.Tensor]] = [{} for _ in grids]
        for need in needs:
            rows = current_rows(call.attn, need, call.version, where)
            for i, g in enumerate(self._to_grids(rows.T.contiguous(), grids, call.order)):
                out[i][need] = g
        return out

    # -- layout helpers ----------------------------------------------------------------------------------
    def _window(self, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.visual
        return _vision_utils().get_vision_window_index(grid_thw, self.m, v.window_size, v.patch_size)

    def _order(self, grids: list[tuple[int, int, int]], device: torch.device) -> tuple[torch.Tensor | None, Any]:
        """The model's sequence order for these grids relative to merge-window-major order: position ``p``
        holds window-major token ``order[p]`` (None: the same order, Qwen2-VL), and the window data."""
        if not self.windowed:
            return None, None
        wi, cu_w = self._window(torch.tensor(grids, device=device))
        unit = self.m * self.m
        order = (wi.to(device)[:, None] * unit + torch.arange(unit, device=device)).reshape(-1)
        return order, (wi, cu_w)

    def _to_grids(self, seq: torch.Tensor, grids: list[tuple[int, int, int]], order: torch.Tensor | None
                  ) -> list[torch.Tensor]:
        """A packed sequence (N, ...) as one (t, h, w, ...) tensor per item."""
        canon = seq if order is None else torch.empty_like(seq).index_copy_(0, order, seq)
        out = []
        for part, (t, h, w) in zip(torch.split(canon, [t * h * w for t, h, w in grids]), grids):
            out.append(rearrange(part, "(t hu wu a b) ... -> t (hu a) (wu b) ...", t=t, hu=h // self.m,
                                 wu=w // self.m, a=self.m, b=self.m))
        return out

    def _from_grids(self, parts: list[torch.Tensor], order: torch.Tensor | None) -> torch.Tensor:
        """The inverse of `_to_grids`."""
        canon = torch.cat([
            rearrange(x, "t (hu a) (wu b) ... -> (t hu wu a b) ...", a=self.m, b=self.m) for x in parts
        ])
        return canon if order is None else canon[order]

    # -- hooks ---------------------------------------------------------------------------------------------
    def _start(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid is None:
            raise RuntimeStateError("the vision tower was called without grid_thw")
        self.call = _Call([tuple(int(v) for v in r) for r in grid.tolist()])
        if self.windowed:
            self.call.window_index = self._window(grid)[0]
        self.call.order = self._order(self.call.grids, grid.device)[0]

    def _keys_hook(self, block: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
            if self.call is None:
                return
            heads = self.visual.blocks[block - 1].attn.num_heads
            c = out.shape[-1] // 3
            self.call.keys[block] = out[:, c:2 * c].reshape(out.shape[0], heads, -1).mean(1).detach()

        return hook

    def _unpack(self, hs: torch.Tensor, block: int) -> list[VisualItemTokens]:
        call = self.call
        assert call is not None
        metric = call.keys.get(block)
        grids = call.grids if call.items is None else [it.grid for it in call.items]
        xs = self._to_grids(hs, grids, call.order)
        ms = self._to_grids(metric, grids, call.order) if metric is not None else [None] * len(xs)
        needs = self.session.attention_needs("encoder", block) if block >= 0 else []
        att = self._attention_grids(needs, f"encoder block {block}")

        def rows(i: int, f: int) -> dict[EncoderAttention, torch.Tensor]:
            return {need: a[f].permute(2, 0, 1) for need, a in att[i].items()}

        if call.items is None:
            return [
                VisualItemTokens("image" if g[0] == 1 else "video",
                                 [FrameGrid.fresh(x[f], None if mt is None else mt[f]).with_values(attention=rows(i, f))
                                  for f in range(g[0])], g)
                for i, (x, mt, g) in enumerate(zip(xs, ms, grids))
            ]
        for i, (item, x, mt) in enumerate(zip(call.items, xs, ms)):
            item.frames = [fr.with_values(x=x[f], metric=None if mt is None else mt[f],
                                          attention={**fr.attention, **rows(i, f)})
                           for f, fr in enumerate(item.frames)]
        return call.items

    def _pack(self, items: list[VisualItemTokens], device: torch.device) -> torch.Tensor:
        call = self.call
        assert call is not None
        grids = [it.grid for it in items]
        order, window = self._order(grids, device)
        hs = self._from_grids([torch.stack([fr.x for fr in it.frames]) for it in items], order)
        size = self._from_grids([torch.stack([fr.size for fr in it.frames]).float() for it in items], order)
        position = self._from_grids([torch.stack([fr.pos for fr in it.frames]).float() for it in items], order)
        call.items, call.order = items, order
        call.version += 1
        gt = torch.tensor(grids, device=device)
        vu = _vision_utils()
        cu = vu.get_vision_cu_seqlens(gt)
        cfg = self.visual.config
        cos, sin = self.visual.rotary_pos_emb(hs, position)
        kw: dict[str, Any] = {"position_embeddings": (cos, sin)}
        from transformers.utils.generic import get_max_seqlen

        kw["full"] = (cu, get_max_seqlen(cu, cfg))
        if window is not None:
            cu_w = window[1].to(device)
            kw["window"] = (cu_w, get_max_seqlen(cu_w, cfg))
        kw["log_size"] = None if bool((size == 1).all()) else size.log()
        call.kw = kw
        return hs

    def _block_hook(self, i: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            call = self.call
            if call is None:
                return args, kwargs
            hs = hidden_states_of(args, kwargs)
            if i in self.session.encoder_blocks():
                items = self._unpack(hs, i)
                items = self.session.run("encoder", i, items)
                hs = self._pack(items, hs.device)
            if call.items is not None:
                kw = call.kw
                windowed = self.windowed and i not in self.visual.fullatt_block_indexes
                cu, mx = kw["window"] if windowed else kw["full"]
                kwargs["cu_seqlens"], kwargs["max_seqlen"] = cu, mx
                kwargs["position_embeddings"] = kw["position_embeddings"]
                if kw["log_size"] is not None and self.session.proportional:
                    from tokcomp.encoder import ChunkedBias

                    kwargs["tokcomp_bias"] = ChunkedBias(kw["log_size"])
                call.tokens_per_block[i] = [it.num_tokens for it in call.items]
            return with_hidden_states(args, kwargs, hs)

        return hook

    def _unit_slots(self, device: torch.device) -> list[torch.Tensor]:
        """For each item, the merger-input window slot of each of its original LLM tokens, in output order."""
        call = self.call
        assert call is not None
        counts = [t * (h // self.m) * (w // self.m) for t, h, w in call.grids]
        total = sum(counts)
        out_to_in = torch.arange(total, device=device)
        if call.window_index is not None:
            # the tower un-permutes the merger's output with argsort(window_index): output row u comes from
            # merger input window argsort(window_index)[u]
            out_to_in = torch.argsort(call.window_index.to(device))
        return list(torch.split(out_to_in, counts))

    def _expand(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        call = self.call
        if call is None or call.items is None:
            return None
        hs = args[0]
        items = self._unpack(hs, -1)
        unit = self.m * self.m
        n_orig = sum(t * h * w for t, h, w in call.grids)
        full = hs.new_zeros(n_orig // unit, unit, hs.shape[-1])
        slots = self._unit_slots(hs.device)
        for it, sl in zip(items, slots):
            x = torch.stack([fr.x for fr in it.frames])  # (t, h, w, c)
            # new LLM tokens in raster order, each a 2x2 window: the merger's input layout
            x = rearrange(x, "t (hu a) (wu b) c -> (t hu wu) (a b) c", a=self.m, b=self.m)
            full[sl[: x.shape[0]]] = x
        return (full.reshape(n_orig, -1), *args[1:])

    def _finish(self, module: torch.nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        call = self.call
        if call is None:
            return None
        self.call = None
        m = self.m
        pooled = out.pooler_output
        counts = [t * (h // m) * (w // m) for t, h, w in call.grids]
        if call.items is None:
            units_before = [
                _unit_items(pooled_i, (t, h // m, w // m), None, m)
                for pooled_i, (t, h, w) in zip(torch.split(pooled, counts), call.grids)
            ]
        else:
            units_before = []
            for pooled_i, it in zip(torch.split(pooled, counts), call.items):
                t, h, w = it.grid
                n = t * (h // m) * (w // m)
                units_before.append(_unit_items(pooled_i[:n], (t, h // m, w // m), it, m))
        items_units = units_before
        needs = self.session.attention_needs("projector", self.adapter.num_vision_blocks)
        if needs and self.session.projector_stages:
            self.call = call
            att = self._attention_grids(needs, "the merger")
            self.call = None
            for it, a in zip(units_before, att):
                for f, fr in enumerate(it.frames):
                    pooled_att = {}
                    for need, g in a.items():
                        t, hp, wp, H = g.shape
                        g = g[f].reshape(hp // m, m, wp // m, m, H).mean((1, 3))
                        pooled_att[need] = g.permute(2, 0, 1)
                    it.frames[f] = fr.with_values(attention=pooled_att)
        if self.session.projector_stages:
            items_units = self.session.run("projector", self.adapter.num_vision_blocks, units_before)
        changed = call.items is not None or bool(self.session.projector_stages)
        result = VisionCallResult([], [], [], [])
        new = pooled.clone() if changed else pooled
        offset = 0
        for it, n in zip(items_units, counts):
            # one result item per placeholder run: the whole item, or each frame (Qwen3-VL's video runs)
            parts = [(f, [fr]) for f, fr in enumerate(it.frames)] if self.frame_runs else [(0, it.frames)]
            n_part = n // len(parts)
            for f, frames in parts:
                k = sum(fr.num_tokens for fr in frames)
                if changed:
                    block = torch.cat([fr.x.reshape(-1, fr.x.shape[-1]) for fr in frames])
                    new[offset:offset + n_part] = 0
                    new[offset:offset + k] = block.to(new.dtype)
                result.original_units.append(n_part)
                result.units.append(k)
                result.features.append(new[offset:offset + k])
                if frames[0].is_grid:
                    result.grids.append((len(frames), *frames[0].shape))
                    result.anchors.append(None)
                else:
                    _t0, h0, w0 = it.original
                    result.grids.append((len(frames), h0, w0))
                    anchors = []
                    for g, fr in enumerate(frames):
                        rc = fr.pos.reshape(-1, 2).round().long()
                        rc[:, 0].clamp_(0, h0 - 1)
                        rc[:, 1].clamp_(0, w0 - 1)
                        anchors.append(g * h0 * w0 + rc[:, 0] * w0 + rc[:, 1])
                    result.anchors.append(torch.cat(anchors))
                result.provenance.append([fr.owner for fr in frames])
                offset += n_part
        result.encoder_tokens = dict(call.tokens_per_block)
        self.after_call(out, call, units_before, items_units, counts, changed)
        self.session.finish_call(result)
        if changed:
            out.pooler_output = new
            return out
        return None

    def after_call(self, out: Any, call: _Call, units_before: list[VisualItemTokens],
                   units: list[VisualItemTokens], counts: list[int], changed: bool) -> None:
        """Subclasses rewrite further tower outputs here (Qwen3-VL: the DeepStack features)."""


def _unit_items(x: torch.Tensor, grid: tuple[int, int, int], patches: VisualItemTokens | None,
                m: int) -> VisualItemTokens:
    """The projector's output for one item as LLM-token grids, with sizes/positions/provenance carried from
    the patch-level grid (each LLM token is an m x m window of it)."""
    t, h, w = grid
    xs = x.reshape(t, h, w, -1)
    frames = []
    for f in range(t):
        if patches is None:
            fr = FrameGrid.fresh(xs[f])
            fr = fr.with_values(size=fr.size * m * m)
            hp, wp = h * m, w * m
            rows, cols = torch.meshgrid(torch.arange(hp), torch.arange(wp), indexing="ij")
            owner = ((rows // m) * w + cols // m).reshape(-1).to(x.device)
            frames.append(fr.with_values(owner=owner))
            continue
        pf = patches.frames[f]
        s = pf.size.reshape(h, m, w, m).sum((1, 3))
        p = (pf.pos * pf.size[..., None]).reshape(h, m, w, m, 2).sum((1, 3)) / s[..., None]
        p = (p - (m - 1) / 2) / m  # patch units -> LLM-token units
        tok = pf.owner  # original patch -> patch-level token (raster in the merged patch grid)
        wp = pf.shape[1]
        owner = (tok // wp // m) * w + (tok % wp) // m
        frames.append(FrameGrid(xs[f], s, p, owner))
    kind = "image" if t == 1 else "video"
    return VisualItemTokens(kind, frames, grid)
