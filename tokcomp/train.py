"""Trains the small Qwen2-VL shipped with tokcomp on the synthetic VQA task (`tokcomp.vqa`).

The model is the real ``transformers`` ``Qwen2VLForConditionalGeneration``, built from its config class
at a small size (`model_config`), with a word-level tokenizer over the task's words (`build_tokenizer`)
and the real ``Qwen2VLProcessor`` with the PIL image processor (`build_processor`). Pictures are
336x336, so 144 merged visual tokens (12x12) enter the LLM.

What made it learn, in the order it was found (`docs/accuracy.md` has the measurements):

- **An auxiliary loss at the visual tokens** (`dense_labels`): each visual token's own output predicts
  the words for what is drawn under it and the named cell it lies in. Without it, four recipes learnt
  the background colour and little else in the time budget.
- **Every question asked as at inference** (`encode_shared`): each training picture is asked its own
  question and up to ``per_type`` questions of every type (`extra_questions`), packed in one row where
  each question sees the picture and itself, at the positions it has when asked alone. Asked one after
  another instead, each question sat at another distance from the picture, and the answer position
  never learnt to look in the named cell through the rotary positions.
- **A low rotary base** (10): Qwen2-VL's M-RoPE gives the width axis its lowest frequencies; at base 10
  they turn 1.4-2.8 rad across the 12-token row, enough to tell left from right.
- **Rare cells weighted up** (``balance``): the digit covers a few of the 144 tokens; weighting the
  auxiliary loss by how rare a token's kind is made the digit readable at all.
- **More questions per picture** (``per_type``): the largest single gain; questions are cheap next to
  the picture they share. ``balanced`` evens out the yes/no and count answers of these questions.
- **Fewer, wider ViT heads** (2 of 32 dimensions instead of 4 of 16): 76.6% -> 80.3% at equal steps,
  shapes and the digit read more often. Probably because the ViT's rotary gives each axis a quarter of a
  head's dimensions: a 16-dimension head has only 4 frequencies per axis (1 to 0.001 rad a patch), too
  few to look at a patch's near neighbours.
- **The digit's segments per cell** (``segments``, `tokcomp.vqa.segment_labels`): a training-only head
  on the merger output predicts which lit segments lie in each visual token's cell. The digit was mostly
  confused between digits one vertical segment apart (2/3, 5/6, 8/9); with these targets it went from
  39% to 67% of 200 held-out questions at equal steps.
- **Count scenes twice** (``pictures``, `training_pictures`): only the task's count scenes hold three or
  more objects of a colour, and the model answered 2 to most counts of 3 and 4; drawing them twice as
  often took counting from 57% to 70% at equal steps.
- **bf16 autocast with eager attention** (``bf16``): a step a third faster on this CPU, so 3,000 steps
  fit where 2,100 did in fp32; 88.3% -> 91.2% on 1,400 held-out questions. The weights stay fp32 and
  the checkpoint is saved with ``sdpa``.

Weights start from a unit-gain initialisation (`init_weights`).

Run it with:

```bash
python -m tokcomp.train --out DIR            # the shipped checkpoint's recipe (see TrainConfig)
python -m tokcomp.train --out DIR --steps 20 # a quick check
```

Training is deterministic for a given seed and thread count (the same ``torch`` build and thread
count give the same weights). The folder written is a ``save_pretrained`` model (safetensors) plus the
tokenizer and the image processor, loadable with `load_checkpoint` or
``tokcomp.testing.trained_model()``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
from transformers import (
    BatchFeature,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig, Qwen2VLVisionConfig

from . import vqa

__all__ = [
    "PROMPT",
    "TrainConfig",
    "TrainResult",
    "answer_ids",
    "build_image_processor",
    "build_processor",
    "build_tokenizer",
    "dense_labels",
    "encode",
    "encode_shared",
    "extra_questions",
    "init_weights",
    "load_checkpoint",
    "main",
    "model_config",
    "predict",
    "save_checkpoint",
    "token_accuracy",
    "train",
    "training_pictures",
]

_SPECIALS = ("<unk>", "<pad>", "<s>", "</s>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
             "<|vision_end|>")
_PAD_ID, _BOS_ID, _EOS_ID, _IMAGE_ID, _VIDEO_ID, _START_ID, _END_ID = 1, 2, 3, 4, 5, 6, 7
PROMPT = "<|vision_start|><|image_pad|><|vision_end|> {question}"
"""The text of one sample before its answer: the image, then the question."""


# ---------------------------------------------------------------------------------------------------------
# Tokenizer, processor, model
# ---------------------------------------------------------------------------------------------------------
def build_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `tokcomp.vqa.VOCABULARY` with the Qwen2-VL special tokens.

    Ids: ``<unk> <pad> <s> </s>`` 0-3, ``<|image_pad|>`` 4, ``<|video_pad|>`` 5, ``<|vision_start|>`` 6,
    ``<|vision_end|>`` 7, then the task's words in `tokcomp.vqa.VOCABULARY` order. Padding is on the left.

    Returns:
        A ``PreTrainedTokenizerFast``.
    """
    vocab = {t: i for i, t in enumerate([*_SPECIALS, *vqa.VOCABULARY])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
        image_token="<|image_pad|>",
        video_token="<|video_pad|>",
        vision_start_token="<|vision_start|>",
        vision_end_token="<|vision_end|>",
    )


