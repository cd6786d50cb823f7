"""Every registered strategy on every registered adapter, at every site both support (issue #4).

The matrix is read from the registry at collection time, so strategies and adapters registered later
(encoder-site methods, third-party adapters) join it without editing this file. For each adapter the tiny
models of `tokcomp.testing` whose class it declares in ``model_classes`` are used (``qwen2_vl`` covers
Qwen2-VL and Qwen2.5-VL).

What each cell holds:

* ``generate()`` with the KV cache on a padded batch of two samples with different images, under ``sdpa``
  and ``eager``: visual tokens were really removed (``report().visual_tokens``), and the batch gives the
  same first-step logits (and the same greedy tokens) as each sample generated alone.
* LLM-site pruners: dropping tokens gives the logits of the unpatched model that keeps every token but
  masks the dropped keys from each layer on (the oracle below, written independently of the runtime).
* A strategy at a site the adapter does not support fails at ``tokcomp.compress`` with a `ScheduleError`
  naming the adapter and the site.

Plus, per adapter: the layout is the same whether the model is called directly or by ``generate()`` (whose
prefill call carries precomputed features instead of pixels), ``attention_parts`` reproduces the eager
attention, and the architecture-specific layouts (LLaVA-OneVision's newline tokens, InternVL tiles, LLaVA
images) match what the processor wrote.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
from conftest import all_hooks, cached_model

import tokcomp as tc
from tokcomp import testing
from tokcomp.contracts import SITES, Strategy

# The model class each tiny architecture builds; an adapter covers the architectures whose class it lists.
TINY_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",  # Qwen3-VL-MoE: tests/test_qwen3_vl.py
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "internvl": "InternVLForConditionalGeneration",
    "llava": "LlavaForConditionalGeneration",
}
# Stage parameters per strategy for the 4-layer tiny LLMs; strategies not listed run with their defaults.
STAGE_PARAMS: dict[str, dict[str, Any]] = {
    "spu": {"layers": range(1, 4)},
    "fastv": {"layers": [2]},
    "vtw": {"layers": [2]},
    "random": {"layers": [1]},
    "visionzip": {"dominant": 4, "contextual": 2},  # 6 of the tiny towers' 16 patches per tile
    "vscan": {"keep": 8, "window": 2},  # 1 local pick in each 2 x 2 window of a 4 x 4 tile + 4 global
}
ATTN = ("sdpa", "eager")
GEN = {"max_new_tokens": 3, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
ATOL, RTOL = 2e-4, 1e-4


def _archs(adapter_cls: type) -> list[str]:
    return [arch for arch, cls in TINY_CLASSES.items() if cls in adapter_cls.model_classes]


def _matrix() -> list[Any]:
    cases = []
    for s_name, s_reg in sorted(tc.registry.strategies().items()):
        for a_name, a_reg in sorted(tc.registry.adapters().items()):
            sites = [s for s in SITES if s in s_reg.obj.sites and s in a_reg.obj.sites]
            archs = _archs(a_reg.obj)
            for site in sites:
                if not archs:
                    cases.append(
                        pytest.param(
                            s_name,
                            a_name,
                            None,
                            site,
                            marks=pytest.mark.skip(
                                reason=f"no tiny model in tokcomp.testing for adapter {a_name!r}"
                            ),
                        )
                    )
                for arch in archs:
                    cases.append(pytest.param(s_name, a_name, arch, site, id=f"{s_name}-{arch}-{site}"))
    return cases


def _unsupported() -> list[Any]:
    cases = []
    for a_name, a_reg in sorted(tc.registry.adapters().items()):
        archs = _archs(a_reg.obj)
        if not archs:
            continue
        strategies = [(n, r.obj) for n, r in sorted(tc.registry.strategies().items())]
        strategies.append((_AnySite.name, _AnySite))
        for s_name, s_cls in strategies:
            for site in SITES:
                if site in s_cls.sites and site not in a_reg.obj.sites:
                    cases.append(pytest.param(s_name, a_name, archs[0], site, id=f"{s_name}-{a_name}-{site}"))
    if not cases:  # test_an_adapter_without_a_site_rejects_it covers the message with a test-only adapter
        cases.append(pytest.param(None, None, None, None, id="none",
                                  marks=pytest.mark.skip(reason="every registered adapter supports every site")))
    return cases


class _AnySite(Strategy):
    """A test-only strategy that declares every site, so each adapter's unsupported sites are exercised."""

    name: ClassVar[str] = "test-any-site"
    sites: ClassVar[frozenset[str]] = frozenset(SITES)

    def default_layers(self, num_layers: int) -> list[int]:
        return [0]


