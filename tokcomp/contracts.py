"""The contracts strategies and adapters meet through.

A *strategy* (a compression method) never sees a model class; an *adapter* (an architecture) never names a
strategy. The runtime in `tokcomp.runtime` connects them: the adapter says where the visual tokens and the
layers are, the runtime builds a view of the tokens for the strategy, and applies the strategy's decision.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import nn

from .errors import ScheduleError

__all__ = [
    "SITES",
    "Adapter",
    "AttentionParts",
    "AttentionSite",
    "CountItem",
    "EncoderAttention",
    "ItemShape",
    "LLMDecision",
    "LLMStrategy",
    "LLMView",
    "PackedGrid",
    "Projections",
    "SampleLayout",
    "ShapeStep",
    "Site",
    "StagePlacement",
    "Strategy",
    "TokenCount",
    "VisualItem",
    "VisualStrategy",
]

Site = Literal["encoder", "projector", "llm"]
"""Where a stage runs: inside the vision encoder, on the projector's output, or between LLM layers."""
SITES: tuple[str, ...] = ("encoder", "projector", "llm")
"""The sites, in data-flow order."""


class StagePlacement(Protocol):
    """Where a stage runs, as `Strategy.validate` reads it (`tokcomp.Stage` is one).

    Declared here rather than importing `tokcomp.schedule.Stage`, so that the contracts import nothing
    of the schedule layer built on them (the schedule imports the contracts, not the other way round).

    Attributes:
        site: ``"encoder"``, ``"projector"`` or ``"llm"``.
        layers: The stage's layers, or None for the strategy's default.
    """

    site: str
    layers: list[int] | None


@dataclass(frozen=True)
class VisualItem:
    """One image or video in a sample, as its tokens enter the LLM.

    Attributes:
        kind: ``"image"`` or ``"video"``.
        grid: ``(t, h, w)`` of the item's tokens as they enter the LLM (after the projector's merge).
        start: Offset of the item's first token among the sample's visual tokens.
        count: Number of visual tokens of the item (``t * h * w`` unless the architecture adds extras).
    """

    kind: str
    grid: tuple[int, int, int]
    start: int
    count: int


@dataclass
class SampleLayout:
    """Where one sample's visual tokens are in its input sequence.

    Attributes:
        positions: ``(n,)`` sequence indices of the visual tokens, ascending.
        items: The images/videos, in sequence order; their ``start``/``count`` partition ``0..n-1``.
        coords: ``(n, 3)`` long tensor, each token's ``(t, row, col)`` inside its item's grid.
        item_of: ``(n,)`` long tensor, the index into ``items`` of each token.
    """

    positions: torch.Tensor
    items: list[VisualItem]
    coords: torch.Tensor
    item_of: torch.Tensor

    @property
    def num_visual(self) -> int:
        """Number of visual tokens in the sample."""
        return int(self.positions.numel())

    @classmethod
    def from_items(cls, positions: torch.Tensor, items: Sequence[VisualItem]) -> SampleLayout:
        """Build a layout whose tokens are laid out in raster order ``(t, row, col)`` inside each item."""
        coords, item_of = [], []
        for i, item in enumerate(items):
            t, h, w = item.grid
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            c = torch.stack([tt.flatten(), hh.flatten(), ww.flatten()], dim=1)
            if c.shape[0] != item.count:
                raise ValueError(f"item {i} has grid {item.grid} but {item.count} tokens")
            coords.append(c)
            item_of.append(torch.full((item.count,), i, dtype=torch.long))
        dev = positions.device
        if coords:
            return cls(positions, list(items), torch.cat(coords).to(dev), torch.cat(item_of).to(dev))
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        return cls(positions, [], empty.view(0, 3), empty)


