"""PACT (Dhouib et al., CVPR 2025): pure tensor functions.

PACT reduces the visual tokens once, on the input of one decoder layer ``L`` (default 4), in two steps:

1. **EUTI** (`euti_scores`, `euti_select`) prunes the least important visual tokens. The importance
   of a token is the attention it receives from one global query per head (the mean query over the non-text
   prefix), computed with layer ``L``'s own pre-RoPE projections, times the L2 norm of its hidden state.
2. **DBDPC** (`dbdpc`) clusters the kept visual tokens by the cosine distance of their post-RoPE keys;
   `retrieve_pruned` lets the pruned tokens that lie close to a cluster centre rejoin that cluster, and
   `merge_clusters` replaces each cluster by the plain mean of its members, written at the centre's slot.

Everything here works on one sample, is model-agnostic and runs on whatever device its inputs are on.
Sequence surgery, positions and the proportional-attention bias ``log(size)`` are the caller's job.

Deliberate deviations from the reference implementation (orailix/PACT), all of them on purpose:

* All distances, densities and scores are computed in float32 whatever the input dtype; the reference runs
  DBDPC in the model dtype (bf16/fp16), where many distinct distances round to the same value.
* Densities are ranked deterministically (equal densities: the lower index is visited first); the reference
  ranks with a non-stable ``argsort``, so exactly equal densities may be ordered arbitrarily.
* Rows that are exactly equal after normalisation are at distance exactly 0 from each other, so duplicates
  always merge, even with ``cutoff = 0``; a plain ``1 - x̂·x̂`` can leave a rounding residue there.
* `merge_clusters` accumulates the member sums in float32 (the reference uses ``index_add_`` in the
  hidden dtype), then casts the means back to the hidden dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from tokcomp.contracts import LLMDecision, LLMStrategy, LLMView, check_keep_ratio
from tokcomp.errors import ScheduleError

__all__ = [
    "PACT",
    "cosine_distances",
    "dbdpc",
    "euti_keep_count",
    "euti_scores",
    "euti_select",
    "merge_clusters",
    "non_text_mask",
    "retrieve_pruned",
]


def _check_bool_vector(name: str, mask: Tensor, n: int) -> None:
    if mask.dtype != torch.bool or mask.shape != (n,):
        raise ValueError(
            f"{name} must be a bool tensor of shape ({n},), got {mask.dtype} {tuple(mask.shape)}"
        )


def _check_cutoff(name: str, value: float) -> None:
    # `not value >= 0` also rejects NaN, which would make every comparison silently False.
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _check_index_vector(name: str, idx: Tensor) -> None:
    if idx.ndim != 1 or idx.dtype != torch.long:
        raise ValueError(f"{name} must be a 1-D LongTensor, got {idx.dtype} {tuple(idx.shape)}")


def non_text_mask(visual: Tensor) -> Tensor:
    """Positions PACT treats as "non-text": every position from 0 up to the last visual token.

    The system prompt and the special tokens between images are included on purpose (spec §3.1): EUTI's
    global query and its softmax both run over this whole prefix.

    Args:
        visual: Bool tensor ``(N,)``, True at visual-token positions.

    Returns:
        Bool tensor ``(N,)``; all False when there is no visual token.

    Raises:
        ValueError: If ``visual`` is not a 1-D bool tensor.
    """
    if visual.ndim != 1:
        raise ValueError(f"visual must be 1-D, got shape {tuple(visual.shape)}")
    _check_bool_vector("visual", visual, visual.shape[0])
    out = torch.zeros_like(visual)
    hits = visual.nonzero()
    if hits.numel():
        out[: int(hits[-1]) + 1] = True
    return out


def euti_keep_count(n_visual: int, keep_ratio: float) -> int:
    """Number of visual tokens EUTI keeps: ``int(n_visual * keep_ratio)``, truncated like the reference.

    Truncation, floating-point error included, is kept on purpose so token counts match the reference
    exactly: ``100 * 0.29`` is ``28.999999999999996``, so 28 tokens are kept, not 29.

    Args:
        n_visual: Number of visual tokens, ``>= 0``.
        keep_ratio: Fraction λ in ``[0, 1]``.

    Returns:
        The number of tokens to keep.

    Raises:
        ValueError: If ``n_visual < 0`` or ``keep_ratio`` is outside ``[0, 1]``.
    """
    if n_visual < 0:
        raise ValueError(f"n_visual must be >= 0, got {n_visual}")
    if not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in [0, 1], got {keep_ratio}")
    return int(n_visual * keep_ratio)


def euti_scores(q: Tensor, k: Tensor, hidden: Tensor, not_text: Tensor, visual: Tensor) -> Tensor:
    """EUTI importance of the visual tokens of one sample (spec §3.2).

    For each query head ``h``: ``q̄_h`` is the mean query over the non-text positions, and
    ``a_h = softmax_j(q̄_h · k_{h,j} / √d)`` over the non-text keys ``j``. The head average of ``a_h`` (NaN
    replaced by 0) times the L2 norm of the raw hidden state is the score. Computed in float32.

    Args:
        q: Pre-RoPE queries of layer L, ``(H, N, d)``.
        k: Pre-RoPE keys of layer L, ``(H_kv, N, d)``; with grouped-query attention each key head serves
            ``H // H_kv`` consecutive query heads (the layout of ``repeat_kv``/``repeat_interleave``).
        hidden: Residual-stream hidden states entering layer L, before its input norm, ``(N, D)``.
        not_text: Bool ``(N,)``, the positions that form the global query and the softmax support
            (see `non_text_mask`).
        visual: Bool ``(N,)``, the visual positions; must be a subset of ``not_text``.

    Returns:
        Float32 scores ``(n_visual,)`` for the visual positions, in position order.

    Raises:
        ValueError: On inconsistent shapes, ``H`` not divisible by ``H_kv``, or visual positions outside
            ``not_text``.
    """
    if q.ndim != 3 or k.ndim != 3:
        raise ValueError(f"q and k must be 3-D (heads, N, d), got {tuple(q.shape)} and {tuple(k.shape)}")
    n_heads, n, d = q.shape
    n_kv = k.shape[0]
    if k.shape[1:] != (n, d):
        raise ValueError(f"k must be (H_kv, {n}, {d}) to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if n_kv == 0 or n_heads % n_kv:
        raise ValueError(f"query heads ({n_heads}) must be a multiple of key heads ({n_kv})")
    if hidden.ndim != 2 or hidden.shape[0] != n:
        raise ValueError(f"hidden must be ({n}, D), got {tuple(hidden.shape)}")
    _check_bool_vector("not_text", not_text, n)
    _check_bool_vector("visual", visual, n)
    if bool((visual & ~not_text).any()):
        raise ValueError("every visual position must also be in not_text")

    if not bool(not_text.any()):
        # No prefix means no visual token either (checked above); avoid the NaN mean of an empty set.
        return torch.zeros(0, dtype=torch.float32, device=q.device)

    group = n_heads // n_kv
    q_mean = q[:, not_text].float().mean(dim=1)  # (H, d)
    k_prefix = k[:, not_text].float()  # (H_kv, M, d)
    # Grouping the query heads by their key head is the same as repeat_interleave on the keys, without
    # materialising H copies of the prefix keys.
    logits = torch.einsum("vgd,vmd->vgm", q_mean.view(n_kv, group, d), k_prefix).reshape(n_heads, -1)
    attn = torch.softmax(logits / math.sqrt(d), dim=-1).mean(dim=0)  # (M,)
    # Only NaN is zeroed (spec); inf cannot come out of a softmax.
    attn = torch.where(torch.isnan(attn), torch.zeros_like(attn), attn)

    full = torch.zeros(n, dtype=torch.float32, device=q.device)
    full[not_text] = attn
    norms = torch.linalg.vector_norm(hidden[visual].float(), ord=2, dim=-1)
    return full[visual] * norms


def euti_select(scores: Tensor, n_keep: int) -> Tensor:
    """Indices of the ``n_keep`` highest scores, ties broken by the lower index.

    This is the reference's threshold rule (keep ``s > thr``, then fill with ``s == thr`` in ascending index
    order, where ``thr`` is the ``n_keep``-th largest score) written as a stable top-k.

    Args:
        scores: 1-D scores, e.g. from `euti_scores`. Must not contain NaN.
        n_keep: How many to keep, ``>= 0``; values ``>= len(scores)`` keep everything. ``0`` (when
            ``int(N * λ)`` truncates to 0) keeps what the reference keeps: every token scored above the
            minimum, i.e. all but the lowest-scored ones.

    Returns:
        Sorted LongTensor of kept indices (into ``scores``), on the device of ``scores``.

    Raises:
        ValueError: If ``scores`` is not 1-D or contains NaN, or ``n_keep < 0``.
    """
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {tuple(scores.shape)}")
    if n_keep < 0:
        raise ValueError(f"n_keep must be >= 0, got {n_keep}")
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores contain NaN; the top-k order is undefined")
    # A stable descending sort keeps equal scores in ascending index order: that is the tie rule.
    order = torch.sort(scores, descending=True, stable=True).indices
    if n_keep == 0 and scores.numel():
        # The reference reads the threshold as the n_keep-th largest score, sorted_scores[n_keep - 1]: with
        # n_keep = 0 that index is -1, the *smallest* score, so it keeps every token scored above the
        # minimum (all but the lowest-scored ones), not none. Followed here, as the reference does it.
        return (scores > scores.min()).nonzero().squeeze(1)
    return order[:n_keep].sort().values


def cosine_distances(a: Tensor, b: Tensor | None = None) -> Tensor:
    """Pairwise cosine distances ``clamp(1 − âbᵀ, min=0)`` in float32.

    Rows that are exactly equal after normalisation get distance exactly 0 (and so does the diagonal when
    ``b`` is None): ``1 − â·â`` can leave a rounding residue of about 1e-7, which would stop duplicates from
    merging at ``cutoff = 0``. An all-zero row normalises to zero, so it is at distance 1 from every non-zero
    row and at 0 from other all-zero rows.

    Args:
        a: ``(n, c)`` vectors, any floating dtype.
        b: ``(m, c)`` vectors, or None for the distances within ``a`` (then the result is exactly symmetric).

    Returns:
        Float32 distances ``(n, m)``, or ``(n, n)`` when ``b`` is None.

    Raises:
        ValueError: If the inputs are not 2-D with the same, non-zero, number of columns.
    """
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"a must be 2-D with at least one column, got {tuple(a.shape)}")
    if b is not None and (b.ndim != 2 or b.shape[1] != a.shape[1]):
        raise ValueError(f"b must be (m, {a.shape[1]}), got {tuple(b.shape)}")
    a_hat = F.normalize(a.float(), dim=-1)
    if b is None:
        dist = (1.0 - a_hat @ a_hat.T).clamp_min(0.0)
        # Exact symmetry keeps "centres are pairwise > cutoff apart" independent of which side is looked at.
        dist = (dist + dist.T) / 2
        if a_hat.shape[0]:
            inverse = torch.unique(a_hat, dim=0, return_inverse=True)[1]
            dist = dist.masked_fill(inverse[:, None] == inverse[None, :], 0.0)
        return dist
    b_hat = F.normalize(b.float(), dim=-1)
    dist = (1.0 - a_hat @ b_hat.T).clamp_min(0.0)
    if a_hat.shape[0] and b_hat.shape[0]:
        inverse = torch.unique(torch.cat([a_hat, b_hat]), dim=0, return_inverse=True)[1]
        same = inverse[: a_hat.shape[0], None] == inverse[None, a_hat.shape[0] :]
        dist = dist.masked_fill(same, 0.0)
    return dist


def _density_order(dist: Tensor, density_dc: float) -> Tensor:
    """Visiting order of DBDPC: decreasing density, equal densities by ascending index."""
    rho = torch.exp(-((dist / density_dc) ** 2)).sum(dim=1)
    # The reference replaces ρ by its rank with a non-stable argsort; only the order matters for the greedy
    # pass, and a stable sort makes it deterministic.
    return torch.sort(rho, descending=True, stable=True).indices


def dbdpc(x: Tensor, cutoff: float, density_dc: float = 2.0) -> tuple[Tensor, Tensor]:
    """DBDPC clustering (density-based, density-peak-like) of the EUTI-kept tokens (spec §3.3).

    Steps:

    1. cosine distances ``D`` (see `cosine_distances`), computed in float32 on purpose: the reference
       runs in the model dtype (bf16), whose coarse rounding changes which points count as neighbours;
    2. density ``ρ_i = Σ_j exp(−(D_ij / density_dc)²)``, replaced by its rank. The rank is made deterministic:
       equal densities are ordered by ascending index (the lower index counts as denser). This is where we
       deliberately differ from the reference, whose non-stable ``argsort`` may order exact ties either way;
    3. centres: visit the points by decreasing density; a point becomes a centre iff its distance to every
       centre chosen so far is ``> cutoff``;
    4. labels: every point joins its **nearest** centre (which need not be the centre that covered it in
       step 3); equal distances go to the lower centre index.

    Guarantees: centres are pairwise ``> cutoff`` apart, every point is ``<= cutoff`` from its centre, and
    every centre is labelled with itself. With ``cutoff = 0`` every point is its own centre except exact
    duplicates (equal rows after normalisation): their distance 0 is not ``> 0``, so they merge.

    Args:
        x: ``(n, c)`` post-RoPE keys of the kept tokens, all KV heads concatenated; any floating dtype.
        cutoff: Clustering cutoff ``d_c >= 0`` on the cosine distance.
        density_dc: Bandwidth of the density kernel (fixed to 2 in the reference; not the cutoff).

    Returns:
        ``(centres, labels)``: ``centres`` is a sorted LongTensor of centre indices into ``x``; ``labels`` is a
        LongTensor ``(n,)`` giving, for each point, the index into ``x`` of its centre.

    Raises:
        ValueError: If ``x`` is not 2-D with at least one column or contains non-finite values, if
            ``cutoff < 0`` or ``density_dc <= 0``.
    """
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"x must be 2-D (n, c) with c >= 1, got {tuple(x.shape)}")
    _check_cutoff("cutoff", cutoff)
    if not density_dc > 0:
        raise ValueError(f"density_dc must be > 0, got {density_dc}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains non-finite values")
    n = x.shape[0]
    if n == 0:
        empty = torch.zeros(0, dtype=torch.long, device=x.device)
        return empty, empty.clone()

    dist = cosine_distances(x)
    order = _density_order(dist, density_dc)
    # The greedy pass is inherently sequential; doing it on the CPU over a bool matrix avoids one device sync
    # per visited point. covers[a, b]: the a-th visited point lies within the cutoff of the b-th.
    covers = (dist <= cutoff)[order][:, order].cpu()
    uncovered = torch.ones(n, dtype=torch.bool)
    picked = []
    pos = 0
    while True:
        # The first uncovered point in visiting order is > cutoff from every centre chosen so far, and all
        # points before it are covered: this is exactly the greedy rule, jumping over covered points.
        picked.append(pos)
        uncovered &= ~covers[pos]
        uncovered[pos] = False  # already implied by D_pp = 0 <= cutoff; explicit so the loop always ends
        if not bool(uncovered.any()):
            break
        pos = int(torch.argmax(uncovered.to(torch.uint8)))
    centres = order[torch.tensor(picked, device=order.device)].sort().values
    # argmin returns the first minimum, and centres are ascending, hence ties go to the lower centre index.
    labels = centres[torch.argmin(dist[:, centres], dim=1)]
    return centres, labels


def retrieve_pruned(
    pruned_x: Tensor, centre_x: Tensor, centres: Tensor, cutoff: float, alpha: float = 1.5
) -> Tensor:
    """Let EUTI-pruned tokens rejoin the nearest DBDPC cluster when it is close enough (spec §3.3 step 4).

    Distances are cosine distances in float32 (see `cosine_distances`).

    Args:
        pruned_x: ``(m, c)`` post-RoPE keys of the pruned visual tokens.
        centre_x: ``(k, c)`` the same vectors for the centres, in the order of ``centres``.
        centres: LongTensor ``(k,)`` of centre indices into the kept set (as returned by `dbdpc`).
        cutoff: The DBDPC cutoff ``d_c >= 0``.
        alpha: Retrieval radius factor (``coef_pruned``), ``>= 0``: a pruned token is retrieved iff its
            nearest centre is at distance ``<= alpha * cutoff``.

    Returns:
        LongTensor ``(m,)``: the value from ``centres`` of the nearest centre (ties: the earlier one in
        ``centres``), or −1 when that centre is too far or there is no centre.

    Raises:
        ValueError: On inconsistent shapes or a negative ``cutoff``/``alpha``.
    """
    _check_index_vector("centres", centres)
    if pruned_x.ndim != 2 or centre_x.ndim != 2 or pruned_x.shape[1] != centre_x.shape[1]:
        raise ValueError(
            f"pruned_x and centre_x must be (m, c) and (k, c), got {tuple(pruned_x.shape)}, {tuple(centre_x.shape)}"
        )
    if centre_x.shape[0] != centres.shape[0]:
        raise ValueError(f"centre_x has {centre_x.shape[0]} rows but there are {centres.shape[0]} centres")
    _check_cutoff("cutoff", cutoff)
    _check_cutoff("alpha", alpha)
    m = pruned_x.shape[0]
    out = torch.full((m,), -1, dtype=torch.long, device=centres.device)
    if m == 0 or centres.numel() == 0:
        return out
    dist = cosine_distances(pruned_x, centre_x)
    nearest_dist, nearest = dist.min(dim=1)
    hit = nearest_dist <= alpha * cutoff
    out[hit] = centres[nearest[hit]]
    return out


def merge_clusters(
    hidden: Tensor,
    labels: Tensor,
    centres: Tensor,
    pruned_hidden: Tensor | None = None,
    pruned_labels: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Replace each cluster by the plain mean of its members (spec §3.3 step 5).

    Members are the kept tokens labelled with the centre plus the retrieved pruned tokens (label ``!= -1``).
    The sums are accumulated in float32 and the means cast back to ``hidden.dtype``. The merged token takes the
    centre's slot and keeps the centre's position; positions are the caller's business.

    Args:
        hidden: ``(n, D)`` hidden states of the kept tokens.
        labels: LongTensor ``(n,)``, centre index (into the kept set) of each kept token.
        centres: Sorted LongTensor ``(k,)`` of distinct centre indices; every centre must be labelled with
            itself.
        pruned_hidden: Optional ``(m, D)`` hidden states of the pruned tokens.
        pruned_labels: Optional LongTensor ``(m,)`` from `retrieve_pruned` (−1: not retrieved). Must be
            given together with ``pruned_hidden``.

    Returns:
        ``(merged, sizes)``: ``merged`` is ``(k, D)`` in ``hidden.dtype``, row ``i`` for ``centres[i]``;
        ``sizes`` is float32 ``(k,)``, the member counts, retrieved tokens included.

    Raises:
        ValueError: On inconsistent shapes, unsorted or repeated centres, labels that are not centres, or a
            centre not labelled with itself.
    """
    if hidden.ndim != 2:
        raise ValueError(f"hidden must be 2-D (n, D), got {tuple(hidden.shape)}")
    n, width = hidden.shape
    _check_index_vector("labels", labels)
    _check_index_vector("centres", centres)
    if labels.shape[0] != n:
        raise ValueError(f"labels must have {n} entries, got {labels.shape[0]}")
    if (pruned_hidden is None) != (pruned_labels is None):
        raise ValueError("pruned_hidden and pruned_labels must be given together")
    k = centres.shape[0]
    if k and (bool((centres[1:] <= centres[:-1]).any()) or int(centres[0]) < 0 or int(centres[-1]) >= n):
        raise ValueError("centres must be strictly increasing indices into hidden")
    if bool((labels[centres] != centres).any()):
        raise ValueError("every centre must be labelled with itself")

    def slots(lab: Tensor) -> Tensor:
        slot = torch.searchsorted(centres, lab).clamp_max(max(k - 1, 0))
        if lab.numel() and (k == 0 or bool((centres[slot] != lab).any())):
            raise ValueError("labels must be values from centres")
        return slot

    sums = torch.zeros(k, width, dtype=torch.float32, device=hidden.device)
    sizes = torch.zeros(k, dtype=torch.float32, device=hidden.device)
    kept_slot = slots(labels)
    sums.index_add_(0, kept_slot, hidden.float())
    sizes.index_add_(0, kept_slot, torch.ones(n, dtype=torch.float32, device=hidden.device))

    if pruned_hidden is not None and pruned_labels is not None:
        _check_index_vector("pruned_labels", pruned_labels)
        if pruned_hidden.ndim != 2 or pruned_hidden.shape[1] != width:
            raise ValueError(f"pruned_hidden must be (m, {width}), got {tuple(pruned_hidden.shape)}")
        if pruned_labels.shape[0] != pruned_hidden.shape[0]:
            raise ValueError(
                f"pruned_labels must have {pruned_hidden.shape[0]} entries, got {pruned_labels.shape[0]}"
            )
        taken = pruned_labels != -1
        lab = pruned_labels[taken]
        slot = slots(lab)
        sums.index_add_(0, slot, pruned_hidden[taken].float())
        sizes.index_add_(0, slot, torch.ones(lab.shape[0], dtype=torch.float32, device=hidden.device))

    # sizes >= 1 for every centre, since each centre is its own member (checked above).
    return (sums / sizes[:, None]).to(hidden.dtype), sizes


