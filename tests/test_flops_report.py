"""`tokcomp.bench.flops_breakdown`: the FLOPs of a run's report, checked against hand counts on the tiny
models (numbers written out below, not computed with `tokcomp.flops`)."""

from __future__ import annotations

import pytest
import torch
from conftest import cached_model
from tokcomp.strategies import OIM, SPU

import tokcomp as tc
from tokcomp import testing
from tokcomp.bench import flops_breakdown

# Tiny Qwen2-VL LLM (tokcomp.testing): D = 64, H = 4, H_kv = 2, d = 16, I = 128, gated MLP. With n = n_k:
#   q 2·n·64·64 = 8192n, k and v 2·n·64·32 = 4096n each, out 8192n, mlp 3·2·n·64·128 = 49152n,
#   scores and values 2·n²·4·16 = 128n² each.


def llm_layer(n: int) -> dict[str, int]:
    return {
        "qkv": 16384 * n,
        "attn_scores": 128 * n * n,
        "attn_values": 128 * n * n,
        "out_proj": 8192 * n,
        "mlp": 49152 * n,
    }


# Tiny Qwen2-VL vision block: width 32, 2 heads of 16, plain MLP 32 -> 64 -> 32, attention per image:
#   q/k/v 2·n·32·32 = 2048n each, out 2048n, mlp 2·2·n·32·64 = 8192n, scores and values 2·n²·32 = 64n² each.


def vision_block(groups: list[int]) -> int:
    return sum(16384 * n + 128 * n * n for n in groups)


@pytest.fixture(scope="module")
def oim_spu_run():
    model = cached_model("qwen2_vl")
    inputs = testing.tiny_inputs("qwen2_vl")  # 224x168 -> 12x16 patches, 140x196 -> 14x10 patches
    schedule = tc.Schedule(
        [tc.Stage(OIM(rate=0.25), site="encoder", layers=[1]), tc.Stage(SPU(), site="llm", layers=[2, 3])]
    )
    with torch.no_grad(), tc.compress(model, schedule) as run:
        model(**inputs)
    return model, inputs, run.report()


def test_token_counts_by_hand(oim_spu_run):
    _, inputs, rep = oim_spu_run
    assert inputs["image_grid_thw"].tolist() == [[1, 12, 16], [1, 14, 10]]
    # OIM at block 1 removes floor(w/4) columns rounded down to even: 16 -> 12, 10 -> 8
    assert rep.encoder_tokens == {1: [12 * 12, 14 * 8]}
    # the 2x2 merger: 36 and 28 LLM tokens; SPU's linear cascade over layers 2..3: 18/14, then 0
    assert rep.visual_tokens == [[36, 28], [36, 28], [18, 14], [0, 0]]
    assert rep.text_tokens == [11, 7]
    assert rep.uncompressed_visual == [48, 35]


def test_llm_flops_match_hand_count(oim_spu_run):
    model, inputs, rep = oim_spu_run
    fb = flops_breakdown(model, rep, inputs=inputs)
    tokens = [[47, 47, 29, 11], [35, 35, 21, 7]]  # text + visual entering each layer, per sample
    assert fb["tokens"]["llm"] == tokens
    for layer in range(4):
        expected = {
            k: llm_layer(tokens[0][layer])[k] + llm_layer(tokens[1][layer])[k]
            for k in ("qkv", "attn_scores", "attn_values", "out_proj", "mlp")
        }
        got = fb["llm"]["compressed"]["layers"][layer]
        assert {k: got[k] for k in expected} == expected
        assert got["attention"] == got["qkv"] + got["attn_scores"] + got["attn_values"] + got["out_proj"]
        assert got["attention"] + got["mlp"] == got["total"]
    base = 4 * sum(sum(llm_layer(n).values()) for n in (59, 42))  # every visual token at every layer
    comp = sum(sum(llm_layer(n).values()) for row in tokens for n in row)
    assert fb["llm"]["baseline"]["total"] == base
    assert fb["llm"]["compressed"]["total"] == comp
    assert fb["llm"]["ideal_speedup"] == pytest.approx(base / comp)
    assert fb["llm"]["ratio"] == pytest.approx(comp / base)


