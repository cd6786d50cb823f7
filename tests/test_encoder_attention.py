"""Encoder attention rows (`tokcomp.contracts.EncoderAttention`) equal softmax(q kᵀ/√d) of the block.

The oracle: the same batch through the unpatched tower whose attention function is swapped (in this test
only) for one that computes eager attention itself and records every call's probabilities. The rows the
runtime computed under ``sdpa`` (and ``eager``) from the block's own q/k must equal the recorded CLS row, or
the recorded column sums divided by the frame's query count, for every image and frame of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch
from conftest import cached_model

import tokcomp as tc
from tokcomp import testing
from tokcomp.contracts import EncoderAttention, VisualStrategy
from tokcomp.tokens import VisualTokens

ARCHS = ["llava", "internvl", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
CLS = {"llava", "internvl"}


@dataclass
class Probe(VisualStrategy):
    """Records the attention it is given and changes nothing."""

    name: ClassVar[str] = "probe"
    needs: tuple = ()
    seen: list = field(default_factory=list)

    def attention_needs(self, where):
        return self.needs

    def reduce(self, tokens: VisualTokens) -> VisualTokens:
        self.seen.append([[dict(fr.attention) for fr in it.frames] for it in tokens.items])
        return tokens


def _record(store: list):
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_):
        w = torch.matmul(query.float(), key.float().transpose(2, 3)) * scaling
        if attention_mask is not None:
            w = w + attention_mask.float()
        p = torch.softmax(w, dim=-1)
        store.append((module, p))
        return torch.matmul(p.to(value.dtype), value).transpose(1, 2).contiguous(), p

    return attention


def _reference(model, batch, block_attn, query, prefix):
    """Per attention call of ``block_attn``: the recorded rows ``(B, H, T)`` (patch keys only for row towers)."""
    from transformers import AttentionInterface

    store: list = []
    AttentionInterface.register("tokcomp_test_record", _record(store))
    cfg = block_attn.config
    old = cfg._attn_implementation
    cfg._attn_implementation = "tokcomp_test_record"
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        cfg._attn_implementation = old
    calls = [p for m, p in store if m is block_attn]
    out = []
    for p in calls:
        if query == "cls":
            out.append(p[:, :, 0, prefix:])
        else:
            out.append(p.sum(2)[:, :, prefix:])
    return out


def _blocks(model, arch):
    inner = model.model
    if arch.startswith("qwen"):
        return [b.attn for b in inner.visual.blocks]
    if arch == "internvl":
        return [b.attention for b in inner.vision_tower.encoder.layer]
    return [b.self_attn for b in inner.vision_tower.encoder.layers]


def _batch(arch):
    images = [[testing.make_image(224, 168, seed=1)], [testing.make_image(140, 196, seed=2)]]
    return testing.tiny_inputs(arch, images)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_rows_equal_softmax_of_the_block(arch, attn):
    model = cached_model(arch, attn)
    batch = _batch(arch)
    depth = len(_blocks(model, arch))
    queries = ["mean", "cls"] if arch in CLS else ["mean"]
    blocks = range(depth - 1)  # every block before the stage's (Qwen2.5-VL: windowed and full ones)
    needs = tuple(EncoderAttention(b, q) for b in blocks for q in queries)
    probe = Probe(needs=needs)
    with torch.no_grad(), tc.compress(model, [tc.Stage(probe, site="encoder", layers=[depth - 1])]):
        model(**batch)
    (seen,) = probe.seen
    for need in needs:
        got = [fr[need] for item in seen for fr in item]  # (H, h, w) per frame, batch order
        ref = _patch_frames(model, arch, batch, need)
        assert len(got) == len(ref) >= 2
        for g, r in zip(got, ref):
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def _patch_frames(model, arch, batch, need):
    """The recorded rows of ``need`` as ``(H, h, w)`` per frame in raster order (the oracle's side)."""
    prefix = 1 if arch in CLS else 0
    ref = _reference(model, batch, _blocks(model, arch)[need.block], need.query, prefix)
    if not arch.startswith("qwen"):
        rows = torch.cat(ref)
        if need.query == "mean":
            rows = rows / (rows.shape[-1] + prefix)
        side = int(rows.shape[-1] ** 0.5)
        return list(rows.reshape(rows.shape[0], rows.shape[1], side, side))
    from transformers import vision_utils

    visual = model.model.visual
    seq = torch.cat([r[0].transpose(0, 1) for r in ref])  # (N, H) in the tower's order
    grid = batch["image_grid_thw"]
    m = visual.spatial_merge_size
    if hasattr(visual, "fullatt_block_indexes"):
        wi, _ = vision_utils.get_vision_window_index(grid, m, visual.window_size, visual.patch_size)
        order = (wi[:, None] * m * m + torch.arange(m * m)).reshape(-1)
        seq = torch.empty_like(seq).index_copy_(0, order, seq)
    start, frames = 0, []
    for t, h, w in grid.tolist():
        part = seq[start:start + t * h * w]
        start += t * h * w
        x = part.reshape(t, h // m, w // m, m, m, -1).permute(0, 1, 3, 2, 4, 5).reshape(t, h, w, -1)
        if need.query == "mean":
            x = x / (h * w)
        frames += [x[f].permute(2, 0, 1) for f in range(t)]
    return frames


@pytest.mark.parametrize("arch", ["llava", "internvl", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_rows_at_the_projector_are_pooled_per_unit(arch):
    """At the projector site each LLM token gets the mean of its m x m patches' rows (Qwen's 2x2 merger,
    InternVL's pixel shuffle; LLaVA's per-token projector: the patch rows themselves)."""
    model = cached_model(arch)
    batch = _batch(arch)
    need = EncoderAttention(len(_blocks(model, arch)) - 1, "mean")
    probe = Probe(needs=(need,))
    with torch.no_grad(), tc.compress(model, [tc.Stage(probe, site="projector")]):
        model(**batch)
    got = [fr[need] for item in probe.seen[0] for fr in item]
    unit = 1 if arch == "llava" else 2
    ref = []
    for r in _patch_frames(model, arch, batch, need):
        H, h, w = r.shape
        ref.append(r.reshape(H, h // unit, unit, w // unit, unit).mean((2, 4)))
    assert len(got) == len(ref) >= 2
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-4)


def test_refusals():
    qwen = cached_model("qwen2_vl")
    with pytest.raises(tc.ScheduleError, match="no CLS token"):
        tc.compress(qwen, [tc.Stage(Probe(needs=(EncoderAttention(0, "cls"),)), site="encoder", layers=[1])])
    with pytest.raises(tc.ScheduleError, match="only blocks 0..0"):
        tc.compress(qwen, [tc.Stage(Probe(needs=(EncoderAttention(1, "mean"),)), site="encoder", layers=[1])])
    ov = cached_model("llava_onevision")
    with pytest.raises(tc.ScheduleError, match="cannot provide there"):
        tc.compress(ov, [tc.Stage(Probe(needs=(EncoderAttention(1, "mean"),)), site="projector")])
    with pytest.raises(tc.ScheduleError, match="'cls' or 'mean'"):
        EncoderAttention(0, "last")


def test_stale_rows_are_refused():
    """Rows of block 0 describe the tokens before OIM merged them at block 1: a stage at block 3 that asks
    for them is refused instead of reading rows of tokens that no longer exist."""
    model = cached_model("qwen2_5_vl")
    probe = Probe(needs=(EncoderAttention(0, "mean"),))
    stages = [tc.Stage("oim", site="encoder", layers=[1], rate=0.5, iterations=1),
              tc.Stage(probe, site="encoder", layers=[3])]
    with torch.no_grad(), tc.compress(model, stages), pytest.raises(tc.RuntimeStateError, match="changed"):
        model(**_batch("qwen2_5_vl"))


def test_video_frames_get_their_own_rows():
    """A Qwen2-VL video of 2 temporal frames: attention runs per frame (cu_seqlens), so each frame's mean
    row sums to 1 over its own keys."""
    model = cached_model("qwen2_vl")
    frames = [testing.make_image(112, 84, seed=s) for s in range(4)]
    batch = testing.tiny_inputs("qwen2_vl", [[]], videos=[frames])
    probe = Probe(needs=(EncoderAttention(0, "mean"),))
    with torch.no_grad(), tc.compress(model, [tc.Stage(probe, site="encoder", layers=[1])]):
        model(**batch)
    (item,) = probe.seen[0]
    assert len(item) == 2
    for fr in item:
        a = fr[EncoderAttention(0, "mean")]
        torch.testing.assert_close(a.sum((1, 2)), torch.ones(a.shape[0]), atol=1e-5, rtol=0)
