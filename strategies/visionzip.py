"""VisionZip (Yang et al., CVPR 2025): keep the dominant tokens, merge the rest into a few contextual ones.

Written from the project's specification of the reference code (``shared/spec/methods-2025.md`` §2;
dvlab-research/VisionZip @ 3151f6d, and llmc's Qwen2.5-VL port for towers without a CLS token), which this
module does not reproduce. Per image (tile, video frame) with patch tokens ``x``, attention scores ``s`` and
similarity features ``m`` (the block's keys averaged over heads):

1. **Dominant**: the ``d`` tokens with the largest ``s`` (the CLS query's attention summed over heads, or for
   towers without CLS the attention each token receives, averaged over heads and query rows), kept in
   ascending order.
2. **Contextual**: the ``N_f`` remaining tokens, in ascending order, with ``m̂ = m / ‖m‖``. Targets are the
   tokens at list positions ``0, step, 2·step, …`` (``step = max(1, N_f // c)``, the first ``c``); every other
   remaining token joins the target of largest ``m̂_i · m̂_t`` (ties to the first target), and each target
   becomes ``x_t + mean(members)`` (the target *plus* the mean of its members, not the group mean; a target
   without members stays ``x_t``).
3. Output ``[CLS copy, dominant…, contextual…]`` (encoder site of a CLS tower; the reference feeds the CLS
   state to the LLM as its first visual token).

Deliberate differences from the reference (each named in the docs page):

* Budgets are clamped so that the output never has more tokens than the frame (the reference's ``topk``
  raises); the CLS copy takes one of the frame's places.
* ``contextual = 0`` keeps the dominant tokens only (the reference divides by zero).
* Ties in the dominant ranking go to the lower index (``topk``'s order is implementation-defined).
* Keys are normalised with an epsilon, in float32 (a zero key gives NaN in the reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from tokcomp.contracts import AttentionSite, EncoderAttention, ItemShape, ShapeStep, VisualStrategy
from tokcomp.errors import ScheduleError
from tokcomp.tokens import FrameGrid, VisualItemTokens, VisualTokens

__all__ = ["VisionZip", "VisionZipResult", "visionzip_counts", "visionzip_merge", "visionzip_select"]


def visionzip_counts(n: int, dominant: int, contextual: int, cls: bool = False,
                     dominant_ratio: float | None = None, contextual_ratio: float | None = None) -> tuple[int, int]:
    """How many dominant patches and contextual tokens a frame of ``n`` patches keeps.

    The frame keeps ``min(D + C, n)`` tokens, with or without a CLS copy: ``D = max(dominant, 1)`` dominant
    tokens, the CLS copy being one of them when ``cls`` (the reference's API: ``dominant=54`` keeps the CLS and
    53 patches), then ``C = min(contextual, n - D)`` contextual tokens.

    Args:
        n: Patch tokens of the frame.
        dominant: Dominant tokens, the CLS copy included when ``cls``.
        contextual: Contextual tokens.
        cls: A CLS copy is emitted in front (it takes one of the dominant places).
        dominant_ratio: When given, ``D = int(ratio · n)`` (llmc's Qwen rule).
        contextual_ratio: When given, ``C = max(int(ratio · n), 1)`` (llmc's Qwen rule).

    Returns:
        ``(d, c)``: dominant *patches* (``D - 1`` with a CLS copy) and contextual tokens.
    """
    D = int(dominant_ratio * n) if dominant_ratio is not None else int(dominant)
    C = max(int(contextual_ratio * n), 1) if contextual_ratio is not None else int(contextual)
    D = min(max(D, 1), n)
    C = max(min(C, n - D), 0)
    return D - int(cls), C


def visionzip_select(scores: Tensor, metric: Tensor, d: int, c: int) -> tuple[Tensor, Tensor, Tensor]:
    """Dominant tokens, contextual targets and each token's group (module docstring, steps 1–2).

    Args:
        scores: ``(n,)`` attention scores of the patches.
        metric: ``(n, dm)`` similarity features (keys averaged over heads).
        d: Dominant tokens to keep, clamped to ``[0, n]``.
        c: Contextual targets, clamped to the ``n - d`` remaining tokens.

    Returns:
        ``(dominant, targets, group)``: ``dominant`` ``(d,)`` ascending indices; ``targets`` ``(c',)`` indices
        in target order; ``group`` ``(n,)`` long, for every token the position in ``targets`` of the target
        it merges into (``-1`` for dominant tokens; a target is its own group). Tokens of no group (``c = 0``)
        are ``-2``: they are dropped.
    """
    n = int(scores.shape[0])
    d = max(0, min(int(d), n))
    order = torch.sort(scores.float(), descending=True, stable=True).indices  # ties: the lower index first
    dominant = order[:d].sort().values
    is_dom = torch.zeros(n, dtype=torch.bool, device=scores.device)
    is_dom[dominant] = True
    rest = (~is_dom).nonzero().squeeze(1)  # ascending
    nf = int(rest.numel())
    group = torch.full((n,), -1, dtype=torch.long, device=scores.device)
    c = max(0, min(int(c), nf))
    if c == 0:
        group[rest] = -2
        return dominant, rest[:0], group
    step = max(1, nf // c)
    pos = torch.arange(0, nf, step, device=scores.device)[:c]
    targets = rest[pos]
    unit = F.normalize(metric.float()[rest], dim=-1)
    sim = unit @ unit[pos].T  # (nf, c)
    assign = sim.argmax(1)  # first maximum: ties to the first target
    assign[pos] = torch.arange(c, device=scores.device)
    group[rest] = assign
    return dominant, targets, group


@dataclass
class VisionZipResult:
    """What `visionzip_merge` returns for one frame.

    Attributes:
        x: ``(k, C)`` output tokens: ``[cls copy,] dominant (ascending), contextual (target order)``.
        dominant: ``(d,)`` indices of the dominant patches.
        targets: ``(c,)`` indices of the contextual targets.
        group: ``(n,)`` see `visionzip_select`.
    """

    x: Tensor
    dominant: Tensor
    targets: Tensor
    group: Tensor


def visionzip_merge(x: Tensor, scores: Tensor, metric: Tensor, d: int, c: int,
                    cls: Tensor | None = None) -> VisionZipResult:
    """One frame through VisionZip (module docstring).

    Args:
        x: ``(n, C)`` patch hidden states.
        scores: ``(n,)`` attention scores.
        metric: ``(n, dm)`` similarity features.
        d: Dominant patches.
        c: Contextual targets.
        cls: Optional ``(C,)`` CLS state, emitted first.

    Returns:
        The output tokens and the selection.
    """
    dominant, targets, group = visionzip_select(scores, metric, d, c)
    xf = x.float()
    k = int(targets.numel())
    members = (group >= 0)
    members[targets] = False
    idx = group[members]
    total = xf.new_zeros(k, x.shape[1]).index_add_(0, idx, xf[members])
    count = torch.bincount(idx, minlength=k).clamp(min=1).to(xf.dtype)
    contextual = xf[targets] + total / count[:, None]
    parts = [xf[dominant], contextual]
    if cls is not None:
        parts.insert(0, cls.float().reshape(1, -1))
    return VisionZipResult(torch.cat(parts).to(x.dtype), dominant, targets, group)


@dataclass
class VisionZip(VisualStrategy):
    """VisionZip: dominant tokens by attention, the others merged into spaced contextual tokens.

    At the ``encoder`` site (its reference placement: the block whose input is the LLM's features, e.g. the
    last block for LLaVA-1.5's ``hidden_states[-2]``) the scores are the CLS query row of the previous block
    (towers without CLS: the attention each token receives), the similarity is that block's keys, and a CLS
    tower gets a copy of its CLS state as the first output token. At the ``projector`` site (the Qwen port, for
    architectures whose projector needs the grid) the scores are the attention each token receives in the
    last encoder block, averaged over each LLM token's patches, the similarity is the projected features, no
    CLS copy is made, and the output stays in sequence order.

    Args:
        dominant: Dominant tokens per frame, the CLS copy included (README default 54; 54 + 10 = 64 tokens).
        contextual: Contextual tokens per frame.
        dominant_ratio: Instead of ``dominant``: ``int(ratio · n)`` dominant patches (llmc's Qwen rule).
        contextual_ratio: Instead of ``contextual``: ``max(int(ratio · n), 1)``.
        emit_cls: At the encoder site of a CLS tower, emit the CLS state as the first token (the reference).
    """

    name: ClassVar[str] = "visionzip"
    sites: ClassVar[frozenset[str]] = frozenset({"encoder", "projector"})
    preserves_grid: ClassVar[bool] = False
    dominant: int = 54
    contextual: int = 10
    dominant_ratio: float | None = None
    contextual_ratio: float | None = None
    emit_cls: bool = True
    metric: str = "auto"

    def check(self) -> None:
        """Parameter ranges."""
        if self.dominant < 1:
            raise ScheduleError(f"visionzip: dominant must be >= 1, got {self.dominant}")
        if self.contextual < 0:
            raise ScheduleError(f"visionzip: contextual must be >= 0, got {self.contextual}")
        for name in ("dominant_ratio", "contextual_ratio"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= float(v) <= 1.0:
                raise ScheduleError(f"visionzip: {name} must be in [0, 1], got {v}")
        if self.metric not in ("auto", "keys", "hidden"):
            raise ScheduleError(f"visionzip: metric must be 'auto', 'keys' or 'hidden', got {self.metric!r}")

    def default_layers(self, num_layers: int) -> list[int]:
        """The last block: its input is LLaVA-1.5's feature layer (``hidden_states[-2]``)."""
        return [num_layers - 1]

    def validate(self, stage: object, adapter: object) -> None:
        """At the encoder site the stage needs an earlier block (scores and keys come from it)."""
        layers = getattr(stage, "layers", None)
        if getattr(stage, "site", "") == "encoder":
            nb = adapter.num_vision_blocks  # type: ignore[attr-defined]
            layers = list(layers) if layers is not None else self.default_layers(nb)
            if len(layers) != 1 or layers[0] < 1:
                raise ScheduleError(
                    "visionzip runs once, at one encoder block >= 1 (it reads the previous block's attention); "
                    f"got layers={layers}"
                )
        super().validate(stage, adapter)  # type: ignore[arg-type]

    def attention_needs(self, where: AttentionSite) -> tuple[EncoderAttention, ...]:
        """Encoder: the CLS row (or received attention) of the previous block; projector: received attention
        of the last block."""
        if where.site == "encoder":
            return (EncoderAttention(where.layer - 1, "cls" if where.has_cls else "mean"),)
        return (EncoderAttention(where.num_blocks - 1, "mean"),)

    def _counts(self, n: int, cls: bool) -> tuple[int, int]:
        return visionzip_counts(n, self.dominant, self.contextual, cls, self.dominant_ratio, self.contextual_ratio)

    def output_shape(self, shape: ItemShape, step: ShapeStep) -> ItemShape:
        """Every frame keeps ``min(D + C, n)`` tokens as a 1-D frame (`visionzip_counts`; the same with or
        without a CLS copy)."""
        n = shape.h * shape.w
        d, c = self._counts(n, False)
        return ItemShape(shape.t, 1, d + c, is_grid=False)

    def reduce(self, tokens: VisualTokens) -> VisualTokens:
        """Run every frame through `visionzip_merge`."""
        where = AttentionSite(tokens.site, tokens.layer, tokens.num_layers, tokens.prefix > 0)
        (need,) = self.attention_needs(where)
        encoder = tokens.site == "encoder"
        items, info = [], {"dominant": [], "contextual": []}
        for it in tokens.items:
            frames = []
            for fr in it.frames:
                n = fr.num_tokens
                att = fr.attention_of(need).reshape(-1, n)
                scores = att.sum(0) if need.query == "cls" else att.mean(0)
                use_keys = encoder and self.metric != "hidden" and fr.metric is not None
                metric = fr.metric.reshape(n, -1) if use_keys else fr.x.reshape(n, -1)  # type: ignore[union-attr]
                cls_x = fr.prefix_x[0] if encoder and self.emit_cls and fr.prefix_x is not None and len(fr.prefix_x) else None
                d, c = self._counts(n, cls_x is not None)
                res = visionzip_merge(fr.x.reshape(n, -1), scores, metric, d, c, cls_x)
                frames.append(_frame(fr, res, cls_x is not None, sequence_order=not encoder))
                info["dominant"].append(int(res.dominant.numel()))
                info["contextual"].append(int(res.targets.numel()))
            items.append(VisualItemTokens(it.kind, frames, it.original))
        return VisualTokens(items, tokens.site, tokens.layer, tokens.num_layers, tokens.stage_layers,
                            tokens.multiple, info, tokens.prefix)


def _frame(fr: FrameGrid, res: VisionZipResult, cls: bool, sequence_order: bool) -> FrameGrid:
    """The output frame: sizes add up (provenance), a merged token takes its target's position."""
    n = fr.num_tokens
    size = fr.size.reshape(n).float()
    pos = fr.pos.reshape(n, 2)
    group = res.group
    k_c = int(res.targets.numel())
    csize = size.new_zeros(k_c).index_add_(0, group[group >= 0], size[group >= 0])
    kept = torch.cat([res.dominant, res.targets])
    sizes = torch.cat([size[res.dominant], csize])
    positions = pos[kept]
    x = res.x
    if sequence_order and not cls:
        order = kept.argsort()
        kept, sizes, positions, x = kept[order], sizes[order], positions[order], x[order]
    lead = int(cls)
    # output index of the token that holds each current token (-1: dropped)
    out_of = torch.full((n,), -1, dtype=torch.long, device=kept.device)
    out_of[kept] = torch.arange(kept.numel(), device=kept.device) + lead
    members = group >= 0
    target_out = out_of[res.targets]
    out_of[members] = target_out[group[members]]
    owner = torch.where(fr.owner >= 0, out_of[fr.owner.clamp(min=0)], fr.owner)
    if cls:
        centre = pos.mean(0, keepdim=True)
        sizes = torch.cat([sizes.new_ones(1), sizes])
        positions = torch.cat([centre, positions])
    k = int(x.shape[0])
    return FrameGrid(x.reshape(1, k, -1), sizes.reshape(1, k), positions.reshape(1, k, 2), owner, None,
                     is_grid=False, prefix_x=fr.prefix_x)