@dataclass
class Projections:
    """A decoder layer's own query/key projections of one sample's current tokens (computed on request).

    All tensors cover the sample's valid tokens present at the layer's input, in sequence order.

    Attributes:
        q: ``(H, N, d)`` queries before RoPE.
        k: ``(H_kv, N, d)`` keys before RoPE.
        q_rope: ``(H, N, d)`` queries after RoPE.
        k_rope: ``(H_kv, N, d)`` keys after RoPE.
        visual: ``(N,)`` bool, which of the N tokens are the visual tokens of the view (same order).
        hidden: ``(N, D)`` the residual-stream hidden states entering the layer (before its norm).
        scaling: The attention's softmax scale (usually ``d ** -0.5``).
        sequence_index: ``(N,)`` long, each token's index in the sample's sequence as it entered the LLM,
            padding not counted (what a batch-1 reference implementation calls the token's absolute index).
            Filled by the runtime; None from code that builds projections by hand.
    """

    q: torch.Tensor
    k: torch.Tensor
    q_rope: torch.Tensor
    k_rope: torch.Tensor
    visual: torch.Tensor
    hidden: torch.Tensor
    scaling: float
    sequence_index: torch.Tensor | None = None


@dataclass
class LLMView:
    """What an LLM-site strategy sees of one sample before decoder layer ``layer``.

    Attributes:
        layer: Index of the decoder layer whose input is being reduced (0-based).
        num_layers: Depth of the LLM.
        stage_layers: The sorted layers of the stage this call belongs to.
        hidden: ``(n, D)`` the visual tokens still present, in their original order.
        text_hidden: ``(m, D)`` the sample's other (non-visual, non-padding) tokens.
        index: ``(n,)`` each present token's index among the sample's *original* visual tokens.
        sizes: ``(n,)`` float, how many original visual tokens each present token stands for.
        layout: The sample's original visual layout (items, grids, coordinates).
        sample: Row of the batch this view belongs to (for bookkeeping only: decisions must not depend on
            it, or a batch would differ from its samples run alone).
    """

    layer: int
    num_layers: int
    stage_layers: tuple[int, ...]
    hidden: torch.Tensor
    text_hidden: torch.Tensor
    index: torch.Tensor
    sizes: torch.Tensor
    layout: SampleLayout
    sample: int
    _scores: Callable[[str], torch.Tensor] | None = field(default=None, repr=False)
    _projections: Callable[[], Projections] | None = field(default=None, repr=False)
    _previous_projections: Callable[[], Projections] | None = field(default=None, repr=False)
    _final_norm: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)

    @property
    def num_present(self) -> int:
        """Number of visual tokens present at this layer's input."""
        return int(self.index.numel())

    @property
    def num_original(self) -> int:
        """Number of visual tokens the sample had when it entered the LLM."""
        return self.layout.num_visual

    @property
    def coords(self) -> torch.Tensor:
        """``(n, 3)`` ``(t, row, col)`` of each present token in its item's grid."""
        return self.layout.coords[self.index]

    @property
    def item_of(self) -> torch.Tensor:
        """``(n,)`` item index of each present token."""
        return self.layout.item_of[self.index]

    def attention_scores(self, query: str = "last") -> torch.Tensor:
        """Head-averaged attention probability each present visual token receives.

        Computed by the runtime from the previous layer's own q/k projections (the layer whose output
        enters ``layer``), never from a materialised attention matrix of the model.

        Args:
            query: ``"last"``: the last valid token's query row (FastV's code); ``"mean"``: the mean over
                every valid query row of the probability it gives each key (FastV's paper).

        Returns:
            ``(n,)`` float32 scores.
        """
        if self._scores is None:
            raise RuntimeError("this strategy did not declare needs_scores=True, so no scores were prepared")
        return self._scores(query)

    def projections(self) -> Projections:
        """This layer's own q/k projections of the sample's tokens (see `Projections`)."""
        if self._projections is None:
            raise RuntimeError("projections are not available in this view")
        return self._projections()

    def previous_projections(self) -> Projections:
        """The *previous* layer's q/k projections (the layer whose output enters ``layer``) of the same tokens,
        in the same order as `projections`: computed from that layer's own input norm, q/k projections and
        RoPE on its input. ``hidden`` is that layer's input. Needs ``needs_previous_projections=True``."""
        if self._previous_projections is None:
            raise RuntimeError(
                "this strategy did not declare needs_previous_projections=True, so the previous layer's input "
                "was not kept"
            )
        return self._previous_projections()

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The LLM's final norm (the one before the LM head) applied to hidden states ``x`` ``(..., D)``."""
        if self._final_norm is None:
            raise RuntimeError("the final norm is not available in this view")
        return self._final_norm(x)


