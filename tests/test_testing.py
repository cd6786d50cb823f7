"""Tests for ``tokcomp.testing``: tiny real VLMs, their processors and inputs, and ``batch_item``."""

from __future__ import annotations

import ast
import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
from packaging.version import Version
from PIL import Image
from transformers import (
    BatchFeature,
    CLIPImageProcessorPil,
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLProcessor,
)

import tokcomp.testing as tt
from tokcomp.testing import (
    ARCHITECTURES,
    batch_item,
    make_image,
    tiny_config,
    tiny_inputs,
    tiny_model,
    tiny_processor,
    tiny_tokenizer,
)

EXPECTED = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor, Qwen2VLImageProcessorPil),
    "qwen2_5_vl": (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessorPil,
    ),
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen2VLImageProcessorPil),
    "qwen3_vl_moe": (
        Qwen3VLMoeConfig,
        Qwen3VLMoeForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen2VLImageProcessorPil,
    ),
    "llava_onevision": (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionProcessor,
        LlavaOnevisionImageProcessorPil,
    ),
    "internvl": (
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        GotOcr2ImageProcessorPil,
    ),
    "llava": (LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, CLIPImageProcessorPil),
}
VIDEO_ARCHS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "internvl")
QWEN = ("qwen2_vl", "qwen2_5_vl")
IMAGE_KEYS = ("pixel_values", "image_grid_thw", "image_sizes", "batch_num_images")

parametrize_arch = pytest.mark.parametrize("arch", ARCHITECTURES)


@functools.cache
def model_for(arch: str) -> PreTrainedModel:
    # Shared across tests: nothing below mutates weights, and building each model once keeps the file fast.
    return tiny_model(arch)


@functools.cache
def picture(width: int, height: int, seed: int) -> Image.Image:
    return make_image(width, height, seed=seed)


def two_samples_three_images() -> list[list[Image.Image]]:
    return [[picture(224, 168, 0), picture(140, 196, 1)], [picture(196, 140, 2)]]


def last_logits(model: PreTrainedModel, inputs: BatchFeature) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits[:, -1]


def count_features(pooled: Any, hidden: int) -> int:
    """Number of feature vectors in a ``pooler_output`` (a tensor, or a list of per-image tensors)."""
    if isinstance(pooled, (list, tuple)):
        return sum(p.numel() for p in pooled) // hidden
    return pooled.numel() // hidden


def assert_same_batch(actual: BatchFeature, expected: BatchFeature) -> None:
    assert set(actual.keys()) == set(expected.keys())
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        assert torch.equal(actual[key], expected[key]), key


# --------------------------------------------------------------------------------------------------------
# Configs, tokenizers, processors
# --------------------------------------------------------------------------------------------------------
@parametrize_arch
def test_config_is_the_real_class_at_tiny_size(arch: str) -> None:
    config = tiny_config(arch, num_hidden_layers=3, attn_implementation="eager")
    assert type(config) is EXPECTED[arch][0]
    text = config.get_text_config()
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads) == (64, 4, 2)
    assert text.intermediate_size == 128 and text.num_hidden_layers == 3 and text.vocab_size == 256
    assert text._attn_implementation == "eager" and config.vision_config._attn_implementation == "eager"
    assert config.image_token_id == tiny_tokenizer(arch).convert_tokens_to_ids(
        tiny_processor(arch).image_token
    )


