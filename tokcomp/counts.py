"""Token counts known before the encoder runs: what a schedule leaves of each image or video at the LLM input.

A serving engine sizes the placeholder runs of a prompt before the vision encoder runs (vLLM fixes them at
preprocessing). Encoder- and projector-site stages change that size, so it must be known from the item's
grid and the schedule alone. Each `tokcomp.contracts.VisualStrategy` says how its output size follows from
its input (`VisualStrategy.output_shape`; OIM, downsample and ToMe do), and each adapter applies its own
rules around the stages (`Adapter.predict_tokens`: Qwen's 2x2 merger, InternVL's pixel shuffle,
LLaVA-OneVision's stitching, pooling and newline tokens). This module composes them in schedule order.

LLM-site stages never change the number of tokens that *enter* the LLM (they remove tokens between
layers), so they are ignored here. A vision stage whose output size depends on the data is refused by name
with its reason (`CountError`); so is an item whose architecture makes the count data-dependent (the
AnyRes crop of merged LLaVA-OneVision tiles).

Examples:
    >>> import tokcomp as tc
    >>> from tokcomp import counts, testing
    >>> from tokcomp.contracts import CountItem
    >>> from tokcomp.strategies import OIM
    >>> model = testing.tiny_model("qwen2_vl")
    >>> schedule = tc.Schedule([tc.Stage(OIM(rate=0.5), site="encoder", layers=[0])])
    >>> counts.item_tokens(model, schedule, CountItem("image", (1, 8, 12)))
    TokenCount(visual=12, placeholders=12)
"""

from __future__ import annotations

from typing import Any

from .contracts import Adapter, CountItem, ItemShape, ShapeFn, ShapeStep, TokenCount, VisualStrategy
from .errors import ScheduleError
from .schedule import ResolvedStage, Schedule

__all__ = ["CountError", "check_predictable", "item_tokens", "shape_functions", "visual_tokens"]


class CountError(ScheduleError):
    """The number of tokens an item will have cannot be known before the encoder runs (the message names
    the stage or the architecture rule and says why)."""


def _adapter(model_or_adapter: Any) -> Adapter:
    if isinstance(model_or_adapter, Adapter):
        return model_or_adapter
    from .runtime import find_adapter

    return find_adapter(model_or_adapter)


def _stages(adapter: Adapter, schedule: Any) -> list[ResolvedStage]:
    return Schedule.coerce(schedule).resolve(adapter)


def check_predictable(model_or_adapter: Any, schedule: Any) -> None:
    """Raise `CountError` unless every encoder/projector stage of ``schedule`` can say its output size.

    Args:
        model_or_adapter: A supported model, or its adapter.
        schedule: A `tokcomp.Schedule`, a preset name, a file ... (anything `tokcomp.compress` takes).

    Raises:
        CountError: Naming the first stage whose size depends on the data, with the strategy's reason.
    """
    adapter = _adapter(model_or_adapter)
    for stage in _stages(adapter, schedule):
        if stage.site == "llm":
            continue
        probe = ItemShape(1, 4 * max(1, adapter.grid_multiple), 4 * max(1, adapter.grid_multiple))
        _apply(stage, probe, _step(adapter, stage, stage.layers[0]))


def _step(adapter: Adapter, stage: ResolvedStage, layer: int) -> ShapeStep:
    if stage.site == "encoder":
        return ShapeStep("encoder", layer, adapter.num_vision_blocks, stage.layers, adapter.grid_multiple)
    depth = adapter.num_vision_blocks
    return ShapeStep("projector", depth, depth, stage.layers, 1)


def _apply(stage: ResolvedStage, shape: ItemShape, step: ShapeStep) -> ItemShape:
    strategy = stage.strategy
    name = type(strategy).name
    if not isinstance(strategy, VisualStrategy):
        raise CountError(f"stage {stage.index} ({name} at site {stage.site!r}) is not a vision-side strategy")
    try:
        out = strategy.output_shape(shape, step)
    except ScheduleError as exc:
        raise CountError(f"stage {stage.index} ({name} at site {stage.site!r}): {exc}") from None
    if out is None:
        raise CountError(
            f"stage {stage.index} ({name} at site {stage.site!r}): the number of tokens it leaves cannot be "
            f"known before the encoder runs: {strategy.count_reason}. Serve this schedule with transformers, "
            "or use a stage whose size follows from the grid (oim, downsample, tome)"
        )
    if out.is_grid and step.multiple > 1 and (out.h % step.multiple or out.w % step.multiple):
        raise CountError(
            f"stage {stage.index} ({name}) would leave a {out.h}x{out.w} grid; the projector needs sides "
            f"divisible by {step.multiple}"
        )
    return out