@dataclass
class PACT(LLMStrategy):
    """PACT (Dhouib et al., CVPR 2025): EUTI importance pruning, then DBDPC clustering, inside the LLM.

    At the input of its layer (default 4): EUTI scores every visual token from that layer's own pre-RoPE
    q/k and the hidden-state norm and keeps ``keep_ratio`` of them; DBDPC clusters the kept tokens on their
    post-RoPE keys; pruned tokens within ``alpha * cutoff`` of a centre join its cluster; each cluster
    becomes one token (plain mean, at the centre's slot and position) whose size enters the following
    layers' attention as ``log size`` (proportional attention), in prefill and in cached decoding.

    Deliberate differences from the reference code are listed in the docs (strategies page): scores and
    distances in float32, deterministic tie order, batches handled per sample, no attention matrix.

    Args:
        keep_ratio: EUTI's λ, the fraction of visual tokens kept before clustering.
        cutoff: DBDPC's cutoff ``d_c`` (cosine distance); 0 disables clustering of distinct tokens.
        alpha: Retrieval radius factor for pruned tokens (``alpha * cutoff``).
        density_dc: The density kernel's fixed width (the reference uses 2).
        retrieve: Merge pruned tokens into nearby clusters (the reference's default).
        proportional_attention: Add ``log size`` for merged tokens in the following layers.
    """

    name: ClassVar[str] = "pact"
    needs_projections: ClassVar[bool] = True
    keep_ratio: float = 0.55
    cutoff: float = 0.21
    alpha: float = 1.5
    density_dc: float = 2.0
    retrieve: bool = True
    proportional_attention: bool = True

    def check(self) -> None:
        """Parameter ranges."""
        check_keep_ratio("pact", self.keep_ratio)
        if not (self.cutoff >= 0 and math.isfinite(self.cutoff)):
            raise ScheduleError(f"pact: cutoff must be a finite cosine distance >= 0, got {self.cutoff}")
        if not self.alpha >= 0:
            raise ScheduleError(f"pact: alpha must be >= 0, got {self.alpha}")
        if not self.density_dc > 0:
            raise ScheduleError(f"pact: density_dc must be > 0, got {self.density_dc}")

    def default_layers(self, num_layers: int) -> list[int]:
        """Layer 4, the reference's default (the last layer of a shallower LLM)."""
        return [min(4, num_layers - 1)]

    def validate(self, stage: Any, adapter: Any) -> None:
        """One layer; proportional attention needs a backend that takes an additive bias."""
        if stage.layers is not None and len(set(stage.layers)) != 1:
            raise ScheduleError(f"pact reduces once: give one layer, got {list(stage.layers)}")
        if self.proportional_attention and adapter.attn_implementation.startswith("flash"):
            raise ScheduleError(
                "pact: proportional attention needs an additive attention bias, which flash attention cannot "
                "take; set proportional_attention=False or load the model with attn_implementation='sdpa'"
            )

    def select(self, view: LLMView) -> LLMDecision:
        """EUTI, DBDPC, retrieval and merge for one sample."""
        p = view.projections()
        n = view.num_present
        visual = p.visual
        scores = euti_scores(p.q, p.k, p.hidden, non_text_mask(visual), visual)
        kept = euti_select(scores, euti_keep_count(n, self.keep_ratio))
        keys = p.k_rope[:, visual].permute(1, 0, 2).reshape(n, -1)  # all KV heads concatenated
        pruned = torch.ones(n, dtype=torch.bool, device=keys.device)
        pruned[kept] = False
        pruned_idx = pruned.nonzero().squeeze(1)
        centres, labels = dbdpc(keys[kept], self.cutoff, self.density_dc)
        plabels = None
        if self.retrieve and pruned_idx.numel() and centres.numel():
            plabels = retrieve_pruned(keys[pruned_idx], keys[kept][centres], centres, self.cutoff, self.alpha)
        hidden = view.hidden
        merged, counts = merge_clusters(
            hidden[kept], labels, centres,
            hidden[pruned_idx] if plabels is not None else None, plabels,
        )
        # sizes add the members' own sizes (1 unless an earlier stage merged them)
        sizes = torch.zeros(centres.numel(), device=hidden.device)
        slot = torch.full((n,), -1, dtype=torch.long, device=hidden.device)
        slot[kept[centres]] = torch.arange(centres.numel(), device=hidden.device)
        sizes.index_add_(0, slot[kept[labels]], view.sizes[kept].float())
        members = torch.full((n,), -1, dtype=torch.long, device=hidden.device)
        members[kept] = slot[kept[labels]]
        if plabels is not None:
            ok = plabels >= 0
            sizes.index_add_(0, slot[kept[plabels[ok]]], view.sizes[pruned_idx[ok]].float())
            members[pruned_idx[ok]] = slot[kept[plabels[ok]]]
        info = {"euti_kept": int(kept.numel()), "clusters": int(centres.numel()),
                "retrieved": int((plabels >= 0).sum()) if plabels is not None else 0}
        del counts
        return LLMDecision(
            keep=kept[centres],
            hidden=merged,
            sizes=sizes if self.proportional_attention else None,
            members=members,
            info=info,
        )
