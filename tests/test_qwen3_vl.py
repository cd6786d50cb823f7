"""Qwen3-VL / Qwen3-VL-MoE: the oracles of the other adapters, with DeepStack in and out of the schedule's range.

The tiny models add DeepStack features after LLM layers 0, 1 and 2 (of 4) and tap ViT blocks 0, 1, 2 (of 4).
A batch holds an image per sample and a 4-frame video (2 timestamped runs) in the second sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from conftest import all_hooks, cached_model, needs_precomputed_features
from einops import rearrange
from test_adapters_matrix import _layouts_in_generate, _mask_oracle, _same_layouts
from test_encoder_qwen import _shrunk
from tokcomp.strategies import OIM, PACT, Downsample, RandomPrune
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

import tokcomp as tc
from tokcomp import testing

ARCHS = ["qwen3_vl", "qwen3_vl_moe"]
GEN = {"max_new_tokens": 4, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}


def _batch(arch: str):
    frames = [testing.make_image(128, 96, seed=10 + s) for s in range(4)]
    images = [[testing.make_image(224, 168, seed=1)], [testing.make_image(140, 196, seed=2)]]
    return testing.tiny_inputs(arch, images, videos=[None, frames])


@pytest.mark.parametrize("arch", ARCHS)
def test_layout_video_is_one_item_per_timestamped_run(arch):
    model = cached_model(arch)
    batch = _batch(arch)
    ids = batch["input_ids"][1]
    layout = tc.find_adapter(model).layouts(dict(batch))[1]
    # 140x196 -> 128x192 -> (1, 6, 4); 4 frames of 128x96 -> 2 temporal patches of (1, 3, 4)
    assert [(i.kind, i.grid) for i in layout.items] == [("image", (1, 6, 4)), ("video", (1, 3, 4)),
                                                       ("video", (1, 3, 4))]
    runs = layout.positions[layout.items[1].start:].tolist()
    assert runs[11] + 1 < runs[12], "the two video runs are separated by the timestamp text"
    text = testing.tiny_tokenizer(arch).decode(ids[runs[11] + 1:runs[12]])
    assert "<|vision_end|>" in text and "<|vision_start|>" in text
    # inside generate() the grids come from the M-RoPE position ids: the same items
    _same_layouts(tc.find_adapter(model).layouts(dict(batch)), _layouts_in_generate(model, batch))


@pytest.mark.parametrize("arch", ARCHS)
def test_empty_schedule_is_identity(arch):
    model = cached_model(arch)
    batch = _batch(arch)
    with torch.no_grad():
        ref = model(**batch).logits
        with tc.compress(model, []) as run:
            out = model(**batch).logits
    assert torch.equal(out, ref)
    assert run.report().original_visual == [35, 48]
    assert all_hooks(model) == []


@pytest.mark.parametrize(
    ("arch", "attn", "layer"),  # layers 0, 1: before DeepStack adds; 3: after the last one
    [("qwen3_vl", a, k) for a in ("sdpa", "eager") for k in (0, 1, 3)] + [("qwen3_vl_moe", "sdpa", 1)],
)
def test_drop_equals_mask(arch, attn, layer):
    """Pruning before a DeepStack layer prunes the injected features with the tokens: the logits equal the
    unpatched model's (which adds DeepStack at every visual position) with the dropped keys masked out."""
    model = cached_model(arch, attn)
    batch = dict(_batch(arch))
    with torch.no_grad(), tc.compress(model, [tc.Stage(RandomPrune(keep_ratio=0.4), layers=[layer])]) as run:
        dropped = model(**batch).logits
        kept = {i: run.kept_positions(i) for i in range(run.adapter.num_layers)}
    final = kept[3]
    assert final.shape[1] < batch["input_ids"].shape[1]
    masked = _mask_oracle(model, batch, kept)
    valid = batch["attention_mask"].bool()
    for b in range(final.shape[0]):
        slots = (final[b] >= 0) & valid[b, final[b].clamp(min=0)]
        torch.testing.assert_close(dropped[b, slots], masked[b, final[b][slots]], atol=2e-4, rtol=1e-4)


_GEN_STAGES = {
    "random-llm1": lambda: tc.Stage(RandomPrune(keep_ratio=0.5), layers=[1]),
    "pact-llm1": lambda: tc.Stage(PACT(keep_ratio=0.6, cutoff=0.5), layers=[1]),  # merges: mixed DeepStack
    "oim-encoder1": lambda: tc.Stage(OIM(rate=0.25), site="encoder", layers=[1]),
    "downsample-projector": lambda: tc.Stage(Downsample(factor=2), site="projector"),
}