def _stage(name: str, site: str, strategy: Strategy | None = None) -> tc.Stage:
    params = dict(STAGE_PARAMS.get(name, {}))
    layers = params.pop("layers", None)
    if strategy is not None:
        return tc.Stage(strategy, site=site, layers=layers)
    return tc.Stage(name, site=site, layers=layers, **params)


def _compress(model, stage: tc.Stage) -> tc.CompressionRun:
    """``tokcomp.compress`` with one stage; a combination the strategy's own ``validate`` rejects for this
    architecture (e.g. ToMe's 1-D merging in front of a 2x2-grid projector) is skipped, not failed."""
    try:
        return tc.compress(model, tc.Schedule([stage]))
    except tc.ScheduleError as exc:
        try:
            stage.build_strategy().validate(stage, tc.find_adapter(model))
        except tc.ScheduleError:
            pytest.skip(f"rejected by the schedule validator by design: {exc}")
        raise


def _batch(arch: str):
    """Two samples, two different pictures, prompts of different lengths: the batch is left-padded."""
    images = [[testing.make_image(224, 168, seed=1)], [testing.make_image(140, 196, seed=2)]]
    batch = testing.tiny_inputs(arch, images)
    assert not bool(batch["attention_mask"].all()), "the batch must be padded"
    return batch


def _uncompressed_visual(model, batch) -> list[int]:
    with torch.no_grad(), tc.compress(model, tc.Schedule([])) as run:
        model(**batch)
    return run.report().original_visual


# The oracles are tokcomp.testing's public helpers (plugin authors run the same ones).
_Recorder = testing.MergeRecorder
_capture_prefill = testing.capture_prefill
_forward_kwargs = testing.forward_kwargs
_mask_oracle = testing.masked_logits