def test_vision_flops_match_hand_count(oim_spu_run):
    model, inputs, rep = oim_spu_run
    fb = flops_breakdown(model, rep, inputs=inputs)
    v = fb["vision"]
    assert v["exact"]
    assert vision_block([192, 140]) == 12_666_880
    assert vision_block([144, 112]) == 8_454_144
    assert v["baseline"]["total"] == 2 * 12_666_880  # block 0 and block 1 on every patch
    assert v["compressed"]["total"] == 12_666_880 + 8_454_144  # block 1 after OIM
    assert [layer["total"] for layer in v["compressed"]["layers"]] == [12_666_880, 8_454_144]
    assert fb["tokens"]["vision"] == [332, 256]
    total_b = v["baseline"]["total"] + fb["llm"]["baseline"]["total"]
    total_c = v["compressed"]["total"] + fb["llm"]["compressed"]["total"]
    assert fb["total"] == {
        "compressed": total_c,
        "baseline": total_b,
        "ratio": pytest.approx(total_c / total_b),
        "ideal_speedup": pytest.approx(total_b / total_c),
    }
    assert fb["overhead_s"] == rep.overhead_s >= 0


def test_vision_grids_from_provenance_without_inputs(oim_spu_run):
    model, inputs, rep = oim_spu_run
    with_inputs = flops_breakdown(model, rep, inputs=inputs)
    without = flops_breakdown(model, rep)
    assert without["vision"] == with_inputs["vision"]
    assert without["llm"] == with_inputs["llm"]


def test_empty_schedule_is_its_own_baseline():
    model = cached_model("qwen2_vl")
    inputs = testing.tiny_inputs("qwen2_vl")
    with torch.no_grad(), tc.compress(model, tc.Schedule([])) as run:
        model(**inputs)
    fb = flops_breakdown(model, run.report(), inputs=inputs)
    assert fb["llm"]["compressed"] == fb["llm"]["baseline"]
    assert fb["vision"]["compressed"] == fb["vision"]["baseline"]
    assert fb["total"]["ideal_speedup"] == 1.0
    assert fb["vision"]["baseline"]["total"] == 2 * vision_block([192, 140])


def test_qwen2_5_vl_windowed_blocks_after_a_merge():
    # Tiny Qwen2.5-VL: 4 blocks, full attention in blocks 1 and 3, 56-px windows (2x2 merged units = 4x4
    # patches) elsewhere; width 32, 2 heads, gated MLP 32 -> 64 (3 matrices): 16384n -> 6144n + 2048n +
    # 3·2·n·32·64 = 20480n per token, attention 128 n² per group.
    model = cached_model("qwen2_5_vl")
    inputs = testing.tiny_inputs("qwen2_5_vl", [[testing.make_image(224, 168)]])
    assert inputs["image_grid_thw"].tolist() == [[1, 12, 16]]
    schedule = tc.Schedule([tc.Stage(OIM(rate=0.25), site="encoder", layers=[2])])
    with torch.no_grad(), tc.compress(model, schedule) as run:
        model(**inputs)
    rep = run.report()
    assert rep.encoder_tokens[2] == [12 * 12]

    def block(groups: list[int]) -> int:
        return sum(20480 * n + 128 * n * n for n in groups)

    full_192, windows_192 = block([192]), block([16] * 12)  # 12x16 patches: 3x4 windows of 4x4
    full_144, windows_144 = block([144]), block([16] * 9)  # 12x12 patches: 3x3 windows
    fb = flops_breakdown(model, rep, inputs=inputs)
    assert [la["total"] for la in fb["vision"]["baseline"]["layers"]] == [
        windows_192,
        full_192,
        windows_192,
        full_192,
    ]
    assert [la["total"] for la in fb["vision"]["compressed"]["layers"]] == [
        windows_192,
        full_192,
        windows_144,
        full_144,
    ]