@dataclass
class LLMDecision:
    """What an LLM-site strategy decided for one sample.

    Attributes:
        keep: ``(k,)`` long tensor of indices into the view's present visual tokens, ascending. The others
            are removed from the sequence from this layer on.
        hidden: Optional ``(k, D)`` new hidden states of the kept tokens (a merge writes the cluster's value
            at its kept slot).
        sizes: Optional ``(k,)`` new sizes of the kept tokens. Sizes other than 1 switch on proportional
            attention (``log size`` added to the attention logits of those keys) in the layers that follow.
        members: Optional ``(n,)`` long, for a merge: for each present visual token of the view, the
            position in ``keep`` of the kept token it went into (a kept token goes into itself), ``-1``
            for a token dropped without merging. It says that ``hidden`` is the plain mean of each kept
            token's members, so that an adapter can merge what it adds to the tokens in later layers the
            same way (Qwen3-VL's DeepStack features, through `Adapter.tokens_merged`). Without it, a kept
            token's later inputs are its own.
        info: Free-form numbers the strategy wants in the report.
    """

    keep: torch.Tensor
    hidden: torch.Tensor | None = None
    sizes: torch.Tensor | None = None
    members: torch.Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)


class Strategy:
    """Base class of every compression method.

    Subclasses are dataclasses whose fields are the method's parameters. Class attributes declare what
    the method needs and where it may run; the schedule validator reads them.

    Attributes:
        name: The registered name (``Stage("name", ...)`` finds the class by it).
        sites: The sites the method can run at.
        needs_scores: The runtime must prepare attention scores (`LLMView.attention_scores`).
        needs_projections: The runtime must offer the layer's q/k (`LLMView.projections`).
        needs_previous_projections: The runtime must keep the previous layer's input, so that
            `LLMView.previous_projections` can recompute its q/k (the stage cannot run at layer 0).
        preserves_grid: Encoder/projector sites: the output is still a rectangular grid.
    """

    name: ClassVar[str] = ""
    sites: ClassVar[frozenset[str]] = frozenset()
    needs_scores: ClassVar[bool] = False
    needs_projections: ClassVar[bool] = False
    needs_previous_projections: ClassVar[bool] = False
    preserves_grid: ClassVar[bool] = True

    def check(self) -> None:
        """Validate the parameters on their own; raise `ScheduleError` saying what to change."""

    def default_layers(self, num_layers: int) -> list[int]:
        """Layers used when a stage gives none."""
        raise ScheduleError(f"strategy {self.name!r} has no default layers: pass layers=[...] to its Stage")

    def validate(self, stage: StagePlacement, adapter: Adapter) -> None:
        """Model-dependent checks, run by `tokcomp.compress` before anything runs."""

    def params(self) -> dict[str, Any]:
        """The strategy's parameters as a plain dict (for reports and schedule files)."""
        if dataclasses.is_dataclass(self):
            return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {}


class LLMStrategy(Strategy):
    """A strategy that runs at the ``llm`` site: it picks which visual tokens go on into a layer."""

    sites: ClassVar[frozenset[str]] = frozenset({"llm"})

    def select(self, view: LLMView) -> LLMDecision:
        """Decide, for one sample, which of its present visual tokens enter ``view.layer``."""
        raise NotImplementedError


@dataclass(frozen=True)
class EncoderAttention:
    """A request for attention inside the vision encoder, computed by the runtime from a block's own q/k.

    A `VisualStrategy` lists its requests in `VisualStrategy.attention_needs`; the runtime computes them while
    the tower runs (from the outputs of the block's query and key projections, with the block's own norms and
    rotary embedding, over the tokens each attention call of the block covers: one image or tile, one video
    frame, one attention window), never from ``output_attentions``, so every attention backend stays as the
    user chose it. The result reaches the strategy on each frame as `FrameGrid.attention`, one ``(H, h, w)``
    float32 tensor per request (one value per head and per token of the frame).

    Attributes:
        block: Encoder block whose attention is computed (0-based; the block's input is what its q/k see).
            At the ``encoder`` site it must come before the block the stage runs at.
        query: ``"cls"``: the CLS token's query row (the probability the CLS query gives each patch key;
            the softmax runs over every key of the call, the CLS key included); towers without a CLS token
            refuse it. ``"mean"``: the attention each token receives, the mean over all query rows of the
            frame (CLS included) of the probability they give it; in a windowed block a query outside the
            token's window gives it 0.
    """

    block: int
    query: str = "cls"

    def __post_init__(self) -> None:
        if self.query not in ("cls", "mean"):
            raise ScheduleError(f"EncoderAttention: query must be 'cls' or 'mean', got {self.query!r}")


