"""Real model *shapes* with random weights, for benchmarks where the checkpoints are not available.

Compute cost depends on shapes, not on weight values, so a model with the published widths, depths and
heads of a real checkpoint, but random weights, costs what the real one costs. tokcomp ships the
published ``config.json`` values of six checkpoints as package data (``tokcomp/data/shapes/<name>/``:
``config.json``, read with ``AutoConfig.from_pretrained(folder)``, and ``source.json``, the hub id and
notes); this module loads them and builds the matching ``transformers`` model, its processor and synthetic
inputs of a requested visual-token count:

| name | checkpoint (Hugging Face hub id) | LLM | vision tower |
|---|---|---|---|
| ``qwen2-vl-2b`` | ``Qwen/Qwen2-VL-2B-Instruct`` | 28 × 1536, 12 / 2 heads | ViT 32 × 1280 |
| ``qwen2.5-vl-3b`` | ``Qwen/Qwen2.5-VL-3B-Instruct`` | 36 × 2048, 16 / 2 heads | ViT 32 × 1280 |
| ``llava-ov-0.5b`` | ``llava-hf/llava-onevision-qwen2-0.5b-ov-hf`` | 24 × 896, 14 / 2 | SigLIP 26 × 1152 |
| ``internvl2.5-1b`` | ``OpenGVLab/InternVL2_5-1B`` | 24 × 896, 14 / 2 heads | InternViT 24 × 1024 |
| ``qwen3-vl-2b`` | ``Qwen/Qwen3-VL-2B-Instruct`` | 28 × 2048, 16 / 8 heads | ViT 24 × 1024, DeepStack 5, 11, 17 |
| ``qwen3-vl-8b`` | ``Qwen/Qwen3-VL-8B-Instruct`` | 36 × 4096, 32 / 8 heads | ViT 27 × 1152, DeepStack 8, 16, 24 |

The shipped values are transcribed from those checkpoints' published ``config.json`` files (for
InternVL2.5-1B, the ``llm_config`` / ``vision_config`` of the original repository, mapped onto
``transformers``' ``InternVLConfig`` field names). They were written from the published files, not
downloaded here: nothing in this module touches the network. The two Qwen3-VL shapes were checked against
copies of the published files quoted in public code (the 2B ``text_config``/``vision_config`` as of hub
revision ``89644892e4d85e24eaac8bacfd4f463576704203``; the 8B values as in the Qwen3-VL-8B-based
``nvidia/Cosmos-Reason2-8B`` ``config.json``, which keeps the Qwen3-VL-8B shapes). With reduced vision depth,
the DeepStack taps are the published ones that fall inside the reduced tower.

**Vocabulary.** Every shape is built with the 256-id vocabulary and the special-token ids of
`tokcomp.testing`, so that its tokenizer and processors work unchanged. The vocabulary size does not
change the cost of visual-token compression: the embedding is a table lookup, and a prefill needs the
LM head for the last position only (``logits_to_keep=1``, what ``generate()`` does); decoding pays
``2·D·V`` FLOPs per step for the head, the same with and without compression. The real vocabularies
(151 936 ids for the Qwen models) are recorded in `ModelShape.published_vocab_size`.

**Reduced depth.** ``layers`` and ``vision_blocks`` build fewer LLM layers / vision blocks than the
checkpoint has, for quick runs on a CPU; every result that uses them must say so (`ModelShape.describe`).
Qwen2.5-VL's full-attention blocks (``fullatt_block_indexes`` 7, 15, 23, 31) are kept where they fall
inside the reduced tower, and the last block is always one, so every reduced tower mixes windowed and
full attention like the real one.

Examples:
    >>> from tokcomp.shapes import SHAPES, shape_config
    >>> SHAPES["qwen2-vl-2b"].config.text_config.hidden_size
    1536
    >>> SHAPES["qwen2-vl-2b"].published_vocab_size
    151936
    >>> shape_config("qwen2-vl-2b", layers=2, vision_blocks=1).text_config.num_hidden_layers
    2
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    BatchFeature,
    GotOcr2ImageProcessorPil,
    LlavaOnevisionImageProcessorPil,
    PreTrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2VLImageProcessorPil,
)

from . import testing

__all__ = [
    "SHAPES",
    "SHAPES_DIR",
    "ModelShape",
    "image_size_for",
    "load_shapes",
    "shape_config",
    "shape_inputs",
    "shape_model",
    "shape_processor",
]

SHAPES_DIR: Path = Path(__file__).resolve().parent / "data" / "shapes"
"""Where the shipped shapes live: one folder per shape with ``config.json`` and ``source.json``."""


@dataclass(frozen=True, eq=False)
class ModelShape:
    """The published shape of one checkpoint, read from its shipped folder.

    Attributes:
        name: tokcomp's short name (``"qwen2-vl-2b"``), the folder's name.
        folder: The folder holding ``config.json`` (the published values) and ``source.json``.
        checkpoint: The hub id whose ``config.json`` the values come from.
        notes: Anything a reader of a benchmark should know about the transcription.
    """

    name: str
    folder: Path
    checkpoint: str
    notes: str = ""

    @cached_property
    def config(self) -> PreTrainedConfig:
        """The published config, as ``AutoConfig.from_pretrained(folder)`` reads it (do not modify it:
        `shape_config` builds a fresh one)."""
        return AutoConfig.from_pretrained(self.folder)

    @property
    def arch(self) -> str:
        """The `tokcomp.testing` architecture whose vocabulary, tokenizer and processor class it uses (the
        config's ``model_type``)."""
        return str(self.config.model_type)

    @property
    def published_vocab_size(self) -> int:
        """The checkpoint's vocabulary (not used to build: see the module docstring)."""
        return int(self.config.text_config.vocab_size)

    @property
    def num_layers(self) -> int:
        """The checkpoint's LLM depth."""
        return int(self.config.text_config.num_hidden_layers)

    @property
    def num_vision_blocks(self) -> int:
        """The checkpoint's vision-tower depth."""
        vc = self.config.vision_config
        return int(getattr(vc, "depth", None) or vc.num_hidden_layers)

    def describe(self, layers: int | None = None, vision_blocks: int | None = None) -> str:
        """One line for reports: the checkpoint, and the reduction if any (said loudly)."""
        ll = self.num_layers if layers is None else layers
        vb = self.num_vision_blocks if vision_blocks is None else vision_blocks
        depth = f"LLM {ll}/{self.num_layers} layers, vision {vb}/{self.num_vision_blocks} blocks"
        reduced = " (REDUCED DEPTH)" if (ll, vb) != (self.num_layers, self.num_vision_blocks) else ""
        return f"{self.name}: shapes of {self.checkpoint}, random weights, tiny vocabulary; {depth}{reduced}"


def load_shapes(folder: str | Path = SHAPES_DIR) -> dict[str, ModelShape]:
    """Every shape folder under ``folder`` (a ``config.json`` and a ``source.json`` each), by folder name.

    Args:
        folder: A directory of shape folders; the default is the shipped one, `SHAPES_DIR`.

    Raises:
        FileNotFoundError: ``folder`` holds no shape.
    """
    out = {}
    for sub in sorted(Path(folder).iterdir()):
        if (sub / "config.json").is_file():
            source = json.loads((sub / "source.json").read_text()) if (sub / "source.json").is_file() else {}
            out[sub.name] = ModelShape(sub.name, sub, str(source.get("checkpoint", "")), str(source.get("notes", "")))
    if not out:
        raise FileNotFoundError(f"no model shape (a folder with config.json) under {folder}")
    return out


SHAPES: dict[str, ModelShape] = load_shapes()
"""The six published shapes, by tokcomp's short name (the configs load on first use)."""

def _get(name: str) -> ModelShape:
    if name not in SHAPES:
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(SHAPES)}")
    return SHAPES[name]