@pytest.mark.parametrize("arch, per_tile", [("llava_onevision", 16), ("internvl", 64 + 1), ("llava", 16 + 1)])
def test_tiled_towers_count_one_group_per_tile(arch, per_tile):
    model = cached_model(arch)
    inputs = testing.tiny_inputs(arch, [[testing.make_image(224, 168)]])
    with torch.no_grad(), tc.compress(model, tc.Schedule([])) as run:
        model(**inputs)
    fb = flops_breakdown(model, run.report(), inputs=inputs)
    pv = inputs["pixel_values"]
    tiles = int(pv.flatten(2).ne(0).any(-1).sum()) if pv.dim() == 5 else pv.shape[0]
    assert fb["tokens"]["vision_baseline"] == [tiles * per_tile] * len(fb["tokens"]["vision_baseline"])
    # attention per tile: (tiles · per_tile²), not (tiles · per_tile)²
    layer0 = fb["vision"]["baseline"]["layers"][0]
    hidden = model.config.vision_config.hidden_size
    assert layer0["attn_scores"] == 2 * tiles * per_tile * per_tile * hidden


def test_without_inputs_other_towers_say_so():
    model = cached_model("internvl")
    inputs = testing.tiny_inputs("internvl", [[testing.make_image(224, 168)]])
    with torch.no_grad(), tc.compress(model, tc.Schedule([])) as run:
        model(**inputs)
    fb = flops_breakdown(model, run.report())
    assert fb["vision"] is None
    assert any("inputs=" in n for n in fb["notes"])
    assert fb["total"]["compressed"] == fb["llm"]["compressed"]["total"]


@pytest.mark.parametrize("arch, per_tile, merged", [("llava_onevision", 16, 12), ("internvl", 64 + 1, 48 + 1),
                                                    ("llava", 16 + 1, 12 + 1)])
def test_tiled_towers_count_merged_tiles_after_an_encoder_stage(arch, per_tile, merged):
    """OIM at block 1 of 2 (one width merge: 4x4 -> 4x3 patches, InternVL 8x8 -> 8x6 with even sides): block 0
    runs every tile at full size, block 1 on the merged tiles; attention is counted per tile."""
    model = cached_model(arch)
    inputs = testing.tiny_inputs(arch, [[testing.make_image(224, 168)]])
    with torch.no_grad(), tc.compress(model, [tc.Stage(OIM(rate=0.25), site="encoder", layers=[1])]) as run:
        model(**inputs)
    fb = flops_breakdown(model, run.report(), inputs=inputs)
    assert fb["vision"]["exact"], fb["notes"]
    pv = inputs["pixel_values"]
    tiles = int(pv.flatten(2).ne(0).any(-1).sum()) if pv.dim() == 5 else pv.shape[0]
    hidden = model.config.vision_config.hidden_size
    base, comp = fb["vision"]["baseline"]["layers"], fb["vision"]["compressed"]["layers"]
    assert comp[0] == base[0]
    assert comp[1]["attn_scores"] == 2 * tiles * merged * merged * hidden
    assert base[1]["attn_scores"] == 2 * tiles * per_tile * per_tile * hidden


def test_qwen3_vl_vision_groups_per_image():
    """Qwen3-VL's tower (the same tiny block shape, 4 blocks, 16-px patches): one attention group per image
    from image_grid_thw, and the merged groups after an encoder stage."""
    model = cached_model("qwen3_vl")
    inputs = testing.tiny_inputs("qwen3_vl")  # 224x168 -> 10x14 patches, 140x196 -> 12x8 patches
    assert inputs["image_grid_thw"].tolist() == [[1, 10, 14], [1, 12, 8]]
    with torch.no_grad(), tc.compress(model, [tc.Stage(OIM(rate=0.25), site="encoder", layers=[1])]) as run:
        model(**inputs)
    rep = run.report()
    fb = flops_breakdown(model, rep, inputs=inputs)
    v = fb["vision"]
    assert v["exact"]
    merged = rep.encoder_tokens[1]
    assert sum(merged) < 140 + 96
    assert v["baseline"]["total"] == 4 * vision_block([140, 96])
    assert v["compressed"]["total"] == vision_block([140, 96]) + 3 * vision_block(merged)
