"""Count functions (issue #14, item 3): the tokens an item puts in front of the LLM, known before the encoder.

The oracle is the runtime: the prediction (`tokcomp.counts.visual_tokens`, from the processor's output and
the schedule, nothing run) must equal what ``run.report()`` counts after a real forward on every adapter's
tiny model, and the predicted placeholder slots must equal the prompt's length change. Without a schedule the
predicted placeholders must equal the placeholder tokens the processor wrote (an oracle independent of
tokcomp). Stages whose size depends on the data are refused by name, with the reason.
"""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from conftest import cached_model
from tokcomp.strategies import OIM, Downsample, ToMe

import tokcomp as tc
from tokcomp import counts, testing
from tokcomp.contracts import CountItem, ItemShape, ShapeStep, VisualStrategy
from tokcomp.tokens import FrameGrid, VisualItemTokens, VisualTokens

ARCHS = [a for a in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "internvl", "llava")
         if a in testing.ARCHITECTURES]
_IMAGE_ID, _VIDEO_ID = 4, 5  # the tiny tokenizer's fixed placeholder ids (tokcomp.testing)

SCHEDULES = {
    "oim-encoder": lambda: [tc.Stage(OIM(rate=0.5), site="encoder", layers=[0, 1])],
    "downsample-encoder": lambda: [tc.Stage(Downsample(factor=2.0), site="encoder", layers=[1])],
    "tome-encoder": lambda: [tc.Stage(ToMe(r=3), site="encoder", layers=[0, 1])],
    "projector": lambda: [tc.Stage(OIM(rate=0.5, mode="pairs", first_axis="height"), site="projector"),
                          tc.Stage(ToMe(r=2), site="projector")],
    "encoder+projector+llm": lambda: [
        tc.Stage(Downsample(factor=1.5), site="encoder", layers=[0]),
        tc.Stage(Downsample(factor=2.0), site="projector"),
        tc.Stage("fastv", site="llm", layers=[2]),
    ],
}


def _batch(arch: str):
    if arch == "llava_onevision":
        # a multi-image sample (base tiles) and a video: the encoder-side counts are known there; the
        # AnyRes grid of a single image is tested on its own below
        img = [testing.make_image(120, 90, seed=1), testing.make_image(90, 120, seed=2)]
        return testing.tiny_inputs(arch, [img, []], videos=[None, [testing.make_image(56, 56, seed=s) for s in range(4)]])
    if arch.startswith("qwen"):
        frames = [testing.make_image(112, 84, seed=s) for s in range(2)]
        return testing.tiny_inputs(arch, [[testing.make_image(224, 168, seed=1)], []], videos=[None, frames])
    return testing.tiny_inputs(arch, [[testing.make_image(224, 168, seed=1)],
                                      [testing.make_image(140, 196, seed=2), testing.make_image(56, 56, seed=3)]])


def _placeholders(batch) -> list[int]:
    ids = batch["input_ids"]
    return [int(((ids[b] == _IMAGE_ID) | (ids[b] == _VIDEO_ID)).sum()) for b in range(ids.shape[0])]


def _run(model, schedule, batch):
    with torch.no_grad(), tc.compress(model, schedule) as run:
        model(**batch)
    return run.report()


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("arch", ARCHS)
def test_prediction_equals_runtime(arch, name):
    model = cached_model(arch)
    batch = _batch(arch)
    schedule = tc.Schedule(SCHEDULES[name]())
    try:
        schedule.resolve(tc.find_adapter(model))
    except tc.ScheduleError as exc:
        pytest.skip(f"rejected by the schedule validator by design: {exc}")
    empty = counts.visual_tokens(model, tc.Schedule([]), batch)
    assert [sum(c.placeholders for c in s) for s in empty] == _placeholders(batch)
    predicted = counts.visual_tokens(model, schedule, batch)
    visual = [sum(c.visual for c in s) for s in predicted]
    assert all(v < sum(c.visual for c in e) for v, e in zip(visual, empty)), "nothing compressed: vacuous"
    rep = _run(model, schedule, batch)
    assert visual == rep.original_visual
    valid = batch["attention_mask"].sum(1).tolist()
    for b, (p, e) in enumerate(zip(predicted, empty)):
        removed = sum(c.placeholders for c in e) - sum(c.placeholders for c in p)
        assert rep.text_tokens[b] + rep.original_visual[b] == valid[b] - removed


@pytest.mark.parametrize("stage", ["oim", "downsample", "projector"])
def test_llava_onevision_anyres(stage):
    """A picture whose aspect ratio fills its tiles is predicted with encoder stages; one that the model crops
    is predicted at the projector site and refused at the encoder site (the crop follows the merges)."""
    arch = "llava_onevision"
    model = cached_model(arch)
    stages = {
        "oim": [tc.Stage(OIM(rate=0.5), site="encoder", layers=[0, 1])],
        "downsample": [tc.Stage(Downsample(factor=2.0), site="encoder", layers=[0])],
        "projector": [tc.Stage(OIM(rate=0.5), site="projector")],
    }[stage]
    schedule = tc.Schedule(stages)
    for size in ((112, 56), (150, 90)):  # fills a 1x2 layout; padded (cropped) in its layout
        batch = testing.tiny_inputs(arch, [[testing.make_image(*size, seed=1)]])
        cropped = size == (150, 90)
        if cropped and stage != "projector":
            with pytest.raises(counts.CountError, match="crops the AnyRes padding"):
                counts.visual_tokens(model, schedule, batch)
            continue
        predicted = counts.visual_tokens(model, schedule, batch)
        empty = counts.visual_tokens(model, tc.Schedule([]), batch)
        assert [sum(c.placeholders for c in s) for s in empty] == _placeholders(batch)
        rep = _run(model, schedule, batch)
        assert [sum(c.visual for c in s) for s in predicted] == rep.original_visual
        removed = sum(c.placeholders for c in empty[0]) - sum(c.placeholders for c in predicted[0])
        assert removed > 0
        assert rep.text_tokens[0] + rep.original_visual[0] == int(batch["attention_mask"].sum()) - removed