def test_config_details_per_architecture() -> None:
    for arch in QWEN:
        config = tiny_config(arch)
        rope = config.get_text_config().rope_parameters
        assert rope["rope_type"] == "default" and sum(rope["mrope_section"]) == 64 // 4 // 2
        vision = config.vision_config
        assert (vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size) == (14, 2, 2)
    qwen25 = tiny_config("qwen2_5_vl").vision_config
    assert qwen25.window_size == 56 and list(qwen25.fullatt_block_indexes) == [1, 3] and qwen25.depth == 4
    ov = tiny_config("llava_onevision")
    assert (
        ov.vision_config.model_type == "siglip_vision_model" and ov.vision_feature_select_strategy == "full"
    )
    assert all(h % 56 == 0 and w % 56 == 0 for h, w in ov.image_grid_pinpoints)
    internvl = tiny_config("internvl")
    assert internvl.downsample_ratio == 0.5
    assert internvl.image_seq_length == (112 // 14) ** 2 // 4
    llava = tiny_config("llava")
    assert llava.vision_config.model_type == "clip_vision_model"
    assert (llava.vision_feature_layer, llava.vision_feature_select_strategy) == (-2, "default")
    assert tiny_config("qwen2_vl").video_token_id == tiny_tokenizer("qwen2_vl").convert_tokens_to_ids(
        "<|video_pad|>"
    )
    assert ov.video_token_id == tiny_tokenizer("llava_onevision").convert_tokens_to_ids("<video>")
    for arch in ("qwen3_vl", "qwen3_vl_moe"):
        q3 = tiny_config(arch)
        assert (q3.vision_config.patch_size, q3.vision_config.spatial_merge_size) == (16, 2)
        assert list(q3.vision_config.deepstack_visual_indexes) == [0, 1, 2]
        assert sum(q3.get_text_config().rope_parameters["mrope_section"]) == 16 // 2


@parametrize_arch
def test_tokenizer_and_processor(arch: str) -> None:
    tokenizer = tiny_tokenizer(arch)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2, 3)
    # Words have the same id in every architecture; special tokens split without surrounding spaces.
    assert tokenizer("w0 w243 zzz").input_ids == [12, 255, 0]
    processor = tiny_processor(arch)
    placeholder = processor.image_token
    ids = tokenizer(f"w5{placeholder}{placeholder}w6").input_ids
    assert ids == [17, 4, 4, 18]
    _, _, processor_cls, image_processor_cls = EXPECTED[arch]
    assert isinstance(processor, processor_cls)
    assert type(processor.image_processor) is image_processor_cls
    if arch in VIDEO_ARCHS:
        assert processor.video_processor is None
        assert tokenizer.convert_tokens_to_ids(processor.video_token) == 5


def test_processor_subclasses_leave_the_library_classes_alone() -> None:
    # The relaxed type check lives on private subclasses: the real class still rejects a missing video
    # processor (without torchvision it fails inside the dummy mapping, with torchvision as a TypeError).
    image_processor = tiny_processor("qwen2_vl").image_processor
    with pytest.raises((TypeError, AttributeError, ValueError)):
        Qwen2VLProcessor(
            image_processor=image_processor, tokenizer=tiny_tokenizer("qwen2_vl"), video_processor=None
        )


def test_make_image_is_deterministic() -> None:
    first, again, other = make_image(64, 48, seed=3), make_image(64, 48, seed=3), make_image(64, 48, seed=4)
    assert first.size == (64, 48) and first.mode == "RGB"
    assert first.tobytes() == again.tobytes()
    assert first.tobytes() != other.tobytes()
    # Not a flat colour: the picture has structure for spatial methods to work on.
    assert len({tuple(px) for px in np.asarray(first).reshape(-1, 3).tolist()}) > 20


def test_module_does_not_import_torchvision() -> None:
    tree = ast.parse(Path(tt.__file__).read_text())
    imported = [
        alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    ] + [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not [name for name in imported if name.split(".")[0] == "torchvision"]


# --------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------
@parametrize_arch
def test_same_seed_gives_same_weights(arch: str) -> None:
    rng_before = torch.get_rng_state()
    first = tiny_model(arch, seed=7, num_hidden_layers=1)
    assert torch.equal(torch.get_rng_state(), rng_before), "tiny_model must not move the global RNG"
    again = tiny_model(arch, seed=7, num_hidden_layers=1)
    other = tiny_model(arch, seed=8, num_hidden_layers=1)
    assert type(first) is EXPECTED[arch][1] and not first.training
    a, b, c = first.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@parametrize_arch
def test_forward_and_generate_with_multi_image_batch(arch: str) -> None:
    model = model_for(arch)
    inputs = tiny_inputs(arch, two_samples_three_images())
    assert inputs["attention_mask"][:, 0].eq(0).any(), "the batch should need (left) padding"
    assert inputs["attention_mask"][:, -1].eq(1).all()
    if arch in QWEN:
        assert torch.equal(inputs["mm_token_type_ids"], (inputs["input_ids"] == 4).long())
    if arch == "llava_onevision":
        assert inputs["batch_num_images"].tolist() == [2, 1] and inputs["image_sizes"].shape == (3, 2)
    logits = last_logits(model, inputs)
    assert logits.shape == (2, 256) and torch.isfinite(logits).all()
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])


