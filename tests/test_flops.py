"""Tests of tokcomp.flops: hand counts, PyTorch's own FLOP counter, properties, and real configs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers.vision_utils import get_vision_cu_seqlens, get_vision_window_index

from tokcomp.flops import (
    COMPONENTS,
    LayerShape,
    attention_pairs,
    flops_ratio,
    ideal_speedup,
    layer_flops,
    linear_flops,
    llm_decode_flops,
    llm_prefill_flops,
    model_shapes,
    qwen2_5_vl_window_groups,
    vision_attention_groups,
    vision_flops,
)

# The tiny shape the hand counts use: D=8, I=16, H=2, H_kv=1, d=4.
TINY = LayerShape(hidden=8, intermediate=16, num_heads=2, num_kv_heads=1, head_dim=4, gated_mlp=True)
QWEN2_VL_2B = LayerShape(hidden=1536, intermediate=8960, num_heads=12, num_kv_heads=2, head_dim=128)
DOCS = Path(__file__).resolve().parents[1] / "docs" / "flops.md"

# Seeded and bounded so the file stays fast and every run sees the same examples.
FAST = settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


# --------------------------------------------------------------------------------------------------------
# Hand counts


def test_hand_count_gated_prefill() -> None:
    # n = 3 tokens, prefill (3 queries, 3 keys).
    # q:      2·n·D·H·d    = 2·3·8·2·4 = 384
    # k:      2·n·D·H_kv·d = 2·3·8·1·4 = 192
    # v:      2·n·D·H_kv·d = 2·3·8·1·4 = 192      → qkv = 384 + 192 + 192 = 768
    # scores: 2·n_q·n_k·H·d = 2·3·3·2·4 = 144
    # values: 2·n_q·n_k·H·d = 2·3·3·2·4 = 144
    # out:    2·n·H·d·D    = 2·3·2·4·8 = 384
    # mlp:    3·2·n·D·I    = 3·2·3·8·16 = 2304    (gate, up, down)
    # total = 768 + 144 + 144 + 384 + 2304 = 3744
    assert layer_flops(TINY, 3, 3) == {
        "qkv": 768,
        "attn_scores": 144,
        "attn_values": 144,
        "out_proj": 384,
        "mlp": 2304,
        "total": 3744,
    }


def test_hand_count_plain_mlp() -> None:
    # Same layer with fc1/fc2: mlp = 2·2·n·D·I = 2·2·3·8·16 = 1536; total = 768 + 144 + 144 + 384 + 1536 = 2976.
    plain = LayerShape(hidden=8, intermediate=16, num_heads=2, num_kv_heads=1, head_dim=4, gated_mlp=False)
    flops = layer_flops(plain, 3, 3)
    assert flops["mlp"] == 1536
    assert flops["total"] == 2976


def test_hand_count_causal() -> None:
    # Causal prefill of 3 tokens sees 1 + 2 + 3 = 6 pairs instead of 9:
    # scores = values = 2·6·H·d = 2·6·2·4 = 96; total = 3744 − 2·(144 − 96) = 3648.
    flops = layer_flops(TINY, 3, 3, causal=True)
    assert (flops["attn_scores"], flops["attn_values"], flops["total"]) == (96, 96, 3648)
    # 2 new queries after 3 cached keys (n_k = 5): the first sees 4 keys, the second 5 → 9 pairs (of 10).
    assert attention_pairs(2, 5, causal=True) == 9
    assert attention_pairs(2, 5) == 10


def test_hand_count_decode() -> None:
    # One new token, 5 cached: n_q = 1, n_k = 6.
    # qkv = 2·1·8·2·4 + 2·(2·1·8·1·4) = 128 + 128 = 256
    # scores = values = 2·1·6·2·4 = 96
    # out = 2·1·2·4·8 = 128; mlp = 3·2·1·8·16 = 768
    # total = 256 + 96 + 96 + 128 + 768 = 1344
    step = llm_decode_flops(TINY, [5])
    assert step["layers"] == [
        {"qkv": 256, "attn_scores": 96, "attn_values": 96, "out_proj": 128, "mlp": 768, "total": 1344}
    ]
    assert step["total"] == 1344
    # Two layers with different caches (layer 1 pruned to 2 cached): n_k = 3 → scores = values = 2·3·2·4 = 48,
    # total = 256 + 48 + 48 + 128 + 768 = 1248.
    assert llm_decode_flops(TINY, [5, 2])["total"] == 1344 + 1248


def test_hand_count_prefill_stack_and_vision_groups() -> None:
    # Layer 0 at 3 tokens (3744, above); layer 1 at 1 token: qkv = 2·8·2·4 + 2·2·8·1·4 = 256,
    # scores = values = 2·1·1·2·4 = 16, out = 2·2·4·8 = 128, mlp = 3·2·8·16 = 768 → 1184.
    prefill = llm_prefill_flops(TINY, [3, 1])
    assert [layer["total"] for layer in prefill["layers"]] == [3744, 1184]
    assert prefill["total"] == 3744 + 1184
    # Vision: 4 tokens as one group vs as two groups of 2 (H = H_kv = 2, d = 4, D = 8, I = 16, plain MLP).
    vit = LayerShape(hidden=8, intermediate=16, num_heads=2, num_kv_heads=2, head_dim=4, gated_mlp=False)
    # one group:  scores = 2·4·4·2·4 = 256;  two groups: 2·(2·2·2·2·4) = 128.
    # Linear terms are equal: qkv = 3·(2·4·8·8) = 1536, mlp = 2·(2·4·8·16) = 2048.
    one, two = vision_flops(vit, [4]), vision_flops(vit, [[2, 2]])
    assert (one["attn_scores"], two["attn_scores"]) == (256, 128)
    assert one["qkv"] == two["qkv"] == 3 * linear_flops(4, 8, 8) == 1536
    assert one["mlp"] == two["mlp"] == 2 * linear_flops(4, 8, 16) == 2048


def test_worked_example_qwen2_vl_2b_matches_docs() -> None:
    # The numbers published in docs/flops.md; a change to the formulas must change the page too.
    full = llm_prefill_flops(QWEN2_VL_2B, [2000] * 28)
    half = llm_prefill_flops(QWEN2_VL_2B, [1000] * 28)
    assert half["layers"][0] == {
        "qkv": 6_291_456_000,
        "attn_scores": 3_072_000_000,
        "attn_values": 3_072_000_000,
        "out_proj": 4_718_592_000,
        "mlp": 82_575_360_000,
        "total": 99_729_408_000,
    }
    assert half["total"] == 2_792_423_424_000
    assert full["total"] == 5_928_910_848_000
    assert round(ideal_speedup(half, full), 3) == 2.123
    assert round(flops_ratio(half, full), 4) == 0.4710
    assert llm_decode_flops(QWEN2_VL_2B, [2000] * 28)["total"] == 2_964_627_456
    progressive = llm_prefill_flops(QWEN2_VL_2B, [2000] * 2 + [1000] * 26)
    assert progressive["total"] == 3_016_458_240_000
    text = DOCS.read_text()
    literals = (
        "2,792,423,424,000",
        "5,928,910,848,000",
        "99,729,408,000",
        "2.123",
        "2,964,627,456",
        "3,016,458,240,000",
    )
    for literal in literals:
        assert literal in text, literal


# --------------------------------------------------------------------------------------------------------
# Cross-checks against torch.utils.flop_counter on real computations


class ExplicitLayer(nn.Module):
    """A pre-norm decoder layer written with nn.Linear and matmuls, in the shapes of a `LayerShape`."""

    def __init__(self, shape: LayerShape) -> None:
        super().__init__()
        self.shape = shape
        big_d, i, d = shape.hidden, shape.intermediate, shape.head_dim
        h, h_kv = shape.num_heads, shape.num_kv_heads
        self.q = nn.Linear(big_d, h * d)
        self.k = nn.Linear(big_d, h_kv * d)
        self.v = nn.Linear(big_d, h_kv * d)
        self.o = nn.Linear(h * d, big_d, bias=False)
        if shape.gated_mlp:
            self.gate, self.up, self.down = nn.Linear(big_d, i), nn.Linear(big_d, i), nn.Linear(i, big_d)
        else:
            self.fc1, self.fc2 = nn.Linear(big_d, i), nn.Linear(i, big_d)

    def forward(
        self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None, sdpa: bool
    ) -> torch.Tensor:
        s, n = self.shape, x.shape[0]
        h = nn.functional.layer_norm(x, (s.hidden,))
        q = self.q(h).view(n, s.num_heads, s.head_dim).transpose(0, 1)
        k = self.k(h).view(n, s.num_kv_heads, s.head_dim).transpose(0, 1)
        v = self.v(h).view(n, s.num_kv_heads, s.head_dim).transpose(0, 1)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=1), torch.cat([cache[1], v], dim=1)
        if sdpa:
            att = nn.functional.scaled_dot_product_attention(q[None], k[None], v[None], enable_gqa=True)[0]
        else:
            rep = s.num_heads // s.num_kv_heads
            k, v = k.repeat_interleave(rep, dim=0), v.repeat_interleave(rep, dim=0)
            att = torch.softmax(q @ k.transpose(1, 2) / s.head_dim**0.5, dim=-1) @ v
        x = x + self.o(att.transpose(0, 1).reshape(n, s.num_heads * s.head_dim))
        h = nn.functional.layer_norm(x, (s.hidden,))
        if s.gated_mlp:
            return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))
        return x + self.fc2(nn.functional.gelu(self.fc1(h)))


def _counted(fn, *args, **kwargs) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


shapes = st.builds(
    lambda big_d, kv, group, d, i, gated: LayerShape(big_d, i, kv * group, kv, d, gated),
    st.integers(1, 16),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(1, 8),
    st.integers(1, 24),
    st.booleans(),
)


@FAST
@given(shape=shapes, n=st.integers(1, 7), cached=st.integers(0, 7), sdpa=st.booleans())
def test_layer_flops_equals_torch_flop_counter(shape: LayerShape, n: int, cached: int, sdpa: bool) -> None:
    layer = ExplicitLayer(shape)
    x = torch.randn(n, shape.hidden)
    cache = None
    if cached:
        cache = (torch.randn(shape.num_kv_heads, cached, shape.head_dim),) * 2
    # PyTorch's counter does not see the fused CPU SDPA kernel, only the math backend's matmuls.
    with sdpa_kernel(SDPBackend.MATH):
        measured = _counted(layer, x, cache, sdpa)
    assert measured == layer_flops(shape, n, n + cached)["total"]


def _per_layer(counter: FlopCounterMode) -> list[int]:
    # Module names look like "Qwen2Model.layers.3", "...encoder.layer.0" (InternViT) or "...blocks.1" (Qwen
    # towers); their totals include every counted op inside the layer and nothing outside it (rotary
    # tables, embeddings, pooling heads, the merger).
    found: dict[int, int] = {}
    for name, ops in counter.get_flop_counts().items():
        match = re.search(r"\.(?:layers|layer|blocks)\.(\d+)$", name)
        if match:
            found[int(match.group(1))] = sum(ops.values())
    return [found[i] for i in sorted(found)]


def _eager(config: transformers.PreTrainedConfig) -> transformers.PreTrainedConfig:
    config._attn_implementation = "eager"  # eager attention is matmuls PyTorch's counter can see
    return config


def _measure(module: nn.Module, *args, **kwargs) -> list[int]:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module.eval()(*args, **kwargs)
    return _per_layer(counter)


TEXT = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 64,
}


@pytest.mark.parametrize(
    ("cls", "cfg_cls", "extra"),
    [
        (transformers.Qwen2Model, transformers.Qwen2Config, {"num_key_value_heads": 2}),
        # head_dim 32 with 4 heads: H·d = 128 ≠ D = 64, so the o_proj and q_proj widths are H·d, not D.
        (transformers.LlamaModel, transformers.LlamaConfig, {"num_key_value_heads": 1, "head_dim": 32}),
    ],
)
def test_llm_prefill_and_decode_match_real_decoder_layers(cls, cfg_cls, extra) -> None:
    torch.manual_seed(0)
    config = _eager(cfg_cls(**TEXT, **extra))
    model = cls(config).eval()
    shape, _, depth, _ = model_shapes(config)
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        past = model(input_ids=ids, use_cache=True).past_key_values
    prefill = _measure(model, input_ids=ids)
    assert prefill == [layer["total"] for layer in llm_prefill_flops(shape, [9] * depth)["layers"]]
    decode = _measure(model, input_ids=ids[:, :1], past_key_values=past, use_cache=True)
    assert decode == [layer["total"] for layer in llm_decode_flops(shape, [9] * depth)["layers"]]


VISION = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2}


@pytest.mark.parametrize(
    ("cls", "config", "image", "tokens"),
    [
        # SigLIP: 56/14 = 4×4 patches, no CLS token.
        (
            transformers.SiglipVisionModel,
            transformers.SiglipVisionConfig(**VISION, image_size=56, patch_size=14),
            56,
            16,
        ),
        # CLIP: 4×4 patches + CLS.
        (
            transformers.CLIPVisionModel,
            transformers.CLIPVisionConfig(**VISION, image_size=56, patch_size=14),
            56,
            17,
        ),
        # InternViT: 4×4 patches + CLS.
        (
            transformers.InternVLVisionModel,
            transformers.InternVLVisionConfig(**VISION, image_size=56, patch_size=14),
            56,
            17,
        ),
    ],
)
def test_vision_flops_match_real_vit_towers(cls, config, image, tokens) -> None:
    torch.manual_seed(0)
    model = cls(_eager(config))
    measured = _measure(model, pixel_values=torch.randn(1, 3, image, image))
    shape = LayerShape.from_vision_config(config)
    assert not shape.gated_mlp
    assert measured == [b["total"] for b in vision_flops(shape, [tokens] * 2)["layers"]]


GRID = [[1, 10, 14], [2, 4, 4]]  # one image (10×14 patches) and one 2-frame video (4×4 patches)


def test_vision_flops_match_qwen2_vl_tower_per_frame_groups() -> None:
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

    config = transformers.Qwen2VLConfig(
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2}
    ).vision_config
    model = Qwen2VisionTransformerPretrainedModel(_eager(config))
    n = sum(t * h * w for t, h, w in GRID)
    measured = _measure(model, torch.randn(n, 3 * 2 * 14 * 14), grid_thw=torch.tensor(GRID))
    groups = vision_attention_groups(GRID)
    assert groups == [140, 16, 16]
    assert measured == [
        b["total"] for b in vision_flops(LayerShape.from_vision_config(config), [groups] * 2)["layers"]
    ]


def test_vision_flops_match_qwen2_5_vl_tower_with_windows() -> None:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    config = transformers.Qwen2_5_VLConfig(
        vision_config={
            "depth": 3,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_heads": 2,
            "out_hidden_size": 64,
            "window_size": 56,
            "fullatt_block_indexes": [1],
        }
    ).vision_config
    model = Qwen2_5_VisionTransformerPretrainedModel(_eager(config))
    n = sum(t * h * w for t, h, w in GRID)
    measured = _measure(model, torch.randn(n, 3 * 2 * 14 * 14), grid_thw=torch.tensor(GRID))
    shape = LayerShape.from_vision_config(config)
    assert shape.gated_mlp
    win = qwen2_5_vl_window_groups(GRID, window_size=56, patch_size=14, spatial_merge_size=2)
    frames = vision_attention_groups(GRID)
    expected = vision_flops(shape, [frames] * 3, windows=[win, None, win])
    assert measured == [b["total"] for b in expected["layers"]]
    # The windows make blocks 0 and 2 cheaper than the full-attention block 1, by attention alone.
    assert measured[0] == measured[2] < measured[1]


@FAST
@given(
    grid=st.lists(
        st.tuples(st.integers(1, 3), st.integers(1, 12), st.integers(1, 12)), min_size=1, max_size=3
    ),
    window_size=st.sampled_from([28, 56, 84, 112]),
)
def test_window_and_frame_groups_match_transformers(grid, window_size) -> None:
    grid = [(t, 2 * h, 2 * w) for t, h, w in grid]  # Qwen grids are multiples of the 2×2 merge
    thw = torch.tensor(grid)
    _, cu = get_vision_window_index(thw, spatial_merge_size=2, window_size=window_size, patch_size=14)
    assert (
        qwen2_5_vl_window_groups(grid, window_size=window_size, patch_size=14, spatial_merge_size=2)
        == (cu[1:] - cu[:-1]).tolist()
    )
    cu = get_vision_cu_seqlens(thw)
    assert vision_attention_groups(grid) == (cu[1:] - cu[:-1]).tolist()


# --------------------------------------------------------------------------------------------------------
# Properties


@FAST
@given(shape=shapes, tokens=st.lists(st.integers(0, 300), min_size=1, max_size=6), data=st.data())
def test_prefill_monotone_and_additive(shape: LayerShape, tokens: list[int], data: st.DataObject) -> None:
    fewer = [data.draw(st.integers(0, n)) for n in tokens]
    big, small = llm_prefill_flops(shape, tokens), llm_prefill_flops(shape, fewer)
    for key in (*COMPONENTS, "total"):
        assert small[key] <= big[key]
        assert big[key] == sum(layer[key] for layer in big["layers"])
    for layer in big["layers"]:
        assert layer["total"] == sum(layer[key] for key in COMPONENTS)
    assert llm_prefill_flops(shape, tokens, causal=True)["total"] <= big["total"]
    if sum(fewer) < sum(tokens):
        assert small["total"] < big["total"]


@FAST
@given(shape=shapes, kv=st.lists(st.integers(0, 300), min_size=1, max_size=6), new=st.integers(1, 4))
def test_decode_grows_with_cache(shape: LayerShape, kv: list[int], new: int) -> None:
    step, longer = llm_decode_flops(shape, kv, new), llm_decode_flops(shape, [k + 1 for k in kv], new)
    assert step["total"] < longer["total"]
    assert step["total"] == sum(layer["total"] for layer in step["layers"])
    # Decoding against a cache is the tail of a prefill's work: a prefill of kv + new tokens costs more.
    assert step["total"] <= llm_prefill_flops(shape, [k + new for k in kv])["total"]


@FAST
@given(shape=shapes, groups=st.lists(st.integers(0, 50), min_size=1, max_size=5))
def test_splitting_attention_groups_never_costs_more(shape: LayerShape, groups: list[int]) -> None:
    split, joined = vision_flops(shape, [groups]), vision_flops(shape, [sum(groups)])
    for key in ("qkv", "out_proj", "mlp"):
        assert split[key] == joined[key]
    assert split["attn_scores"] <= joined["attn_scores"]
    # Σ n_g² exactly: the grouped block equals the sum of one block per group.
    assert split["total"] == sum(vision_flops(shape, [g])["total"] for g in groups)


@FAST
@given(big_d=st.integers(1, 64), heads=st.integers(1, 8), i=st.integers(1, 128), n=st.integers(0, 64))
def test_twice_the_mac_formula_papers_quote(big_d: int, heads: int, i: int, n: int) -> None:
    # FastV-style per-layer MACs 4nD² + 2n²D + 2nDI, for multi-head attention with H·d = D and a plain MLP.
    shape = LayerShape(
        hidden=big_d * heads,
        intermediate=i,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=big_d,
        gated_mlp=False,
    )
    width = shape.hidden
    assert layer_flops(shape, n, n)["total"] == 2 * (4 * n * width**2 + 2 * n**2 * width + 2 * n * width * i)


@FAST
@given(n_q=st.integers(0, 12), extra=st.integers(0, 12))
def test_causal_pairs_equal_a_real_mask(n_q: int, extra: int) -> None:
    n_k = n_q + extra
    mask = torch.ones(n_q, n_k, dtype=torch.bool).tril(diagonal=n_k - n_q)
    assert attention_pairs(n_q, n_k, causal=True) == int(mask.sum())


@FAST
@given(a=st.integers(1, 10**15), b=st.integers(1, 10**15))
def test_ratio_and_speedup_are_reciprocal(a: int, b: int) -> None:
    assert flops_ratio(a, {"total": b}) * ideal_speedup({"total": a}, b) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------------
# Configs


ROPE = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
QWEN_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_parameters": ROPE,
}


def test_qwen2_vl_config_reads_embed_dim_not_llm_width() -> None:
    config = transformers.Qwen2VLConfig(
        text_config=QWEN_TEXT,
        vision_config={"depth": 3, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 4},
    )
    llm, vit, layers, blocks = model_shapes(config)
    assert llm == LayerShape(
        hidden=64, intermediate=128, num_heads=4, num_kv_heads=2, head_dim=16, gated_mlp=True
    )
    # vision hidden_size (64) is the merger's output width; the blocks are embed_dim = 32 wide, fc1 32·4.
    assert vit == LayerShape(
        hidden=32, intermediate=128, num_heads=2, num_kv_heads=2, head_dim=16, gated_mlp=False
    )
    assert (layers, blocks) == (2, 3)


def test_qwen2_5_vl_config_has_gated_vision_mlp() -> None:
    config = transformers.Qwen2_5_VLConfig(
        text_config=QWEN_TEXT,
        vision_config={
            "depth": 4,
            "hidden_size": 32,
            "intermediate_size": 48,
            "num_heads": 2,
            "out_hidden_size": 64,
        },
    )
    llm, vit, layers, blocks = model_shapes(config)
    assert llm.hidden == 64 and llm.num_kv_heads == 2
    assert vit == LayerShape(
        hidden=32, intermediate=48, num_heads=2, num_kv_heads=2, head_dim=16, gated_mlp=True
    )
    assert (layers, blocks) == (2, 4)


@pytest.mark.parametrize(
    ("config_cls", "text_type", "vision_type"),
    [
        (transformers.LlavaOnevisionConfig, "qwen2", "siglip_vision_model"),
        (transformers.InternVLConfig, "qwen2", None),
        (transformers.LlavaConfig, "llama", "clip_vision_model"),
    ],
)
def test_llava_family_configs(config_cls, text_type, vision_type) -> None:
    text = {
        "model_type": text_type,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
    }
    vision = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3, "num_attention_heads": 2}
    if vision_type:
        vision["model_type"] = vision_type
    llm, vit, layers, blocks = model_shapes(config_cls(text_config=text, vision_config=vision))
    assert llm == LayerShape(
        hidden=64, intermediate=128, num_heads=4, num_kv_heads=1, head_dim=16, gated_mlp=True
    )
    assert vit == LayerShape(
        hidden=32, intermediate=48, num_heads=2, num_kv_heads=2, head_dim=16, gated_mlp=False
    )
    assert (layers, blocks) == (2, 3)


def test_default_configs_and_explicit_head_dim() -> None:
    # Defaults of the real classes: Qwen2-VL's tower is 1280 wide (not the 3584 of its hidden_size field).
    _, vit, _, blocks = model_shapes(transformers.Qwen2VLConfig())
    assert (vit.hidden, vit.intermediate, vit.num_heads, blocks) == (1280, 5120, 16, 32)
    llm, vit, layers, blocks = model_shapes(transformers.LlavaConfig())
    assert (llm.hidden, vit.hidden, vit.intermediate, layers, blocks) == (4096, 1024, 4096, 32, 24)
    # A config's own head_dim wins over hidden // heads.
    llama = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=32, intermediate_size=8)
    assert LayerShape.from_text_config(llama).head_dim == 32
    # A text-only config has no tower.
    assert model_shapes(transformers.Qwen2Config())[1:] == (None, 32, 0)


# --------------------------------------------------------------------------------------------------------
# Validation


def test_invalid_inputs_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        LayerShape(hidden=8, intermediate=16, num_heads=3, num_kv_heads=2, head_dim=4)
    with pytest.raises(ValueError, match="hidden"):
        LayerShape(hidden=0, intermediate=16, num_heads=2, num_kv_heads=1, head_dim=4)
    with pytest.raises(ValueError, match="n_keys >= n_queries"):
        layer_flops(TINY, 3, 2, causal=True)
    with pytest.raises(ValueError, match="tokens"):
        llm_prefill_flops(TINY, [3, -1])
    with pytest.raises(ValueError, match="partition"):
        vision_flops(TINY, [10], windows=[[4, 4]])
    with pytest.raises(ValueError, match="one entry"):
        vision_flops(TINY, [10, 10], windows=[[10]])
    with pytest.raises(ValueError, match="positive"):
        flops_ratio(1, 0)
    with pytest.raises(ValueError, match="no 'hidden_size'"):
        LayerShape.from_text_config(object())