@dataclass(frozen=True)
class AttentionSite:
    """Where a stage asks for encoder attention (the argument of `VisualStrategy.attention_needs`).

    Attributes:
        site: ``"encoder"`` or ``"projector"``.
        layer: The encoder block at whose input the stage runs (the projector: ``num_blocks``).
        num_blocks: Depth of the vision encoder.
        has_cls: The tower runs a CLS token in front of the patches (``EncoderAttention("cls")`` exists).
    """

    site: str
    layer: int
    num_blocks: int
    has_cls: bool


def check_attention_needs(label: str, strategy: Strategy, site: str, layers: Sequence[int], adapter: Adapter) -> None:
    """Raise a `ScheduleError` when a stage's `VisualStrategy.attention_needs` cannot be met on ``adapter``."""
    if not isinstance(strategy, VisualStrategy) or site not in ("encoder", "projector"):
        return
    depth = adapter.num_vision_blocks
    for layer in layers if site == "encoder" else (depth,):
        for need in strategy.attention_needs(AttentionSite(site, layer, depth, adapter.vision_has_cls)):
            if site not in adapter.encoder_attention_sites:
                where = sorted(adapter.encoder_attention_sites)
                raise ScheduleError(
                    f"{label}: needs the vision encoder's attention at the {site!r} site, which the "
                    f"{adapter.name!r} adapter cannot provide there"
                    + (f" (it can at {where})" if where else " (it provides no encoder attention)")
                )
            if not 0 <= need.block < depth or (site == "encoder" and need.block >= layer):
                limit = f"0..{layer - 1}" if site == "encoder" else f"0..{depth - 1}"
                raise ScheduleError(
                    f"{label}: asks for the attention of encoder block {need.block}, but at {site} block {layer} "
                    f"only blocks {limit} have run; move the stage to a later block"
                )
            if need.query == "cls" and not adapter.vision_has_cls:
                raise ScheduleError(
                    f"{label}: asks for the CLS query row of block {need.block}, but the {adapter.name!r} vision "
                    "tower has no CLS token; use query='mean' (the attention each token receives)"
                )