@parametrize_arch
def test_text_only_sample_mixes_with_image_sample(arch: str) -> None:
    model = model_for(arch)
    images = [picture(224, 168, 0)]
    inputs = tiny_inputs(arch, [images, []])
    assert (inputs["input_ids"][1] == 4).sum() == 0
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2
    alone = tiny_inputs(arch, [[]], prompts=["w9 w8"])
    assert not any(k in alone for k in IMAGE_KEYS)
    assert model.generate(**alone, max_new_tokens=3, do_sample=False).shape == (
        1,
        alone["input_ids"].shape[1] + 3,
    )


@parametrize_arch
def test_placeholders_match_visual_features(arch: str) -> None:
    model = model_for(arch)
    inputs = tiny_inputs(arch, two_samples_three_images())
    kwargs = {k: inputs[k] for k in IMAGE_KEYS if k in inputs}
    with torch.no_grad():
        pooled = model.model.get_image_features(**kwargs).pooler_output
    hidden = model.config.get_text_config().hidden_size
    assert count_features(pooled, hidden) == int((inputs["input_ids"] == model.config.image_token_id).sum())


@parametrize_arch
def test_default_inputs(arch: str) -> None:
    inputs = tiny_inputs(arch)
    per_sample = (inputs["input_ids"] == 4).sum(-1).tolist()
    expected = {
        "qwen2_vl": [48, 35],
        "qwen2_5_vl": [48, 35],
        "qwen3_vl": [35, 24],  # 32 px per token: 224x168 -> 224x160, 140x196 -> 128x192
        "qwen3_vl_moe": [35, 24],
        "llava_onevision": [70, 72],
        "internvl": [80, 48],
        "llava": [16, 16],
    }[arch]
    assert per_sample == expected
    assert inputs["attention_mask"].eq(0).any()
    half = tiny_inputs(arch, dtype=torch.bfloat16)
    assert half["pixel_values"].dtype == torch.bfloat16
    with pytest.raises(ValueError):
        tiny_inputs(arch, [[picture(64, 64, 0)]], prompts=["w1", "w2"])


@parametrize_arch
def test_logits_are_finite_in_bfloat16(arch: str) -> None:
    model = tiny_model(arch, dtype=torch.bfloat16, num_hidden_layers=2)
    logits = last_logits(model, tiny_inputs(arch, dtype=torch.bfloat16))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


@parametrize_arch
def test_outputs_depend_on_the_inputs(arch: str) -> None:
    # Non-degenerate weights: greedy tokens vary with the prompt, and the image moves the logits.
    model = model_for(arch)
    image = picture(224, 168, 0)
    prompts = ["w5 w6 w7", "w100 w3", "w9", "w40 w41 w42 w43"]
    inputs = tiny_inputs(arch, [[image]] * len(prompts), prompts=prompts)
    tokens = last_logits(model, inputs).argmax(-1)
    assert len(set(tokens.tolist())) > 1
    other = tiny_inputs(arch, [[picture(224, 168, 5)]] * len(prompts), prompts=prompts)
    moved = (last_logits(model, other) - last_logits(model, inputs)).abs().max()
    assert moved > 0.1


# --------------------------------------------------------------------------------------------------------
# batch_item
# --------------------------------------------------------------------------------------------------------
@parametrize_arch
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_item_equals_the_sample_processed_alone(arch: str, padding_side: str) -> None:
    samples = [[], *two_samples_three_images()]
    prompts = ["w1 w2 w3 w4 w5 w6", "w7", "w8 w9 w10"]
    inputs = tiny_inputs(arch, samples, prompts=prompts, padding_side=padding_side)
    for i in range(len(samples)):
        alone = tiny_inputs(arch, [samples[i]], prompts=[prompts[i]], padding_side=padding_side)
        assert_same_batch(batch_item(inputs, i), alone)
    assert_same_batch(batch_item(inputs, -1), batch_item(inputs, 2))
    with pytest.raises(IndexError):
        batch_item(inputs, 3)