class _AboveMean(VisualStrategy):
    """Test-only: keeps the tokens whose norm is above the frame's mean (a data-dependent count)."""

    name: ClassVar[str] = "test-above-mean"
    preserves_grid: ClassVar[bool] = False
    count_reason: ClassVar[str] = "it keeps the tokens whose norm is above the mean"

    def default_layers(self, num_layers: int) -> list[int]:
        return [0]


def test_data_dependent_stage_is_refused_by_name():
    model = cached_model("llava")
    schedule = tc.Schedule([tc.Stage(OIM(rate=0.5), site="encoder", layers=[0]),
                            tc.Stage(_AboveMean(), site="projector")])
    with pytest.raises(counts.CountError, match=r"stage 1 \(test-above-mean at site 'projector'\).*above the mean"):
        counts.check_predictable(model, schedule)
    with pytest.raises(counts.CountError, match="test-above-mean"):
        counts.visual_tokens(model, schedule, testing.tiny_inputs("llava"))
    counts.check_predictable(model, tc.Schedule([tc.Stage("fastv", site="llm", layers=[2])]))  # LLM-side: fine


def test_llm_stages_do_not_change_the_llm_input_count():
    model = cached_model("qwen2_vl")
    item = CountItem("image", (1, 8, 12))
    base = counts.item_tokens(model, tc.Schedule([]), item)
    assert base.visual == (8 // 2) * (12 // 2)
    llm = tc.Schedule([tc.Stage("fastv", site="llm", layers=[2]), tc.Stage("spu", site="llm", layers=[1, 2, 3])])
    assert counts.item_tokens(model, llm, item) == base


def _frames(h: int, w: int, t: int = 1) -> VisualItemTokens:
    g = torch.Generator().manual_seed(h * 100 + w)
    return VisualItemTokens("image", [FrameGrid.fresh(torch.randn(h, w, 8, generator=g)) for _ in range(t)], (t, h, w))


@pytest.mark.parametrize("strategy", [
    OIM(rate=0.3), OIM(r=2, mode="pairs"), OIM(rate=0.6, iterations=3), OIM(rate=0.25, first_axis="height"),
    Downsample(factor=1.7), Downsample(factor=3.0), ToMe(r=5), ToMe(r=(4, -1.0)), ToMe(r=[9, 1]),
])
@pytest.mark.parametrize("multiple", [1, 2])
def test_output_shape_equals_reduce(strategy, multiple):
    """Each strategy's shape function against its own reduce on real tensors, over many grid sizes."""
    layers = (1, 3)
    for h, w in ((4, 6), (6, 4), (10, 14), (2, 8), (16, 2)):
        if isinstance(strategy, ToMe) and multiple > 1:
            continue
        shape = ItemShape(2, h, w)
        items = [_frames(h, w, 2)]
        for layer in layers:
            vt = VisualTokens(items, "encoder", layer, 4, layers, multiple)
            shape = strategy.output_shape(shape, ShapeStep("encoder", layer, 4, layers, multiple))
            items = strategy.reduce(vt).items
            fr = items[0].frames[0]
            assert (len(items[0].frames), *fr.shape, fr.is_grid) == (shape.t, shape.h, shape.w, shape.is_grid)


def test_llava_full_feature_strategy_counts_the_cls_slot():
    """With vision_feature_select_strategy="full" each image's run holds CLS + grid: one more placeholder."""
    from transformers import LlavaForConditionalGeneration

    config = testing.tiny_config("llava")
    config.vision_feature_select_strategy = "full"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config).eval()
    processor = testing.tiny_processor("llava")
    processor.vision_feature_select_strategy = "full"
    images = [testing.make_image(64, 64), testing.make_image(80, 60, seed=2)]
    batch = processor(text=["w0 <image> w3 w4", "w1 <image> w5"], images=images, padding=True,
                      padding_side="left", return_tensors="pt")
    schedule = tc.Schedule([tc.Stage(Downsample(factor=2.0), site="encoder", layers=[1])])
    empty = counts.visual_tokens(model, tc.Schedule([]), batch)
    assert [sum(c.placeholders for c in s) for s in empty] == _placeholders(batch)
    predicted = counts.visual_tokens(model, schedule, batch)
    assert [[(c.visual, c.placeholders) for c in s] for s in predicted] == [[(4, 5)], [(4, 5)]]
    rep = _run(model, schedule, batch)
    assert [sum(c.visual for c in s) for s in predicted] == rep.original_visual


def test_an_adapter_without_count_functions_is_refused_by_name():
    from tokcomp.contracts import Adapter

    model = cached_model("llava")
    plain = type("PluginAdapter", (type(tc.find_adapter(model)),), {
        "name": "plugin-adapter", "predict_tokens": Adapter.predict_tokens, "count_items": Adapter.count_items,
    })(model)
    with pytest.raises(counts.CountError, match="'plugin-adapter' adapter cannot predict.*Adapter.predict_tokens"):
        counts.item_tokens(plain, tc.Schedule([]), CountItem("image", (1, 4, 4)))
    with pytest.raises(counts.CountError, match="'plugin-adapter' adapter does not describe.*count_items"):
        counts.visual_tokens(plain, tc.Schedule([]), testing.tiny_inputs("llava"))
