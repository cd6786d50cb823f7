"""Tiny real ``transformers`` vision-language models with real preprocessed inputs, built offline.

This module gives tests, demos and third-party plugins the real model classes
(``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
``Qwen3VLForConditionalGeneration``, ``Qwen3VLMoeForConditionalGeneration``,
``LlavaOnevisionForConditionalGeneration``, ``InternVLForConditionalGeneration`` and
``LlavaForConditionalGeneration``) at toy sizes, with random but deterministic weights, a tokenizer
built in code and the real processor classes. Nothing is downloaded, and nothing needs torchvision:
the processors use the PIL image processors (``*ImageProcessorPil``), and video inputs are built here
from those image processors instead of the torchvision-only video processors.

Examples:
    ```python
    from tokcomp.testing import tiny_model, tiny_inputs, batch_item

    model = tiny_model("qwen2_vl")
    inputs = tiny_inputs("qwen2_vl")            # 2 samples, 2 images of different sizes, left padding
    out = model.generate(**inputs, max_new_tokens=3)
    first = batch_item(inputs, 0)               # sample 0 alone, without padding
    ```

All architectures share one vocabulary layout (256 ids): ``<unk> <pad> <s> </s>`` at 0–3, the
architecture's special tokens at 4–11 (the image placeholder is always id 4 and the video placeholder
id 5), and the plain words ``w0`` … ``w243`` at 12–255, so a word has the same id in every architecture.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import (
    BatchFeature,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    LlavaOnevisionProcessor,
    LlavaProcessor,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
    Qwen3VLProcessor,
    SiglipVisionConfig,
)
from transformers.image_utils import SizeDict
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import (
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLVisionConfig,
)
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig, Qwen3VLVisionConfig
from transformers.models.qwen3_vl_moe.configuration_qwen3_vl_moe import (
    Qwen3VLMoeTextConfig,
    Qwen3VLMoeVisionConfig,
)
from transformers.video_utils import make_batched_videos

__all__ = [
    "ARCHITECTURES",
    "ORACLE_ATOL",
    "ORACLE_RTOL",
    "MergeRecorder",
    "batch_item",
    "capture_prefill",
    "check_batch_equals_samples",
    "check_drop_equals_mask",
    "check_llm_strategy",
    "forward_kwargs",
    "make_image",
    "masked_logits",
    "oracle_batch",
    "tiny_config",
    "tiny_inputs",
    "tiny_model",
    "tiny_processor",
    "tiny_tokenizer",
    "trained_model",
    "trained_model_path",
]

ARCHITECTURES: tuple[str, ...] = (
    "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "llava_onevision", "internvl", "llava"
)
"""The architectures this module can build, by their ``transformers`` ``model_type``."""

# ---------------------------------------------------------------------------------------------------------
# Vocabulary. Fixed slots keep the special ids identical across architectures, so code that only sees a
# batch (``batch_item``) can find the placeholders without being told which architecture made it.
# ---------------------------------------------------------------------------------------------------------
_VOCAB_SIZE = 256
_BASE_TOKENS = ("<unk>", "<pad>", "<s>", "</s>")
_UNK_ID, _PAD_ID, _BOS_ID, _EOS_ID = 0, 1, 2, 3
_IMAGE_ID, _VIDEO_ID, _START_ID, _END_ID = 4, 5, 6, 7
_NUM_SPECIAL_SLOTS = 8
_FIRST_WORD_ID = len(_BASE_TOKENS) + _NUM_SPECIAL_SLOTS
_NUM_WORDS = _VOCAB_SIZE - _FIRST_WORD_ID

# Per architecture: tokenizer attribute name -> (token, slot id). The attribute names are the ones the
# processors read (``tokenizer.image_token``, InternVL's ``tokenizer.context_image_token``, ...).
_SPECIAL_TOKENS: dict[str, dict[str, tuple[str, int]]] = {
    "qwen2_vl": {
        "image_token": ("<|image_pad|>", _IMAGE_ID),
        "video_token": ("<|video_pad|>", _VIDEO_ID),
        "vision_start_token": ("<|vision_start|>", _START_ID),
        "vision_end_token": ("<|vision_end|>", _END_ID),
    },
    "llava_onevision": {
        "image_token": ("<image>", _IMAGE_ID),
        "video_token": ("<video>", _VIDEO_ID),
    },
    "internvl": {
        "context_image_token": ("<IMG_CONTEXT>", _IMAGE_ID),
        "video_token": ("<video>", _VIDEO_ID),
        "start_image_token": ("<img>", _START_ID),
        "end_image_token": ("</img>", _END_ID),
    },
    "llava": {
        "image_token": ("<image>", _IMAGE_ID),
    },
}
_SPECIAL_TOKENS["qwen2_5_vl"] = _SPECIAL_TOKENS["qwen2_vl"]
_SPECIAL_TOKENS["qwen3_vl"] = _SPECIAL_TOKENS["qwen2_vl"]
_SPECIAL_TOKENS["qwen3_vl_moe"] = _SPECIAL_TOKENS["qwen2_vl"]

# What the user writes in a prompt for one image / one video (the processor expands the placeholder).
_IMAGE_PROMPT = {
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen3_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen3_vl_moe": "<|vision_start|><|image_pad|><|vision_end|>",
    "llava_onevision": "<image>",
    "internvl": "<IMG_CONTEXT>",
    "llava": "<image>",
}
_VIDEO_PROMPT = {
    "qwen2_vl": "<|vision_start|><|video_pad|><|vision_end|>",
    "qwen2_5_vl": "<|vision_start|><|video_pad|><|vision_end|>",
    # Qwen3-VL's processor replaces only the <|video_pad|> with one timestamped run per temporal patch,
    # so the outer start/end tokens stay (as with the library's own chat template).
    "qwen3_vl": "<|vision_start|><|video_pad|><|vision_end|>",
    "qwen3_vl_moe": "<|vision_start|><|video_pad|><|vision_end|>",
    "llava_onevision": "<video>",
    "internvl": "<video>",
}
# A fixed two-word "system prompt" in front of every sample, so that visual tokens sit mid-sequence as in
# real chat templates (text positions before and after them both exist).
_PROMPT_PREFIX = "w0 w1"

# ---------------------------------------------------------------------------------------------------------
# Sizes. The LLM is the same everywhere; each vision tower is the real one at toy width.
# ---------------------------------------------------------------------------------------------------------
_HIDDEN = 64
_HEADS = 4
_KV_HEADS = 2
_INTERMEDIATE = 128
_VISION_HIDDEN = 32
_VISION_HEADS = 2
_ROPE_THETA = 10000.0
# Qwen2-VL: merged tokens per image are bounded by these pixel budgets (28 px = patch 14 x merge 2).
_QWEN_MIN_PIXELS = 28 * 28 * 4
_QWEN_MAX_PIXELS = 28 * 28 * 64
# Qwen3-VL: 32 px per LLM token (patch 16 x merge 2); the same 4 to 64 merged tokens per image.
_QWEN3_PATCH = 16
_QWEN3_MIN_PIXELS = 32 * 32 * 4
_QWEN3_MAX_PIXELS = 32 * 32 * 64
# 56 px tiles with 14 px patches: a 4x4 grid per tile, as in the brief for LLaVA and LLaVA-OneVision.
_TILE = 56
_PATCH = 14
# InternVL tiles are 112 px so that pixel shuffle (0.5) still leaves a 4x4 token grid per tile like the
# other architectures; 56 px would leave 2x2, too small for spatial compression methods to mean anything.
_INTERNVL_TILE = 112
_INTERNVL_MAX_PATCHES = 4
_INTERNVL_SEQ = (_INTERNVL_TILE // _PATCH) ** 2 // 4
# LLaVA-OneVision anyres layouts: up to 2x2 tiles (plus 1x3 / 3x1 for elongated images).
_OV_PINPOINTS = [[_TILE * r, _TILE * c] for r, c in ((1, 1), (1, 2), (2, 1), (2, 2), (1, 3), (3, 1))]
# Qwen2.5-VL's video timing: seconds per temporal patch = temporal_patch_size / fps.
_VIDEO_FPS = 2.0
# Weights ~ N(0, _WEIGHT_GAIN**2 / fan_in): unit-variance activations at every depth, so logits are neither
# near-uniform (HF's 0.02 default on a 64-wide model) nor overflowing in bf16/fp16.
_WEIGHT_GAIN = 1.0

_DEFAULT_SIZES = ((224, 168), (140, 196))


def _check_arch(arch: str) -> None:
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")


# ---------------------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------------------
def _text_kwargs(num_hidden_layers: int) -> dict[str, Any]:
    return {
        "vocab_size": _VOCAB_SIZE,
        "hidden_size": _HIDDEN,
        "intermediate_size": _INTERMEDIATE,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": _HEADS,
        "num_key_value_heads": _KV_HEADS,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "bos_token_id": _BOS_ID,
        "eos_token_id": _EOS_ID,
        "pad_token_id": _PAD_ID,
        "tie_word_embeddings": False,
    }


def tiny_config(
    arch: str, *, num_hidden_layers: int = 4, attn_implementation: str = "sdpa"
) -> PreTrainedConfig:
    """Builds the real ``transformers`` config of ``arch`` at toy size.

    All architectures share the LLM shape: hidden 64, 4 attention heads and 2 key/value heads (GQA, head
    dim 16), MLP 128, vocabulary 256 (see `tiny_tokenizer` for the ids). Vision towers are 32 wide
    with 2 heads:

    - ``qwen2_vl``: ``Qwen2VLConfig``; ViT depth 2, patch 14, temporal patch 2, spatial merge 2;
      M-RoPE ``mrope_section [2, 3, 3]`` (sums to head_dim / 2 = 8).
    - ``qwen2_5_vl``: ``Qwen2_5_VLConfig``; ViT depth 4 with window attention (``window_size`` 56 px =
      2x2 merged tokens) and full attention in blocks ``[1, 3]``.
    - ``qwen3_vl`` / ``qwen3_vl_moe``: ``Qwen3VLConfig`` / ``Qwen3VLMoeConfig`` (4 experts, 2 per token);
      ViT depth 4, patch 16, a learned 8x8 position grid, DeepStack taps at blocks ``[0, 1, 2]`` (added
      after LLM layers 0-2); text ``head_dim`` 16 with interleaved ``mrope_section [4, 2, 2]``.
    - ``llava_onevision``: ``LlavaOnevisionConfig``; SigLIP depth 2, 56 px tiles of 4x4 patches, anyres
      pinpoints up to 2x2 tiles, ``vision_feature_select_strategy="full"``, feature layer -1.
    - ``internvl``: ``InternVLConfig``; InternViT depth 2, 112 px tiles (8x8 patches, 4x4 tokens after the
      0.5 pixel shuffle), ``downsample_ratio=0.5``.
    - ``llava``: ``LlavaConfig`` (LLaVA-1.5); CLIP depth 2, 56 px, patch 14, feature layer -2,
      ``vision_feature_select_strategy="default"`` (CLS dropped), Llama LLM.

    Args:
        arch: One of `ARCHITECTURES`.
        num_hidden_layers: Number of LLM decoder layers.
        attn_implementation: Attention backend for every sub-model (``"sdpa"`` or ``"eager"``).

    Returns:
        The composite config (e.g. ``Qwen2VLConfig``) with ``image_token_id`` (and ``video_token_id``
        where the architecture has one) matching `tiny_tokenizer`.

    Raises:
        ValueError: If ``arch`` is unknown.
    """
    _check_arch(arch)
    text = _text_kwargs(num_hidden_layers)
    rope = {"rope_type": "default", "rope_theta": _ROPE_THETA}
    config: PreTrainedConfig
    if arch == "qwen2_vl":
        config = Qwen2VLConfig(
            text_config=Qwen2VLTextConfig(**text, rope_parameters={**rope, "mrope_section": [2, 3, 3]}),
            vision_config=Qwen2VLVisionConfig(
                depth=2,
                embed_dim=_VISION_HIDDEN,
                hidden_size=_HIDDEN,
                mlp_ratio=2,
                num_heads=_VISION_HEADS,
                patch_size=_PATCH,
                temporal_patch_size=2,
                spatial_merge_size=2,
            ),
            image_token_id=_IMAGE_ID,
            video_token_id=_VIDEO_ID,
            vision_start_token_id=_START_ID,
            vision_end_token_id=_END_ID,
        )
    elif arch == "qwen2_5_vl":
        config = Qwen2_5_VLConfig(
            text_config=Qwen2_5_VLTextConfig(**text, rope_parameters={**rope, "mrope_section": [2, 3, 3]}),
            vision_config=Qwen2_5_VLVisionConfig(
                depth=4,
                hidden_size=_VISION_HIDDEN,
                intermediate_size=2 * _VISION_HIDDEN,
                out_hidden_size=_HIDDEN,
                num_heads=_VISION_HEADS,
                patch_size=_PATCH,
                temporal_patch_size=2,
                spatial_merge_size=2,
                window_size=56,
                fullatt_block_indexes=[1, 3],
                tokens_per_second=2,
            ),
            image_token_id=_IMAGE_ID,
            video_token_id=_VIDEO_ID,
            vision_start_token_id=_START_ID,
            vision_end_token_id=_END_ID,
        )
    elif arch in ("qwen3_vl", "qwen3_vl_moe"):
        config = _qwen3_vl_config(arch, text, rope)
    elif arch == "llava_onevision":
        config = LlavaOnevisionConfig(
            text_config=Qwen2Config(**text, rope_parameters=rope),
            vision_config=SiglipVisionConfig(
                hidden_size=_VISION_HIDDEN,
                intermediate_size=2 * _VISION_HIDDEN,
                num_hidden_layers=2,
                num_attention_heads=_VISION_HEADS,
                image_size=_TILE,
                patch_size=_PATCH,
                vision_use_head=False,
            ),
            image_token_index=_IMAGE_ID,
            video_token_index=_VIDEO_ID,
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            image_grid_pinpoints=[list(p) for p in _OV_PINPOINTS],
            vision_aspect_ratio="anyres_max_9",
        )
    elif arch == "internvl":
        config = InternVLConfig(
            text_config=Qwen2Config(**text, rope_parameters=rope),
            vision_config=InternVLVisionConfig(
                hidden_size=_VISION_HIDDEN,
                intermediate_size=2 * _VISION_HIDDEN,
                num_hidden_layers=2,
                num_attention_heads=_VISION_HEADS,
                image_size=[_INTERNVL_TILE, _INTERNVL_TILE],
                patch_size=[_PATCH, _PATCH],
            ),
            image_token_id=_IMAGE_ID,
            image_seq_length=_INTERNVL_SEQ,
            downsample_ratio=0.5,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            tie_word_embeddings=False,
        )
    else:
        config = LlavaConfig(
            text_config=LlamaConfig(**text, rope_parameters=rope),
            vision_config=CLIPVisionConfig(
                hidden_size=_VISION_HIDDEN,
                intermediate_size=2 * _VISION_HIDDEN,
                projection_dim=_VISION_HIDDEN,
                num_hidden_layers=2,
                num_attention_heads=_VISION_HEADS,
                image_size=_TILE,
                patch_size=_PATCH,
            ),
            image_token_index=_IMAGE_ID,
            image_seq_length=(_TILE // _PATCH) ** 2,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
    # Top-level ids are what generate() falls back on when the generation config lacks them.
    config.pad_token_id = _PAD_ID
    config.bos_token_id = _BOS_ID
    config.eos_token_id = _EOS_ID
    # The setter propagates to the vision and text sub-configs.
    config._attn_implementation = attn_implementation
    return config


def _qwen3_vl_config(arch: str, text: dict[str, Any], rope: dict[str, Any]) -> PreTrainedConfig:
    # head_dim 16: mrope_section sums to 8 (frequency pairs), assigned T/H/W interleaved by the model.
    rope = {**rope, "mrope_section": [4, 2, 2], "mrope_interleaved": True}
    vision = {
        "depth": 4,
        "hidden_size": _VISION_HIDDEN,
        "intermediate_size": 2 * _VISION_HIDDEN,
        "num_heads": _VISION_HEADS,
        "patch_size": _QWEN3_PATCH,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "out_hidden_size": _HIDDEN,
        "num_position_embeddings": 64,  # a learned 8x8 grid, interpolated to each image's grid
        "deepstack_visual_indexes": [0, 1, 2],  # features added after LLM layers 0, 1, 2
    }
    ids = {
        "image_token_id": _IMAGE_ID,
        "video_token_id": _VIDEO_ID,
        "vision_start_token_id": _START_ID,
        "vision_end_token_id": _END_ID,
    }
    if arch == "qwen3_vl":
        return Qwen3VLConfig(
            text_config=Qwen3VLTextConfig(**text, head_dim=16, rope_parameters=rope),
            vision_config=Qwen3VLVisionConfig(**vision),
            **ids,
        )
    moe = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "decoder_sparse_step": 1}
    return Qwen3VLMoeConfig(
        text_config=Qwen3VLMoeTextConfig(**text, **moe, head_dim=16, rope_parameters=rope),
        vision_config=Qwen3VLMoeVisionConfig(**vision),
        **ids,
    )


# ---------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------
def tiny_tokenizer(arch: str) -> PreTrainedTokenizerFast:
    """Builds a word-level tokenizer in code for ``arch``, with the architecture's special tokens.

    The vocabulary has 256 ids: ``<unk> <pad> <s> </s>`` (0–3), eight special slots (4–11) and the words
    ``w0`` … ``w243`` (12–255), split on whitespace and punctuation; anything else maps to ``<unk>``.
    Slot 4 is the image placeholder (``<|image_pad|>``, ``<image>`` or InternVL's ``<IMG_CONTEXT>``),
    slot 5 the video placeholder (``<|video_pad|>`` or ``<video>``), slots 6/7 the Qwen
    ``<|vision_start|>``/``<|vision_end|>`` or InternVL ``<img>``/``</img>`` tokens; unused slots hold
    ``<|reserved_k|>``. The ids match `tiny_config`'s ``image_token_id`` etc. Special tokens are
    registered as added tokens (so runs like ``<image><image>`` split without spaces) and as named
    attributes (``tokenizer.image_token``, ``tokenizer.image_token_id``, ...) because that is where the
    processors look for them. No BOS/EOS is added when encoding; padding defaults to the left.

    Args:
        arch: One of `ARCHITECTURES`.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``pad_token="<pad>"``, ``eos_token="</s>"``, ``bos_token="<s>"``.

    Raises:
        ValueError: If ``arch`` is unknown.
    """
    _check_arch(arch)
    named = _SPECIAL_TOKENS[arch]
    slots = {slot: token for token, slot in named.values()}
    specials = [slots.get(i, f"<|reserved_{i}|>") for i in range(len(_BASE_TOKENS), _FIRST_WORD_ID)]
    vocab_list = [*_BASE_TOKENS, *specials, *(f"w{k}" for k in range(_NUM_WORDS))]
    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(vocab_list)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # Tokens already in the vocabulary keep their ids when registered as added tokens.
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in (*_BASE_TOKENS, *specials)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
        **{name: token for name, (token, _) in named.items()},
    )


# ---------------------------------------------------------------------------------------------------------
# Processors
# ---------------------------------------------------------------------------------------------------------
def _qwen_video_patches(image_processor: Qwen2VLImageProcessorPil, clips: list[np.ndarray]) -> dict[str, Any]:
    """Qwen2-VL video patches built from the image processor's output on single frames.

    ``Qwen2VLImageProcessorPil.patchify`` lays a still image out as rows ``(grid_h, grid_w)`` in
    merge-window-major order (``gh/m, gw/m, m, m``), each row ``(C, temporal_patch, patch, patch)`` with
    the frame repeated along the temporal axis. ``Qwen2VLVideoProcessor.patchify`` uses the same row
    order per temporal slice and the same feature order, but fills the temporal axis with consecutive
    frames: ``(grid_t, gh/m, gw/m, m, m, C, T, p, p)``. So frame k of each pair contributes its
    temporal slice 0. Odd frame counts are padded by repeating the last frame, as the video processor does.
    """
    temporal = image_processor.temporal_patch_size
    patch = image_processor.patch_size
    all_rows, grids = [], []
    for clip in clips:
        frames = list(clip)
        frames += [frames[-1]] * (-len(frames) % temporal)
        out = image_processor(frames, return_tensors="np")
        frame_grids = np.asarray(out["image_grid_thw"])
        if not (frame_grids == frame_grids[0]).all():
            raise ValueError("all frames of a video must have the same size")
        _, grid_h, grid_w = (int(v) for v in frame_grids[0])
        rows = np.asarray(out["pixel_values"]).reshape(
            len(frames), grid_h * grid_w, -1, temporal, patch, patch
        )
        grid_t = len(frames) // temporal
        # (grid_t * T frames, N, C, p, p) -> (grid_t, N, C, T, p, p): one temporal slice per frame.
        rows = rows[:, :, :, 0].reshape(grid_t, temporal, grid_h * grid_w, -1, patch, patch)
        rows = rows.transpose(0, 2, 3, 1, 4, 5).reshape(grid_t * grid_h * grid_w, -1)
        all_rows.append(rows)
        grids.append([grid_t, grid_h, grid_w])
    return {
        "pixel_values_videos": np.concatenate(all_rows, axis=0),
        "video_grid_thw": np.asarray(grids, dtype=np.int64),
    }


def _frame_tiles(image_processor: Any, clips: list[np.ndarray], size: SizeDict) -> np.ndarray:
    """Per-frame resize/rescale/normalize to one tile, as the LLaVA-OV and InternVL video processors do.

    Both video processors only resize each frame to the tile size (no anyres split, no crops, no padding
    to square) and normalise with the image statistics, so the image processor's own primitives give the
    same pipeline without torchvision. The result is ``(num_videos, num_frames, 3, S, S)``.
    """
    videos = []
    for clip in clips:
        tiles = []
        for frame in clip:
            chw = np.moveaxis(np.asarray(frame), -1, 0)
            tile = image_processor.resize(chw, size=size, resample=image_processor.resample)
            tile = image_processor.rescale(tile, image_processor.rescale_factor)
            tiles.append(
                image_processor.normalize(tile, image_processor.image_mean, image_processor.image_std)
            )
        videos.append(np.stack(tiles).astype(np.float32))
    if len({v.shape for v in videos}) > 1:
        raise ValueError("videos in one batch must have the same number of frames for this architecture")
    return np.stack(videos)


class _TorchvisionFreeProcessor(ProcessorMixin):
    """Mixin for the real processors: accepts ``video_processor=None`` and processes videos without one.

    ``ProcessorMixin.__init__`` type-checks every sub-processor, and without torchvision the video
    processor mapping is a dummy, so even ``None`` fails (with torchvision ``None`` is rejected too). Only
    these subclasses relax the check, for ``video_processor`` only; the library classes stay untouched.
    When no video processor is set, videos are built from the image processor (see ``_process_videos``).
    """

    # "qwen": flat temporal patches (Qwen2-VL / Qwen2.5-VL); "frames": one tile per frame (OV, InternVL).
    _video_layout: str = "frames"
    _video_seconds_per_grid: bool = False

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        """Accepts ``None`` for ``video_processor``; defers to ``ProcessorMixin`` for everything else.

        Args:
            argument_name: The sub-processor attribute being checked.
            argument: The object passed for it.

        Returns:
            ``None`` for a missing video processor, else the class ``ProcessorMixin`` expects.
        """
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)

    def _process_videos(self, videos: Any, **kwargs: Any) -> tuple[dict[str, Any], list[str]]:
        # A real video processor (e.g. set by a user with working torchvision) keeps the library path.
        if getattr(self, "video_processor", None) is not None:
            return super()._process_videos(videos, **kwargs)
        clips = make_batched_videos(videos)
        image_processor: Any = self.image_processor
        video_token: str = self.video_token
        if self._video_layout == "qwen3":
            return self._qwen3_videos(image_processor, clips)
        if self._video_layout == "qwen":
            data = _qwen_video_patches(image_processor, clips)
            merge_area = image_processor.merge_size**2
            replacements = [video_token * (int(np.prod(g)) // merge_area) for g in data["video_grid_thw"]]
            if self._video_seconds_per_grid:
                data["second_per_grid_ts"] = [image_processor.temporal_patch_size / _VIDEO_FPS] * len(clips)
            return data, replacements
        size = image_processor.size
        data = {
            "pixel_values_videos": _frame_tiles(
                image_processor, clips, SizeDict(height=size.height, width=size.width)
            )
        }
        return data, [self.replace_video_token(data, video_idx=k) for k in range(len(clips))]


    def _qwen3_videos(self, image_processor: Any, clips: list[np.ndarray]) -> tuple[dict[str, Any], list[str]]:
        """Qwen3-VL: the same temporal patches, and per temporal patch one ``<t seconds>`` text and one run of
        ``<|vision_start|> <|video_pad|> x (h*w/4) <|vision_end|>``, as ``Qwen3VLProcessor.replace_video_token``
        writes it; timestamps from the processor's own ``_calculate_timestamps`` at ``_VIDEO_FPS``."""
        data = _qwen_video_patches(image_processor, clips)
        merge_area = image_processor.merge_size**2
        tokens: Any = self
        replacements = []
        for clip, (grid_t, grid_h, grid_w) in zip(clips, data["video_grid_thw"].tolist()):
            stamps = tokens._calculate_timestamps(
                list(range(len(clip))), _VIDEO_FPS, image_processor.temporal_patch_size
            )
            run = tokens.vision_start_token + self.video_token * (grid_h * grid_w // merge_area)
            replacements.append("".join(f"<{stamps[f]:.1f} seconds>" + run + tokens.vision_end_token
                                        for f in range(grid_t)))
        return data, replacements


class _TinyQwen2VLProcessor(_TorchvisionFreeProcessor, Qwen2VLProcessor):
    _video_layout = "qwen"


class _TinyQwen2_5_VLProcessor(_TorchvisionFreeProcessor, Qwen2_5_VLProcessor):
    _video_layout = "qwen"
    _video_seconds_per_grid = True


class _TinyQwen3VLProcessor(_TorchvisionFreeProcessor, Qwen3VLProcessor):
    _video_layout = "qwen3"


class _TinyLlavaOnevisionProcessor(_TorchvisionFreeProcessor, LlavaOnevisionProcessor):
    pass


class _TinyInternVLProcessor(_TorchvisionFreeProcessor, InternVLProcessor):
    pass


def tiny_processor(arch: str) -> ProcessorMixin:
    """Builds the real processor of ``arch`` with the PIL image processor and `tiny_tokenizer`.

    Image sizes match the tiny vision towers of `tiny_config`:

    - ``qwen2_vl`` / ``qwen2_5_vl``: ``Qwen2VLImageProcessorPil`` with ``min_pixels = 28*28*4`` and
      ``max_pixels = 28*28*64``, i.e. 4 to 64 merged tokens per image (224x168 -> 12x16 patches -> 48).
    - ``qwen3_vl`` / ``qwen3_vl_moe``: the same image processor with 16 px patches and 32 px per token
      (224x168 -> 224x160 -> 35 tokens). Videos are written as ``Qwen3VLProcessor`` writes them: one
      ``<t seconds>`` text and one ``<|vision_start|>...<|vision_end|>`` run per temporal patch.
    - ``llava_onevision``: ``LlavaOnevisionImageProcessorPil`` with 56 px tiles and the config's
      pinpoints; ``num_image_tokens=16``.
    - ``internvl``: ``GotOcr2ImageProcessorPil`` with 112 px crops, ``crop_to_patches`` and at most 4 crops
      (+ a thumbnail); ``image_seq_length=16``.
    - ``llava``: ``CLIPImageProcessorPil`` resizing the short side to 56 and centre-cropping 56x56.

    The four processors that own a video processor are returned as small private subclasses of the real
    classes (``isinstance(p, Qwen2VLProcessor)`` holds) whose only changes are: ``video_processor=None``
    is accepted, and videos are processed without torchvision (Qwen: temporal patches built from the
    frames' image patches; LLaVA-OV / InternVL: each frame resized to one tile). Frame sampling is not
    done: every frame given is used.

    Args:
        arch: One of `ARCHITECTURES`.

    Returns:
        A ``Qwen2VLProcessor``, ``Qwen2_5_VLProcessor``, ``Qwen3VLProcessor``, ``LlavaOnevisionProcessor``,
        ``InternVLProcessor`` or ``LlavaProcessor``. It cannot be saved with ``save_pretrained`` (no video processor).

    Raises:
        ValueError: If ``arch`` is unknown.
    """
    _check_arch(arch)
    tokenizer = tiny_tokenizer(arch)
    if arch in ("qwen2_vl", "qwen2_5_vl"):
        qwen_ip = Qwen2VLImageProcessorPil(
            min_pixels=_QWEN_MIN_PIXELS,
            max_pixels=_QWEN_MAX_PIXELS,
            patch_size=_PATCH,
            temporal_patch_size=2,
            merge_size=2,
        )
        cls = _TinyQwen2VLProcessor if arch == "qwen2_vl" else _TinyQwen2_5_VLProcessor
        return cls(image_processor=qwen_ip, tokenizer=tokenizer, video_processor=None)
    if arch in ("qwen3_vl", "qwen3_vl_moe"):
        qwen3_ip = Qwen2VLImageProcessorPil(  # Qwen3-VL's auto mapping uses the Qwen2-VL image processor
            min_pixels=_QWEN3_MIN_PIXELS,
            max_pixels=_QWEN3_MAX_PIXELS,
            patch_size=_QWEN3_PATCH,
            temporal_patch_size=2,
            merge_size=2,
        )
        return _TinyQwen3VLProcessor(image_processor=qwen3_ip, tokenizer=tokenizer, video_processor=None)
    if arch == "llava_onevision":
        ov_ip = LlavaOnevisionImageProcessorPil(
            size={"height": _TILE, "width": _TILE}, image_grid_pinpoints=[list(p) for p in _OV_PINPOINTS]
        )
        return _TinyLlavaOnevisionProcessor(
            image_processor=ov_ip,
            tokenizer=tokenizer,
            video_processor=None,
            num_image_tokens=(_TILE // _PATCH) ** 2,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
        )
    if arch == "internvl":
        internvl_ip = GotOcr2ImageProcessorPil(
            size={"height": _INTERNVL_TILE, "width": _INTERNVL_TILE},
            crop_to_patches=True,
            min_patches=1,
            max_patches=_INTERNVL_MAX_PATCHES,
        )
        return _TinyInternVLProcessor(
            image_processor=internvl_ip,
            tokenizer=tokenizer,
            video_processor=None,
            image_seq_length=_INTERNVL_SEQ,
        )
    clip_ip = CLIPImageProcessorPil(
        size={"shortest_edge": _TILE}, crop_size={"height": _TILE, "width": _TILE}
    )
    return LlavaProcessor(
        image_processor=clip_ip,
        tokenizer=tokenizer,
        patch_size=_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


# ---------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------
def make_image(width: int, height: int, *, seed: int = 0) -> Image.Image:
    """Draws a deterministic RGB test picture: a two-colour gradient with a few coloured shapes.

    Args:
        width: Width in pixels.
        height: Height in pixels.
        seed: Picks the colours, gradient direction and shapes; different seeds give visibly different
            pictures, the same seed always the same pixels.

    Returns:
        A ``PIL.Image.Image`` in mode ``"RGB"``.
    """
    rng = random.Random(seed)
    start = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float64)
    end = np.array([rng.randrange(256) for _ in range(3)], dtype=np.float64)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    ramp = math.cos(angle) * xs / max(width - 1, 1) + math.sin(angle) * ys / max(height - 1, 1)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-9)
    pixels = start + (end - start) * ramp[..., None]
    image = Image.fromarray(np.round(pixels).astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(3, 6)):
        colour = tuple(rng.randrange(256) for _ in range(3))
        x0, x1 = sorted(rng.randrange(width) for _ in range(2))
        y0, y1 = sorted(rng.randrange(height) for _ in range(2))
        box = (x0, y0, max(x1, x0 + width // 8), max(y1, y0 + height // 8))
        kind = rng.randrange(3)
        if kind == 0:
            draw.rectangle(box, fill=colour)
        elif kind == 1:
            draw.ellipse(box, fill=colour)
        else:
            draw.polygon([(rng.randrange(width), rng.randrange(height)) for _ in range(3)], fill=colour)
    return image


# ---------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------
def _default_prompt(index: int) -> str:
    # Lengths cycle through distinct values so that a default batch always needs padding.
    length = (7, 3, 5, 9, 4, 6)[index % 6]
    return " ".join(f"w{(37 * index + 11 * k + 5) % _NUM_WORDS}" for k in range(length))


def tiny_inputs(
    arch: str,
    samples: list[list[Image.Image]] | None = None,
    *,
    prompts: list[str] | None = None,
    videos: Sequence[Sequence[Image.Image] | None] | None = None,
    padding_side: str = "left",
    dtype: torch.dtype = torch.float32,
) -> BatchFeature:
    """Processes a batch of samples with `tiny_processor`, ready for ``model(**inputs)``/``generate``.

    Sample ``i`` is the text ``"w0 w1 <placeholders> <prompt i>"``: a fixed two-word prefix, one
    placeholder per image of ``samples[i]`` in order (Qwen ``<|vision_start|><|image_pad|><|vision_end|>``,
    LLaVA/OV ``<image>``, InternVL ``<IMG_CONTEXT>``), then the video placeholder if ``videos[i]`` is
    given (Qwen ``<|vision_start|><|video_pad|><|vision_end|>``, OV/InternVL ``<video>``), then the
    prompt. The processor expands every placeholder to the exact number of visual tokens.

    The result holds everything the model needs: ``input_ids``, ``attention_mask``, pixel tensors and,
    per architecture, ``image_grid_thw`` and ``mm_token_type_ids`` (Qwen; 1 = image, 2 = video token),
    ``image_sizes`` and ``batch_num_images`` (LLaVA-OV), ``pixel_values_videos`` with
    ``video_grid_thw`` (Qwen, plus ``second_per_grid_ts`` for Qwen2.5-VL) or ``(videos, frames, 3, 56,
    56)`` (OV). InternVL puts video frames into ``pixel_values`` like image tiles, as its processor does.

    Default batch (``samples=None`` and ``videos=None``): two samples, one 224x168 and one 140x196 picture
    (`make_image` seeds 0 and 1), with default prompts of 7 and 3 words.

    Args:
        arch: One of `ARCHITECTURES`.
        samples: Per sample, its images (an empty list makes a text-only sample). LLaVA-OV processes a
            sample with one image in anyres mode (base + tiles) and a sample with several images as one
            base tile each, as its processor does.
        prompts: Per sample, its text after the placeholders (words ``w0`` … ``w243``); defaults to prompts
            of different lengths.
        videos: Per sample, ``None`` / ``[]`` or one video as a list of PIL frames of equal size. Qwen pairs
            consecutive frames into temporal patches (an odd count repeats the last frame); LLaVA-OV and
            InternVL need the same frame count for every video of the batch. Not supported for ``llava``.
        padding_side: ``"left"`` (for generation) or ``"right"``.
        dtype: Floating dtype of the pixel tensors (match the model's dtype).

    Returns:
        A ``transformers.BatchFeature`` of torch tensors.

    Raises:
        ValueError: If ``arch`` is unknown, lengths of ``samples``/``prompts``/``videos`` differ, or
            videos are given for ``llava``.
    """
    _check_arch(arch)
    if samples is None:
        if videos is None:
            samples = [[make_image(w, h, seed=k)] for k, (w, h) in enumerate(_DEFAULT_SIZES)]
        else:
            samples = [[] for _ in videos]
    clips = [list(v) if v else [] for v in (videos if videos is not None else [None] * len(samples))]
    if prompts is None:
        prompts = [_default_prompt(k) for k in range(len(samples))]
    if not len(samples) == len(prompts) == len(clips):
        raise ValueError(
            f"got {len(samples)} samples, {len(prompts)} prompts and {len(clips)} videos; "
            "need one of each per sample"
        )
    if any(clips) and arch not in _VIDEO_PROMPT:
        raise ValueError(f"{arch} has no video input")
    texts = []
    for images, frames, prompt in zip(samples, clips, prompts):
        parts = [_PROMPT_PREFIX, *([_IMAGE_PROMPT[arch]] * len(images))]
        if frames:
            parts.append(_VIDEO_PROMPT[arch])
        parts.append(prompt)
        texts.append(" ".join(p for p in parts if p))
    kwargs: dict[str, Any] = {
        "text": texts,
        "padding": True,
        "padding_side": padding_side,
        "return_tensors": "pt",
    }
    if any(samples):
        # LLaVA-OV tells single-image (anyres) from multi-image samples by the nesting; the others want a
        # flat list in prompt order.
        kwargs["images"] = (
            [list(s) for s in samples]
            if arch == "llava_onevision"
            else [image for s in samples for image in s]
        )
    if any(clips):
        kwargs["videos"] = [frames for frames in clips if frames]
    inputs = tiny_processor(arch)(**kwargs)
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(dtype)
    return inputs


# ---------------------------------------------------------------------------------------------------------
# One sample of a batch
# ---------------------------------------------------------------------------------------------------------
def _consecutive_groups(item_tokens: list[int], sample_tokens: list[int]) -> list[range]:
    """Assigns consecutive items (images, tiles, videos) to samples so that token counts add up."""
    groups, start = [], 0
    for needed in sample_tokens:
        end, total = start, 0
        while total < needed and end < len(item_tokens):
            total += item_tokens[end]
            end += 1
        if total != needed:
            raise ValueError("the visual inputs do not match the placeholder tokens in input_ids")
        groups.append(range(start, end))
        start = end
    if start != len(item_tokens):
        raise ValueError("the batch has more visual inputs than placeholder tokens in input_ids")
    return groups


def _uniform_groups(num_items: int, sample_tokens: list[int]) -> list[range]:
    """Like ``_consecutive_groups`` when every item has the same number of tokens (tiles, frames)."""
    total = sum(sample_tokens)
    if num_items == 0 or total % num_items:
        raise ValueError("the visual inputs do not match the placeholder tokens in input_ids")
    return _consecutive_groups([total // num_items] * num_items, sample_tokens)


def _rows(tensor: torch.Tensor, group: range) -> torch.Tensor:
    return tensor[group.start : group.stop]


_TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")
_KNOWN_KEYS = {
    *_TEXT_KEYS,
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "second_per_grid_ts",
    "image_sizes",
    "batch_num_images",
}


def batch_item(inputs: BatchFeature, i: int) -> BatchFeature:
    """Returns sample ``i`` of a `tiny_inputs` batch as a batch of one, with its padding removed.

    The result equals (tensor for tensor) what `tiny_inputs` returns for that sample alone, so
    ``model(**batch_item(inputs, i))`` is the reference for "a batch equals its samples run one by one".
    It is computed by slicing, not by re-processing: text tensors keep only the row's unpadded positions,
    and the visual tensors are cut per architecture, which is recognised from the keys —

    - Qwen (``image_grid_thw`` / ``video_grid_thw``): images (videos) are assigned to samples in order by
      their token counts ``t*h*w/4``; their patch rows of ``pixel_values`` (``pixel_values_videos``),
      grids and ``second_per_grid_ts`` are cut out.
    - LLaVA-OV (``image_sizes`` / ``batch_num_images`` / ``pixel_values_videos``): the sample's images by
      ``batch_num_images`` (which skips text-only samples), tile padding beyond the sample's largest
      image trimmed; its video by the uniform token count per video.
    - InternVL and LLaVA (``pixel_values`` only): every row (tile, crop, frame or image) has the same
      number of placeholder tokens, so rows are assigned by token count.

    Placeholders are found by the tiny vocabulary's fixed ids (image 4, video 5), so batches from other
    tokenizers are not supported.

    Args:
        inputs: A batch returned by `tiny_inputs` (any dtype; tensors may be on any device).
        i: Sample index; negative values count from the end.

    Returns:
        A ``BatchFeature`` holding only sample ``i``.

    Raises:
        IndexError: If ``i`` is out of range.
        ValueError: If ``inputs`` has keys this function does not know, or its visual tensors do not match
            its placeholder tokens.
    """
    unknown = set(inputs.keys()) - _KNOWN_KEYS
    if unknown:
        raise ValueError(f"batch_item does not know how to slice {sorted(unknown)}")
    input_ids: torch.Tensor = inputs["input_ids"]
    batch = input_ids.shape[0]
    if not -batch <= i < batch:
        raise IndexError(f"sample {i} out of range for a batch of {batch}")
    i %= batch
    mask = (
        inputs["attention_mask"].bool() if "attention_mask" in inputs else torch.ones_like(input_ids).bool()
    )
    keep = mask[i]
    out: dict[str, Any] = {k: inputs[k][i : i + 1][:, keep] for k in _TEXT_KEYS if k in inputs}
    image_tokens = ((input_ids == _IMAGE_ID) & mask).sum(-1).tolist()
    video_tokens = ((input_ids == _VIDEO_ID) & mask).sum(-1).tolist()

    if "image_grid_thw" in inputs or "video_grid_thw" in inputs:
        for grid_key, pixel_key, tokens in (
            ("image_grid_thw", "pixel_values", image_tokens),
            ("video_grid_thw", "pixel_values_videos", video_tokens),
        ):
            if grid_key not in inputs or tokens[i] == 0:
                continue
            grids: torch.Tensor = inputs[grid_key]
            patches = grids.prod(-1).tolist()
            merge_area = sum(patches) // max(sum(tokens), 1)
            group = _consecutive_groups([p // merge_area for p in patches], tokens)[i]
            offsets = [0, *np.cumsum(patches).tolist()]
            out[pixel_key] = inputs[pixel_key][offsets[group.start] : offsets[group.stop]]
            out[grid_key] = _rows(grids, group)
            if grid_key == "video_grid_thw" and "second_per_grid_ts" in inputs:
                out["second_per_grid_ts"] = _rows(inputs["second_per_grid_ts"], group)
    elif any(k in inputs for k in ("image_sizes", "batch_num_images", "pixel_values_videos")):
        if "pixel_values" in inputs and image_tokens[i]:
            per_sample = [0] * batch
            with_images = [j for j in range(batch) if image_tokens[j]]
            for j, n in zip(with_images, inputs["batch_num_images"].tolist()):
                per_sample[j] = n
            start = sum(per_sample[:i])
            group = range(start, start + per_sample[i])
            pixels = _rows(inputs["pixel_values"], group)
            # Tiles added only to stack images of different tile counts are exact zeros.
            used = pixels.flatten(2).ne(0).any(-1)
            tiles = max(int(row.nonzero().max()) + 1 for row in used)
            out["pixel_values"] = pixels[:, :tiles]
            out["image_sizes"] = _rows(inputs["image_sizes"], group)
            out["batch_num_images"] = inputs["batch_num_images"].new_tensor([per_sample[i]])
        if "pixel_values_videos" in inputs and video_tokens[i]:
            videos = inputs["pixel_values_videos"]
            group = _uniform_groups(videos.shape[0], video_tokens)[i]
            out["pixel_values_videos"] = _rows(videos, group)
    elif "pixel_values" in inputs and image_tokens[i]:
        pixels = inputs["pixel_values"]
        out["pixel_values"] = _rows(pixels, _uniform_groups(pixels.shape[0], image_tokens)[i])
    return BatchFeature(out)


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------
_MODEL_CLASSES: dict[str, type[PreTrainedModel]] = {
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
    "qwen3_vl": Qwen3VLForConditionalGeneration,
    "qwen3_vl_moe": Qwen3VLMoeForConditionalGeneration,
    "llava_onevision": LlavaOnevisionForConditionalGeneration,
    "internvl": InternVLForConditionalGeneration,
    "llava": LlavaForConditionalGeneration,
}


@torch.no_grad()
def _reinitialise(model: torch.nn.Module) -> None:
    # Same rule for every architecture (their own inits differ: 0.02 normal, xavier, CLIP factors), so
    # "how much do visual tokens matter" is comparable across them.
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)):
            fan_in = module.weight[0].numel()
            module.weight.normal_(0.0, _WEIGHT_GAIN / math.sqrt(fan_in))
        elif isinstance(module, torch.nn.Embedding):
            module.weight.normal_(0.0, 1.0)
            # Keep nn.Embedding's contract (and HF's init): the padding row stays zero.
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()


def tiny_model(
    arch: str,
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    num_hidden_layers: int = 4,
    seed: int = 0,
) -> PreTrainedModel:
    """Builds the real ``XForConditionalGeneration`` of ``arch`` from `tiny_config`, in eval mode.

    Weights are random and deterministic: every linear, convolution and embedding weight is drawn from
    ``N(0, 1/fan_in)`` (embeddings ``N(0, 1)``) after ``torch.manual_seed(seed)``; norms, biases and the
    few special parameters keep the model's own init. This scale keeps activations near unit variance, so
    logits depend visibly on the inputs (the library's 0.02 default gives near-uniform logits at width 64)
    and stay finite in bf16/fp16. The caller's global RNG state is left unchanged.

    Args:
        arch: One of `ARCHITECTURES`.
        attn_implementation: ``"sdpa"`` or ``"eager"`` (needed for ``output_attentions``).
        dtype: Parameter dtype.
        num_hidden_layers: Number of LLM decoder layers.
        seed: Weight seed; the same seed gives identical weights.

    Returns:
        The model (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
        ``Qwen3VLForConditionalGeneration``, ``Qwen3VLMoeForConditionalGeneration``,
        ``LlavaOnevisionForConditionalGeneration``, ``InternVLForConditionalGeneration`` or
        ``LlavaForConditionalGeneration``) in eval mode, with its generation config's pad/bos/eos ids set
        to the tiny tokenizer's.

    Raises:
        ValueError: If ``arch`` is unknown.
    """
    config = tiny_config(arch, num_hidden_layers=num_hidden_layers, attn_implementation=attn_implementation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _MODEL_CLASSES[arch](config)
        _reinitialise(model)
    model.generation_config.pad_token_id = _PAD_ID
    model.generation_config.bos_token_id = _BOS_ID
    model.generation_config.eos_token_id = _EOS_ID
    return model.to(dtype).eval()


# ---------------------------------------------------------------------------------------------------------
# The trained model (tokcomp.train on tokcomp.vqa), shipped as package data
# ---------------------------------------------------------------------------------------------------------
def trained_model_path() -> Path:
    """The folder of the shipped checkpoint: a small ``Qwen2VLForConditionalGeneration`` trained on the
    synthetic VQA task (`tokcomp.vqa`) by ``python -m tokcomp.train``.

    It holds the model (``model.safetensors``, ``config.json``), the tokenizer, the image processor
    and ``training.json`` (the recipe, the loss curve and the held-out accuracy at the end).
    ``Qwen2VLForConditionalGeneration.from_pretrained(trained_model_path())`` loads the model; the
    processor is rebuilt from its saved parts by `trained_model` (a processor without a video
    processor cannot be saved whole without torchvision).

    Returns:
        The folder's path inside the installed package.
    """
    return Path(__file__).resolve().parent / "data" / "vqa-qwen2vl"


def trained_model() -> tuple[PreTrainedModel, ProcessorMixin]:
    """Loads the shipped trained model and its processor (see `trained_model_path`).

    Returns:
        ``(model, processor)``: the model in eval mode (fp32, ``sdpa``) and a ``Qwen2VLProcessor``
        whose prompts are ``tokcomp.train.PROMPT`` with a task question.

    Examples:
        >>> from tokcomp.testing import trained_model
        >>> from tokcomp.train import predict
        >>> from tokcomp.vqa import make_examples
        >>> model, processor = trained_model()
        >>> ex = make_examples(1, seed=0, split="test")
        >>> predict(model, processor, ex)[0] in ("white", "gray", "black")
        True
    """
    from .train import load_checkpoint

    return load_checkpoint(trained_model_path())


# ---------------------------------------------------------------------------------------------------------
# Saved folders, for code that loads with from_pretrained
# ---------------------------------------------------------------------------------------------------------
__all__ += ["save_tiny_pretrained", "tiny_chat_template"]


def tiny_chat_template(arch: str) -> str:
    """A chat template for the tiny tokenizer of ``arch``, in the message format of the real ones.

    It renders ``[{"role": ..., "content": [{"type": "image"}, {"type": "text", "text": ...}]}]`` (or a
    plain string as content) as ``"w0 w1"`` followed by the turns' parts in order: each image as the
    architecture's placeholder (what `tiny_inputs` writes), each video as the video placeholder and
    each text as is; ``add_generation_prompt`` appends ``"w2"``. The real templates' role markers
    (``<|im_start|>``, ``USER:``) are not in the tiny vocabulary, so they are left out.

    Args:
        arch: One of `ARCHITECTURES`.

    Returns:
        A Jinja template string for ``processor.chat_template``.

    Raises:
        ValueError: If ``arch`` is unknown.
    """
    _check_arch(arch)
    image = _IMAGE_PROMPT[arch]
    video = _VIDEO_PROMPT.get(arch, "")
    # Spaces are emitted as expressions: the whitespace-control dashes would strip literal ones.
    return (
        _PROMPT_PREFIX
        + "{%- for message in messages -%}"
        "{%- if message['content'] is string -%}{{ ' ' ~ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        f"{{%- if part['type'] == 'image' -%}}{{{{ ' {image}' }}}}"
        f"{{%- elif part['type'] == 'video' -%}}{{{{ ' {video}' }}}}"
        "{%- elif part['type'] == 'text' -%}{{ ' ' ~ part['text'] }}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ ' w2' }}{%- endif -%}"
    )


def save_tiny_pretrained(
    arch: str,
    folder: str | Any,
    *,
    num_hidden_layers: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """Saves `tiny_model` and its processor into ``folder`` with ``save_pretrained``.

    The folder then loads as a real checkpoint does: ``AutoConfig``/``AutoModelForImageTextToText`` (or the
    model class) ``.from_pretrained(folder)``, ``AutoTokenizer`` and ``AutoImageProcessor``, and, for
    ``llava``, ``AutoProcessor``. It holds ``config.json``, ``generation_config.json``,
    ``model.safetensors``, the tokenizer files, ``processor_config.json`` (the processor's settings with
    the image processor nested, as ``ProcessorMixin.save_pretrained`` writes it) and
    ``chat_template.jinja`` (`tiny_chat_template`). The image processor is recorded under the name
    real checkpoints carry (``Qwen2VLImageProcessor``, not ``...Pil``), so ``AutoImageProcessor`` picks
    the backend the installed libraries allow, as it does for a downloaded checkpoint.

    The processors of ``qwen2_vl``, ``qwen2_5_vl``, ``llava_onevision`` and ``internvl`` own a video
    processor, which needs torchvision; none is saved. ``AutoProcessor`` then fails on such a folder in the
    video processor, as it does on a real checkpoint without torchvision: load it with
    `tokcomp.integrations.processors.load_processor` (which warns when torchvision is installed).

    Args:
        arch: One of `ARCHITECTURES`.
        folder: Directory to write (created if missing).
        num_hidden_layers: LLM depth (`tiny_model`).
        seed: Weight seed (`tiny_model`).
        dtype: Dtype the weights are saved in.

    Returns:
        ``folder`` as a ``pathlib.Path``.

    Raises:
        ValueError: If ``arch`` is unknown.

    Examples:
        ```python
        import tempfile
        from transformers import AutoModelForImageTextToText
        from tokcomp.testing import save_tiny_pretrained

        path = save_tiny_pretrained("llava", tempfile.mkdtemp())
        model = AutoModelForImageTextToText.from_pretrained(path)
        ```
    """
    import json
    from pathlib import Path

    _check_arch(arch)
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    model = tiny_model(arch, num_hidden_layers=num_hidden_layers, seed=seed, dtype=dtype)
    model.save_pretrained(path)
    processor = tiny_processor(arch)
    template = tiny_chat_template(arch)
    # The library's processor class, not the private torchvision-free subclass tiny_processor returns.
    library_cls = next(c for c in type(processor).__mro__ if c.__module__.startswith("transformers."))
    processor.tokenizer._set_processor_class(library_cls.__name__)
    processor.tokenizer.save_pretrained(path)
    settings = processor.to_dict()
    settings.pop("video_processor", None)
    settings["processor_class"] = library_cls.__name__
    image_settings = settings.get("image_processor")
    if isinstance(image_settings, dict):
        name = image_settings.get("image_processor_type", "")
        image_settings["image_processor_type"] = name.removesuffix("Pil")
    (path / "processor_config.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    (path / "chat_template.jinja").write_text(template)
    return path


# ---------------------------------------------------------------------------------------------------------
# Oracles for LLM-side strategies (used by tokcomp's own tests and offered to plugin authors)
# ---------------------------------------------------------------------------------------------------------
ORACLE_ATOL = 2e-4
"""Absolute tolerance of the oracles on the logits of the tiny float32 models."""
ORACLE_RTOL = 1e-4
"""Relative tolerance of the oracles."""

_ORACLE_GEN = {"max_new_tokens": 3, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}


def capture_prefill(model: torch.nn.Module) -> tuple[list[dict[str, Any]], Any]:
    """Record the keyword arguments of every prefill call ``generate()`` makes to ``model``.

    Returns:
        ``(calls, handle)``: the list the calls are appended to, and the hook handle (``handle.remove()``).
    """
    from tokcomp.compat import cache_of

    calls: list[dict[str, Any]] = []

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        cache = cache_of(kwargs)
        if cache is None or cache.get_seq_length() == 0:
            calls.append(dict(kwargs))

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


def forward_kwargs(call: dict[str, Any]) -> dict[str, Any]:
    """A model call (a ``generate()`` prefill call, or a processor output) made into a plain forward that
    returns every position's logits: the same ids, positions and features, no cache."""
    from tokcomp.compat import without_cache

    kw = {k: v for k, v in without_cache(dict(call)).items() if k not in ("logits_to_keep", "use_cache")}
    if isinstance(kw.get("mm_encoder_outputs"), dict):
        kw["mm_encoder_outputs"] = dict(kw["mm_encoder_outputs"])
    return {**kw, "use_cache": False}


def masked_logits(model: torch.nn.Module, call: dict[str, Any], kept: dict[int, torch.Tensor]) -> torch.Tensor:
    """The drop-equals-mask oracle: the *unpatched* model keeping every token, with the keys a run dropped
    masked out of attention from each layer on.

    Independent of tokcomp's runtime: per decoder layer a plain 4-D mask "causal on sequence index, key not
    padding, key still kept at this layer" (plus the diagonal, so no row is empty) replaces the layer's
    attention mask. Only masks change: the model computes its own positions, so kept tokens have their
    original positions in both runs.

    Args:
        model: A tiny model (``model.model.language_model.layers``), outside any ``tokcomp.compress`` block.
        call: The keyword arguments of the compressed run's forward (see `capture_prefill`).
        kept: ``{layer: (B, S) original sequence index of each slot present at the layer's input, -1 for an
            empty slot}``, as ``run.kept_positions(layer)`` gives it; layers missing keep every token.

    Returns:
        ``(B, L, vocab)`` logits at every original position.
    """
    lm = model.model.language_model
    valid = call["attention_mask"].bool()
    B, L = valid.shape
    dtype = next(model.parameters()).dtype
    eager = lm.config._attn_implementation == "eager"
    handles = []
    for i, layer in enumerate(lm.layers):
        if i not in kept:
            continue
        keep = torch.zeros(B, L, dtype=torch.bool)
        for b in range(B):
            idx = kept[i][b]
            keep[b, idx[idx >= 0]] = True
        pos = torch.arange(L)
        allowed = (pos[None, :] <= pos[:, None])[None] & (valid & keep)[:, None, :]
        allowed = (allowed | torch.eye(L, dtype=torch.bool)[None])[:, None]
        mask = (
            torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
            if eager
            else allowed
        )

        def hook(mod: torch.nn.Module, args: tuple, kwargs: dict, mask: torch.Tensor = mask) -> tuple[tuple, dict]:
            kwargs["attention_mask"] = mask
            return args, kwargs

        handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            return model(**forward_kwargs(call)).logits
    finally:
        for h in handles:
            h.remove()


class MergeRecorder:
    """Wraps one strategy instance's ``select`` to note whether any of its decisions merged tokens (then
    dropping is not masking, and the drop-equals-mask oracle does not apply).

    Attributes:
        merged: Some decision carried new hidden states or sizes.
    """

    def __init__(self, strategy: Any) -> None:
        self.merged = False
        inner = getattr(strategy, "select", None)
        if inner is None:
            return

        def select(view: Any) -> Any:
            decision = inner(view)
            if getattr(decision, "hidden", None) is not None or getattr(decision, "sizes", None) is not None:
                self.merged = True
            return decision

        strategy.select = select  # an instance attribute: this strategy object only


def oracle_batch(arch: str) -> BatchFeature:
    """The oracles' batch: two samples with different pictures and prompt lengths, left-padded."""
    images = [[make_image(224, 168, seed=1)], [make_image(140, 196, seed=2)]]
    return tiny_inputs(arch, images)


def check_batch_equals_samples(model: torch.nn.Module, schedule: Any, batch: BatchFeature | None = None,
                               *, atol: float = ORACLE_ATOL, rtol: float = ORACLE_RTOL) -> Any:
    """Assert that ``generate()`` under ``schedule`` on a padded batch equals each sample generated alone
    (first-step logits within tolerance, the same greedy tokens), and that visual tokens were removed.

    Args:
        model: A tiny model (`tiny_model`).
        schedule: Anything `tokcomp.compress` takes.
        batch: A `tiny_inputs` batch; default `oracle_batch` of the model's architecture.
        atol: Absolute tolerance on the logits.
        rtol: Relative tolerance.

    Returns:
        The batch run's `tokcomp.Report`.

    Raises:
        AssertionError: Saying which sample differs, or that nothing was removed.
    """
    import tokcomp as tc

    batch = oracle_batch(model.config.model_type) if batch is None else batch
    L = batch["input_ids"].shape[1]
    with torch.no_grad(), tc.compress(model, schedule) as run:
        out = model.generate(**batch, **_ORACLE_GEN)
        rep = run.report()
        singles = [model.generate(**batch_item(batch, i), **_ORACLE_GEN) for i in range(batch["input_ids"].shape[0])]
    base = rep.baseline_visual
    for b, n in enumerate(base):
        fewest = min(row[b] for row in rep.visual_tokens)
        assert fewest < n, f"sample {b}: no visual token was removed ({rep.visual_tokens}); the check is vacuous"
    for i, single in enumerate(singles):
        torch.testing.assert_close(out.logits[0][i], single.logits[0][0], atol=atol, rtol=rtol,
                                   msg=lambda m, i=i: f"sample {i}: batch differs from the sample alone: {m}")
        n = single.sequences.shape[1] - _ORACLE_GEN["max_new_tokens"]
        assert torch.equal(out.sequences[i, L:], single.sequences[0, n:]), f"sample {i}: greedy tokens differ"
    return rep


def check_drop_equals_mask(model: torch.nn.Module, stage: Any, batch: BatchFeature | None = None,
                           *, atol: float = ORACLE_ATOL, rtol: float = ORACLE_RTOL) -> bool:
    """Assert that physically dropping tokens (one LLM-site ``stage``, run by ``generate()``) gives the
    logits of the unpatched model that keeps them and masks them out (`masked_logits`), at every kept slot.

    Args:
        model: A tiny model (`tiny_model`).
        stage: A `tokcomp.Stage` at site ``"llm"``.
        batch: A `tiny_inputs` batch; default `oracle_batch` of the model's architecture.
        atol: Absolute tolerance on the logits.
        rtol: Relative tolerance.

    Returns:
        True when checked; False when the strategy merged tokens (the oracle does not apply to merges).

    Raises:
        AssertionError: The logits differ, or nothing was removed.
    """
    import tokcomp as tc

    batch = oracle_batch(model.config.model_type) if batch is None else batch
    strategy = stage.build_strategy()
    recorder = MergeRecorder(strategy)
    own = tc.Stage(strategy, site=stage.site, layers=stage.layers)
    calls, handle = capture_prefill(model)
    try:
        with torch.no_grad(), tc.compress(model, tc.Schedule([own])) as run:
            model.generate(**batch, **_ORACLE_GEN)
            call = calls[0]
            dropped = model(**forward_kwargs(call)).logits  # the same prefill, every position's logits
            kept = {i: run.kept_positions(i) for i in range(run.adapter.num_layers)}
    finally:
        handle.remove()
    if recorder.merged:
        return False
    final = kept[max(kept)]
    assert final.shape[1] < call["input_ids"].shape[1], "nothing was removed: the check would be vacuous"
    masked = masked_logits(model, call, kept)
    valid = call["attention_mask"].bool()
    for b in range(final.shape[0]):
        slots = (final[b] >= 0) & valid[b, final[b].clamp(min=0)]
        torch.testing.assert_close(dropped[b, slots], masked[b, final[b][slots]], atol=atol, rtol=rtol,
                                   msg=lambda m, b=b: f"sample {b}: dropping differs from masking: {m}")
    return True


def check_llm_strategy(
    strategy: Any,
    archs: Sequence[str] = ("qwen2_vl", "llava"),
    *,
    layers: Sequence[int] | None = None,
    attn_implementations: Sequence[str] = ("sdpa",),
) -> dict[str, dict[str, str]]:
    """Check an LLM-side strategy with tokcomp's two oracles on tiny models: a batch equals its samples, and
    dropping equals masking. This is what tokcomp's own tests hold every built-in strategy to.

    Args:
        strategy: A strategy instance, class or registered name (`tokcomp.Stage` takes any of them).
        archs: Architectures of `tiny_model` to run on (see `ARCHITECTURES`).
        layers: The stage's LLM layers (the tiny LLMs have 4); default the strategy's ``default_layers``.
        attn_implementations: ``"sdpa"`` and/or ``"eager"``.

    Returns:
        ``{"arch/attn": {"batch_equals_samples": "passed", "drop_equals_mask": "passed" or "not applicable:
        the strategy merges tokens"}}``.

    Raises:
        AssertionError: An oracle failed (the message names the architecture, the sample and the check).
        tokcomp.ScheduleError: The strategy is not valid on one of the models.

    Examples:
        >>> from tokcomp.strategies import FastV
        >>> result = check_llm_strategy(FastV(keep_ratio=0.5), archs=["llava"], layers=[2])
        >>> result["llava/sdpa"]["drop_equals_mask"]
        'passed'
    """
    import tokcomp as tc

    results: dict[str, dict[str, str]] = {}
    for arch in archs:
        for attn in attn_implementations:
            model = tiny_model(arch, attn_implementation=attn)
            stage = tc.Stage(strategy, site="llm", layers=None if layers is None else list(layers))
            key = f"{arch}/{attn}"
            try:
                check_batch_equals_samples(model, tc.Schedule([stage]))
                dropped = check_drop_equals_mask(model, stage)
            except AssertionError as exc:
                raise AssertionError(f"{key}: {exc}") from None
            results[key] = {
                "batch_equals_samples": "passed",
                "drop_equals_mask": "passed" if dropped else "not applicable: the strategy merges tokens",
            }
    return results
