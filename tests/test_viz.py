"""`tokcomp.viz`: the patch maps are partitions consistent with the report, the picture is the one the
model saw, and the PNGs are written."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import cached_model
from PIL import Image
from tokcomp.strategies import OIM, SPU

import tokcomp as tc
from tokcomp import testing
from tokcomp.cli import main
from tokcomp.viz import provenance_figure, qwen_image_inputs, stage_provenance

PICTURE = testing.make_image(448, 336, seed=3)  # 24 x 32 patches, 12 x 16 LLM tokens


def check_partition(stage: dict, grid: tuple[int, int]) -> None:
    """Every original patch appears exactly once, held by one token or removed (-1); token ids are dense
    enough that the count of distinct holders is the stage's token count."""
    h, w = grid
    for m, tokens in zip(stage["maps"], stage["tokens"]):
        assert m.dtype == torch.long and m.shape == (h * w,)
        assert int(m.min()) >= -1
        held = torch.unique(m[m >= 0])
        assert held.numel() == tokens


@pytest.fixture(scope="module")
def luvc_maps():
    model = cached_model("qwen2_vl", layers=8)
    return model, stage_provenance(model, PICTURE, "luvc")


def test_stages_in_order_and_partitions(luvc_maps):
    _, d = luvc_maps
    item = d["items"][0]
    assert item["patch_grid"] == (24, 32)
    sites = [s["site"] for s in d["stages"]]
    assert sites[0] == "input" and "encoder" in sites and sites.index("llm-input") > sites.index("encoder")
    assert sites[-1] == "llm"
    for s in d["stages"]:
        check_partition(s, item["patch_grid"])
    assert d["stages"][0]["tokens"] == [768]
    assert (d["stages"][0]["maps"][0] == torch.arange(768)).all()


def test_counts_match_the_report(luvc_maps):
    _, d = luvc_maps
    rep = d["report"]
    enc = [s for s in d["stages"] if s["site"] == "encoder"]
    events = [e for e in rep.vision_events if e["site"] == "encoder"]
    assert [s["tokens"][0] for s in enc] == [e["tokens_out"][0] for e in events]
    llm_input = next(s for s in d["stages"] if s["site"] == "llm-input")
    assert llm_input["tokens"] == [rep.original_visual[0]] == [rep.emitted_visual[0]]
    for s in d["stages"]:
        if s["site"] == "llm":
            assert s["tokens"][0] == rep.visual_tokens[s["layer"]][0]


def test_merged_groups_are_whole_and_removals_stick(luvc_maps):
    _, d = luvc_maps
    stages = d["stages"]
    llm_input = next(s for s in stages if s["site"] == "llm-input")["maps"][0]
    # OIM merged whole rows/columns before the 2x2 merger: every LLM token holds at least 4 patches
    sizes = torch.bincount(llm_input)
    assert int(sizes.min()) >= 4 and int(sizes.sum()) == 768
    previous = llm_input
    for s in (s for s in stages if s["site"] == "llm"):
        m = s["maps"][0]
        # pruning only: a patch keeps its token until the token goes, and never comes back
        assert bool(((m == previous) | (m == -1)).all())
        assert bool((m[previous == -1] == -1).all())
        # a token is kept or removed with all of its patches
        for t in torch.unique(previous[previous >= 0]):
            group = m[previous == t]
            assert bool((group == t).all()) or bool((group == -1).all())
        previous = m


def test_llm_only_schedule_merger_groups_are_2x2():
    model = cached_model("qwen2_vl", layers=8)
    d = stage_provenance(
        model, PICTURE, tc.Schedule([tc.Stage(SPU(), site="llm", layers=range(2, 8))]), layers=[0, 4]
    )
    assert [s["site"] for s in d["stages"]] == ["input", "llm-input", "llm", "llm"]
    m = d["stages"][1]["maps"][0].view(24, 32)
    assert int(m[0, 0]) == int(m[1, 1]) == 0 and int(m[0, 2]) == 1 and int(m[2, 0]) == 16
    assert (torch.bincount(m.reshape(-1)) == 4).all()
    assert d["stages"][2]["tokens"] == [192]  # layer 0: before the first stage
    assert d["stages"][3]["tokens"] == [d["report"].visual_tokens[4][0]]


def test_qwen2_5_vl_and_an_encoder_only_schedule():
    model = cached_model("qwen2_5_vl")
    sched = tc.Schedule([tc.Stage(OIM(rate=0.25), site="encoder", layers=[1, 2])])
    d = stage_provenance(model, PICTURE, sched)
    enc = [s for s in d["stages"] if s["site"] == "encoder"]
    assert len(enc) == 2 and enc[0]["tokens"][0] > enc[1]["tokens"][0]
    for s in d["stages"]:
        check_partition(s, d["items"][0]["patch_grid"])


