"""What the runtime needs to follow ``generate()`` and the scoring forward: batch expansion and labels.

**Batch expansion.** For beam search and ``num_return_sequences=k``, ``generate()`` runs the vision tower
once on the user's batch (the features become ``mm_encoder_outputs``) and only then repeats every sample
``k`` times (``_expand_inputs_for_generation``: ``input_ids``, the masks, the positions and the features).
The tower's results therefore describe the samples, not the rows the language model receives. The runtime
watches that expansion (an instance attribute over the model's own method, removed when the ``with`` block
ends) and, at the prefill that follows, builds the LLM input of the unique samples from a call restricted to
them (`restrict_rows`), then repeats it for the copies (`llm_input_expanded`). Releases that expand the
pixels before the tower runs (the tower then sees every copy) need nothing of this.

**Labels.** A compressed forward returns fewer positions than it was given. ``labels`` are compacted
exactly like the sequence (`compact_labels`), and the loss is the model's own loss function on the
compacted logits and labels. See "Outputs under compression" in the docs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .contracts import LLMInput
from .errors import RuntimeStateError

__all__ = [
    "IGNORE_INDEX",
    "Expansion",
    "InstanceAttribute",
    "compact_labels",
    "llm_input_expanded",
    "restrict_rows",
    "watch_expansion",
]

IGNORE_INDEX = -100
"""The label `transformers`' loss functions ignore; removed and dead slots get it."""


@dataclass
class Expansion:
    """``generate()`` repeated every sample ``size`` times after the vision tower ran.

    Attributes:
        size: Rows per sample (``max(num_beams, num_return_sequences)``).
        features: Per modality, the ``pooler_output`` of ``mm_encoder_outputs`` before the expansion.
    """

    size: int
    features: dict[str, Any]


class InstanceAttribute:
    """Removes an attribute set on one object (a handle like torch's hook handles)."""

    def __init__(self, obj: Any, name: str) -> None:
        self.obj, self.name = obj, name

    def remove(self) -> None:
        """Delete the attribute (the class's own definition shows through again)."""
        self.obj.__dict__.pop(self.name, None)


def watch_expansion(model: nn.Module, seen: Callable[[Expansion], None]) -> InstanceAttribute | None:
    """Report to ``seen`` every expansion of precomputed features ``generate()`` makes on ``model``.

    Returns:
        The handle that removes the watch, or None when the model has no ``_expand_inputs_for_generation``.
    """
    own = getattr(model, "_expand_inputs_for_generation", None)
    if own is None:
        return None

    def expand(*args: Any, **kwargs: Any) -> Any:
        size = int(kwargs.get("expand_size", args[0] if args else 1))
        mm = kwargs.get("mm_encoder_outputs")
        if size > 1 and isinstance(mm, dict) and mm:
            # the features were computed before the expansion; keep them as they are (expanded in place below)
            seen(Expansion(size, {m: o.pooler_output for m, o in mm.items()
                                  if getattr(o, "pooler_output", None) is not None}))
        return own(*args, **kwargs)

    model._expand_inputs_for_generation = expand
    return InstanceAttribute(model, "_expand_inputs_for_generation")


def _rows(value: Any, key: str, batch: int, k: int) -> Any:
    """``value`` restricted to every ``k``-th batch row (positions of M-RoPE carry the batch in dim 1)."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    if key == "position_ids" and value.dim() == 3 and value.shape[1] == batch:
        return value[:, ::k]
    if value.shape[0] == batch:
        return value[::k]
    return value


def _repeat(value: Any, key: str, k: int) -> Any:
    """The inverse of `_rows`: every batch row repeated ``k`` times."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    dim = 1 if key == "position_ids" and value.dim() == 3 else 0
    return value.repeat_interleave(k, dim=dim)


def restrict_rows(call: dict[str, Any], expansion: Expansion) -> dict[str, Any]:
    """The model call as it was before ``generate()`` expanded it: one row per sample, and the features
    ``mm_encoder_outputs`` held before they were repeated.

    Raises:
        RuntimeStateError: The rows of a sample are not copies of each other.
    """
    ids: torch.Tensor = call["input_ids"]
    k = expansion.size
    B = int(ids.shape[0])
    if B % k or not torch.equal(ids.view(B // k, k, -1), ids[::k, None].expand(B // k, k, ids.shape[1])):
        raise RuntimeStateError(
            f"generate() expanded the batch {k}-fold after encoding the images, but the {B} rows of the prefill "
            "are not groups of identical copies; tokcomp cannot tell which images each row holds"
        )
    out = {key: _rows(v, key, B, k) for key, v in call.items()}
    mm = call.get("mm_encoder_outputs")
    if isinstance(mm, dict):
        restored = {}
        for modality, output in mm.items():
            if modality in expansion.features:
                output = copy.copy(output)
                output.pooler_output = expansion.features[modality]
            restored[modality] = output
        out["mm_encoder_outputs"] = restored
    return out


def llm_input_expanded(
    llm_input: Callable[[dict[str, Any], dict[str, Any]], LLMInput],
    call: dict[str, Any],
    lm_kwargs: dict[str, Any],
    expansion: Expansion,
) -> LLMInput:
    """``llm_input`` computed for the unique samples, then repeated for the copies ``generate()`` made.

    What the adapter writes into the restricted language-model kwargs (e.g. new ``inputs_embeds``) is
    repeated back into ``lm_kwargs``.
    """
    k = expansion.size
    B = int(call["input_ids"].shape[0])
    sub_call = restrict_rows(call, expansion)
    sub_lm = {key: _rows(v, key, B, k) for key, v in lm_kwargs.items()}
    given = dict(sub_lm)
    inp = llm_input(sub_call, sub_lm)
    for key, value in sub_lm.items():
        if given.get(key) is not value:
            lm_kwargs[key] = _repeat(value, key, k)
    return LLMInput(
        layouts=[lay for lay in inp.layouts for _ in range(k)],
        keep=inp.keep.repeat_interleave(k, dim=0),
        position_ids=None if inp.position_ids is None else _repeat(inp.position_ids, "position_ids", k),
        decode_shift=None if inp.decode_shift is None else inp.decode_shift.repeat_interleave(k, dim=0),
    )


def compact_labels(labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``labels`` (B, L) compacted like the sequence: slot ``s`` of row ``b`` gets the label of the original
    position ``positions[b, s]``.

    `IGNORE_INDEX` goes where the slot is dead (``positions < 0``) and right after a dead slot: the loss
    predicts slot ``s`` from the logits of slot ``s - 1``, and a dead slot holds no token.
    """
    idx = positions.to(labels.device)
    dead = idx < 0
    out = labels.gather(1, idx.clamp(min=0)).masked_fill(dead, IGNORE_INDEX)
    out[:, 1:] = out[:, 1:].masked_fill(dead[:, :-1], IGNORE_INDEX)
    return out