# --------------------------------------------------------------------------------------------------------
# the matrix


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize(("strategy", "adapter", "arch", "site"), _matrix())
def test_generate_removes_tokens_and_batch_equals_samples(strategy, adapter, arch, site, attn):
    model = cached_model(arch, attn)
    assert type(tc.find_adapter(model)).name == adapter
    batch = _batch(arch)
    before = _uncompressed_visual(model, batch)
    assert all(n > 0 for n in before)
    L = batch["input_ids"].shape[1]
    hooks_before = all_hooks(model)  # transformers installs a few output-recording hooks of its own
    with torch.no_grad(), _compress(model, _stage(strategy, site)) as run:
        out = model.generate(**batch, **GEN)
        rep = run.report()
        singles = []
        for i in range(2):
            one = testing.batch_item(batch, i)
            singles.append(model.generate(**one, **GEN))
            assert [row[0] for row in run.report().visual_tokens] == [row[i] for row in rep.visual_tokens]
    assert all_hooks(model) == hooks_before
    assert out.sequences.shape[1] == L + 3
    for b, n in enumerate(before):
        fewest = min(row[b] for row in rep.visual_tokens)
        assert fewest < n, f"sample {b}: {strategy} removed no visual token ({rep.visual_tokens})"
    for i, single in enumerate(singles):
        torch.testing.assert_close(out.logits[0][i], single.logits[0][0], atol=ATOL, rtol=RTOL)
        n = single.sequences.shape[1] - 3
        assert torch.equal(out.sequences[i, L:], single.sequences[0, n:]), "greedy tokens differ"


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize(
    ("strategy", "adapter", "arch", "site"), [c for c in _matrix() if c.values[3] == "llm"]
)
def test_drop_equals_mask(strategy, adapter, arch, site, attn):
    model = cached_model(arch, attn)
    stage = _stage(strategy, site)
    _compress(model, stage)  # a combination the validator rejects by design is skipped here
    # the public oracle plugin authors run (tokcomp.testing); it asserts that something was removed
    if not testing.check_drop_equals_mask(model, stage, _batch(arch), atol=ATOL, rtol=RTOL):
        pytest.skip(f"{strategy} merges tokens: dropping is not masking, the oracle does not apply")


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize(
    "arch",
    [pytest.param(a, id=a) for a in TINY_CLASSES],
)
def test_direct_forward_drop_equals_mask(arch, attn):
    """model(**batch) without position ids: the model computes its own positions in both runs."""
    model = cached_model(arch, attn)
    batch = dict(_batch(arch))
    with torch.no_grad(), tc.compress(model, [tc.Stage("random", layers=[1], keep_ratio=0.5)]) as run:
        dropped = model(**batch).logits
        kept = {i: run.kept_positions(i) for i in range(run.adapter.num_layers)}
    final = kept[run.adapter.num_layers - 1]
    assert final.shape[1] < batch["input_ids"].shape[1]
    masked = _mask_oracle(model, batch, kept)
    valid = batch["attention_mask"].bool()
    for b in range(final.shape[0]):
        slots = (final[b] >= 0) & valid[b, final[b].clamp(min=0)]
        torch.testing.assert_close(dropped[b, slots], masked[b, final[b][slots]], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(("strategy", "adapter", "arch", "site"), _unsupported())
def test_unsupported_site_fails_at_compress(strategy, adapter, arch, site):
    model = cached_model(arch)
    stage = _stage(strategy, site, _AnySite() if strategy == _AnySite.name else None)
    hooks_before = all_hooks(model)
    with pytest.raises(tc.ScheduleError) as info:
        tc.compress(model, tc.Schedule([stage]))
    msg = str(info.value)
    assert f"{adapter!r} adapter does not support the {site!r} site" in msg, msg
    assert "llm" in msg, "the message lists the sites the adapter supports"
    assert all_hooks(model) == hooks_before


@pytest.mark.parametrize("site", ["encoder", "projector"])
def test_an_adapter_without_a_site_rejects_it(site):
    from tokcomp.adapters.llava import LlavaAdapter

    class LLMOnly(LlavaAdapter):
        name: ClassVar[str] = "test-llm-only"
        sites: ClassVar[frozenset[str]] = frozenset({"llm"})

    model = cached_model("llava")
    with pytest.raises(tc.ScheduleError) as info:
        tc.Schedule([_stage("oim", site)]).resolve(LLMOnly(model))
    msg = str(info.value)
    assert f"'test-llm-only' adapter does not support the {site!r} site" in msg and "llm" in msg, msg


# --------------------------------------------------------------------------------------------------------
# per adapter


ADAPTER_ARCHS = [
    pytest.param(arch, id=arch)
    for reg in sorted(tc.registry.adapters().values(), key=lambda r: r.name)
    for arch in _archs(reg.obj)
]


def _layouts_in_generate(model, batch):
    adapter = tc.find_adapter(model)
    calls, handle = _capture_prefill(model)
    try:
        with torch.no_grad():
            model.generate(**batch, max_new_tokens=1, do_sample=False)
    finally:
        handle.remove()
    return adapter.layouts(calls[0])


def _same_layouts(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.items == y.items
        assert torch.equal(x.positions, y.positions)
        assert torch.equal(x.coords, y.coords)


@pytest.mark.parametrize("arch", ADAPTER_ARCHS)
def test_layout_same_in_forward_and_generate(arch):
    """generate() hands the prefill precomputed features instead of pixels (and drops grids/sizes)."""
    model = cached_model(arch)
    images = [[testing.make_image(224, 168, seed=1)], [], [testing.make_image(140, 196, seed=2)]]
    batch = testing.tiny_inputs(arch, images)
    direct = tc.find_adapter(model).layouts(dict(batch))
    _same_layouts(direct, _layouts_in_generate(model, batch))
    ids = batch["input_ids"]
    for b, lay in enumerate(direct):
        assert lay.num_visual == sum(i.count for i in lay.items)
        assert bool(lay.positions.numel() == 0) == (not images[b])
        assert bool(((ids[b, lay.positions] == 4) | (ids[b, lay.positions] == 5)).all()), "a placeholder"
        for k, item in enumerate(lay.items):  # raster order inside every item
            c = lay.coords[item.start : item.start + item.count]
            _, h, w = item.grid
            assert torch.equal(c[:, 0] * h * w + c[:, 1] * w + c[:, 2], torch.arange(item.count))
            assert bool((lay.item_of[item.start : item.start + item.count] == k).all())


@pytest.mark.parametrize("arch", ADAPTER_ARCHS)
def test_attention_parts_reproduce_eager_attention(arch):
    """The runtime scores tokens from ``attention_parts``; they must be the layer's own q/k."""
    # a fresh model: output_attentions=True makes transformers install recording hooks that stay on it
    model = testing.tiny_model(arch, attn_implementation="eager")
    adapter = tc.find_adapter(model)
    batch = _batch(arch)
    layer = 1
    seen = {}

    def hook(mod, args, kwargs):
        seen["h"] = args[0] if args else kwargs["hidden_states"]
        seen["pe"] = kwargs["position_embeddings"]

    handle = adapter.decoder_layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            attn = model(**batch, output_attentions=True).attentions[layer]  # (B, H, L, L)
    finally:
        handle.remove()
    parts = adapter.attention_parts(layer)
    h, (cos, sin) = seen["h"], seen["pe"]
    B, L, _ = h.shape
    with torch.no_grad():
        x = parts.norm(h)
        q = parts.q_proj(x).view(B, L, parts.num_heads, parts.head_dim)
        k = parts.k_proj(x).view(B, L, parts.num_kv_heads, parts.head_dim)
        if parts.q_norm is not None:  # per-head norms before RoPE (Qwen3-VL)
            q, k = parts.q_norm(q), parts.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)

    def rope(t):
        half = t.shape[-1] // 2
        rotated = torch.cat([-t[..., half:], t[..., :half]], -1)
        return t * cos[:, None] + rotated * sin[:, None]

    q, k = rope(q), rope(k).repeat_interleave(parts.num_heads // parts.num_kv_heads, dim=1)
    logits = (q[:, :, -1:] @ k.transpose(-1, -2)) * parts.scaling  # the last query row
    logits = logits.masked_fill(~batch["attention_mask"].bool()[:, None, None, :], float("-inf"))
    torch.testing.assert_close(logits.softmax(-1)[:, :, 0], attn[:, :, -1], atol=1e-5, rtol=1e-4)


def test_llava_onevision_layouts_and_newlines():
    """Base tile + AnyRes rows x (cols + 1) with a newline per row; base + 1 newline per image of a
    multi-image sample; videos pooled 2x2 + 1 newline. Newline tokens are never visual positions."""
    from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

    arch = "llava_onevision"
    model = cached_model(arch)
    img = testing.make_image
    frames = [img(112, 84, seed=s) for s in range(3)]
    samples = [
        [img(224, 168, seed=1), img(60, 90, seed=2)],
        [img(300, 80, seed=3)],
        [],
        [img(140, 196, seed=4)],
    ]
    batch = testing.tiny_inputs(arch, samples, videos=[[], [], frames, []])
    layouts = tc.find_adapter(model).layouts(dict(batch))
    _same_layouts(layouts, _layouts_in_generate(model, batch))
    processor = testing.tiny_processor(arch)
    ids = batch["input_ids"]
    kinds = [[(i.kind, i.grid) for i in lay.items] for lay in layouts]
    assert kinds[0] == [("image", (1, 4, 4))] * 2
    assert kinds[2] == [("video", (3, 2, 2))]
    for b, size in ((1, batch["image_sizes"][2]), (3, batch["image_sizes"][3])):
        (k0, base), (k1, (_, rows, cols)) = kinds[b]
        assert k0 == k1 == "image" and base == (1, 4, 4)
        h, w = (int(v) for v in size)
        assert image_size_to_num_patches(size, model.config.image_grid_pinpoints, 56) > 1  # AnyRes tiles
        n_tokens = processor._get_number_of_features(h, w, 56, 56)
        assert n_tokens == 16 + rows * (cols + 1) == int((ids[b] == 4).sum())
    # The placeholders left out of the layouts are exactly the image_newline features.
    captured = {}

    def spy(mod, args, kwargs, out):
        captured["embeds"] = kwargs["inputs_embeds"]

    handle = model.model.language_model.register_forward_hook(spy, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # per row, as generate() gives them
    newline = model.model.image_newline
    for b, lay in enumerate(layouts):
        placeholder = (ids[b] == 4) | (ids[b] == 5)
        placeholder[lay.positions] = False
        is_newline = (captured["embeds"][b] == newline).all(-1)
        assert torch.equal(placeholder, is_newline)
        # one per image of a multi-image sample, one per AnyRes row, one per video
        assert int(placeholder.sum()) == [2, kinds[1][1][1][1], 1, kinds[3][1][1][1]][b]
    # Newlines are kept like text: even when every visual token is withdrawn they reach the last layer.
    with torch.no_grad(), tc.compress(model, [tc.Stage("vtw", layers=[2])]) as run:
        model(**batch, position_ids=positions)
    final = run.kept_positions(3)
    for b, lay in enumerate(layouts):
        nl = ((ids[b] == 4) | (ids[b] == 5)).nonzero().squeeze(1)
        nl = nl[~torch.isin(nl, lay.positions)]
        assert bool(torch.isin(nl, final[b]).all())
        assert not bool(torch.isin(lay.positions, final[b]).any())
    assert run.report().visual_tokens[3] == [0, 0, 0, 0]


def test_llava_onevision_mixed_batch_equals_samples():
    """Multi-image, AnyRes, video and text-only samples in one padded batch, through generate()."""
    arch = "llava_onevision"
    model = cached_model(arch)
    img = testing.make_image
    frames = [img(112, 84, seed=s) for s in range(3)]
    samples = [
        [img(224, 168, seed=1), img(60, 90, seed=2)],
        [img(300, 80, seed=3)],
        [],
        [img(140, 196, seed=4)],
    ]
    batch = testing.tiny_inputs(arch, samples, videos=[[], [], frames, []])
    with torch.no_grad(), tc.compress(model, [_stage("spu", "llm")]) as run:
        out = model.generate(**batch, **GEN)
        rep = run.report()
        singles = [model.generate(**testing.batch_item(batch, i), **GEN) for i in range(len(samples))]
    assert rep.original_visual == [32, 64, 12, 64] and rep.visual_tokens[-1] == [0, 0, 0, 0]
    for i, single in enumerate(singles):
        torch.testing.assert_close(out.logits[0][i], single.logits[0][0], atol=ATOL, rtol=RTOL)


def test_llava_full_feature_strategy_keeps_cls_as_text():
    """With vision_feature_select_strategy="full" the LLM gets CLS + grid per image; CLS is not visual."""
    from transformers import LlavaForConditionalGeneration

    config = testing.tiny_config("llava")
    config.vision_feature_select_strategy = "full"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config).eval()
    processor = testing.tiny_processor("llava")
    processor.vision_feature_select_strategy = "full"
    img = testing.make_image
    images = [img(64, 64), img(80, 60, seed=2), img(50, 70, seed=3)]
    batch = processor(
        text=["w0 <image> w3 w4", "w1 <image><image> w5"], images=images, padding=True, return_tensors="pt"
    )
    ids = batch["input_ids"]
    assert ((ids == 4).sum(1) == torch.tensor([17, 34])).all()
    layouts = tc.find_adapter(model).layouts(dict(batch))
    _same_layouts(layouts, _layouts_in_generate(model, batch))
    for b, lay in enumerate(layouts):
        run_starts = [p for p in (ids[b] == 4).nonzero().squeeze(1).tolist() if p == 0 or ids[b, p - 1] != 4]
        cls = [run_starts[0] + 17 * k for k in range(len(lay.items))]  # each image: CLS, then 16 grid tokens
        assert [i.grid for i in lay.items] == [(1, 4, 4)] * len(cls)
        assert not bool(torch.isin(torch.tensor(cls), lay.positions).any())
        assert lay.num_visual == int((ids[b] == 4).sum()) - len(cls)


def test_internvl_tiles():
    arch = "internvl"
    model = cached_model(arch)
    samples = [[testing.make_image(224, 168, seed=1), testing.make_image(100, 100, seed=2)], []]
    batch = testing.tiny_inputs(arch, samples)
    lay = tc.find_adapter(model).layouts(dict(batch))
    tiles = batch["pixel_values"].shape[0]  # crops + thumbnail of each image
    assert [i.grid for i in lay[0].items] == [(1, 4, 4)] * tiles and lay[1].items == []
    assert lay[0].num_visual == int((batch["input_ids"][0] == 4).sum()) == 16 * tiles
    assert tc.find_adapter(model).grid_multiple == 2


def test_llava_images_split_per_image():
    arch = "llava"
    model = cached_model(arch)
    samples = [[testing.make_image(224, 168, seed=1), testing.make_image(100, 100, seed=2)], []]
    batch = testing.tiny_inputs(arch, samples)
    lay = tc.find_adapter(model).layouts(dict(batch))
    assert [(i.grid, i.start) for i in lay[0].items] == [((1, 4, 4), 0), ((1, 4, 4), 16)]
    assert lay[0].num_visual == int((batch["input_ids"][0] == 4).sum()) == 32
    assert tc.find_adapter(model).grid_multiple == 1


def test_matrix_covers_every_adapter_and_strategy():
    """Nothing registered silently escapes the matrix."""
    cells = {(c.values[0], c.values[1]) for c in _matrix()}
    for a_name, a_reg in tc.registry.adapters().items():
        if a_reg.package == "tokcomp":  # a third-party adapter may have no tiny model here (skipped cells)
            assert _archs(a_reg.obj), f"built-in adapter {a_name!r} has no tiny model in tokcomp.testing"
        for s_name, s_reg in tc.registry.strategies().items():
            if s_reg.obj.sites & a_reg.obj.sites:
                assert (s_name, a_name) in cells
    assert {"qwen2_vl", "llava_onevision", "internvl", "llava"} <= set(tc.registry.adapters())