def build_image_processor() -> Qwen2VLImageProcessorPil:
    """The PIL Qwen2-VL image processor that keeps a 336x336 picture at its size (144 merged tokens)."""
    side = vqa.IMAGE_SIZE
    return Qwen2VLImageProcessorPil(
        min_pixels=28 * 28 * 4, max_pixels=side * side, patch_size=14, temporal_patch_size=2, merge_size=2
    )


def build_processor(
    tokenizer: PreTrainedTokenizerFast | None = None, image_processor: Qwen2VLImageProcessorPil | None = None
) -> Qwen2VLProcessor:
    """The real ``Qwen2VLProcessor`` (without a video processor, so no torchvision is needed).

    Args:
        tokenizer: Defaults to `build_tokenizer`.
        image_processor: Defaults to the 336x336 PIL image processor.

    Returns:
        A ``Qwen2VLProcessor`` (a subclass that accepts ``video_processor=None``, see
        `tokcomp.testing.tiny_processor`).
    """
    from .testing import _TinyQwen2VLProcessor

    return _TinyQwen2VLProcessor(
        image_processor=image_processor or build_image_processor(),
        tokenizer=tokenizer or build_tokenizer(),
        video_processor=None,
    )


@dataclass
class TrainConfig:
    """The recipe: model size, optimiser and data.

    Attributes:
        hidden: LLM width.
        layers: LLM decoder layers.
        heads: LLM attention heads (head dim = hidden / heads).
        kv_heads: LLM key/value heads.
        intermediate: LLM MLP width.
        vision_width: ViT width.
        vision_depth: ViT blocks.
        vision_heads: ViT heads.
        rope_theta: Base of the LLM's rotary (M-RoPE) frequencies.
        steps: Optimiser steps.
        batch: Examples per step.
        lr: Peak learning rate (AdamW, linear warm-up then cosine decay to 0).
        warmup: Warm-up steps.
        weight_decay: AdamW weight decay.
        seed: Seed of the weights, the data stream (``split="train"``) and the shuffling.
        threads: ``torch`` threads (determinism holds per thread count).
        extra: Ask every other question type about each picture too (`extra_questions`).
        dense: Weight of the auxiliary loss at the visual tokens (`dense_labels`): each visual token's
            output predicts the words for what is drawn under it and for the named cell it lies in
            (`tokcomp.vqa.token_labels`); 0 turns it off.
        shared: Pack each picture's questions into one row with `encode_shared` (each question sees
            the picture and itself, at the positions it has at inference) instead of one after another.
        per_type: With ``extra``, questions asked per type and picture (`extra_questions`).
        balance: Exponent of the weighting of the auxiliary loss by what a token shows: a token whose
            kind (background, object, digit, stripes) is a share ``f`` of the batch's visual tokens
            weighs ``f ** -balance`` (1: every kind weighs the same in all; 0: every token the same).
        balanced: Ask the extra questions with even yes/no and counts (`extra_questions`).
        pictures: Comma-separated question types whose pictures make up the training stream, as a
            pattern that repeats (a type named twice takes two pictures per round; empty: all, in the
            split's order). Every type is still asked about each picture through ``extra``;
            this only changes which scenes are drawn, for example ``count`` scenes, the only ones with
            three or more objects of one colour.
        segments: Weight of a second auxiliary loss, at the visual tokens as they enter the LLM (the
            merger's output): a linear head, used in training only and not saved, predicts which of the
            digit's lit segments lie in each token's cell (`tokcomp.vqa.segment_labels`, binary
            cross-entropy over the tokens near the digit); 0 turns it off.
        bf16: Run the training forward under CPU ``bfloat16`` autocast with ``eager`` attention (the
            weights, the optimiser and the saved checkpoint stay fp32 and ``sdpa``).
    """

    hidden: int = 128
    layers: int = 6
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 256
    vision_width: int = 64
    vision_depth: int = 2
    vision_heads: int = 2
    rope_theta: float = 10.0
    # 3,000 steps took 12.1 min on 2 threads in bf16 (2,100 took 15.3 min in fp32).
    steps: int = 3000
    batch: int = 8
    lr: float = 2e-3
    warmup: int = 20
    weight_decay: float = 0.01
    seed: int = 0
    # Two threads ran 1.5x faster than one on an otherwise idle 2-core machine (with another process
    # busy on the second core they ran 4-10x slower; pass --threads 1 there).
    threads: int = 2
    extra: bool = True
    dense: float = 1.0
    shared: bool = True
    per_type: int = 3
    balance: float = 0.5
    balanced: bool = True
    # Count scenes twice, and no scenes drawn for the questions every picture can answer (background,
    # digit, stripes): only count scenes hold three or more objects of a colour. 82.0% against 80.2%
    # for the split's own order, on 1,400 held-out questions after 1,400 steps.
    pictures: str = "count,count,position,relation,exist"
    # Per-cell digit segments: the digit went from 39% to 67% of 200 held-out questions (1,400 steps).
    segments: float = 1.0
    # A third faster a step on this CPU; the losses followed the fp32 run's to within 0.02 at steps 100
    # and 200, and the 900 more steps that fit took 1,400 held-out questions from 88.3% to 91.2%.
    bf16: bool = True