def _full_attention_blocks(published: list[int], depth: int) -> list[int]:
    kept = [i for i in published if i < depth]
    if depth - 1 not in kept:
        kept.append(depth - 1)
    return sorted(kept)


def shape_config(
    name: str,
    *,
    layers: int | None = None,
    vision_blocks: int | None = None,
    attn_implementation: str = "sdpa",
) -> PreTrainedConfig:
    """The ``transformers`` config of a published shape, with `tokcomp.testing`'s vocabulary.

    The shipped ``config.json`` is read with ``AutoConfig``; the depths, the vocabulary and the special
    token ids are then replaced, and the config is built again from that dict, so that values derived from
    the depth (``layer_types``) follow the reduced one.

    Args:
        name: A key of `SHAPES`.
        layers: LLM decoder layers to build (default: the checkpoint's depth).
        vision_blocks: Vision-tower blocks to build (default: the checkpoint's depth).
        attn_implementation: Attention backend of every sub-model.

    Returns:
        The composite config (``Qwen2VLConfig``, ``Qwen2_5_VLConfig``, ``Qwen3VLConfig``,
        ``LlavaOnevisionConfig`` or ``InternVLConfig``).

    Raises:
        ValueError: If ``name`` is unknown or a depth is not positive.
    """
    shape = _get(name)
    n_layers = shape.num_layers if layers is None else int(layers)
    n_blocks = shape.num_vision_blocks if vision_blocks is None else int(vision_blocks)
    if n_layers < 1 or n_blocks < 1:
        raise ValueError(f"layers and vision_blocks must be >= 1, got {n_layers} and {n_blocks}")
    tiny = testing.tiny_config(shape.arch)  # vocabulary and special ids
    published = shape.config
    d = copy.deepcopy(published.to_dict())
    text = d["text_config"]
    text.pop("layer_types", None)  # rebuilt from the (reduced) depth
    text.update(
        num_hidden_layers=n_layers,
        vocab_size=tiny.text_config.vocab_size,
        bos_token_id=tiny.bos_token_id,
        eos_token_id=tiny.eos_token_id,
        pad_token_id=tiny.pad_token_id,
        tie_word_embeddings=False,
    )
    v = d["vision_config"]
    if "depth" in v:  # the Qwen towers
        v["depth"] = n_blocks
    else:
        v["num_hidden_layers"] = n_blocks
    if "fullatt_block_indexes" in v:
        v["fullatt_block_indexes"] = _full_attention_blocks(v["fullatt_block_indexes"], n_blocks)
    if "deepstack_visual_indexes" in v:
        v["deepstack_visual_indexes"] = [i for i in v["deepstack_visual_indexes"] if i < n_blocks]
    if shape.arch == "llava_onevision":
        d.update(image_token_index=tiny.image_token_id, video_token_index=tiny.video_token_id)
    else:
        d["image_token_id"] = tiny.image_token_id
        for key in ("video_token_id", "vision_start_token_id", "vision_end_token_id"):
            if key in d:
                d[key] = getattr(tiny, key)
    if shape.arch == "internvl":
        d.pop("max_dynamic_patch", None)  # the processor's setting (`shape_processor`), not the model's
    else:
        d.pop("tie_word_embeddings", None)
    for key in ("transformers_version", "architectures", "_name_or_path"):
        d.pop(key, None)
    config = type(published).from_dict(d)
    config.pad_token_id = tiny.pad_token_id
    config.bos_token_id = tiny.bos_token_id
    config.eos_token_id = tiny.eos_token_id
    config._attn_implementation = attn_implementation
    return config


