"""Encoder- and projector-site compression on Qwen2-VL / Qwen2.5-VL, carried through to the LLM input.

Qwen3-VL joins the tests that need no DeepStack-aware oracle (its carry-through test, which hands the model
the DeepStack features too, is in ``tests/test_qwen3_vl.py``)."""

from __future__ import annotations

import pytest
import torch
from conftest import all_hooks, cached_model, needs_precomputed_features
from tokcomp.strategies import OIM, SPU, Downsample, ToMe
from transformers.modeling_outputs import BaseModelOutputWithPooling

import tokcomp as tc
from tokcomp import testing

ARCHS = ["qwen2_vl", "qwen2_5_vl"]
WITH_QWEN3 = [*ARCHS, "qwen3_vl"]


def _samples():
    return [
        [testing.make_image(224, 168, seed=1)],
        [testing.make_image(140, 196, seed=2), testing.make_image(112, 112, seed=3)],
        [],
    ]


def _video_batch(arch):
    frames = [testing.make_image(112, 84, seed=10 + s) for s in range(4)]
    return testing.tiny_inputs(arch, [[testing.make_image(168, 112, seed=4)], []], videos=[None, frames])


def _shrunk(model, inputs, results):
    """The prompt as if each image had been its compressed size: shorter placeholder runs, the new grids,
    and the compressed features handed in as precomputed encoder outputs. Built only from the emitted
    features and grids, never from the runtime's position or mask logic."""
    cfg = model.config
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    feats = {1: [], 2: []}
    grids = {1: [], 2: []}
    for res in results:
        kind = 1 if res.original_units == _run_lengths(ids, mask, cfg.image_token_id) else 2
        feats[kind] += list(res.features)
        grids[kind] += [(t, h * 2, w * 2) for t, h, w in res.grids]
    rows, k = [], {1: 0, 2: 0}
    for b in range(ids.shape[0]):
        row = ids[b][mask[b]].tolist()
        new, i = [], 0
        while i < len(row):
            kind = 1 if row[i] == cfg.image_token_id else 2 if row[i] == cfg.video_token_id else 0
            if kind:
                j = i
                while j < len(row) and row[j] == row[i]:
                    j += 1
                new += [row[i]] * feats[kind][k[kind]].shape[0]
                k[kind] += 1
                i = j
            else:
                new.append(row[i])
                i += 1
        rows.append(new)
    L = max(map(len, rows))
    nid = torch.full((len(rows), L), 1, dtype=torch.long)
    am = torch.zeros_like(nid)
    for b, r in enumerate(rows):
        nid[b, L - len(r):] = torch.tensor(r)
        am[b, L - len(r):] = 1
    mm = (nid == cfg.image_token_id).int() + 2 * (nid == cfg.video_token_id).int()
    out = {"input_ids": nid, "attention_mask": am, "mm_token_type_ids": mm, "mm_encoder_outputs": {}}
    if feats[1]:
        out["image_grid_thw"] = torch.tensor(grids[1])
        out["mm_encoder_outputs"]["image"] = BaseModelOutputWithPooling(pooler_output=tuple(feats[1]))
    if feats[2]:
        out["video_grid_thw"] = torch.tensor(grids[2])
        out["mm_encoder_outputs"]["video"] = BaseModelOutputWithPooling(pooler_output=tuple(feats[2]))
        if "second_per_grid_ts" in inputs:
            out["second_per_grid_ts"] = inputs["second_per_grid_ts"]
    return out


def _run_lengths(ids, mask, token):
    out = []
    for b in range(ids.shape[0]):
        row = (ids[b] == token) & mask[b]
        n = 0
        for v in row.tolist() + [False]:
            if v:
                n += 1
            elif n:
                out.append(n)
                n = 0
    return out


@pytest.mark.parametrize("arch", WITH_QWEN3)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("stage", ["oim-rate0", "downsample-1"])
def test_stages_doing_nothing_are_the_identity(arch, attn, stage):
    model = cached_model(arch, attn)
    inputs = testing.tiny_inputs(arch, _samples())
    st = (tc.Stage(OIM(rate=0.0), site="encoder", layers=[1]) if stage == "oim-rate0"
          else tc.Stage(Downsample(factor=1.0), site="projector"))
    vis_cfg = model.model.visual.config
    before = vis_cfg._attn_implementation
    with torch.no_grad():
        ref = model(**inputs).logits
        with tc.compress(model, [st]) as run:
            out = model(**inputs).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    rep = run.report()
    assert sum(rep.emitted_visual) == sum(rep.uncompressed_visual) == sum(rep.original_visual)
    assert all_hooks(model) == []
    assert vis_cfg._attn_implementation == before


@needs_precomputed_features
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "stage",
    [
        lambda: tc.Stage(OIM(rate=0.25), site="encoder", layers=[1]),
        lambda: tc.Stage(OIM(rate=0.5, metric="hidden", mode="pairs"), site="encoder", layers=[0]),
        lambda: tc.Stage(Downsample(factor=2), site="projector"),
        lambda: tc.Stage(OIM(rate=0.3, iterations=2), site="projector"),
    ],
    ids=["oim-keys", "oim-pairs", "downsample-projector", "oim-projector"],
)
def test_llm_input_follows_the_encoder(arch, stage):
    """Compressed == the unpatched model given the compressed features with shorter placeholder runs and
    the new grids (positions, masks and decoding computed by the model itself)."""
    model = cached_model(arch)
    inputs = testing.tiny_inputs(arch, _samples())
    gen = {"max_new_tokens": 4, "do_sample": False}
    with torch.no_grad(), tc.compress(model, [stage()]) as run:
        out = model(**inputs).logits[:, -1]
        results = run._state.vision
        toks = model.generate(**inputs, **gen)[:, inputs["input_ids"].shape[1]:]
    rep = run.report()
    assert sum(rep.emitted_visual) < sum(rep.uncompressed_visual), "nothing was compressed"
    assert rep.original_visual == [sum(rep.emitted_visual[:1]), sum(rep.emitted_visual[1:3]), 0]
    shrunk = _shrunk(model, inputs, results)
    with torch.no_grad():
        ref = model(**shrunk).logits[:, -1]
        ref_toks = model.generate(**shrunk, **gen)[:, shrunk["input_ids"].shape[1]:]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(toks, ref_toks)