class VisualStrategy(Strategy):
    """A strategy that runs at the ``encoder`` and/or ``projector`` site on `tokcomp.tokens.VisualTokens`.

    Attributes:
        metric: ``"keys"`` asks the runtime for the previous block's attention keys (head-averaged) as
            each frame's ``metric``; ``"hidden"`` uses the hidden states; ``"auto"`` uses the keys where an
            earlier block exists and the hidden states at block 0 and at the projector (where there are no
            keys). ``"keys"`` at block 0 or at the projector site is refused at `tokcomp.compress`.
        proportional_attention: After a merge, the following encoder blocks add ``log size`` to the
            attention logits of each key.
    """

    sites: ClassVar[frozenset[str]] = frozenset({"encoder", "projector"})
    metric: str = "hidden"
    proportional_attention: bool = False

    count_reason: ClassVar[str] = "its output size depends on the data"
    """Why `output_shape` cannot say the size in advance (quoted when `tokcomp.counts` refuses a stage)."""

    def reduce(self, tokens: Any) -> Any:
        """Return a smaller `tokcomp.tokens.VisualTokens` (same items, fewer tokens per frame)."""
        raise NotImplementedError

    def attention_needs(self, where: AttentionSite) -> tuple[EncoderAttention, ...]:
        """The encoder attention the stage needs when it runs at ``where`` (site, block, tower); the runtime
        puts each on every frame as ``FrameGrid.attention[need]``.

        Validated at `tokcomp.compress` against the adapter (`Adapter.encoder_attention_sites`,
        `Adapter.vision_has_cls`). Default: none.
        """
        return ()

    def output_shape(self, shape: ItemShape, step: ShapeStep) -> ItemShape | None:
        """The shape `reduce` will return for an item of ``shape``, computed without any tensor.

        Strategies whose output size depends only on the input size and their parameters implement it, so
        that serving engines can size placeholder runs before the encoder runs (`tokcomp.counts`); the
        tests hold the runtime to it. Default: None, "not predictable" (then `count_reason` says why).

        Args:
            shape: The item's shape entering the stage (every frame has the same ``h x w``).
            step: Where the stage runs (site, block, the stage's blocks, the grid unit).

        Returns:
            The item's shape after the stage, or None when it depends on the data.
        """
        return None

    def validate(self, stage: StagePlacement, adapter: Adapter) -> None:
        """A grid-breaking strategy cannot feed a projector that needs the grid; keys need an earlier block."""
        if self.metric == "keys":
            if stage.site == "projector":
                raise ScheduleError(
                    f"{self.name!r}: metric='keys' reads an encoder block's attention keys, which do not exist at "
                    "the projector site; use metric='hidden' (or 'auto')"
                )
            layers = stage.layers if stage.layers is not None else self.default_layers(adapter.num_vision_blocks)
            if stage.site == "encoder" and 0 in layers:
                raise ScheduleError(
                    f"{self.name!r}: metric='keys' at encoder block 0: the keys come from the previous block, and "
                    "block 0 has none. Start the stage at block 1, or use metric='auto' (hidden states at block "
                    "0, keys after it) or metric='hidden'"
                )
        if not self.preserves_grid and stage.site == "encoder" and adapter.encoder_grid_reason:
            raise ScheduleError(
                f"{self.name!r} merges tokens without keeping the 2-D grid, but the {adapter.name!r} adapter "
                f"needs the grid after the encoder: {adapter.encoder_grid_reason}. Run it at site='projector', "
                "or use a grid-preserving strategy ('oim', 'downsample') in the encoder."
            )
        if not self.preserves_grid and stage.site == "encoder" and adapter.grid_multiple > 1:
            raise ScheduleError(
                f"{self.name!r} merges tokens without keeping the 2-D grid, but the {adapter.name!r} projector "
                f"needs a rectangular grid with sides divisible by {adapter.grid_multiple}. Run it at "
                "site='projector', or use a grid-preserving strategy ('oim', 'downsample') in the encoder."
            )
        if self.proportional_attention and stage.site == "encoder" and adapter.vision_attn_implementation.startswith(
            "flash"
        ):
            raise ScheduleError(
                f"{self.name!r}: proportional attention needs an additive bias, which flash attention in the "
                "vision tower cannot take; set proportional_attention=False or load the model with sdpa"
            )
        if type(self).attention_needs is VisualStrategy.attention_needs:
            return
        if stage.site == "encoder":
            blocks = stage.layers if stage.layers is not None else self.default_layers(adapter.num_vision_blocks)
        else:
            blocks = [adapter.num_vision_blocks]
        check_attention_needs(repr(self.name), self, stage.site, [int(b) for b in blocks], adapter)


def check_keep_ratio(name: str, value: float) -> None:
    """Raise a `ScheduleError` unless ``0 < value <= 1``."""
    if not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ScheduleError(
            f"{name}: keep_ratio must be in (0, 1], got {value!r}; it is the fraction of visual tokens KEPT "
            "(0.25 keeps a quarter). To drop every visual token use the 'vtw' strategy."
        )


@dataclass(frozen=True)
class AttentionParts:
    """The pieces of a decoder layer the runtime needs to compute scores without the model's attention.

    Attributes:
        norm: The layer's input norm (applied before q/k/v projections).
        q_proj: Query projection.
        k_proj: Key projection.
        num_heads: Query heads.
        num_kv_heads: Key/value heads.
        head_dim: Size of one head.
        scaling: Softmax scale.
        q_norm: Optional per-head norm applied to the queries before RoPE (Qwen3, Gemma 3), on ``head_dim``.
        k_norm: Optional per-head norm applied to the keys before RoPE.
    """

    norm: nn.Module
    q_proj: nn.Module
    k_proj: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None


