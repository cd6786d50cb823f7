"""Attention inside the vision encoder, computed from a block's own queries and keys (`EncoderAttention`).

The adapters capture the queries and keys a block computes (the outputs of its projections, after the
block's q/k norms and rotary embedding, exactly as its attention function receives them) and hand them to
the functions here, per attention call of the block: one row of a row tower's batch (an image, a tile), or
one ``cu_seqlens`` segment of a packed tower (a frame, or an attention window in Qwen2.5-VL's windowed
blocks). Nothing asks the model for ``output_attentions``, so ``sdpa`` and FlashAttention stay on; the cost
is one ``(H, T, T)`` logit block per call, computed in query chunks for the ``"mean"`` rows.

The rows equal ``softmax(scale · q kᵀ + bias)`` of the call, in float32: ``"cls"`` is row 0 (the CLS
query), ``"mean"`` the sum over the call's query rows divided by the number of query rows of the token's
frame (a frame is one window of the call when the block is not windowed).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .contracts import EncoderAttention
from .errors import RuntimeStateError

__all__ = ["call_rows", "current_rows", "needs_by_block", "packed_rows"]

_CHUNK = 1024  # query rows per logit block for "mean"


def call_rows(q: Tensor, k: Tensor, scaling: float, query: str, bias: Tensor | None = None) -> Tensor:
    """The requested attention rows of one attention call.

    Args:
        q: ``(H, T, d)`` queries as the attention function receives them.
        k: ``(H, T, d)`` keys.
        scaling: The softmax scale the block uses.
        query: ``"cls"`` (row 0) or ``"mean"`` (the *sum* over the ``T`` query rows; callers divide by the
            frame's query count).
        bias: Optional ``(T,)`` additive key bias (proportional attention's ``log size``).

    Returns:
        ``(H, T)`` float32: the probability each key receives.
    """
    qf, kf = q.float(), k.float()
    add = None if bias is None else bias.float().view(1, 1, -1)

    def probs(rows: Tensor) -> Tensor:
        logits = torch.matmul(rows, kf.transpose(-1, -2)) * scaling
        if add is not None:
            logits = logits + add
        return torch.softmax(logits, dim=-1)

    if query == "cls":
        return probs(qf[:, :1])[:, 0]
    out = qf.new_zeros(kf.shape[0], kf.shape[1])
    for start in range(0, qf.shape[1], _CHUNK):
        out += probs(qf[:, start:start + _CHUNK]).sum(1)
    return out


def packed_rows(q: Tensor, k: Tensor, scaling: float, query: str, bounds: Sequence[int],
                frame_lengths: Tensor, bias: Tensor | None = None) -> Tensor:
    """`call_rows` over a packed sequence whose attention runs per segment (``cu_seqlens``).

    Args:
        q: ``(H, N, d)`` queries of the whole packed sequence.
        k: ``(H, N, d)`` keys.
        scaling: The softmax scale.
        query: ``"cls"`` or ``"mean"`` (the towers that pack have no CLS token; ``"cls"`` takes each
            segment's first token).
        bounds: The block's ``cu_seqlens`` (``0, ..., N``): the segments its attention calls cover.
        frame_lengths: ``(N,)`` the number of tokens in each token's frame (the ``"mean"`` divisor).
        bias: Optional ``(N,)`` additive key bias.

    Returns:
        ``(H, N)`` float32.
    """
    out = q.new_zeros(q.shape[0], q.shape[1], dtype=torch.float32)
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e > s:
            out[:, s:e] = call_rows(q[:, s:e], k[:, s:e], scaling, query, None if bias is None else bias[s:e])
    if query == "mean":
        out = out / frame_lengths.to(out.device, torch.float32).view(1, -1)
    return out


def needs_by_block(needs: Sequence[EncoderAttention]) -> dict[int, set[str]]:
    """``{block: {query, ...}}`` of a list of requests (what to compute at each block)."""
    out: dict[int, set[str]] = {}
    for n in needs:
        out.setdefault(n.block, set()).add(n.query)
    return out


def current_rows(
    store: dict[EncoderAttention, tuple[Tensor, int]], need: EncoderAttention, version: int, where: str
) -> Tensor:
    """The rows recorded for ``need`` during this tower call, if no later stage changed the tokens since.

    Args:
        store: What the block hooks recorded: request -> (rows, token version when recorded).
        need: The request.
        version: The call's current token version (bumped by every stage that changes the tokens).
        where: Where the rows are wanted (for the error message).

    Returns:
        The recorded rows.

    Raises:
        RuntimeStateError: If the rows were not computed, or describe tokens a later stage changed.
    """
    got = store.get(need)
    if got is None:
        raise RuntimeStateError(f"encoder attention {need} was not computed during this tower call")
    rows, recorded = got
    if recorded != version:
        raise RuntimeStateError(
            f"the encoder attention of block {need.block} describes tokens that a later encoder stage "
            f"changed before {where}; schedule the stage that needs it before any other encoder stage"
        )
    return rows