@pytest.mark.parametrize(
    ("arch", "stage"),
    [pytest.param("qwen3_vl", f, id=f"qwen3_vl-{k}") for k, f in _GEN_STAGES.items()]
    + [pytest.param("qwen3_vl_moe", _GEN_STAGES["random-llm1"], id="qwen3_vl_moe-random-llm1")],
)
def test_generate_batch_equals_samples_and_cache_equals_recompute(arch, stage):
    model = cached_model(arch)
    batch = _batch(arch)
    L = batch["input_ids"].shape[1]
    with torch.no_grad(), tc.compress(model, [stage()]) as run:
        cached = model.generate(**batch, **GEN)
        rep = run.report()
        fresh = model.generate(**batch, **GEN, use_cache=False)
        singles = []
        for i in range(2):
            one = testing.batch_item(batch, i)
            singles.append((model.generate(**one, **GEN), one["input_ids"].shape[1]))
    assert min(rep.visual_tokens[-1][b] for b in range(2)) < 35, rep.visual_tokens
    assert all(rep.visual_tokens[-1][b] < n for b, n in enumerate(rep.uncompressed_visual))
    assert torch.equal(cached.sequences, fresh.sequences)
    for a, b in zip(cached.scores, fresh.scores):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-4)
    for i, (single, n) in enumerate(singles):
        assert torch.equal(single.sequences[0, n:], cached.sequences[i, L:])
        torch.testing.assert_close(single.scores[0][0], cached.scores[0][i], atol=2e-4, rtol=1e-4)


def _tower_outputs(model):
    """A forward hook on the vision tower that records the DeepStack features it returns (after tokcomp's own
    hook; get_image_features splits them in place afterwards)."""
    seen = []
    handle = model.model.visual.register_forward_hook(lambda mod, args, out: seen.append(list(out.deepstack_features)))
    return seen, handle


_ENCODER_STAGES = {
    "oim-encoder1": lambda: tc.Stage(OIM(rate=0.25), site="encoder", layers=[1]),  # tap 0 before, 1-2 after
    "oim-encoder0": lambda: tc.Stage(OIM(rate=0.5, metric="hidden", mode="pairs"), site="encoder", layers=[0]),
    "oim-projector": lambda: tc.Stage(OIM(rate=0.3, iterations=2), site="projector"),
}


@needs_precomputed_features
@pytest.mark.parametrize(
    ("arch", "stage"),
    [pytest.param("qwen3_vl", f, id=f"qwen3_vl-{k}") for k, f in _ENCODER_STAGES.items()]
    + [pytest.param("qwen3_vl_moe", _ENCODER_STAGES["oim-encoder1"], id="qwen3_vl_moe-oim-encoder1")],
)
def test_llm_input_follows_the_encoder(arch, stage):
    """Compressed == the unpatched model given the compressed features and DeepStack features, with
    shorter placeholder runs and the new grids (positions, masks, DeepStack adds and decoding by the model)."""
    model = cached_model(arch)
    inputs = _batch(arch)
    gen = {"max_new_tokens": 4, "do_sample": False}
    with torch.no_grad(), tc.compress(model, [stage()]) as run:
        seen, handle = _tower_outputs(model)
        try:
            out = model(**inputs).logits[:, -1]
        finally:
            handle.remove()
        results = run._state.vision
        toks = model.generate(**inputs, **gen)[:, inputs["input_ids"].shape[1]:]
    rep = run.report()
    assert sum(rep.emitted_visual) < sum(rep.uncompressed_visual), "nothing was compressed"
    shrunk = _shrunk(model, inputs, results)
    for res, tower in zip(results, seen):  # images first, then videos: the model's own call order
        kind = "image" if res.original_units == [35, 24] else "video"
        offsets = [sum(res.original_units[:k]) for k in range(len(res.units))]
        ds = [tuple(f[o:o + n] for o, n in zip(offsets, res.units)) for f in tower]
        assert len(ds) == 3 and all(len(f) == len(res.units) for f in ds)
        pooled = shrunk["mm_encoder_outputs"][kind].pooler_output
        shrunk["mm_encoder_outputs"][kind] = BaseModelOutputWithDeepstackFeatures(
            pooler_output=pooled, deepstack_features=ds
        )
    with torch.no_grad():
        ref = model(**shrunk).logits[:, -1]
        ref_toks = model.generate(**shrunk, **gen)[:, shrunk["input_ids"].shape[1]:]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(toks, ref_toks)