class Adapter:
    """Base class of the per-architecture adapters.

    An adapter is built for one model instance. It tells the runtime where the LLM's decoder layers are,
    where each sample's visual tokens sit in the input sequence and what grid they form, and which
    constraints the architecture puts on a schedule.

    Attributes:
        name: The registered name.
        model_classes: Names of the `transformers` classes it supports (for error messages).
        sites: The sites this adapter can hook.
        grid_multiple: The projector's grid unit: encoder-side merges must keep grid sides divisible by it.
        encoder_grid_reason: Non-empty when what follows the encoder needs a 2-D grid even though the
            projector works per token (it says why, for the validator's message).
        priority: Where two adapters support the same model, the higher ``priority`` is chosen; on a tie a
            third-party adapter before a built-in one, then by name (`tokcomp.registry.adapter_order`).
        refused_classes: Model classes of a related family that the adapter knowingly does not drive, each
            with the reason; `tokcomp.find_adapter` raises it instead of a generic "unsupported" error.
        encoder_attention_sites: The sites at which the adapter computes `EncoderAttention` requests from
            its vision tower's own q/k (empty: it provides none; such stages are refused at compress()).
    """

    name: ClassVar[str] = ""
    model_classes: ClassVar[tuple[str, ...]] = ()
    refused_classes: ClassVar[dict[str, str]] = {}
    sites: ClassVar[frozenset[str]] = frozenset({"llm"})
    grid_multiple: ClassVar[int] = 1
    encoder_grid_reason: ClassVar[str] = ""
    priority: ClassVar[int] = 0
    encoder_attention_sites: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        """Whether this adapter can drive ``model``."""
        return type(model).__name__ in cls.model_classes

    # -- LLM -------------------------------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        """The bare decoder stack (embeddings, layers, final norm)."""
        raise NotImplementedError

    @property
    def decoder_layers(self) -> Sequence[nn.Module]:
        """The LLM's decoder layers, in order."""
        return self.language_model.layers

    @property
    def num_layers(self) -> int:
        """Depth of the LLM."""
        return len(self.decoder_layers)

    @property
    def attn_implementation(self) -> str:
        """The attention backend the LLM runs with (``sdpa``, ``eager``, ``flash_attention_2``, ...)."""
        return str(self.language_model.config._attn_implementation)

    @property
    def final_norm(self) -> nn.Module:
        """The LLM's final norm, applied to the last layer's output before the LM head."""
        return self.language_model.norm

    def attention_parts(self, layer: int) -> AttentionParts:
        """The norm and q/k projections of decoder layer ``layer``."""
        block = self.decoder_layers[layer]
        attn = block.self_attn
        cfg = self.language_model.config
        return AttentionParts(
            norm=block.input_layernorm,
            q_proj=attn.q_proj,
            k_proj=attn.k_proj,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=attn.head_dim,
            scaling=float(attn.scaling),
            q_norm=getattr(attn, "q_norm", None),
            k_norm=getattr(attn, "k_norm", None),
        )

    def layouts(self, call: dict[str, Any]) -> list[SampleLayout]:
        """Each sample's visual layout, from the keyword arguments of a prefill call of the model."""
        raise NotImplementedError

    def install_llm(self) -> list[Any]:
        """Install the adapter's own hooks on the language model for a compress block; return their handles.

        For architectures that feed the LLM more than its input sequence (Qwen3-VL's DeepStack features,
        added at the visual positions after the first layers). The runtime calls it once, when the schedule
        makes the LLM's sequence change, and removes the handles on exit. Default: none.
        """
        return []

    def slots_changed(self, index: torch.Tensor | None) -> None:
        """Told by the runtime which original sequence slot each present slot holds, whenever that changes.

        Args:
            index: ``(B, S)`` long, the original index of each slot of the hidden states from now on (``-1``
                for a dead padding slot), or None at the start of a prefill (every slot, in order). It
                holds until the next call: for the layers after a stage, and for the adapter's own hooks
                (`install_llm`) on those layers' outputs.
        """

    def tokens_merged(self, sample: int, into: torch.Tensor, members: torch.Tensor) -> None:
        """Told by the runtime that an LLM-site stage merged visual tokens of one sample (`LLMDecision.members`).

        Called before the `slots_changed` of the same stage. Each kept token's hidden state is now the
        plain mean of its members'; an adapter that adds its own inputs at the visual tokens in later layers
        (`install_llm`) adds the same mean of its members' inputs there.

        Args:
            sample: The batch row.
            into: ``(m,)`` long, the original sequence slot of the kept token each member went into.
            members: ``(m,)`` long, each member's original sequence slot; every kept token with more than
                one member is listed as a member of itself. Tokens merged with no other are not listed.
        """

    # -- vision tower (encoder / projector sites) ---------------------------------------------------------
    @property
    def num_vision_blocks(self) -> int:
        """Depth of the vision encoder."""
        raise NotImplementedError

    @property
    def vision_attn_implementation(self) -> str:
        """The vision tower's attention backend."""
        return "sdpa"

    def vision_attention_configs(self) -> list[Any]:
        """The config objects the vision tower's attention modules read their backend from."""
        raise NotImplementedError

    @property
    def vision_has_cls(self) -> bool:
        """Whether the vision tower runs a CLS token in front of the patches (``EncoderAttention("cls")``)."""
        return False

    def install_vision(self, session: Any) -> list[Any]:
        """Install the vision-tower hooks of an encoder/projector session; return their handles.

        Adapters that support the ``encoder`` or ``projector`` site implement this (see `tokcomp.encoder`).
        """
        raise NotImplementedError

    def llm_input(self, call: dict[str, Any], lm_kwargs: dict[str, Any], results: list[Any]) -> LLMInput:
        """How the LLM input follows what the vision tower emitted (see `LLMInput`)."""
        raise NotImplementedError

    # -- displays (`tokcomp.viz`) ----------------------------------------------------------------------------
    def packed_grid(self, call: dict[str, Any], image: int) -> PackedGrid | None:
        """How the model packs image ``image`` (its index among the call's images) from several tower rows
        (tiles) into one LLM item, for displays that map the item's tokens back to pixels.

        Args:
            call: The processor output (or model call) holding the image.
            image: Index of the image among the call's images, in batch order.

        Returns:
            The packing, or None (the default) when each tower row is its own item and there is nothing to
            stitch.
        """
        return None

    # -- count functions (`tokcomp.counts`) ---------------------------------------------------------------
    def count_items(self, call: dict[str, Any]) -> list[list[CountItem]]:
        """Per sample, its visual items (`CountItem`, prompt order) from a processor output or model call.

        Implemented by adapters whose encoder-side counts can be predicted (`tokcomp.counts`).
        """
        raise NotImplementedError(f"the {self.name!r} adapter does not describe its items for count functions")

    def predict_tokens(self, item: CountItem, encoder: ShapeFn, projector: ShapeFn) -> TokenCount:
        """The tokens ``item`` puts in front of the LLM when its encoder-site grids go through ``encoder`` and its
        projector-site grids through ``projector``, with the architecture's own rules between and after them
        (a patch merger, pixel shuffle, stitching, pooling, newline tokens).

        Raises:
            tokcomp.errors.ScheduleError: The count depends on the data for this item (the message says why).
        """
        raise NotImplementedError(f"the {self.name!r} adapter cannot predict its token counts")


