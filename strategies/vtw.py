"""VTW — Visual Tokens Withdrawal (Lin et al., AAAI 2025).

Every visual token is withdrawn before decoder layer ``K``; layers ``0..K-1`` see everything. ``K`` is
chosen once per model by `search_k`: the first layer whose withdrawal keeps the KL divergence of the last
prompt token's next-token distribution under ``eta`` on calibration inputs (`shared/spec/baselines.md` §4).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from tokcomp.contracts import LLMDecision, LLMStrategy, LLMView
from tokcomp.errors import ScheduleError

__all__ = ["VTW", "VTWSearch", "kl_withdrawn_vs_full", "search_k"]


@dataclass
class VTW(LLMStrategy):
    """Withdraw all visual tokens at the stage's layer (one layer: ``layers=[K]``)."""

    name: ClassVar[str] = "vtw"

    def default_layers(self, num_layers: int) -> list[int]:
        """Half depth (the reference's K = 15/16 of 32 layers); run `search_k` to choose K for a model."""
        return [num_layers // 2]

    def validate(self, stage, adapter) -> None:
        """One layer only: after it there is nothing left to withdraw."""
        if stage.layers is not None and len(set(stage.layers)) != 1:
            raise ScheduleError(f"vtw withdraws every visual token once: give one layer, got {list(stage.layers)}")

    def select(self, view: LLMView) -> LLMDecision:
        """Keep none."""
        return LLMDecision(keep=torch.zeros(0, dtype=torch.long, device=view.hidden.device))


def kl_withdrawn_vs_full(logits_k: torch.Tensor, logits_full: torch.Tensor) -> torch.Tensor:
    """``KL(P_k ‖ P_full)`` per row, the reference's ``KLDivLoss(log_softmax(full), softmax(k))``."""
    lp_k = torch.log_softmax(logits_k.float(), -1)
    lp_full = torch.log_softmax(logits_full.float(), -1)
    return (lp_k.exp() * (lp_k - lp_full)).sum(-1)


@dataclass
class VTWSearch:
    """Result of `search_k`.

    Attributes:
        k: The chosen layer.
        eta: The threshold used.
        kl: Mean KL per candidate layer that was evaluated.
    """

    k: int
    eta: float
    kl: dict[int, float] = field(default_factory=dict)


@torch.no_grad()
def search_k(
    model: torch.nn.Module,
    calibration: Iterable[dict[str, Any]],
    *,
    eta: float = 0.003,
    candidates: Sequence[int] | None = None,
) -> VTWSearch:
    """Choose VTW's layer ``K`` on calibration inputs (prefill only, as the reference does).

    For each batch: the uncompressed model's last-token logits, then, for every candidate ``k``, the logits
    with every visual token withdrawn before layer ``k``; ``K`` is the first candidate whose mean
    ``KL(P_k ‖ P_full)`` over all samples is ``<= eta``.

    Args:
        model: A model tokcomp supports.
        calibration: Batches of model inputs (left-padded: the last position must be each sample's last
            token).
        eta: The KL threshold (reference: 0.003 for LLaVA-1.5-7B and unknown models).
        candidates: Layers to try, ascending; default ``5..L-1`` (or ``1..L-1`` for LLMs of ≤ 5 layers).

    Raises:
        ValueError: No candidate meets ``eta`` (the reference fails with an IndexError there).
    """
    import tokcomp as tc

    adapter = tc.find_adapter(model)
    L = adapter.num_layers
    cands = list(candidates) if candidates is not None else list(range(5 if L > 5 else 1, L))
    batches = list(calibration)
    for inp in batches:
        m = inp.get("attention_mask")
        if m is not None and not bool(m[:, -1].bool().all()):
            raise ValueError("search_k needs left-padded batches: the last position must be a real token")
    full = [model(**inp).logits[:, -1] for inp in batches]
    kl: dict[int, float] = {}
    for k in cands:
        total, count = 0.0, 0
        with tc.compress(model, tc.Schedule([tc.Stage(VTW(), site="llm", layers=[k])])):
            for inp, ref in zip(batches, full):
                lk = model(**inp).logits[:, -1]
                d = kl_withdrawn_vs_full(lk, ref)
                total += float(d.sum())
                count += d.numel()
        kl[k] = total / max(count, 1)
        if kl[k] <= eta:
            return VTWSearch(k, eta, kl)
    raise ValueError(
        f"no candidate layer meets eta={eta}: mean KL per layer {kl}. Raise eta or add later candidates."
    )