def test_encoder_merge_carries_the_grid_into_a_deepstack_tap_taken_before_it():
    """Downsampling 2x2 at block 1: DeepStack tap 0 (block 0's output, full resolution) must become the
    merger of the 2x2 means of block 0's output, computed here from the unpatched tower."""
    model = cached_model("qwen3_vl")
    inputs = testing.tiny_inputs("qwen3_vl", [[testing.make_image(256, 192, seed=5)]])  # 16 x 12 patches
    visual = model.model.visual
    taps = {}
    handle = visual.deepstack_merger_list[0].register_forward_pre_hook(lambda mod, args: taps.update(x=args[0]))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    grid = rearrange(taps["x"], "(hu wu a b) c -> (hu a) (wu b) c", hu=6, wu=8, a=2, b=2)  # (12, 16, C)
    pooled = rearrange(grid, "(h i) (w j) c -> h w (i j) c", i=2, j=2).mean(2)  # (6, 8, C)
    expected = visual.deepstack_merger_list[0](
        rearrange(pooled, "(hu a) (wu b) c -> (hu wu a b) c", a=2, b=2)
    )
    with torch.no_grad(), tc.compress(model, [tc.Stage(Downsample(factor=2), site="encoder", layers=[1])]) as run:
        seen, handle = _tower_outputs(model)
        try:
            model(**inputs)
        finally:
            handle.remove()
    assert run.report().emitted_visual == [12]
    got = seen[0][0][:12]
    torch.testing.assert_close(got, expected.detach(), atol=1e-5, rtol=1e-5)
    assert bool((seen[0][0][12:] == 0).all()), "unused slots are zeros, like the features"


def test_fastv_scores_use_the_per_head_norms():
    model = cached_model("qwen3_vl")
    parts = tc.find_adapter(model).attention_parts(1)
    assert parts.q_norm is model.model.language_model.layers[1].self_attn.q_norm
    assert parts.k_norm is model.model.language_model.layers[1].self_attn.k_norm


@pytest.mark.parametrize("cls_name", ["Qwen3_5ForConditionalGeneration", "Qwen3_5ForCausalLM"])
def test_qwen3_5_is_refused_by_name_with_the_reason(cls_name):
    """Qwen3.5 is multimodal (the Qwen3-VL tower), but its Gated DeltaNet layers keep no per-token cache:
    compress() refuses it before installing anything, saying why."""
    import transformers
    from transformers.models.qwen3_5.configuration_qwen3_5 import (
        Qwen3_5Config,
        Qwen3_5TextConfig,
        Qwen3_5VisionConfig,
    )

    text = Qwen3_5TextConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, linear_key_head_dim=8, linear_value_head_dim=8,
        linear_num_key_heads=2, linear_num_value_heads=4,
    )
    assert text.layer_types.count("linear_attention") == 3  # the released 3-of-4 pattern
    if cls_name == "Qwen3_5ForCausalLM":
        model = transformers.Qwen3_5ForCausalLM(text)
    else:
        config = Qwen3_5Config(text_config=text, vision_config=Qwen3_5VisionConfig(
            depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64))
        model = transformers.Qwen3_5ForConditionalGeneration(config)
        assert hasattr(model.model, "visual"), "the released class is multimodal"
    with pytest.raises(tc.UnsupportedModelError) as info:
        tc.compress(model, [])
    msg = str(info.value)
    assert cls_name in msg and "Qwen3.5" in msg and "Gated DeltaNet" in msg and "per-token" in msg, msg
    assert all_hooks(model) == [] and not hasattr(model, "_tokcomp_active")


@dataclass
class _PairMerge(tc.LLMStrategy):
    """Merges present visual tokens 2i and 2i+1 into token 2i (plain mean); an odd last one stays alone."""

    name: ClassVar[str] = "test-pair-merge"

    def select(self, view: tc.LLMView) -> tc.LLMDecision:
        n, dev = view.num_present, view.hidden.device
        members = torch.arange(n, device=dev) // 2
        keep = torch.arange(0, n, 2, device=dev)
        sums = torch.zeros(keep.numel(), view.hidden.shape[-1], device=dev).index_add_(0, members, view.hidden.float())
        hidden = sums / torch.bincount(members).float()[:, None]
        return tc.LLMDecision(keep=keep, hidden=hidden.to(view.hidden.dtype), members=members)


def _recording(strategy: tc.LLMStrategy) -> tuple[tc.LLMStrategy, list]:
    """The strategy with its decisions recorded as (layer, sample, visual ranks of the view, keep, members)."""
    seen: list = []
    select = strategy.select

    def recorded(view: tc.LLMView) -> tc.LLMDecision:
        d = select(view)
        seen.append((view.layer, view.sample, view.index.clone(), d.keep.clone(), d.members.clone()))
        return d

    strategy.select = recorded  # this instance only
    return strategy, seen