@dataclass(frozen=True)
class PackedGrid:
    """An LLM item the model stitches from a grid of tiles (LLaVA-OneVision's AnyRes grid), before any
    compression: `Adapter.packed_grid` says, for each of its cells, which tile's patch the cell shows.

    Attributes:
        grid: ``(h, w)`` cells of the packed item.
        layout: ``(rows, cols)`` tiles the picture was cut into (raster order).
        tile: ``(h0, w0)`` patches per tile.
        content: ``(top, bottom, left, right)`` the patch rows and columns of the stitched canvas the
            model keeps (its unpadding), bottom and right exclusive.
        cell_tile: ``(h * w,)`` per cell (raster), the tower row it reads, counted from the image's first
            row (row 0 is the base tile, the grid's tiles start at 1).
        cell_patch: ``(h * w,)`` per cell, the patch index (raster over ``h0 x w0``) inside that tile.
    """

    grid: tuple[int, int]
    layout: tuple[int, int]
    tile: tuple[int, int]
    content: tuple[int, int, int, int]
    cell_tile: torch.Tensor
    cell_patch: torch.Tensor


@dataclass
class LLMInput:
    """How the LLM's input sequence follows encoder/projector-side compression.

    The model still builds its input at the uncompressed length (the projector's output is padded back);
    the runtime then removes the ``keep == False`` slots before decoder layer 0.

    Attributes:
        layouts: Each sample's visual layout over the *kept* tokens, with the new grids.
        keep: ``(B, L)`` bool, the slots that carry a real token.
        position_ids: Replacement position ids for the language model (same shape as it received), or None.
        decode_shift: ``(B,)`` added to the position ids of every decoding step, or None.
    """

    layouts: list[SampleLayout]
    keep: torch.Tensor
    position_ids: torch.Tensor | None = None
    decode_shift: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------------------