def test_picture_is_what_the_model_saw():
    model = cached_model("qwen2_vl", layers=8)
    d = stage_provenance(model, qwen_image_inputs(model, PICTURE), "spu")
    pic = d["items"][0]["picture"]
    assert pic.shape == (336, 448, 3)  # 448x336 is already a multiple of 28: not resized
    original = np.asarray(PICTURE, dtype=np.float64) / 255.0
    assert np.abs(pic - original).mean() < 0.01


def test_figure_and_cli_write_pngs(tmp_path, luvc_maps):
    model, _ = luvc_maps
    fig = provenance_figure(model, PICTURE, "luvc")
    assert len([ax for ax in fig.axes if ax.images]) >= 5
    path = tmp_path / "fig.png"
    fig.savefig(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    src = tmp_path / "in.png"
    testing.make_image(300, 200, seed=5).save(src)
    out = tmp_path / "out" / "viz.png"
    assert main(["visualize", "--image", str(src), "--preset", "fastv", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.width > 600 and im.height > 200
    demo = tmp_path / "demo.png"
    assert main(["visualize", "--demo", "--out", str(demo)]) == 0
    assert demo.stat().st_size > 20_000


@pytest.mark.parametrize("arch", ["llava", "internvl", "llava_onevision"])
def test_row_towers_one_panel_row_per_image_or_tile(arch, tmp_path):
    """LLaVA (one item per image), InternVL (one per tile), LLaVA-OneVision (base tile and AnyRes grid):
    partitions at every stage, token counts equal to the report's, a merge at the encoder visible as fewer
    tokens, and the PNG written."""
    model = cached_model(arch, layers=8)
    d = stage_provenance(model, PICTURE, "luvc")
    rep = d["report"]
    items = d["items"]
    assert len(items) == len(rep.emitted_visual)  # the sample's LLM items
    for s in d["stages"]:
        for k, it in enumerate(items):
            check_partition({"maps": [s["maps"][k]], "tokens": [s["tokens"][k]]}, it["patch_grid"])
    enc = next(s for s in d["stages"] if s["site"] == "encoder")
    assert all(t < it["patch_grid"][0] * it["patch_grid"][1] for t, it in zip(enc["tokens"], items))
    llm_input = next(s for s in d["stages"] if s["site"] == "llm-input")
    assert llm_input["tokens"] == rep.emitted_visual
    for s in d["stages"]:
        if s["site"] == "llm":
            assert sum(s["tokens"]) == rep.visual_tokens[s["layer"]][0]
    assert main(["visualize", "--arch", arch, "--out", str(tmp_path / "v.png")]) == 0
    assert Image.open(tmp_path / "v.png").size[0] > 200


def test_onevision_anyres_panel_is_the_packed_grid():
    """The AnyRes panel has the model's packed grid (its placeholder run's rows and columns) and, without a
    vision stage, one token per cell."""
    model = cached_model("llava_onevision", layers=8)
    d = stage_provenance(model, PICTURE, "spu")
    base, grid = d["items"]
    lay = tc.find_adapter(model).layouts(dict(testing.tiny_inputs("llava_onevision", [[PICTURE]])))[0]
    assert [base["patch_grid"], grid["patch_grid"]] == [tuple(it.grid[1:]) for it in lay.items]
    llm_input = next(s for s in d["stages"] if s["site"] == "llm-input")
    h, w = grid["patch_grid"]
    assert llm_input["tokens"] == [16, h * w]
    assert grid["picture"].shape[:2] == (h * 14, w * 14)


def test_packed_grid_is_the_adapter_contract():
    """viz reads LLaVA-OneVision's AnyRes packing through `Adapter.packed_grid`: the packed grid is the
    layout's AnyRes item, every cell reads a real tile and patch; images that are not packed (another
    adapter, a base-tile-only image of a multi-image sample) give None."""
    model = cached_model("llava_onevision", layers=8)
    adapter = tc.find_adapter(model)
    one = dict(testing.tiny_inputs("llava_onevision", [[PICTURE]]))
    packed = adapter.packed_grid(one, 0)
    assert isinstance(packed, tc.contracts.PackedGrid)
    lay = adapter.layouts(one)[0]
    assert packed.grid == tuple(lay.items[1].grid[1:])
    rows, cols = packed.layout
    h0, w0 = packed.tile
    assert packed.cell_tile.shape == packed.cell_patch.shape == (packed.grid[0] * packed.grid[1],)
    assert 1 <= int(packed.cell_tile.min()) and int(packed.cell_tile.max()) <= rows * cols
    assert 0 <= int(packed.cell_patch.min()) and int(packed.cell_patch.max()) < h0 * w0
    top, bottom, left, right = packed.content
    assert 0 <= top < bottom <= rows * h0 and 0 <= left < right <= cols * w0
    two = dict(testing.tiny_inputs("llava_onevision", [[PICTURE, PICTURE]]))
    assert adapter.packed_grid(two, 0) is None
    qwen = cached_model("qwen2_vl", layers=8)
    assert tc.find_adapter(qwen).packed_grid(dict(testing.tiny_inputs("qwen2_vl")), 0) is None
