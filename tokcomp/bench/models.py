"""The models ``tokcomp bench --model`` measures: tiny test models, published shapes with random weights,
local checkpoints."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError

__all__ = ["DTYPES", "build_model_and_inputs"]

DTYPES: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
}
"""``--dtype`` names and the torch dtypes they stand for."""
_DTYPES = DTYPES  # the name before the split


def build_model_and_inputs(
    spec: str,
    *,
    layers: int | None = None,
    vision_blocks: int | None = None,
    visual_tokens: int = 1024,
    batch: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
) -> tuple[torch.nn.Module, Any, dict[str, Any], dict[str, Any]]:
    """The model and inputs ``tokcomp bench --model SPEC`` measures.

    Args:
        spec: ``"tiny:ARCH"`` (`tokcomp.testing`), a `tokcomp.shapes.SHAPES` name, or a local checkpoint
            folder (loaded with ``from_pretrained``; nothing is downloaded).
        layers: LLM layers to build (tiny models and shapes; default: 8 for tiny, all for shapes).
        vision_blocks: Vision blocks to build (shapes).
        visual_tokens: Visual tokens per sample (shapes and checkpoints).
        batch: Samples.
        dtype: Parameter dtype.
        device: Where to put model and inputs.

    Returns:
        ``(model, inputs, model_info, inputs_info)``.

    Raises:
        ValueError: If the spec is neither a known name nor an existing folder.
    """
    from .. import shapes, testing

    if spec.startswith("tiny:") or spec in testing.ARCHITECTURES:
        arch = spec.removeprefix("tiny:")
        n = layers or 8
        model = testing.tiny_model(arch, num_hidden_layers=n, dtype=dtype)
        images = [[testing.make_image(*testing._DEFAULT_SIZES[i % 2], seed=i)] for i in range(batch)]
        inputs = testing.tiny_inputs(arch, images, dtype=dtype)
        minfo = {
            "short": f"tiny {arch}",
            "description": f"tiny {arch} (tokcomp.testing, random weights), {n} LLM layers",
        }
        iinfo: dict[str, Any] = {"images": [list(testing._DEFAULT_SIZES[i % 2]) for i in range(batch)]}
    elif spec in shapes.SHAPES:
        shape = shapes.SHAPES[spec]
        model = shapes.shape_model(spec, layers=layers, vision_blocks=vision_blocks, dtype=dtype)
        inputs, iinfo = shapes.shape_inputs(spec, visual_tokens, batch=batch, dtype=dtype)
        minfo = {
            "short": spec,
            "description": shape.describe(layers, vision_blocks),
            "shape": spec,
            "checkpoint": shape.checkpoint,
            "layers": layers or shape.num_layers,
            "published_layers": shape.num_layers,
            "vision_blocks": vision_blocks or shape.num_vision_blocks,
            "published_vision_blocks": shape.num_vision_blocks,
            "vocabulary": "tokcomp.testing's 256 ids (the vocabulary does not change compression cost)",
        }
    elif Path(spec).is_dir():
        model, inputs, minfo, iinfo = _from_checkpoint(spec, visual_tokens, batch, dtype)
    else:
        raise UsageError(
            f"--model {spec!r}: not tiny:ARCH, not a shape ({', '.join(shapes.SHAPES)}) and not an existing "
            "folder (checkpoints are only loaded from local paths; nothing is downloaded)"
        )
    model = model.to(device)
    inputs = inputs.to(device)
    return model, inputs, minfo, iinfo


def _from_checkpoint(path: str, visual_tokens: int, batch: int, dtype: torch.dtype) -> tuple[Any, ...]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from .. import testing

    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype, attn_implementation="sdpa", local_files_only=True
    ).eval()
    side = 28 * max(1, round(math.sqrt(visual_tokens)))  # Qwen: (H/28)·(W/28) tokens; others resize anyway
    images = [testing.make_image(side, side, seed=i) for i in range(batch)]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}
    ]
    try:
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - no chat template: the image token and the question
        text = f"{getattr(processor, 'image_token', '<image>')} Describe the image."
    imgs: Any = [[im] for im in images] if model.config.model_type == "llava_onevision" else images
    inputs = processor(text=[text] * batch, images=imgs, padding=True, return_tensors="pt")
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(dtype)
    minfo = {"short": Path(path).name, "description": f"checkpoint {path}", "checkpoint": path}
    return model, inputs, minfo, {"image_size": [side, side]}