def shape_functions(model_or_adapter: Any, schedule: Any) -> tuple[ShapeFn, ShapeFn]:
    """The schedule's encoder and projector stages as two functions on `ItemShape` (what the runtime does
    to an item's token grid, on sizes only).

    The encoder function runs the blocks in ascending order and, at each block, the stages scheduled there
    in schedule order, as the runtime does; the projector function runs the projector-site stages in order.

    Args:
        model_or_adapter: A supported model, or its adapter.
        schedule: Anything `tokcomp.compress` takes.

    Returns:
        ``(encoder, projector)``.

    Raises:
        CountError: A stage cannot say its output size (raised when the function meets it).
    """
    adapter = _adapter(model_or_adapter)
    stages = _stages(adapter, schedule)
    enc = [s for s in stages if s.site == "encoder"]
    proj = [s for s in stages if s.site == "projector"]
    blocks = sorted({b for s in enc for b in s.layers})

    def encoder(shape: ItemShape) -> ItemShape:
        for block in blocks:
            for stage in enc:
                if block in stage.layers:
                    shape = _apply(stage, shape, _step(adapter, stage, block))
        return shape

    def projector(shape: ItemShape) -> ItemShape:
        for stage in proj:
            shape = _apply(stage, shape, _step(adapter, stage, 0))
        return shape

    return encoder, projector


def _predict(adapter: Adapter, item: CountItem, encoder: ShapeFn, projector: ShapeFn) -> TokenCount:
    try:
        return adapter.predict_tokens(item, encoder, projector)
    except CountError:
        raise
    except ScheduleError as exc:
        raise CountError(f"the {adapter.name!r} adapter, {item.kind} {item.grid}: {exc}") from None
    except NotImplementedError as exc:  # an adapter (a plugin's, say) without count functions
        raise CountError(f"{exc}: implement Adapter.predict_tokens to size its items in advance") from None


def item_tokens(model_or_adapter: Any, schedule: Any, item: CountItem) -> TokenCount:
    """The tokens one image or video will put in front of the LLM under ``schedule``.

    Args:
        model_or_adapter: A supported model, or its adapter.
        schedule: Anything `tokcomp.compress` takes.
        item: The item, in the adapter's units (`tokcomp.contracts.CountItem`; `visual_tokens` reads them off
            a processor output).

    Returns:
        Its visual tokens and its placeholder slots (`TokenCount`).

    Raises:
        CountError: The count depends on the data (a stage, or the architecture's rule for this item).
    """
    adapter = _adapter(model_or_adapter)
    encoder, projector = shape_functions(adapter, schedule)
    return _predict(adapter, item, encoder, projector)


def visual_tokens(model_or_adapter: Any, schedule: Any, inputs: Any) -> list[list[TokenCount]]:
    """Per sample, per item (prompt order), the tokens each image or video will put in front of the LLM.

    Nothing runs: the items are read off the processor's output (``image_grid_thw``, ``image_sizes``,
    the placeholder runs of ``input_ids`` ...) by the adapter's `Adapter.count_items`.

    Args:
        model_or_adapter: A supported model, or its adapter.
        schedule: Anything `tokcomp.compress` takes.
        inputs: A processor output (``BatchFeature``) or the keyword arguments of a model call.

    Returns:
        ``[sample][item]`` `TokenCount`.

    Raises:
        CountError: Some item's count depends on the data.
    """
    adapter = _adapter(model_or_adapter)
    encoder, projector = shape_functions(adapter, schedule)
    try:
        items = adapter.count_items(dict(inputs))
    except NotImplementedError as exc:
        raise CountError(f"{exc}: implement Adapter.count_items, or call item_tokens per item") from None
    return [[_predict(adapter, it, encoder, projector) for it in sample] for sample in items]