# Count functions: token counts known before the encoder runs (`tokcomp.counts`)


@dataclass(frozen=True)
class ItemShape:
    """The shape of one visual item at a site: what a count function sees instead of tensors.

    Attributes:
        t: Frames (1 for an image or a tile).
        h: Rows of every frame's grid (1 once a strategy broke the grid).
        w: Columns of every frame's grid (the token count per frame once the grid is broken).
        is_grid: False after a strategy that does not keep the 2-D layout (ToMe).
    """

    t: int
    h: int
    w: int
    is_grid: bool = True

    @property
    def num_tokens(self) -> int:
        """``t * h * w``."""
        return self.t * self.h * self.w


@dataclass(frozen=True)
class ShapeStep:
    """Where a stage's `VisualStrategy.output_shape` is asked about (the shape-only `VisualTokens` fields).

    Attributes:
        site: ``"encoder"`` or ``"projector"``.
        layer: Encoder block at whose input the stage runs (the projector: the number of blocks).
        num_layers: Encoder depth.
        stage_layers: The stage's sorted blocks (``(0,)`` at the projector).
        multiple: Grid sides must stay divisible by this (the adapter's unit at the encoder site, else 1).
    """

    site: str
    layer: int
    num_layers: int
    stage_layers: tuple[int, ...]
    multiple: int = 1

    @property
    def iteration(self) -> int:
        """Index of ``layer`` in the stage's layers (0 for the first), as `VisualTokens.iteration`."""
        return self.stage_layers.index(self.layer) if self.layer in self.stage_layers else 0


@dataclass(frozen=True)
class CountItem:
    """One image or video as the processor described it, in the adapter's units (see each adapter's
    `Adapter.count_items`).

    Attributes:
        kind: ``"image"`` or ``"video"``.
        grid: ``(t, h, w)``: Qwen-VL the ``image_grid_thw``/``video_grid_thw`` row (patches); InternVL
            ``(tiles, S/p, S/p)``; LLaVA ``(1, S/p, S/p)``; LLaVA-OneVision ``(frames, S/p, S/p)`` for a
            video, ``(1, S/p, S/p)`` for an image.
        image_size: LLaVA-OneVision: ``(height, width)`` of the picture in pixels (its AnyRes layout).
        multi_image: LLaVA-OneVision: the image belongs to a sample with several images (base tile only).
    """

    kind: str
    grid: tuple[int, int, int]
    image_size: tuple[int, int] | None = None
    multi_image: bool = False


@dataclass(frozen=True)
class TokenCount:
    """How many tokens one item puts in front of the LLM.

    Attributes:
        visual: Visual tokens (what ``run.report()`` counts; LLM-side stages may remove them later).
        placeholders: Prompt slots of the item's placeholder run(s): ``visual`` plus the architecture's own
            extra tokens (LLaVA-OneVision's newlines, LLaVA's CLS with the ``"full"`` feature strategy).
    """

    visual: int
    placeholders: int


ShapeFn = Callable[[ItemShape], ItemShape]
"""The composed stages of one site, as `tokcomp.counts` hands them to `Adapter.predict_tokens`."""