def model_config(cfg: TrainConfig) -> Qwen2VLConfig:
    """The ``Qwen2VLConfig`` of a recipe (vocabulary: `build_tokenizer`).

    Args:
        cfg: The recipe.

    Returns:
        The config, ``sdpa`` attention.
    """
    head_dim = cfg.hidden // cfg.heads
    half = head_dim // 2
    # M-RoPE splits the rotary half-dimension into (temporal, height, width) sections, as 16/24/24 of 64.
    t = half // 4
    h = (half - t) // 2
    config = Qwen2VLConfig(
        text_config=Qwen2VLTextConfig(
            vocab_size=len(_SPECIALS) + len(vqa.VOCABULARY),
            hidden_size=cfg.hidden,
            intermediate_size=cfg.intermediate,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            num_key_value_heads=cfg.kv_heads,
            max_position_embeddings=1024,
            rms_norm_eps=1e-6,
            bos_token_id=_BOS_ID,
            eos_token_id=_EOS_ID,
            pad_token_id=_PAD_ID,
            tie_word_embeddings=False,
            # A small theta: M-RoPE gives the width axis the lowest frequencies, which at 10,000 turn by
            # 0.04 rad across a 12-token row, so "left" and "right" were almost invisible; at 10 they turn
            # 1.4-2.8 rad. The temporal section, constant over a picture, still matches content anywhere.
            rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta,
                             "mrope_section": [t, h, half - t - h]},
        ),
        vision_config=Qwen2VLVisionConfig(
            depth=cfg.vision_depth,
            embed_dim=cfg.vision_width,
            hidden_size=cfg.hidden,
            mlp_ratio=2,
            num_heads=cfg.vision_heads,
            patch_size=14,
            temporal_patch_size=2,
            spatial_merge_size=2,
        ),
        image_token_id=_IMAGE_ID,
        video_token_id=_VIDEO_ID,
        vision_start_token_id=_START_ID,
        vision_end_token_id=_END_ID,
    )
    config.pad_token_id, config.bos_token_id, config.eos_token_id = _PAD_ID, _BOS_ID, _EOS_ID
    config._attn_implementation = "sdpa"
    return config


@torch.no_grad()
def init_weights(model: torch.nn.Module) -> None:
    """Unit-gain initialisation: linear and convolution weights ``N(0, 1/fan_in)``, embeddings ``N(0, 1)``.

    The library's ``N(0, 0.02)`` suits widths near 1,000; at width 64-128 it shrinks every branch about
    fivefold, so the visual tokens barely reach the answer position at first, and the model spent hundreds
    of steps on text priors alone. With unit gain, the background colour was learnt in 10 steps instead of
    not at all in 40 (2-layer model, 8 pictures a step). Biases and norms keep the model's own init.

    Args:
        model: The freshly built model (changed in place).
    """
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d)):
            module.weight.normal_(0.0, 1.0 / math.sqrt(module.weight[0].numel()))
        elif isinstance(module, torch.nn.Embedding):
            module.weight.normal_(0.0, 1.0)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()