def _redraw(model: torch.nn.Module) -> None:
    # The rule of tokcomp.testing.tiny_model: N(0, 1/fan_in) for matrices, N(0, 1) for embeddings, so
    # activations stay near unit variance at any width (HF's 0.02 default gives near-uniform logits).
    from .train import init_weights  # the one definition of that rule (the trained model starts from it)

    init_weights(model)


def shape_model(
    name: str,
    *,
    layers: int | None = None,
    vision_blocks: int | None = None,
    dtype: torch.dtype = torch.bfloat16,
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> PreTrainedModel:
    """A random-weight model of a published shape, in eval mode.

    Weights follow `tokcomp.testing.tiny_model`'s rule (``N(0, 1/fan_in)``); the caller's RNG state is
    left unchanged. Building the full Qwen2-VL-2B shape (2.2 B parameters) takes tens of seconds on a CPU.

    Args:
        name: A key of `SHAPES`.
        layers: LLM decoder layers (default: the checkpoint's depth).
        vision_blocks: Vision-tower blocks (default: the checkpoint's depth).
        dtype: Parameter dtype (bfloat16 by default: the fast CPU path with AVX512-BF16/AMX).
        attn_implementation: ``"sdpa"`` or ``"eager"``.
        seed: Weight seed.

    Returns:
        The ``...ForConditionalGeneration`` model.
    """
    config = shape_config(
        name, layers=layers, vision_blocks=vision_blocks, attn_implementation=attn_implementation
    )
    cls = testing._MODEL_CLASSES[_get(name).arch]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls._from_config(config, dtype=dtype)
        _redraw(model)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    return model.eval()


def shape_processor(name: str, *, max_tiles: int | None = None) -> ProcessorMixin:
    """The processor of a published shape: its real image-processing sizes with the tiny tokenizer.

    * Qwen2-VL / Qwen2.5-VL: ``Qwen2VLImageProcessorPil`` with ``min_pixels`` 4·28² and ``max_pixels``
      16384·28² (any image whose sides are multiples of 28 keeps its size: ``(H/28)·(W/28)`` tokens).
    * Qwen3-VL: the same with 16-px patches, 32 px per token (``min_pixels`` 4·32², ``max_pixels`` 16384·32²).
    * LLaVA-OneVision: 384 px tiles, the 36 published pinpoints, ``anyres_max_9``, 729 tokens per tile.
    * InternVL: 448 px tiles, dynamic tiling up to ``max_tiles`` (published default 12) plus a thumbnail,
      256 tokens per tile.

    Args:
        name: A key of `SHAPES`.
        max_tiles: InternVL only: the largest number of crops (default 12).

    Returns:
        The processor (the `tokcomp.testing` processor class of the architecture).
    """
    shape = _get(name)
    tokenizer = testing.tiny_tokenizer(shape.arch)
    cls = type(testing.tiny_processor(shape.arch))
    if shape.arch in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        patch = 16 if shape.arch == "qwen3_vl" else 14
        ip = Qwen2VLImageProcessorPil(
            min_pixels=(2 * patch) ** 2 * 4,
            max_pixels=(2 * patch) ** 2 * 16384,
            patch_size=patch,
            temporal_patch_size=2,
            merge_size=2,
        )
        return cls(image_processor=ip, tokenizer=tokenizer, video_processor=None)
    if shape.arch == "llava_onevision":
        ov = LlavaOnevisionImageProcessorPil(
            size={"height": 384, "width": 384},
            image_grid_pinpoints=[list(p) for p in shape.config.image_grid_pinpoints],
        )
        return cls(
            image_processor=ov,
            tokenizer=tokenizer,
            video_processor=None,
            num_image_tokens=729,
            vision_feature_select_strategy="full",
            vision_aspect_ratio="anyres_max_9",
        )
    tiles = int(shape.config.max_dynamic_patch if max_tiles is None else max_tiles)
    ip2 = GotOcr2ImageProcessorPil(
        size={"height": 448, "width": 448}, crop_to_patches=True, min_patches=1, max_patches=tiles
    )
    return cls(image_processor=ip2, tokenizer=tokenizer, video_processor=None, image_seq_length=256)


def image_size_for(name: str, visual_tokens: int) -> tuple[int, int, int, dict[str, Any]]:
    """An image size giving about ``visual_tokens`` visual tokens in the LLM for a shape.

    * Qwen: ``(H/28)·(W/28)`` tokens (Qwen3-VL: ``(H/32)·(W/32)``); the grid ``a × b`` (a ≤ b) closest to
      the request, as square as possible.
    * LLaVA-OneVision: an image of one of the 36 pinpoint sizes (no padding), whose AnyRes token count
      (base tile 729 + unpadded grid + one newline per row, shrunk to ``anyres_max_9``) is closest.
    * InternVL: ``256·(crops + 1 thumbnail)`` tokens; a ``rows × cols`` crop grid (448 px crops) closest to
      the request.

    Args:
        name: A key of `SHAPES`.
        visual_tokens: The requested number.

    Returns:
        ``(width, height, placeholder_tokens, details)``: ``placeholder_tokens`` is what the processor
        writes into ``input_ids`` (LLaVA-OV: newline tokens included); ``details`` says how it was chosen.
    """
    shape = _get(name)
    target = max(1, int(visual_tokens))
    if shape.arch in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        px = 32 if shape.arch == "qwen3_vl" else 28
        best: tuple[float, int, int] | None = None
        for a in range(1, math.isqrt(target) + 2):
            b = max(a, round(target / a))
            key = (abs(a * b - target) / target + 0.001 * (b / a), a, b)
            if best is None or key < best:
                best = key
        assert best is not None
        _, a, b = best
        return px * b, px * a, a * b, {"grid_tokens": (a, b)}
    if shape.arch == "llava_onevision":
        proc = shape_processor(name)
        cands = []
        for h, w in shape.config.image_grid_pinpoints:
            n = proc._get_number_of_features(h, w, 384, 384)
            cands.append((abs(n - target), h * w, w, h, n))
        _, _, w, h, n = min(cands)
        return w, h, n, {"tiles": (h // 384, w // 384)}
    best2: tuple[int, float, int, int] | None = None
    for rows in range(1, 9):
        for cols in range(rows, 9):
            tiles = rows * cols + (1 if rows * cols > 1 else 0)
            key2 = (abs(256 * tiles - target), cols / rows, rows, cols)
            if best2 is None or key2 < best2:
                best2 = key2
    assert best2 is not None
    _, _, rows, cols = best2
    tiles = rows * cols + (1 if rows * cols > 1 else 0)
    return 448 * cols, 448 * rows, 256 * tiles, {"crops": (rows, cols), "max_tiles": rows * cols}


def shape_inputs(
    name: str,
    visual_tokens: int,
    *,
    batch: int = 1,
    prompt_words: int = 24,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
) -> tuple[BatchFeature, dict[str, Any]]:
    """Synthetic inputs for a shape: one `tokcomp.testing.make_image` picture per sample, sized by
    `image_size_for`, and a prompt of ``prompt_words`` words after it.

    Args:
        name: A key of `SHAPES`.
        visual_tokens: The requested visual tokens per sample.
        batch: Samples (each with its own picture, same size).
        prompt_words: Words of text after the image (plus the fixed two-word prefix of `tokcomp.testing`).
        dtype: Pixel dtype (match the model's).
        seed: Picture seed (sample ``i`` uses ``seed + i``).

    Returns:
        ``(inputs, info)``: the processor's ``BatchFeature``; ``info`` has the image size, the requested
        and the placeholder token counts.
    """
    shape = _get(name)
    width, height, _tokens, details = image_size_for(name, visual_tokens)
    proc = shape_processor(name, max_tiles=details.get("max_tiles"))
    image_prompt = testing._IMAGE_PROMPT[shape.arch]
    words = " ".join(f"w{(7 * k + 3) % 200}" for k in range(prompt_words))
    texts = [f"{testing._PROMPT_PREFIX} {image_prompt} {words}" for _ in range(batch)]
    images: Any = [testing.make_image(width, height, seed=seed + i) for i in range(batch)]
    if shape.arch == "llava_onevision":
        images = [[im] for im in images]
    inputs = proc(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(dtype)
    image_id = testing.tiny_config(shape.arch).image_token_id if shape.arch != "llava_onevision" else 4
    placeholders = int((inputs["input_ids"][0] == image_id).sum())
    info = {
        "shape": name,
        "image_size": [width, height],
        "requested_visual_tokens": int(visual_tokens),
        "placeholder_tokens": placeholders,
        "sequence_length": int(inputs["input_ids"].shape[1]),
        "batch": batch,
        **{k: list(v) if isinstance(v, tuple) else v for k, v in details.items()},
    }
    return inputs, info