def _merge_oracle(model, batch, records, *, merge_features: bool = True) -> tuple[torch.Tensor, dict]:
    """The unpatched model with the recorded merges done by hand: at a merging layer's input each kept
    token's hidden state becomes the mean of its members' (the others are masked out of attention from
    there on, `testing.masked_logits`), and with ``merge_features`` each DeepStack layer after the merge
    adds the mean of the members' features at the kept token (successive means, as the merges ran)."""
    layouts = tc.find_adapter(model).layouts(dict(batch))
    valid = batch["attention_mask"].bool()
    B, L = valid.shape
    n_layers = len(model.model.language_model.layers)
    mix = [torch.eye(lay.num_visual) for lay in layouts]  # feature of each visual rank over the original ones
    present = [torch.ones(lay.num_visual, dtype=torch.bool) for lay in layouts]
    mix_after, kept, merges = {}, {}, {}
    for i in range(n_layers):
        for layer, b, ranks, keep, members in records:
            if layer != i:
                continue
            old = mix[b].clone()
            for c in range(keep.numel()):
                mix[b][ranks[keep[c]]] = old[ranks[members == c]].mean(0)
            gone = torch.ones(ranks.numel(), dtype=torch.bool)
            gone[keep] = False
            present[b][ranks[gone]] = False
            merges.setdefault(i, []).append((b, [(layouts[b].positions[ranks[keep[c]]],
                                                  layouts[b].positions[ranks[members == c]]) for c in range(keep.numel())]))
        mix_after[i] = [m.clone() for m in mix]
        rows = []
        for b, lay in enumerate(layouts):
            slots = torch.ones(L, dtype=torch.bool)
            slots[lay.positions[~present[b]]] = False
            rows.append(slots.nonzero().squeeze(1))
        width = max(r.numel() for r in rows)
        kept[i] = torch.stack([torch.cat([torch.full((width - r.numel(),), -1), r]) for r in rows])

    def merge_hidden(i):
        def hook(mod, args, kwargs):
            hs = (args[0] if args else kwargs["hidden_states"]).clone()
            for b, clusters in merges[i]:
                for target, members in clusters:
                    hs[b, target] = hs[b, members].float().mean(0).to(hs.dtype)
            if args:
                return (hs, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hs}
        return hook

    def merge_deepstack(mod, args, kwargs):
        embeds = kwargs.get("deepstack_visual_embeds")
        if embeds is None or not merge_features:
            return None
        counts = [lay.num_visual for lay in layouts]
        new = []
        for j, e in enumerate(embeds):
            parts = e.split(counts)
            new.append(torch.cat([(mix_after[j][b] @ parts[b].float()).to(e.dtype) for b in range(B)]))
        return args, {**kwargs, "deepstack_visual_embeds": new}

    lm = model.model.language_model
    handles = [lm.register_forward_pre_hook(merge_deepstack, with_kwargs=True)]
    handles += [lm.layers[i].register_forward_pre_hook(merge_hidden(i), with_kwargs=True) for i in merges]
    try:
        return testing.masked_logits(model, batch, kept), kept
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize(
    ("attn", "make", "layers"),
    [("sdpa", _PairMerge, [1]), ("eager", _PairMerge, [0]), ("sdpa", _PairMerge, [0, 1]),
     ("sdpa", lambda: PACT(keep_ratio=0.6, cutoff=0.5, proportional_attention=False), [1])],
    ids=["pairs-layer1", "pairs-layer0-eager", "pairs-nested", "pact-layer1"],
)
def test_llm_merge_before_a_deepstack_layer_merges_the_deepstack_features_too(attn, make, layers):
    """A merged token gets the mean of its members' DeepStack features in the layers after the merge: the
    logits equal the unpatched model with the same merges done by hand, and differ from it when each kept
    token keeps its own feature (what tokcomp did before)."""
    model = cached_model("qwen3_vl", attn)
    batch = dict(_batch("qwen3_vl"))
    strategy, records = _recording(make())
    with torch.no_grad(), tc.compress(model, [tc.Stage(strategy, layers=layers)]) as run:
        merged = model(**batch).logits
        final = run.kept_positions(3)
    assert any((m >= 0).sum() > torch.unique(m[m >= 0]).numel() for *_, m in records), "no token merged"
    oracle, kept = _merge_oracle(model, batch, records)
    own, _ = _merge_oracle(model, batch, records, merge_features=False)
    valid = batch["attention_mask"].bool()
    for b in range(final.shape[0]):
        slots = (final[b] >= 0) & valid[b, final[b].clamp(min=0)]
        mine = kept[3][b][kept[3][b] >= 0]
        assert final[b][slots].tolist() == mine[valid[b, mine]].tolist()  # the oracle kept the same tokens
        torch.testing.assert_close(merged[b, slots], oracle[b, final[b][slots]], atol=2e-4, rtol=1e-4)
    assert not torch.allclose(own, oracle, atol=1e-3)
    assert all_hooks(model) == []