def answer_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Token ids of `tokcomp.vqa.ANSWERS`, in that order."""
    return [tokenizer.convert_tokens_to_ids(a) for a in vqa.ANSWERS]


# ---------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------
def extra_questions(
    example: vqa.Example, seed: int, per_type: int = 1, *, balanced: bool = False
) -> list[tuple[str, str]]:
    """More questions about an example's picture: up to ``per_type`` of each type, none repeated.

    Training asks them next to the example's own question (in a seeded random order), so one picture
    gives many supervised answers for one pass of the vision tower. Types with one possible question
    (background, digit, stripes) are asked at most once, and never again if they are the example's own.

    Args:
        example: A training example.
        seed: Seed of the choices (with the example's index).
        per_type: Questions to draw per type (the example's own question counts for its type).
        balanced: Even out the yes/no of ``exist`` and the counts of ``count`` (`tokcomp.vqa.ask`).

    Returns:
        ``(question, answer)`` pairs from `tokcomp.vqa.ask`, without the example's own question.
    """
    rng = random.Random(f"tokcomp-train/{seed}/{example.split}/{example.index}")
    seen = {example.question}
    out = []
    for qtype in vqa.QTYPES:
        for _ in range(per_type - (qtype == example.qtype)):
            qa = vqa.ask(example.scene, qtype, rng, balanced=balanced)
            if qa is not None and qa[0] not in seen:
                seen.add(qa[0])
                out.append(qa)
    rng.shuffle(out)
    return out


def encode(
    processor: Qwen2VLProcessor,
    examples: Sequence[vqa.Example],
    *,
    with_answer: bool = False,
    extra: Sequence[Sequence[tuple[str, str]]] | None = None,
) -> BatchFeature:
    """Processes examples into one left-padded batch.

    Args:
        processor: From `build_processor` (or a loaded checkpoint).
        examples: The examples.
        with_answer: Append each answer and ``</s>`` and return ``labels`` that are ``-100`` except on
            the answer and ``</s>`` tokens (for training).
        extra: Per example, more ``(question, answer)`` pairs to append after the first answer, each
            followed by ``</s>`` and supervised the same way (needs ``with_answer``).

    Returns:
        ``input_ids``, ``attention_mask``, ``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``
        (and ``labels``).
    """
    texts = [PROMPT.format(question=e.question) for e in examples]
    if with_answer:
        texts = [f"{t} {e.answer} </s>" for t, e in zip(texts, examples)]
        for k, pairs in enumerate(extra or []):
            texts[k] += "".join(f" {q} {a} </s>" for q, a in pairs)
    batch = processor(
        text=texts, images=[e.image for e in examples], padding=True, padding_side="left", return_tensors="pt"
    )
    if with_answer:
        batch["labels"] = _answer_labels(batch["input_ids"])
    return batch


def _answer_labels(ids: torch.Tensor) -> torch.Tensor:
    """``ids`` on each ``</s>`` and on the answer token just before it, -100 everywhere else."""
    eos = ids == _EOS_ID
    answer = torch.zeros_like(eos)
    answer[:, :-1] = eos[:, 1:]
    return torch.where(eos | answer, ids, torch.full_like(ids, -100))


def encode_shared(
    processor: Qwen2VLProcessor,
    examples: Sequence[vqa.Example],
    questions: Sequence[Sequence[tuple[str, str]]],
) -> BatchFeature:
    """One packed training row per picture: the picture once, then each question as if asked alone.

    Row ``k`` is the picture prefix ``<|vision_start|> <|image_pad|>... <|vision_end|>`` followed by the
    blocks ``" {question} {answer} </s>"`` of ``questions[k]``. A 4-D attention mask lets every block see
    the prefix and itself (causally) but no other block, and every block's positions restart right after
    the prefix. So each block is computed exactly as `encode` computes that question alone at inference
    (same positions, same visible tokens), while the vision tower and the picture's tokens are computed
    once for all the questions. Rows are right-padded; pads see only themselves.

    Args:
        processor: From `build_processor` (or a loaded checkpoint).
        examples: The pictures (their own questions are not used; put them in ``questions``).
        questions: Per picture, the ``(question, answer)`` pairs to ask.

    Returns:
        ``input_ids``, ``attention_mask`` (``(batch, 1, length, length)`` bool, True where attended),
        ``position_ids`` (``(3, batch, length)``, M-RoPE temporal/height/width), ``pixel_values``,
        ``image_grid_thw`` and ``labels`` (-100 except on each answer and its ``</s>``).

    Raises:
        ValueError: If ``questions`` does not have one entry per example.
    """
    if len(questions) != len(examples):
        raise ValueError(f"{len(examples)} examples but {len(questions)} question lists")
    prefix = processor(text=[PROMPT.format(question="").rstrip()] * len(examples),
                       images=[e.image for e in examples], return_tensors="pt")
    merge = processor.image_processor.merge_size
    head = prefix["input_ids"].shape[1]  # the same for every row: one batch of same-size pictures
    rows, blocks_of = [], []
    for k, pairs in enumerate(questions):
        blocks = [processor.tokenizer(f" {q} {a} </s>", add_special_tokens=False)["input_ids"] for q, a in pairs]
        rows.append(prefix["input_ids"][k].tolist() + [t for b in blocks for t in b])
        blocks_of.append([len(b) for b in blocks])
    length = max(map(len, rows))
    n = len(rows)
    ids = torch.full((n, length), _PAD_ID, dtype=torch.long)
    mask = torch.zeros((n, 1, length, length), dtype=torch.bool)
    pos = torch.zeros((3, n, length), dtype=torch.long)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for k, row in enumerate(rows):
        ids[k, : len(row)] = torch.tensor(row)
        _, gh, gw = (int(v) for v in prefix["image_grid_thw"][k])
        gh, gw = gh // merge, gw // merge
        # The positions get_rope_index gives a text token, a picture and a text token: the picture's
        # tokens sit at (start, start + row, start + column), and text resumes after the longer side.
        image = (prefix["input_ids"][k] == _IMAGE_ID).nonzero().flatten()
        first = int(image[0])
        pos[:, k, :first] = torch.arange(first)
        r, c = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        pos[0, k, image] = first
        pos[1, k, image] = first + r.flatten()
        pos[2, k, image] = first + c.flatten()
        after = first + max(gh, gw)
        tail = head - int(image[-1]) - 1
        pos[:, k, image[-1] + 1 : head] = after + torch.arange(tail)
        start, text0 = head, after + tail
        mask[k, 0, :, :head] = causal[:, :head]
        for size in blocks_of[k]:
            span = slice(start, start + size)
            pos[:, k, span] = text0 + torch.arange(size)
            mask[k, 0, span, span] = causal[:size, :size]
            start += size
        mask[k, 0, start:, start:] = torch.eye(length - start, dtype=torch.bool)
    return BatchFeature({
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": pos,
        "pixel_values": prefix["pixel_values"],
        "image_grid_thw": prefix["image_grid_thw"],
        "labels": _answer_labels(ids),
    })


@torch.no_grad()
def predict(model: Any, processor: Qwen2VLProcessor, examples: Sequence[vqa.Example], batch: int = 32) -> list[str]:
    """The model's answer word to each example: argmax of the next-token logits after the question.

    This is one forward per batch (no ``generate``), for monitoring training; `tokcomp.evaluate` answers
    through ``generate()``.

    Args:
        model: A trained model.
        processor: Its processor.
        examples: The examples.
        batch: Batch size.

    Returns:
        One decoded token per example.
    """
    out: list[str] = []
    for k in range(0, len(examples), batch):
        inputs = encode(processor, examples[k : k + batch])
        logits = model(**inputs, logits_to_keep=1).logits[:, -1]
        out += processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
    return out


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    """What `train` did.

    Attributes:
        config: The recipe.
        losses: Mean loss of every step.
        seconds: Wall time of the training loop.
        accuracy: Held-out accuracy per question type (``"all"`` overall) from `predict`, if evaluated.
        eval_examples: Held-out examples used for ``accuracy``.
    """

    config: TrainConfig
    losses: list[float]
    seconds: float
    accuracy: dict[str, float]
    eval_examples: int


def dense_labels(
    processor: Qwen2VLProcessor, examples: Sequence[vqa.Example], input_ids: torch.Tensor
) -> torch.Tensor:
    """Targets of the auxiliary loss: at each visual token, the ids of the words for that cell.

    Args:
        processor: The processor (its tokenizer maps the words).
        examples: The batch's examples (one picture each).
        input_ids: The batch's ids (from `encode`).

    Returns:
        ``(batch, length, 3)`` ids: at the image-pad positions the `tokcomp.vqa.token_labels` words of
        that cell (row-major over the merged grid, the order the processor lays the tokens), padded
        with -100; -100 everywhere else.

    Raises:
        ValueError: If a picture's tokens do not form a square grid whose side is a multiple of 3.
    """
    out = torch.full((*input_ids.shape, 3), -100, dtype=torch.long)
    for k, example in enumerate(examples):
        where = (input_ids[k] == _IMAGE_ID).nonzero().flatten()
        grid = math.isqrt(len(where))
        if grid * grid != len(where) or grid % 3:
            raise ValueError(f"{len(where)} image tokens is not a square grid of a multiple of 3 per side; "
                             "the picture must be square with a side a multiple of 84 px")
        cells = vqa.token_labels(example.scene, grid)
        for slot in range(3):
            words = [c[slot] if slot < len(c) else None for c in cells]
            ids = [processor.tokenizer.convert_tokens_to_ids(w) if w else -100 for w in words]
            out[k, where, slot] = torch.tensor(ids)
    return out


@torch.no_grad()
def token_accuracy(
    model: Any, processor: Qwen2VLProcessor, examples: Sequence[vqa.Example], batch: int = 16
) -> dict[str, float]:
    """How well the visual tokens' own outputs name their cells (the auxiliary task of `dense_labels`).

    A cell with K words counts each word as right if it is among the output's top K tokens. Words are
    grouped by kind: ``background``, ``colour`` and ``shape`` (of objects), ``digit``, ``stripes`` and
    ``cell`` (the named cell). This tells apart a model whose visual tokens do not carry a detail from
    one whose answer position does not read it.

    Args:
        model: A trained model.
        processor: Its processor.
        examples: Pictures to look at (their questions do not matter).
        batch: Batch size.

    Returns:
        Kind -> share of right words (kinds that never occur are left out).
    """
    right: dict[str, list[int]] = {}
    for k in range(0, len(examples), batch):
        part = examples[k : k + batch]
        inputs = encode(processor, part)
        target = dense_labels(processor, part, inputs["input_ids"])
        top = model(**inputs).logits.topk(target.shape[-1], -1).indices
        for b, i in (target[..., 0] >= 0).nonzero().tolist():
            ids = [t for t in target[b, i].tolist() if t >= 0]
            guessed = set(top[b, i, : len(ids)].tolist())
            for word, t in zip(processor.tokenizer.convert_ids_to_tokens(ids), ids):
                kind = ("background" if word in vqa.BACKGROUNDS else "colour" if word in vqa.COLOURS
                        else "shape" if word in vqa.SHAPES else "stripes" if word in vqa.STRIPES
                        else "cell" if word in vqa.POSITIONS else "digit")
                right.setdefault(kind, []).append(t in guessed)
    return {kind: sum(v) / len(v) for kind, v in right.items()}


def training_pictures(cfg: TrainConfig, step: int) -> list[vqa.Example]:
    """The ``train``-split examples of one step: the next ``cfg.batch`` of the types in ``cfg.pictures``.

    Args:
        cfg: The recipe.
        step: The optimiser step (0-based).

    Returns:
        ``cfg.batch`` examples; with ``cfg.pictures`` empty, examples ``step * batch`` onwards of the
        split, else the split's examples of the pattern's types in the pattern's proportions, each
        type's in the split's order and none twice.

    Raises:
        ValueError: If ``cfg.pictures`` names an unknown question type.
    """
    if not cfg.pictures:
        return vqa.make_examples(cfg.batch, seed=cfg.seed, split="train", start=step * cfg.batch)
    pattern = [t.strip() for t in cfg.pictures.split(",")]
    unknown = sorted(set(pattern) - set(vqa.QTYPES))
    if unknown:
        raise ValueError(f"pictures names unknown question types {unknown}; expected some of {vqa.QTYPES}")
    # Examples cycle through QTYPES, so the n-th example of type t sits at index 7 * n + QTYPES.index(t).
    # The pattern repeats; a type named m times in it takes m of its examples per repetition.
    times = {t: pattern.count(t) for t in pattern}
    out = []
    for j in range(step * cfg.batch, (step + 1) * cfg.batch):
        rep, slot = divmod(j, len(pattern))
        t = pattern[slot]
        n = rep * times[t] + pattern[:slot].count(t)
        out += vqa.make_examples(1, seed=cfg.seed, split="train", start=len(vqa.QTYPES) * n + vqa.QTYPES.index(t))
    return out


def _loss(model: Any, batch: BatchFeature, examples: Sequence[vqa.Example], processor: Qwen2VLProcessor,
          dense: float, balance: float = 0.0, segments: float = 0.0,
          segment_head: torch.nn.Module | None = None) -> torch.Tensor:
    if segments and segment_head is None:
        raise ValueError("segments > 0 needs a segment_head")
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    merged: list[torch.Tensor] = []
    hook = (model.model.visual.merger.register_forward_hook(lambda _m, _i, out: merged.append(out))
            if segments else None)
    try:
        logits = model(**inputs).logits.float()
    finally:
        if hook is not None:
            hook.remove()
    ce = torch.nn.functional.cross_entropy
    # Position i predicts token i + 1, as the library's loss does.
    loss = ce(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    if dense:
        # The visual token's own output (no shift) is scored against a uniform distribution over its
        # cell's words: the soft cross-entropy -(1/K) sum_k log p(word_k), averaged over the tokens.
        target = dense_labels(processor, examples, batch["input_ids"])
        valid = target >= 0
        logp = logits.log_softmax(-1).gather(-1, target.clamp_min(0)) * valid
        per_token = -logp.sum(-1) / valid.sum(-1).clamp_min(1)
        present = valid.any(-1)
        if balance:
            kinds = _token_kinds(processor)[target[..., 0].clamp_min(0)][present]
            share = torch.bincount(kinds, minlength=4).float() / kinds.numel()
            weight = share[kinds] ** -balance
            loss = loss + dense * (per_token[present] * weight).sum() / weight.sum()
        else:
            loss = loss + dense * per_token[present].mean()
    if segments:
        merge = model.config.vision_config.spatial_merge_size
        loss = loss + segments * _segment_loss(segment_head(merged[0].float()), examples, batch, merge)
    return loss


def _segment_loss(predicted: torch.Tensor, examples: Sequence[vqa.Example], batch: BatchFeature,
                  merge: int) -> torch.Tensor:
    """Binary cross-entropy of per-token segment logits against `tokcomp.vqa.segment_labels`, near the digit.

    The merger's rows are each picture's merged tokens in turn, row-major over its grid of
    ``grid_h / merge`` cells a side.
    """
    bits, near = [], []
    for example, (_, gh, _) in zip(examples, batch["image_grid_thw"].tolist()):
        b, n = vqa.segment_labels(example.scene, gh // merge)
        bits.append(torch.from_numpy(b))
        near.append(torch.from_numpy(n))
    target, where = torch.cat(bits).float(), torch.cat(near)
    return torch.nn.functional.binary_cross_entropy_with_logits(predicted[where], target[where])


def _additive_mask(mask: torch.Tensor) -> torch.Tensor:
    """A 4-D bool mask (True: attend) as the additive float mask eager attention expects.

    Eager attention adds a 4-D mask to the scores as it is, so a bool one would add 0 and 1; a 2-D
    padding mask goes through the library's own mask building and is returned unchanged.
    """
    if mask.ndim != 4 or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)


def _token_kinds(processor: Qwen2VLProcessor) -> torch.Tensor:
    """Vocabulary id -> kind of a cell's first word: 0 background, 1 object, 2 digit, 3 stripes."""
    kinds = torch.zeros(len(processor.tokenizer), dtype=torch.long)
    for words, kind in ((vqa.COLOURS, 1), ([str(d) for d in range(10)], 2), (vqa.STRIPES, 3)):
        kinds[processor.tokenizer.convert_tokens_to_ids(list(words))] = kind
    return kinds


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _accuracy(predictions: list[str], examples: Sequence[vqa.Example]) -> dict[str, float]:
    acc: dict[str, float] = {}
    for q in vqa.QTYPES:
        pairs = [(p, e.answer) for p, e in zip(predictions, examples) if e.qtype == q]
        if pairs:
            acc[q] = sum(p == a for p, a in pairs) / len(pairs)
    acc["all"] = sum(p == e.answer for p, e in zip(predictions, examples)) / max(1, len(examples))
    return acc


def train(
    cfg: TrainConfig,
    out: str | Path | None = None,
    *,
    eval_examples: int = 0,
    log: Callable[[str], None] | None = print,
    log_every: int = 25,
    eval_every: int = 0,
) -> tuple[Qwen2VLForConditionalGeneration, Qwen2VLProcessor, TrainResult]:
    """Trains a model from scratch on the task's ``train`` split.

    Args:
        cfg: The recipe.
        out: Folder to save the checkpoint into (model, tokenizer, image processor, ``training.json``);
            nothing is saved if ``None``.
        eval_examples: Held-out (``split="test"``, seed 0) examples to score at the end with `predict`.
        log: Where progress lines go (``None``: silent).
        log_every: Steps between progress lines.
        eval_every: Steps between held-out checks on 70 examples (0: none), for tuning.

    The thread count is set to ``cfg.threads`` while training and restored afterwards, and the caller's
    ``torch`` random state is left as it was.

    Returns:
        The model (eval mode), its processor and a `TrainResult`.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            return _train(cfg, out, eval_examples, log, log_every, eval_every)
    finally:
        torch.set_num_threads(threads)


def _train(
    cfg: TrainConfig,
    out: str | Path | None,
    eval_examples: int,
    log: Callable[[str], None] | None,
    log_every: int,
    eval_every: int,
) -> tuple[Qwen2VLForConditionalGeneration, Qwen2VLProcessor, TrainResult]:
    torch.manual_seed(cfg.seed)
    processor = build_processor()
    model = Qwen2VLForConditionalGeneration(model_config(cfg))
    init_weights(model)
    model.generation_config.pad_token_id = _PAD_ID
    model.generation_config.bos_token_id = _BOS_ID
    model.generation_config.eos_token_id = _EOS_ID
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    segment_head = None
    if cfg.segments:
        # Training-only, and drawn after the model, so the model starts from the same weights as without it.
        segment_head = torch.nn.Linear(cfg.hidden, len(vqa.SEGMENT_NAMES))
        opt.add_param_group({"params": list(segment_head.parameters()), "weight_decay": 0.0})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    if cfg.bf16:
        # On this CPU a training step's forward and backward took 192 ms in bf16 with eager attention,
        # 255 ms with sdpa (its CPU kernel gains little from bf16) and 286 ms in fp32.
        model.set_attn_implementation("eager")
    model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        examples = training_pictures(cfg, step)
        extra = [extra_questions(e, cfg.seed, cfg.per_type, balanced=cfg.balanced) if cfg.extra else []
                 for e in examples]
        if cfg.shared:
            asked = [[(e.question, e.answer), *more] for e, more in zip(examples, extra)]
            batch = encode_shared(processor, examples, asked)
        else:
            batch = encode(processor, examples, with_answer=True, extra=extra)
        if cfg.bf16:
            batch["attention_mask"] = _additive_mask(batch["attention_mask"])
        with torch.autocast("cpu", dtype=torch.bfloat16) if cfg.bf16 else contextlib.nullcontext():
            loss = _loss(model, batch, examples, processor, cfg.dense, cfg.balance, cfg.segments, segment_head)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log and (step % log_every == 0 or step == cfg.steps - 1):
            recent = losses[-log_every:]
            log(f"step {step:5d}  loss {sum(recent) / len(recent):.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                f"{time.perf_counter() - t0:7.1f}s")
        if log and eval_every and (step + 1) % eval_every == 0:
            model.eval()
            probe = vqa.make_examples(140, seed=0, split="test", start=10_000)
            acc = _accuracy(predict(model, processor, probe), probe)
            model.train()
            log("  probe: " + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()))
    seconds = time.perf_counter() - t0
    if cfg.bf16:
        model.set_attn_implementation("sdpa")
    model.eval()
    accuracy: dict[str, float] = {}
    if eval_examples:
        held_out = vqa.make_examples(eval_examples, seed=0, split="test")
        accuracy = _accuracy(predict(model, processor, held_out), held_out)
        if log:
            log("held-out accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))
    result = TrainResult(cfg, losses, seconds, accuracy, eval_examples)
    if out is not None:
        save_checkpoint(model, processor, out, result)
    return model, processor, result


def save_checkpoint(
    model: Qwen2VLForConditionalGeneration, processor: Qwen2VLProcessor, out: str | Path, result: TrainResult
) -> Path:
    """Saves the model (safetensors), tokenizer, image processor and ``training.json`` into ``out``.

    The processor is saved as its two parts: ``ProcessorMixin.save_pretrained`` fails without
    torchvision when there is no video processor (``video_processor=None``), and `load_checkpoint`
    rebuilds the processor from the parts.

    Args:
        model: The model.
        processor: Its processor.
        out: The folder (created if needed).
        result: What training did (written to ``training.json``).

    Returns:
        The folder.
    """
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.tokenizer.save_pretrained(path)
    processor.image_processor.save_pretrained(path)
    info = {**asdict(result), "losses": [round(v, 5) for v in result.losses]}
    info["torch"] = torch.__version__
    (path / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    return path


def load_checkpoint(path: str | Path) -> tuple[Qwen2VLForConditionalGeneration, Qwen2VLProcessor]:
    """Loads a folder written by `train` (or `save_checkpoint`).

    Args:
        path: The checkpoint folder.

    Returns:
        ``(model, processor)``: the model in eval mode (fp32, ``sdpa``) and its ``Qwen2VLProcessor``.

    Raises:
        FileNotFoundError: If ``path`` holds no ``config.json``.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint folder (no config.json); train one with "
                                "`python -m tokcomp.train --out DIR`")
    model = Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    return model.eval(), build_processor(tokenizer, image_processor)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tokcomp.train``: train and save a checkpoint."""
    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog="python -m tokcomp.train", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    for name, value in asdict(defaults).items():
        kind = (lambda v: v.lower() in ("1", "true", "yes")) if isinstance(value, bool) else type(value)
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value)
    p.add_argument("--eval", type=int, default=350, help="held-out examples to score at the end")
    p.add_argument("--eval-every", type=int, default=0, help="steps between held-out probes (tuning)")
    p.add_argument("--log-every", type=int, default=25)
    args = p.parse_args(argv)
    cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    train(cfg, args.out, eval_examples=args.eval, eval_every=args.eval_every, log_every=args.log_every)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