@pytest.mark.parametrize("arch", WITH_QWEN3)
def test_luvc_batch_with_video_through_generate(arch):
    model = cached_model(arch)
    batch = _video_batch(arch)
    gen = {"max_new_tokens": 4, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    L = batch["input_ids"].shape[1]
    with torch.no_grad(), tc.compress(model, tc.Schedule.preset("luvc-video")) as run:
        out = model.generate(**batch, **gen)
        rep = run.report()
        singles = []
        for i in range(2):
            one = testing.batch_item(batch, i)
            singles.append((model.generate(**one, **gen), one["input_ids"].shape[1]))
    # tokens entering the LLM == what the encoder emitted, per sample (Qwen3-VL: one entry per video run)
    assert rep.visual_tokens[0] == [rep.emitted_visual[0], sum(rep.emitted_visual[1:])]
    assert rep.emitted_visual[0] < rep.uncompressed_visual[0]
    assert rep.visual_tokens[-1] == [0, 0]
    assert rep.encoder_tokens and all(len(v) == 2 for v in rep.encoder_tokens.values())
    assert any(e["site"] == "encoder" for e in rep.vision_events)
    for i, (single, n) in enumerate(singles):
        assert torch.equal(single.sequences[0, n:], out.sequences[i, L:])
        torch.testing.assert_close(single.scores[0][0], out.scores[0][i], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", WITH_QWEN3)
def test_luvc_images_batch_equals_samples(arch):
    model = cached_model(arch)
    batch = testing.tiny_inputs(arch, _samples())
    with torch.no_grad(), tc.compress(model, tc.Schedule.preset("luvc")) as run:
        out = model(**batch).logits[:, -1]
        counts = run.report().visual_tokens
        for i in range(3):
            one = model(**testing.batch_item(batch, i)).logits[:, -1]
            torch.testing.assert_close(one[0], out[i], atol=2e-4, rtol=1e-4)
    assert counts[0][2] == 0 and counts[0][0] > 0


def test_tome_at_projector_merges_r_tokens_per_frame():
    model = cached_model("qwen2_vl")
    batch = testing.tiny_inputs("qwen2_vl", _samples())
    with torch.no_grad(), tc.compress(model, [tc.Stage(ToMe(r=5), site="projector")]) as run:
        out = model(**batch).logits[:, -1]
        rep = run.report()
        one = model(**testing.batch_item(batch, 1)).logits[:, -1]
    assert [u - e for u, e in zip([48, 35, 16], rep.emitted_visual)] == [5, 5, 5]
    torch.testing.assert_close(one[0], out[1], atol=2e-4, rtol=1e-4)


def test_proportional_attention_changes_the_encoder_and_is_restored():
    model = cached_model("qwen2_vl")
    inputs = testing.tiny_inputs("qwen2_vl", _samples()[:1])
    outs = {}
    for prop in (True, False):
        with torch.no_grad(), tc.compress(model, [tc.Stage(OIM(rate=0.5, proportional_attention=prop),
                                                           site="encoder", layers=[1])]):
            outs[prop] = model(**inputs).logits[:, -1]
            if prop:
                assert model.model.visual.config._attn_implementation.startswith("tokcomp_")
    assert model.model.visual.config._attn_implementation == "sdpa"
    assert not torch.allclose(outs[True], outs[False])


def test_encoder_validation_messages(qwen):
    def fails(stages, *needles):
        with pytest.raises(tc.ScheduleError) as info:
            tc.compress(qwen, stages)
        for n in needles:
            assert n in str(info.value), str(info.value)

    fails([tc.Stage(ToMe(r=4), site="encoder", layers=[1])], "rectangular grid", "site='projector'")
    fails([tc.Stage(OIM(rate=1.0), site="encoder", layers=[1])], "rate must be in [0, 1)")
    fails([tc.Stage(OIM(r=3), site="encoder", layers=[1])], "multiple of 2")
    fails([tc.Stage(OIM(), site="encoder", layers=[5])], "outside the vision encoder", "2 blocks")
    fails([tc.Stage(SPU(), site="llm"), tc.Stage(OIM(), site="encoder")], "data-flow order")
    fails([tc.Stage(Downsample(factor=0.5), site="projector")], "factor must be >= 1")


def test_report_shows_encoder_blocks_and_llm_layers(qwen):
    inputs = testing.tiny_inputs("qwen2_vl")
    with torch.no_grad(), tc.compress(qwen, tc.Schedule.preset("luvc")) as run:
        qwen.generate(**inputs, max_new_tokens=2)
    text = str(run.report())
    assert "encoder block 1" in text and "oim@encoder" in text and "spu@llm" in text
    rep = run.report()
    assert rep.retained_fraction() < 0.5


def test_features_computed_outside_the_block_are_refused(qwen):
    inputs = testing.tiny_inputs("qwen2_vl")
    with torch.no_grad():
        feats = qwen.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    call = {k: v for k, v in inputs.items() if k != "pixel_values"}
    call["mm_encoder_outputs"] = {"image": feats}
    with torch.no_grad(), tc.compress(qwen, tc.Schedule.preset("luvc")):
        with pytest.raises(tc.RuntimeStateError, match="vision tower did not run"):
            qwen(**call)
