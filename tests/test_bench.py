"""`tokcomp.bench.run_bench`, ``tokcomp bench`` and `tokcomp.shapes`: the result holds every measured field
with sane types and relations (no timing thresholds), the CLI writes its files, the real shapes are the
published ones and build."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

import tokcomp as tc
from tokcomp import shapes, testing
from tokcomp.bench import BenchResult, Spread, load_schedule, run_bench
from tokcomp.cli import main
from tokcomp.flops import LayerShape, model_shapes

SPREAD_KEYS = {"median", "q1", "q3", "min", "max", "values"}
MEASURED = ("prefill_s", "vision_s", "llm_s", "ttft_s", "decode_tokens_per_s", "overhead_s")


@pytest.fixture(scope="module")
def bench() -> BenchResult:
    model = testing.tiny_model("qwen2_vl", num_hidden_layers=6, dtype=torch.bfloat16)
    inputs = testing.tiny_inputs("qwen2_vl", dtype=torch.bfloat16)  # two samples, padded
    return run_bench(
        model,
        inputs,
        {"spu": tc.Schedule.preset("spu"), "luvc": "luvc", "broken": "no-such"},
        repeats=2,
        new_tokens=3,
        progress=False,
    )


def test_result_is_json_with_every_field(bench):
    d = json.loads(json.dumps(bench.to_dict()))
    assert set(d) >= {
        "model",
        "inputs",
        "dtype",
        "device",
        "repeats",
        "new_tokens",
        "machine",
        "baseline",
        "schedules",
        "wall_s",
        "notes",
    }
    assert d["dtype"] == "bfloat16" and d["device"] == "cpu" and d["repeats"] == 2 and d["new_tokens"] == 3
    assert d["inputs"]["batch"] == 2 and d["inputs"]["visual_tokens"] == [48, 35]
    assert {"cpu", "torch", "transformers", "torch_threads"} <= set(d["machine"])
    assert set(d["schedules"]) == {"spu", "luvc", "broken"}
    for row in (d["baseline"], d["schedules"]["spu"], d["schedules"]["luvc"]):
        assert row["error"] is None
        for key in MEASURED:
            assert set(row[key]) == SPREAD_KEYS, key
            assert len(row[key]["values"]) == 2
            assert (
                row[key]["min"] <= row[key]["q1"] <= row[key]["median"] <= row[key]["q3"] <= row[key]["max"]
            )
        for key in ("prefill_s", "vision_s", "llm_s", "ttft_s", "decode_tokens_per_s"):
            assert row[key]["min"] > 0, key
        for key in ("peak_memory_bytes", "llm_peak_memory_bytes"):  # measured in the warm-up run
            assert set(row[key]) == SPREAD_KEYS and len(row[key]["values"]) == 1 and row[key]["min"] >= 0
        assert row["peak_memory_bytes"]["min"] >= 0 and row["overhead_s"]["min"] >= 0
        assert isinstance(row["kv_cache_bytes"], int) and row["kv_cache_bytes"] > 0
        assert len(row["kv_cache_lengths"]) == 6
        assert len(row["visual_tokens"]) == 6 and all(len(r) == 2 for r in row["visual_tokens"])
        assert 0 < row["retained_fraction"] <= 1
        assert set(row["speedup"]) == {"prefill", "llm", "vision", "ttft", "decode"}
        assert set(row["speedup_best"]) == set(row["speedup"])
        assert set(row["ideal_speedup"]) == {"llm", "vision", "prefill"}
        assert set(row["efficiency"]) == {"llm", "prefill"}
        assert set(row["overhead_fraction"]) == {"prefill", "llm"}
        assert {"llm", "vision", "total", "overhead_s", "notes", "tokens"} <= set(row["flops"])
        fid = row["fidelity"]
        assert fid["kl_first_token"] >= -1e-6 and math.isfinite(fid["kl_first_token"])
        assert 0.0 <= fid["greedy_agreement"] <= 1.0
        assert len(fid["tokens"]) == 2 and all(len(t) == 3 for t in fid["tokens"])
    assert d["schedules"]["broken"]["error"].startswith("ScheduleError")
    assert d["schedules"]["broken"]["prefill_s"] is None


def test_baseline_is_the_reference(bench):
    b = bench.baseline
    assert b.retained_fraction == 1.0
    assert all(v == pytest.approx(1.0) for v in b.speedup.values() if v is not None)
    assert b.ideal_speedup["llm"] == 1.0 and b.ideal_speedup["prefill"] == 1.0
    assert b.fidelity["kl_first_token"] == pytest.approx(0.0, abs=1e-6)
    assert b.fidelity["greedy_agreement"] == 1.0
    assert b.overhead_s.max == 0.0


def test_speedups_are_ratios_of_medians(bench):
    b = bench.baseline
    for r in (bench.schedules["spu"], bench.schedules["luvc"]):
        assert r.speedup["prefill"] == pytest.approx(b.prefill_s.median / r.prefill_s.median)
        assert r.speedup["llm"] == pytest.approx(b.llm_s.median / r.llm_s.median)
        assert r.speedup["ttft"] == pytest.approx(b.ttft_s.median / r.ttft_s.median)
        assert r.speedup["decode"] == pytest.approx(
            r.decode_tokens_per_s.median / b.decode_tokens_per_s.median
        )
        assert r.speedup_best["llm"] == pytest.approx(b.llm_s.min / r.llm_s.min)
        assert r.efficiency["llm"] == pytest.approx(r.speedup["llm"] / r.ideal_speedup["llm"])
        assert r.overhead_fraction["prefill"] == pytest.approx(r.overhead_s.median / r.prefill_s.median)
        assert r.ideal_speedup["llm"] == pytest.approx(r.flops["llm"]["ideal_speedup"])
        assert r.ideal_speedup["llm"] > 1.0


def test_compression_shows_in_counts_and_cache(bench):
    b, spu, luvc = bench.baseline, bench.schedules["spu"], bench.schedules["luvc"]
    assert spu.visual_tokens[-1] == [0, 0] and spu.visual_tokens[0] == [48, 35]
    assert luvc.visual_tokens[0][0] < 48 and luvc.encoder_tokens  # OIM inside the encoder
    assert spu.kv_cache_bytes < b.kv_cache_bytes and luvc.kv_cache_bytes < spu.kv_cache_bytes
    assert luvc.retained_fraction < spu.retained_fraction < 1
    assert b.kv_cache_lengths == [59] * 6
    assert spu.fidelity["kl_first_token"] > 0


def test_spread():
    s = Spread.of([3.0, 1.0, 2.0, 10.0])
    assert (s.median, s.min, s.max) == (2.5, 1.0, 10.0)
    assert s.q1 == pytest.approx(1.75) and s.q3 == pytest.approx(4.75)
    one = Spread.of([4.0])
    assert one.median == one.q1 == one.q3 == 4.0
    with pytest.raises(ValueError):
        Spread.of([])


def test_load_schedule_forms(tmp_path, monkeypatch):
    assert load_schedule("fastv").name == "fastv"
    f = tmp_path / "s.json"
    f.write_text(
        json.dumps(
            {"stages": [{"strategy": "random", "site": "llm", "layers": [1], "params": {"keep_ratio": 0.5}}]}
        )
    )
    assert load_schedule(str(f)).stages[0].strategy_name == "random"
    (tmp_path / "my_sched.py").write_text(
        "import tokcomp as tc\n"
        "def build():\n    return tc.Schedule([tc.Stage('fastv', site='llm', layers=[2], keep_ratio=0.3)])\n"
        "FIXED = tc.Schedule.preset('vtw')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_schedule("my_sched:build").stages[0].params == {"keep_ratio": 0.3}
    assert load_schedule("my_sched:FIXED").name == "vtw"
    with pytest.raises(ValueError):
        load_schedule("not-a-preset")
    with pytest.raises(ValueError):
        load_schedule(str(tmp_path / "missing.json"))
    sys.modules.pop("my_sched", None)


def test_cli_bench_writes_json_and_plot(tmp_path, capsys):
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    code = main(
        [
            "bench",
            "--model",
            "tiny:qwen2_vl",
            "--layers",
            "4",
            "-s",
            "spu",
            "-s",
            "fastv",
            "--repeats",
            "1",
            "--new-tokens",
            "2",
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
            "--no-progress",
        ]
    )
    assert code == 0
    d = json.loads(out_json.read_text())
    assert set(d["schedules"]) == {"spu", "fastv"}
    assert d["model"]["short"] == "tiny qwen2_vl"
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_png.stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "uncompressed" in printed and "spu" in printed and "prefill" in printed


# ---------------------------------------------------------------------------------------------------------
# Real shapes
# ---------------------------------------------------------------------------------------------------------
PUBLISHED = {
    # name: (LLM hidden, intermediate, heads, kv heads, head dim, layers), (vision width, MLP, heads, blocks)
    "qwen2-vl-2b": ((1536, 8960, 12, 2, 128, 28), (1280, 5120, 16, 32)),
    "qwen2.5-vl-3b": ((2048, 11008, 16, 2, 128, 36), (1280, 3420, 16, 32)),
    "llava-ov-0.5b": ((896, 4864, 14, 2, 64, 24), (1152, 4304, 16, 26)),
    "internvl2.5-1b": ((896, 4864, 14, 2, 64, 24), (1024, 4096, 16, 24)),
    "qwen3-vl-2b": ((2048, 6144, 16, 8, 128, 28), (1024, 4096, 16, 24)),
    "qwen3-vl-8b": ((4096, 12288, 32, 8, 128, 36), (1152, 4304, 16, 27)),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shape_configs_are_the_published_values(name):
    (d, i, h, kv, hd, n), (vd, vi, vh, vn) = PUBLISHED[name]
    llm, vit, n_llm, n_vit = model_shapes(shapes.shape_config(name))
    assert llm == LayerShape(hidden=d, intermediate=i, num_heads=h, num_kv_heads=kv, head_dim=hd)
    assert (vit.hidden, vit.intermediate, vit.num_heads, n_vit) == (vd, vi, vh, vn)
    assert n_llm == n == shapes.SHAPES[name].num_layers
    assert vit.gated_mlp == (name == "qwen2.5-vl-3b")
    reduced = shapes.shape_config(name, layers=3, vision_blocks=2)
    assert model_shapes(reduced)[2:] == (3, 2)
    tiny = testing.tiny_config(shapes.SHAPES[name].arch)
    assert reduced.text_config.vocab_size == tiny.text_config.vocab_size
    assert "REDUCED DEPTH" in shapes.SHAPES[name].describe(3, 2)
    assert "REDUCED" not in shapes.SHAPES[name].describe()


def test_qwen2_5_full_attention_blocks_survive_reduction():
    assert shapes.shape_config("qwen2.5-vl-3b", vision_blocks=10).vision_config.fullatt_block_indexes == [
        7,
        9,
    ]
    assert shapes.shape_config("qwen2.5-vl-3b").vision_config.fullatt_block_indexes == [7, 15, 23, 31]


@pytest.mark.parametrize("tokens, grid", [(1024, (32, 32)), (2048, (32, 64)), (4096, (64, 64))])
def test_qwen_image_size_gives_the_token_count(tokens, grid):
    w, h, n, _info = shapes.image_size_for("qwen2-vl-2b", tokens)
    assert (h // 28, w // 28) == grid and n == tokens == (h // 28) * (w // 28)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_one_layer_real_shape_runs_a_prefill(name):
    model = shapes.shape_model(name, layers=1, vision_blocks=1)
    inputs, info = shapes.shape_inputs(name, 64, prompt_words=4)
    assert next(model.parameters()).dtype == torch.bfloat16
    w, h, n, _ = shapes.image_size_for(name, 64)
    assert info["placeholder_tokens"] == n and info["image_size"] == [w, h]
    with torch.no_grad(), tc.compress(model, tc.Schedule([])) as run:
        out = model(**inputs, logits_to_keep=1)
    assert out.logits.shape == (1, 1, testing.tiny_config(shapes.SHAPES[name].arch).text_config.vocab_size)
    assert torch.isfinite(out.logits.float()).all()
    assert run.report().baseline_visual[0] > 0


def test_result_round_trips_through_json(bench, tmp_path):
    path = tmp_path / "r.json"
    bench.save_json(path)
    again = BenchResult.load_json(path)
    assert json.loads(json.dumps(again.to_dict())) == json.loads(path.read_text())
    assert again.schedules["spu"].llm_s == bench.schedules["spu"].llm_s
    assert again.schedules["luvc"].encoder_tokens == bench.schedules["luvc"].encoder_tokens