@parametrize_arch
def test_batch_item_gives_the_batch_row_logits(arch: str) -> None:
    model = model_for(arch)
    samples = [[picture(140, 196, 1)], [], [picture(224, 168, 0), picture(196, 140, 2)]]
    inputs = tiny_inputs(arch, samples)
    batched = last_logits(model, inputs)
    for i in range(len(samples)):
        alone = last_logits(model, batch_item(inputs, i))
        torch.testing.assert_close(alone[0], batched[i], atol=1e-4, rtol=0)


def test_batch_item_rejects_unknown_keys() -> None:
    inputs = tiny_inputs("llava")
    inputs["something_else"] = torch.zeros(2)
    with pytest.raises(ValueError, match="something_else"):
        batch_item(inputs, 0)


# --------------------------------------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", QWEN)
def test_qwen_video_of_two_identical_frames_equals_the_image(arch: str) -> None:
    image = picture(224, 168, 0)
    video = tiny_inputs(arch, [[]], videos=[[image, image]])
    still = tiny_inputs(arch, [[image]])
    assert torch.equal(video["pixel_values_videos"], still["pixel_values"])
    assert torch.equal(video["video_grid_thw"], still["image_grid_thw"])
    assert torch.equal(video["mm_token_type_ids"], 2 * (video["input_ids"] == 5).long())
    # Distinct frames fill the temporal axis in order: frame 0 in slice 0, frame 1 in slice 1.
    other = picture(224, 168, 1)
    pair = tiny_inputs(arch, [[]], videos=[[image, other]])["pixel_values_videos"].view(-1, 3, 2, 14, 14)
    first = still["pixel_values"].view(-1, 3, 2, 14, 14)
    second = tiny_inputs(arch, [[other]])["pixel_values"].view(-1, 3, 2, 14, 14)
    assert torch.equal(pair[:, :, 0], first[:, :, 0]) and torch.equal(pair[:, :, 1], second[:, :, 1])
    if arch == "qwen2_5_vl":
        assert video["second_per_grid_ts"].tolist() == [1.0]


@pytest.mark.parametrize("arch", VIDEO_ARCHS)
def test_video_forward_generate_and_batch_item(arch: str) -> None:
    model = model_for(arch)
    frames = [picture(224, 168, s) for s in range(4)]
    samples = [[picture(140, 196, 1)], []]
    videos = [frames, frames[::-1]]
    inputs = tiny_inputs(arch, samples, videos=videos)
    if arch == "qwen3_vl":
        # one timestamped run per temporal patch: 2 videos x 2 temporal patches x (1, 5, 7) tokens
        runs = [r for r in tt.tiny_tokenizer(arch).decode(inputs["input_ids"][0]).split("<|vision_start|>")
                if "<|video_pad|>" in r]
        assert len(runs) == 2 and all(r.count("<|video_pad|>") == 35 for r in runs)
    if arch == "internvl":
        # InternVL's processor turns each frame into an image tile: 2 videos x 4 frames x 16 tokens.
        assert int((inputs["input_ids"] == 4).sum()) == 48 + 2 * 4 * 16
    else:
        with torch.no_grad():
            # positional: 5.17 names LLaVA-OV's first parameter pixel_values, later releases pixel_values_videos
            pooled = model.model.get_video_features(
                *(inputs[k] for k in ("pixel_values_videos", "video_grid_thw") if k in inputs)
            ).pooler_output
        hidden = model.config.get_text_config().hidden_size
        n = count_features(pooled, hidden)
        if arch == "llava_onevision" and Version(transformers.__version__) < Version("5.18"):
            n += len(videos)  # 5.17 appends each video's newline in forward(), not in get_video_features()
        assert n == int((inputs["input_ids"] == 5).sum())
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 3)
    batched = last_logits(model, inputs)
    for i in range(2):
        alone = tiny_inputs(arch, [samples[i]], videos=[videos[i]], prompts=[tt._default_prompt(i)])
        assert_same_batch(batch_item(inputs, i), alone)
        torch.testing.assert_close(last_logits(model, alone)[0], batched[i], atol=1e-4, rtol=0)


def test_llava_has_no_video() -> None:
    with pytest.raises(ValueError, match="no video"):
        tiny_inputs("llava", [[]], videos=[[picture(56, 56, 0)] * 2])
