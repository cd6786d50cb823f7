"""FLOPs accounting for transformer layers, as pure functions of shapes and token counts.

Cost depends on shapes, not on weights, so everything here takes a `LayerShape` and integers and
returns integers: no model, no tensor, no device. The formulas are published in ``docs/flops.md``;
the conventions, in short:

* One multiply-accumulate is 2 FLOPs, so ``x @ W`` with ``x`` of ``n × a`` and ``W`` of ``a × b``
  costs ``2·n·a·b`` (the convention of ``torch.utils.flop_counter``).
* Counted: the q/k/v and output projections, the two attention matmuls (``Q·Kᵀ`` and ``P·V``), the
  MLP matrices. Not counted (lower order, and unchanged in kind by token compression): norms, RoPE,
  softmax, activations, biases, residual adds, the patch embedding, the projector/merger, token
  embeddings and the LM head.
* Causal masking is not discounted by default: eager attention and the SDPA math backend compute the
  full ``n_q × n_k`` score rectangle and mask it afterwards. ``causal=True`` counts only the
  visible (lower-triangle) pairs, which is closer to what block-skipping kernels such as
  FlashAttention-2 execute.

Examples:
    >>> from tokcomp.flops import LayerShape, llm_prefill_flops, ideal_speedup
    >>> qwen2_vl_2b = LayerShape(hidden=1536, intermediate=8960, num_heads=12, num_kv_heads=2,
    ...                          head_dim=128, gated_mlp=True)
    >>> full = llm_prefill_flops(qwen2_vl_2b, [2000] * 28)
    >>> half = llm_prefill_flops(qwen2_vl_2b, [1000] * 28)
    >>> round(ideal_speedup(half, full), 3)
    2.123
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

__all__ = [
    "COMPONENTS",
    "LayerShape",
    "StackFlops",
    "attention_pairs",
    "flops_ratio",
    "ideal_speedup",
    "layer_flops",
    "linear_flops",
    "llm_decode_flops",
    "llm_prefill_flops",
    "model_shapes",
    "qwen2_5_vl_window_groups",
    "vision_attention_groups",
    "vision_flops",
]

COMPONENTS: tuple[str, ...] = ("qkv", "attn_scores", "attn_values", "out_proj", "mlp")
"""The keys of every per-layer FLOPs dict, in data-flow order; ``"total"`` is their sum."""

# Vision towers whose MLP is SwiGLU-style (gate, up, down). Every other vision tower tokcomp supports
# (Qwen2-VL, SigLIP, CLIP, InternViT) uses a plain fc1/fc2 MLP, and the config fields cannot tell the
# two apart: Qwen2.5-VL's vision config has the same hidden_size/intermediate_size fields as SigLIP's.
_GATED_VISION_MODEL_TYPES = frozenset({"qwen2_5_vl_vision"})


def _check_count(name: str, value: Any, *, minimum: int = 0) -> int:
    # bool is an int subclass; True tokens is always a caller bug, so refuse it explicitly.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class LayerShape:
    """The shape of one transformer layer, all that its FLOPs depend on.

    Attributes:
        hidden: Model width D (the residual stream).
        intermediate: MLP width I.
        num_heads: Query heads H.
        num_kv_heads: Key/value heads H_kv (H_kv < H under grouped-query attention; = H otherwise).
        head_dim: Per-head width d. H·d need not equal D (it does not for some LLMs).
        gated_mlp: True for a SwiGLU-style MLP with three D×I matrices (gate, up, down: Qwen2, Llama,
            Qwen2.5-VL's vision tower); False for a plain two-matrix MLP (fc1, fc2: CLIP, SigLIP,
            InternViT, Qwen2-VL's vision tower).

    Examples:
        >>> LayerShape(hidden=8, intermediate=16, num_heads=2, num_kv_heads=1, head_dim=4).gated_mlp
        True
    """

    hidden: int
    intermediate: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    gated_mlp: bool = True

    def __post_init__(self) -> None:
        for name in ("hidden", "intermediate", "num_heads", "num_kv_heads", "head_dim"):
            _check_count(name, getattr(self, name), minimum=1)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if not isinstance(self.gated_mlp, bool):
            raise TypeError(f"gated_mlp must be a bool, got {self.gated_mlp!r}")

    @classmethod
    def from_text_config(cls, cfg: Any, *, gated_mlp: bool = True) -> LayerShape:
        """The decoder-layer shape of a language model config.

        Reads ``hidden_size``, ``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``
        (absent or None: no GQA) and ``head_dim`` (absent or None: ``hidden_size // num_attention_heads``),
        the fields of ``Qwen2Config``, ``Qwen2VLTextConfig``, ``Qwen2_5_VLTextConfig`` and ``LlamaConfig``.

        Args:
            cfg: A text config (e.g. ``config.text_config`` of a VLM config).
            gated_mlp: Whether the MLP is SwiGLU-style; True for every LLM tokcomp supports.

        Returns:
            The layer shape.

        Raises:
            ValueError: If a required field is missing.

        Examples:
            >>> import transformers
            >>> LayerShape.from_text_config(transformers.Qwen2Config(hidden_size=64, intermediate_size=128,
            ...     num_attention_heads=4, num_key_value_heads=2)).head_dim
            16
        """
        hidden = _field(cfg, "hidden_size")
        heads = _field(cfg, "num_attention_heads")
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or hidden // heads
        return cls(
            hidden=hidden,
            intermediate=_field(cfg, "intermediate_size"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            gated_mlp=gated_mlp,
        )

    @classmethod
    def from_vision_config(cls, cfg: Any, *, gated_mlp: bool | None = None) -> LayerShape:
        """The block shape of a vision-tower config.

        Handles the field names of the supported towers:

        * Qwen2-VL (``qwen2_vl_vision``): width ``embed_dim``, MLP width ``int(embed_dim * mlp_ratio)``,
          heads ``num_heads``, plain MLP. Its ``hidden_size`` is the *LLM* width the merger projects to,
          so it is deliberately not read.
        * Qwen2.5-VL (``qwen2_5_vl_vision``): ``hidden_size``, ``intermediate_size``, ``num_heads``,
          gated MLP (its ``out_hidden_size`` is the LLM width).
        * SigLIP, CLIP, InternViT (``siglip_vision_model``, ``clip_vision_model``, ``internvl_vision``):
          ``hidden_size``, ``intermediate_size``, ``num_attention_heads``, plain MLP.

        Vision attention has no GQA, so ``num_kv_heads == num_heads``; ``head_dim`` is width // heads.

        Args:
            cfg: A vision config (e.g. ``config.vision_config`` of a VLM config).
            gated_mlp: Override the MLP kind; None decides by ``cfg.model_type`` (gated only for
                Qwen2.5-VL; unknown towers are taken as plain, the ViT convention).

        Returns:
            The block shape.

        Raises:
            ValueError: If a required field is missing.

        Examples:
            >>> import transformers
            >>> vc = transformers.Qwen2VLConfig(vision_config=dict(embed_dim=32, num_heads=2, mlp_ratio=4,
            ...     hidden_size=64)).vision_config
            >>> (LayerShape.from_vision_config(vc).hidden, LayerShape.from_vision_config(vc).intermediate)
            (32, 128)
        """
        heads = getattr(cfg, "num_heads", None) or _field(cfg, "num_attention_heads")
        if getattr(cfg, "embed_dim", None) is not None and getattr(cfg, "mlp_ratio", None) is not None:
            # Qwen2-VL: the block width is embed_dim; the modeling code builds fc1 as int(dim * ratio).
            hidden = int(cfg.embed_dim)
            intermediate = int(cfg.embed_dim * cfg.mlp_ratio)
        else:
            hidden = _field(cfg, "hidden_size")
            intermediate = _field(cfg, "intermediate_size")
        if gated_mlp is None:
            gated_mlp = getattr(cfg, "model_type", None) in _GATED_VISION_MODEL_TYPES
        return cls(
            hidden=hidden,
            intermediate=intermediate,
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=hidden // heads,
            gated_mlp=gated_mlp,
        )


def _field(cfg: Any, name: str) -> int:
    value = getattr(cfg, name, None)
    if value is None:
        raise ValueError(
            f"{type(cfg).__name__} has no {name!r}; cannot read a layer shape from it "
            "(build the LayerShape by hand for this architecture)"
        )
    return int(value)


class StackFlops(TypedDict):
    """FLOPs of a stack of layers (an LLM pass or a vision tower); a plain, JSON-ready dict.

    Attributes:
        layers: One per-layer dict per layer (keys `COMPONENTS` and ``"total"``), in layer order.
        qkv: Sum over layers of the q/k/v projections.
        attn_scores: Sum over layers of ``Q·Kᵀ``.
        attn_values: Sum over layers of ``P·V``.
        out_proj: Sum over layers of the output projection.
        mlp: Sum over layers of the MLP.
        total: Sum of all of the above.
    """

    layers: list[dict[str, int]]
    qkv: int
    attn_scores: int
    attn_values: int
    out_proj: int
    mlp: int
    total: int


def linear_flops(n_tokens: int, d_in: int, d_out: int) -> int:
    """FLOPs of a dense layer ``y = x W (+ b)`` applied to ``n_tokens`` tokens: ``2·n·d_in·d_out``.

    Useful for pieces outside the layer stack (a projector, a merger) that a caller wants to add.

    Args:
        n_tokens: Number of token rows.
        d_in: Input width.
        d_out: Output width.

    Returns:
        The FLOPs (the bias add is not counted).

    Examples:
        >>> linear_flops(3, 8, 16)
        768
    """
    _check_count("n_tokens", n_tokens)
    _check_count("d_in", d_in)
    _check_count("d_out", d_out)
    return 2 * n_tokens * d_in * d_out


def attention_pairs(n_queries: int, n_keys: int, *, causal: bool = False) -> int:
    """Number of (query, key) pairs scored by attention.

    Without ``causal``, the full rectangle ``n_q·n_k``. With it, the queries are taken to be the last
    ``n_q`` of the ``n_k`` keys (prefill: n_q = n_k; decode: the new tokens after the cache), and query
    ``i`` sees keys up to its own position: ``n_q·(n_q+1)/2 + n_q·(n_k − n_q)`` pairs.

    Args:
        n_queries: Query tokens n_q.
        n_keys: Key tokens n_k (the new tokens included).
        causal: Count only the pairs a causal mask leaves visible.

    Returns:
        The number of pairs.

    Raises:
        ValueError: If ``causal`` and ``n_keys < n_queries`` (a query would lack its own key).

    Examples:
        >>> attention_pairs(3, 3), attention_pairs(3, 3, causal=True), attention_pairs(2, 5, causal=True)
        (9, 6, 9)
    """
    _check_count("n_queries", n_queries)
    _check_count("n_keys", n_keys)
    if not causal:
        return n_queries * n_keys
    if n_keys < n_queries:
        raise ValueError(
            f"causal attention needs n_keys >= n_queries (the queries are the last keys), "
            f"got n_queries={n_queries}, n_keys={n_keys}"
        )
    return n_queries * (n_queries + 1) // 2 + n_queries * (n_keys - n_queries)


def layer_flops(shape: LayerShape, n_queries: int, n_keys: int, *, causal: bool = False) -> dict[str, int]:
    """FLOPs of one transformer layer processing ``n_queries`` new tokens against ``n_keys`` keys.

    With n = n_queries, D = hidden, I = intermediate, H / H_kv heads, d = head_dim, P = attention pairs
    (``n_q·n_k``, or see `attention_pairs` for ``causal``):

    * ``qkv`` = 2·n·D·H·d (q) + 2·n·D·H_kv·d (k) + 2·n·D·H_kv·d (v) — projections are computed for the new
      tokens only; the other keys come from the KV cache.
    * ``attn_scores`` = 2·P·H·d (``Q·Kᵀ``; every query head scores, whatever H_kv).
    * ``attn_values`` = 2·P·H·d (``P·V``).
    * ``out_proj`` = 2·n·H·d·D.
    * ``mlp`` = 3·2·n·D·I if gated (gate, up, down), else 2·2·n·D·I (fc1, fc2).

    Norms, RoPE, softmax, activations, biases and residual adds are ignored: they are O(n·D) or
    O(n_q·n_k·H), lower order than the matmuls. Causal masking is not discounted unless ``causal``:
    eager attention and the SDPA math backend compute the whole rectangle, as does
    ``torch.utils.flop_counter``'s count.

    Args:
        shape: The layer shape.
        n_queries: Tokens whose hidden states this layer computes (prefill: the sequence; decode: 1).
        n_keys: Keys they attend to, the new tokens included (prefill: = n_queries).
        causal: Count only the lower-triangle pairs a causal mask leaves visible.

    Returns:
        A dict with keys ``"qkv"``, ``"attn_scores"``, ``"attn_values"``, ``"out_proj"``, ``"mlp"`` and
        ``"total"`` (their sum), in FLOPs.

    Examples:
        >>> layer_flops(LayerShape(hidden=8, intermediate=16, num_heads=2, num_kv_heads=1, head_dim=4), 3, 3)
        {'qkv': 768, 'attn_scores': 144, 'attn_values': 144, 'out_proj': 384, 'mlp': 2304, 'total': 3744}
    """
    pairs = attention_pairs(n_queries, n_keys, causal=causal)
    n, big_d, h, h_kv, d = n_queries, shape.hidden, shape.num_heads, shape.num_kv_heads, shape.head_dim
    mlp_matrices = 3 if shape.gated_mlp else 2
    out = {
        "qkv": 2 * n * big_d * h * d + 2 * (2 * n * big_d * h_kv * d),
        "attn_scores": 2 * pairs * h * d,
        "attn_values": 2 * pairs * h * d,
        "out_proj": 2 * n * h * d * big_d,
        "mlp": mlp_matrices * 2 * n * big_d * shape.intermediate,
    }
    out["total"] = sum(out.values())
    return out


def _stack(layers: list[dict[str, int]]) -> StackFlops:
    def total(key: str) -> int:
        return sum(layer[key] for layer in layers)

    return StackFlops(
        layers=layers,
        qkv=total("qkv"),
        attn_scores=total("attn_scores"),
        attn_values=total("attn_values"),
        out_proj=total("out_proj"),
        mlp=total("mlp"),
        total=total("total"),
    )


def llm_prefill_flops(
    shape: LayerShape, tokens_per_layer: Sequence[int], *, causal: bool = False
) -> StackFlops:
    """FLOPs of a prefill in which decoder layer ``i`` processes ``tokens_per_layer[i]`` tokens.

    Queries = keys = that count at each layer: tokens pruned before a layer are gone both from its input
    and from its KV cache. One entry per decoder layer (its length is the depth).

    Args:
        shape: The decoder-layer shape (`LayerShape.from_text_config`).
        tokens_per_layer: Tokens (text + visual) entering each layer, for one sequence.
        causal: Count only causally visible attention pairs (see `layer_flops`).

    Returns:
        Per-layer dicts under ``"layers"`` and their component-wise sums (see `StackFlops`).

    Examples:
        >>> shape = LayerShape(hidden=8, intermediate=16, num_heads=2, num_kv_heads=1, head_dim=4)
        >>> llm_prefill_flops(shape, [3, 3])["total"]
        7488
    """
    layers = [layer_flops(shape, _check_count("tokens", n), n, causal=causal) for n in tokens_per_layer]
    return _stack(layers)


def llm_decode_flops(
    shape: LayerShape, kv_per_layer: Sequence[int], new_tokens: int = 1, *, causal: bool = False
) -> StackFlops:
    """FLOPs of one decoding step of ``new_tokens`` tokens, layer ``i`` holding ``kv_per_layer[i]`` cached.

    Each layer projects the new tokens only and attends over ``kv_per_layer[i] + new_tokens`` keys (the
    cache plus the new tokens' own keys). Layers whose visual tokens were pruned at prefill hold shorter
    caches, which is where compression keeps paying during decoding.

    Args:
        shape: The decoder-layer shape.
        kv_per_layer: Cache length of each layer *before* this step.
        new_tokens: Tokens decoded in this step (1 for ordinary generation).
        causal: Among several new tokens, count only causally visible pairs (no effect for 1 token).

    Returns:
        Per-layer dicts under ``"layers"`` and their sums (see `StackFlops`).

    Examples:
        >>> shape = LayerShape(hidden=8, intermediate=16, num_heads=2, num_kv_heads=1, head_dim=4)
        >>> llm_decode_flops(shape, [5])["total"]
        1344
    """
    _check_count("new_tokens", new_tokens, minimum=1)
    layers = [
        layer_flops(shape, new_tokens, _check_count("kv", kv) + new_tokens, causal=causal)
        for kv in kv_per_layer
    ]
    return _stack(layers)


def _groups(entry: int | Sequence[int], where: str) -> list[int]:
    if isinstance(entry, int) and not isinstance(entry, bool):
        return [_check_count(where, entry)]
    return [_check_count(where, g) for g in entry]


def vision_flops(
    shape: LayerShape,
    tokens_per_block: Sequence[int | Sequence[int]],
    windows: Sequence[Sequence[int] | None] | None = None,
) -> StackFlops:
    """FLOPs of a vision tower whose block ``i`` processes ``tokens_per_block[i]`` tokens.

    Vision attention is full (non-causal) attention *within* attention groups: an image, a video frame
    (Qwen2-VL attends per temporal patch), a tile (LLaVA-OneVision, InternVL run each crop separately),
    or a window (Qwen2.5-VL's windowed blocks). An entry of ``tokens_per_block`` is either an int, one
    group, or a sequence of group sizes. The projections and MLP cost the sum of the groups; attention
    costs the sum of each group's square, Σ n_g², not (Σ n_g)².

    Count the tokens a block actually runs on, CLS included (CLIP: 1 + 576 at 336 px; SigLIP and the Qwen
    towers have none). Every block of the tower runs even when the VLM reads an earlier layer's output
    (LLaVA-1.5 reads the penultimate CLIP layer but ``transformers`` runs all of them), so pass one entry
    per block of the tower.

    Args:
        shape: The block shape (`LayerShape.from_vision_config`).
        tokens_per_block: Per block, the token count of one group, or the list of group sizes.
        windows: Optional per-block override of the attention groups, for towers that mix windowed and
            full blocks: ``windows[i]`` (when not None) lists the window sizes block ``i`` attends within,
            and must sum to the block's token count; None entries keep ``tokens_per_block[i]``'s groups.
            See `qwen2_5_vl_window_groups`.

    Returns:
        Per-block dicts under ``"layers"`` and their sums (see `StackFlops`).

    Raises:
        ValueError: If ``windows`` has a different length than ``tokens_per_block``, or a block's windows
            do not add up to its tokens.

    Examples:
        >>> vit = LayerShape(hidden=8, intermediate=16, num_heads=2, num_kv_heads=2, head_dim=4,
        ...                  gated_mlp=False)
        >>> one_group, two_groups = vision_flops(vit, [4]), vision_flops(vit, [[2, 2]])
        >>> one_group["attn_scores"], two_groups["attn_scores"], one_group["mlp"] == two_groups["mlp"]
        (256, 128, True)
    """
    if windows is not None and len(windows) != len(tokens_per_block):
        raise ValueError(
            f"windows has {len(windows)} entries but tokens_per_block has {len(tokens_per_block)}; "
            "give one entry (None for full attention) per block"
        )
    layers = []
    for i, entry in enumerate(tokens_per_block):
        groups = _groups(entry, f"tokens_per_block[{i}]")
        block_windows = None if windows is None else windows[i]
        if block_windows is not None:
            attention_groups = _groups(block_windows, f"windows[{i}]")
            if sum(attention_groups) != sum(groups):
                raise ValueError(
                    f"block {i}: windows add up to {sum(attention_groups)} tokens but the block has "
                    f"{sum(groups)}; windows must partition the block's tokens"
                )
            groups = attention_groups
        # Projections and the MLP are linear in n, so summing a full-attention layer over the groups gives
        # them on Σ n_g and the attention on Σ n_g², with no separate formula to keep in step.
        per_group = [layer_flops(shape, g, g) for g in groups]
        layers.append({key: sum(p[key] for p in per_group) for key in (*COMPONENTS, "total")})
    return _stack(layers)


def _grid(grid_thw: Sequence[Sequence[int]]) -> list[tuple[int, int, int]]:
    grid = []
    for row in grid_thw:
        t, h, w = (int(x) for x in row)
        for name, value in (("t", t), ("h", h), ("w", w)):
            _check_count(f"grid {name}", value, minimum=1)
        grid.append((t, h, w))
    return grid


def vision_attention_groups(grid_thw: Sequence[Sequence[int]]) -> list[int]:
    """Attention groups of Qwen2-VL / Qwen2.5-VL full-attention blocks: one per temporal patch.

    ``transformers`` splits the packed patch sequence at every frame (``h·w`` patches, ``t`` times per
    image or video), so a video's frames do not attend to each other inside the vision tower.

    Args:
        grid_thw: Per image or video, ``(t, h, w)`` in patches (``image_grid_thw`` / ``video_grid_thw``
            rows; a tensor's ``.tolist()`` works).

    Returns:
        The group sizes, to pass as one entry of ``vision_flops``'s ``tokens_per_block``.

    Examples:
        >>> vision_attention_groups([(1, 4, 6), (2, 4, 4)])
        [24, 16, 16]
    """
    return [h * w for t, h, w in _grid(grid_thw) for _ in range(t)]


def qwen2_5_vl_window_groups(
    grid_thw: Sequence[Sequence[int]], *, window_size: int, patch_size: int, spatial_merge_size: int
) -> list[int]:
    """Window sizes of Qwen2.5-VL's windowed vision blocks, in patches.

    Mirrors ``transformers.vision_utils.get_vision_window_index``: the merged grid
    ``(h / m) × (w / m)`` of each temporal patch is tiled by windows of ``window_size // m // patch_size``
    merged units per side, windows at the right and bottom edges are cut short, and each merged unit is
    ``m²`` patches. Pass the result as ``vision_flops``'s ``windows[i]`` for every block not in
    ``fullatt_block_indexes``.

    Args:
        grid_thw: Per image or video, ``(t, h, w)`` in patches.
        window_size: ``vision_config.window_size`` (pixels; 112 in Qwen2.5-VL).
        patch_size: ``vision_config.patch_size`` (14).
        spatial_merge_size: ``vision_config.spatial_merge_size`` (m = 2).

    Returns:
        The window sizes in patches, in the order the model runs them; they sum to Σ t·h·w.

    Examples:
        >>> qwen2_5_vl_window_groups([(1, 20, 12)], window_size=112, patch_size=14, spatial_merge_size=2)
        [64, 32, 64, 32, 32, 16]
    """
    merge = _check_count("spatial_merge_size", spatial_merge_size, minimum=1)
    side = window_size // merge // patch_size
    if side < 1:
        raise ValueError(
            f"window_size {window_size} is smaller than one merged unit ({merge} x {patch_size} px)"
        )
    sizes = []
    for t, h, w in _grid(grid_thw):
        rows, cols = h // merge, w // merge
        row_spans = [min(side, rows - r) for r in range(0, rows, side)]
        col_spans = [min(side, cols - c) for c in range(0, cols, side)]
        frame = [a * b * merge * merge for a in row_spans for b in col_spans]
        sizes.extend(frame * t)
    return sizes


def _total(flops: int | Mapping[str, Any]) -> int:
    if isinstance(flops, Mapping):
        return int(flops["total"])
    return int(flops)


def flops_ratio(compressed: int | Mapping[str, Any], baseline: int | Mapping[str, Any]) -> float:
    """Compressed FLOPs as a fraction of the baseline's (0.4 = 60% of the FLOPs saved).

    Args:
        compressed: FLOPs of the compressed run: an int, or any dict with a ``"total"`` (`layer_flops`,
            `StackFlops`).
        baseline: FLOPs of the uncompressed run, likewise.

    Returns:
        ``compressed / baseline``.

    Raises:
        ValueError: If the baseline is 0.

    Examples:
        >>> flops_ratio(25, {"total": 100})
        0.25
    """
    base = _total(baseline)
    if base <= 0:
        raise ValueError(f"baseline FLOPs must be positive, got {base}")
    return _total(compressed) / base


def ideal_speedup(compressed: int | Mapping[str, Any], baseline: int | Mapping[str, Any]) -> float:
    """The speedup the FLOPs alone promise: ``baseline / compressed``.

    Ideal because real time also pays for memory traffic, kernel launches, the strategy's own overhead,
    and the uncounted lower-order terms; ``tokcomp bench`` measures the real one.

    Args:
        compressed: FLOPs of the compressed run (int or dict with ``"total"``).
        baseline: FLOPs of the uncompressed run, likewise.

    Returns:
        ``baseline / compressed``.

    Raises:
        ValueError: If the compressed FLOPs are 0.

    Examples:
        >>> ideal_speedup(25, 100)
        4.0
    """
    comp = _total(compressed)
    if comp <= 0:
        raise ValueError(f"compressed FLOPs must be positive, got {comp}")
    return _total(baseline) / comp


def model_shapes(config: Any) -> tuple[LayerShape, LayerShape | None, int, int]:
    """The LLM and vision-tower shapes and depths of a VLM config.

    Works for the top-level configs of the supported architectures — ``Qwen2VLConfig``,
    ``Qwen2_5_VLConfig``, ``LlavaOnevisionConfig``, ``InternVLConfig``, ``LlavaConfig`` — which all hold a
    ``text_config`` and a ``vision_config``, and for a bare text config (no vision tower).

    Args:
        config: A model config (``model.config``).

    Returns:
        ``(llm_shape, vision_shape or None, num_llm_layers, num_vision_blocks)``; the vision depth is 0
        without a vision tower. Depths are the layers ``transformers`` runs (Qwen vision ``depth``, else
        ``num_hidden_layers``).

    Raises:
        ValueError: If a required field is missing.

    Examples:
        >>> import transformers
        >>> llm, vit, n_llm, n_vit = model_shapes(transformers.LlavaConfig())
        >>> (llm.hidden, vit.hidden, n_llm, n_vit)
        (4096, 1024, 32, 24)
    """
    text = getattr(config, "text_config", None)
    if text is None:
        text = config
    llm = LayerShape.from_text_config(text)
    num_llm_layers = _field(text, "num_hidden_layers")
    vision_cfg = getattr(config, "vision_config", None)
    if vision_cfg is None:
        return llm, None, num_llm_layers, 0
    vision = LayerShape.from_vision_config(vision_cfg)
    depth = getattr(vision_cfg, "depth", None)
    num_blocks = int(depth) if depth is not None else _field(vision_cfg, "num_hidden_layers")
    return llm, vision, num_llm_layers, num_blocks
