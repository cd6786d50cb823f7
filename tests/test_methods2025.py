"""DivPrune, CDPruner and DART through the real models: ``sdpa`` equals ``eager``, presets run, bad placements
fail early. (Batch equals samples and drop equals mask come from the matrix in test_adapters_matrix.py, which
runs every registered strategy on every adapter.)"""

from __future__ import annotations

import pytest
import torch
from conftest import cached_model

import tokcomp as tc
from tokcomp import testing

STAGES = {
    "divprune": lambda: tc.Stage("divprune", site="projector", keep_ratio=0.3),
    "cdpruner": lambda: tc.Stage("cdpruner", site="llm", keep_ratio=0.3),
    "dart": lambda: tc.Stage("dart", site="llm", layers=[2], keep_ratio=0.5, pivot_image=2, pivot_text=2),
}
ARCHS = ["qwen2_vl", "qwen2_5_vl", "llava_onevision", "internvl", "llava"]


def _batch(arch: str):
    images = [[testing.make_image(224, 168, seed=1)], [testing.make_image(140, 196, seed=2)]]
    return testing.tiny_inputs(arch, images)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", sorted(STAGES))
def test_sdpa_equals_eager(name, arch):
    batch = _batch(arch)
    out, reports = {}, {}
    for attn in ("sdpa", "eager"):
        model = cached_model(arch, attn)
        with torch.no_grad(), tc.compress(model, [STAGES[name]()]) as run:
            out[attn] = model(**batch).logits
        reports[attn] = run.report()
    assert reports["sdpa"].visual_tokens == reports["eager"].visual_tokens
    assert reports["sdpa"].original_visual == reports["eager"].original_visual
    assert min(map(min, reports["sdpa"].visual_tokens)) < max(reports["sdpa"].uncompressed_visual)
    valid = batch["attention_mask"].bool()
    last = out["sdpa"].shape[1] - 1  # left padding: the last position is every sample's last token
    assert bool(valid[:, -1].all())
    torch.testing.assert_close(out["sdpa"][:, last], out["eager"][:, last], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("preset", ["dart", "divprune", "cdpruner"])
def test_presets_run_and_prune(preset):
    model = cached_model("qwen2_vl")
    batch = _batch("qwen2_vl")
    with torch.no_grad(), tc.compress(model, tc.Schedule.preset(preset)) as run:
        model.generate(**batch, max_new_tokens=2, do_sample=False)
    rep = run.report()
    assert min(rep.visual_tokens[-1]) < min(rep.uncompressed_visual)


def test_dart_kept_count_follows_the_reference_rule():
    """Qwen rule: each of the 4 pivots keeps int(n * 0.5 / 4) tokens, plus the 2 image pivots."""
    model = cached_model("qwen2_vl")
    batch = _batch("qwen2_vl")
    with torch.no_grad(), tc.compress(model, [STAGES["dart"]()]) as run:
        model(**batch)
    rep = run.report()
    expected = [2 + 4 * int(n * 0.5 / 4) for n in rep.original_visual]
    assert rep.visual_tokens[2] == expected
    assert [e.info["per_pivot"] for e in rep.events] == [int(n * 0.5 / 4) for n in rep.original_visual]


def test_dart_and_cdpruner_placement_errors():
    model = cached_model("qwen2_vl")
    with pytest.raises(tc.ScheduleError, match="layer 0"):
        tc.compress(model, [tc.Stage("dart", site="llm", layers=[0])])
    with pytest.raises(tc.ScheduleError, match="one layer"):
        tc.compress(model, [tc.Stage("dart", site="llm", layers=[1, 2])])
    with pytest.raises(tc.ScheduleError, match="one layer"):
        tc.compress(model, [tc.Stage("cdpruner", site="llm", layers=[0, 1])])
    with pytest.raises(tc.ScheduleError, match="keep_ratio"):
        tc.compress(model, [tc.Stage("divprune", site="projector", keep_ratio=0.0)])


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava_onevision"])
def test_composed_schedule_batch_equals_samples(arch):
    """DivPrune at the projector, then DART at layer 2 on what is left (its pivot order reads each sample's
    own sequence indices after the projector removed tokens)."""
    model = cached_model(arch)
    batch = _batch(arch)
    stages = [tc.Stage("divprune", site="projector", keep_ratio=0.5),
              tc.Stage("dart", site="llm", layers=[2], keep_ratio=0.5, pivot_image=2, pivot_text=2)]
    gen = {"max_new_tokens": 2, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    with torch.no_grad(), tc.compress(model, stages) as run:
        out = model.generate(**batch, **gen)
        rep = run.report()
        singles = [model.generate(**testing.batch_item(batch, i), **gen) for i in range(2)]
    assert all(a < b for a, b in zip(rep.original_visual, rep.uncompressed_visual))
    assert all(rep.visual_tokens[2][b] < rep.original_visual[b] for b in range(2))
    for i, single in enumerate(singles):
        torch.testing.assert_close(out.logits[0][i], single.logits[0][0], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava"])
def test_low_precision(arch):
    model = cached_model(arch, "sdpa", torch.bfloat16)
    img = testing.make_image
    batch = testing.tiny_inputs(arch, [[img(224, 168, seed=1)], [img(140, 196, seed=2)]], dtype=torch.bfloat16)
    for stages in ([STAGES["divprune"](), STAGES["dart"]()], [STAGES["cdpruner"]()]):
        with torch.no_grad(), tc.compress(model, stages) as run:
            out = model.generate(**batch, max_new_tokens=2, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True)
        assert torch.isfinite(out.logits[0]).all()
        rep = run.report()
        assert min(map(min, rep.visual_tokens)) < min(rep.uncompressed_visual)


def test_video_frames_are_pooled_separately():
    """A Qwen2-VL video of 2 frames of 3x4 tokens: DivPrune and CDPruner keep round(0.25 * 12) = 3 per frame."""
    model = cached_model("qwen2_vl")
    frames = [testing.make_image(112, 84, seed=s) for s in range(4)]
    batch = testing.tiny_inputs("qwen2_vl", [[]], videos=[frames])
    for stage, layer in ((tc.Stage("divprune", site="projector", keep_ratio=0.25), 0),
                         (tc.Stage("cdpruner", site="llm", keep_ratio=0.25), 0)):
        with torch.no_grad(), tc.compress(model, [stage]) as run:
            model.generate(**batch, max_new_tokens=2, do_sample=False)
        rep = run.report()
        assert rep.uncompressed_visual == [24] and rep.visual_tokens[layer] == [6]
        if stage.site == "llm":
            layout = tc.find_adapter(model).layouts(dict(batch))[0]
            kept, frame = run.kept_positions(0)[0], layout.coords[:, 0]
            assert [int(torch.isin(layout.positions[frame == f], kept).sum()) for f in (0, 1)] == [3, 3]
