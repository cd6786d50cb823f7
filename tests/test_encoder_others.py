"""Encoder- and projector-site compression on LLaVA-1.5, InternVL and LLaVA-OneVision, carried through to
the LLM input (the Qwen2-VL counterpart is tests/test_encoder_qwen.py).

The oracle: the compressed run equals the *unpatched* model fed the emitted features as precomputed encoder
outputs (``mm_encoder_outputs``) with placeholder runs shortened to match, which computes its own positions,
masks and decoding. LLaVA-OneVision's projector site runs on the packed LLM input; its oracle re-packs the
emitted features by the model's own rule (AnyRes rows each followed by ``image_newline``, one newline after a
multi-image tile or a video).
"""

from __future__ import annotations

import pytest
import torch
from conftest import all_hooks, cached_model, needs_precomputed_features
from tokcomp.strategies import OIM, Downsample, ToMe
from transformers import LlavaForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutputWithPooling

import tokcomp as tc
from tokcomp import testing
from tokcomp.contracts import VisualStrategy

IMAGE, VIDEO = 4, 5  # the tiny vocabulary's placeholder ids
GEN = {"max_new_tokens": 4, "do_sample": False}


def _batch(arch):
    img = testing.make_image
    if arch == "llava_onevision":  # AnyRes sample, multi-image sample, video sample
        frames = [img(112, 84, seed=10 + s) for s in range(3)]
        samples = [[img(224, 168, seed=1)], [img(140, 196, seed=2), img(112, 112, seed=3)], []]
        return testing.tiny_inputs(arch, samples, videos=[None, None, frames])
    samples = [[img(224, 168, seed=1)], [img(140, 196, seed=2), img(112, 112, seed=3)], []]
    return testing.tiny_inputs(arch, samples)


def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)  # what generate() passes: padding-aware 1-D positions


OV_SAMPLES = ("anyres", "multi", "video")  # what _batch puts in each sample for llava_onevision


def _shrunk(arch, model, inputs, results):
    """The prompt with each placeholder run as long as its compressed features, and those features handed
    in as precomputed encoder outputs. Built only from the emitted features and grids (and, for
    LLaVA-OneVision, the model's packing rule and its ``image_newline``)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    feats = [f for r in results for f in r.features]
    grids = [g for r in results for g in r.grids]
    orig = [u for r in results for u in r.original_units]
    nl = model.model.image_newline.detach()[None] if arch == "llava_onevision" else None
    rows, images, videos, k = [], [], [], 0
    for b in range(ids.shape[0]):
        row = ids[b][mask[b]].tolist()
        new, i = [], 0
        while i < len(row):
            if row[i] not in (IMAGE, VIDEO):
                new.append(row[i])
                i += 1
                continue
            j = i
            while j < len(row) and row[j] == row[i]:
                j += 1
            if arch != "llava_onevision":  # one feature block per image (LLaVA) or tile (InternVL)
                parts, total = [], 0
                while total < j - i:
                    parts.append(feats[k])
                    total += orig[k]
                    k += 1
            elif OV_SAMPLES[b] == "anyres":  # base tile, then the grid's rows each followed by a newline
                g, grid = grids[k + 1], feats[k + 1]
                lines = grid.view(g[1], g[2], -1) if g is not None else grid[None]
                parts = [torch.cat([feats[k], *(torch.cat([line, nl]) for line in lines)])]
                k += 2
            elif OV_SAMPLES[b] == "multi":  # every image: its base tile and one newline
                parts = [torch.cat([feats[k], nl]), torch.cat([feats[k + 1], nl])]
                k += 2
            else:  # a video: the frames and one newline
                parts = [torch.cat([feats[k], nl])]
                k += 1
            new += [row[i]] * sum(p.shape[0] for p in parts)
            (images if row[i] == IMAGE else videos).extend(parts)
            i = j
        rows.append(new)
    assert k == len(feats)
    L = max(map(len, rows))
    nid = torch.full((len(rows), L), 1, dtype=torch.long)
    am = torch.zeros_like(nid)
    for b, r in enumerate(rows):
        nid[b, L - len(r):] = torch.tensor(r)
        am[b, L - len(r):] = 1
    enc = {}
    if images:
        pooled = torch.cat(images) if arch == "internvl" else tuple(images)
        enc["image"] = BaseModelOutputWithPooling(pooler_output=pooled)
    if videos:
        enc["video"] = BaseModelOutputWithPooling(pooler_output=torch.stack(videos))
    return {"input_ids": nid, "attention_mask": am, "mm_encoder_outputs": enc}


def _vision_config(model):
    return model.model.vision_tower.config


IDENTITY = [
    pytest.param(a, s, id=f"{a}-{s}")
    for a in ("llava", "internvl", "llava_onevision")
    for s in ("oim-rate0", "downsample-1")
]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize(("arch", "stage"), IDENTITY)
def test_stages_doing_nothing_are_the_identity(arch, stage, attn):
    model = cached_model(arch, attn)
    inputs = _batch(arch)
    st = (tc.Stage(OIM(rate=0.0), site="encoder", layers=[0, 1]) if stage == "oim-rate0"
          else tc.Stage(Downsample(factor=1.0), site="projector"))
    before = _vision_config(model)._attn_implementation
    with torch.no_grad():
        ref = model(**inputs).logits
        hooks = all_hooks(model)  # after a first call: transformers adds output-recording hooks of its own
        with tc.compress(model, [st]) as run:
            out = model(**inputs).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    rep = run.report()
    assert sum(rep.emitted_visual) == sum(rep.uncompressed_visual) == sum(rep.original_visual) > 0
    assert all_hooks(model) == hooks
    assert _vision_config(model)._attn_implementation == before
    assert not any(name.startswith("pack_image_features") for name in vars(model.model))  # OV's wrapper is gone


CARRY = [
    ("llava", lambda: tc.Stage(OIM(rate=0.25), site="encoder", layers=[1])),  # the feature layer's input
    ("llava", lambda: tc.Stage(OIM(rate=0.5, metric="hidden", mode="pairs"), site="encoder", layers=[0])),
    ("llava", lambda: tc.Stage(ToMe(r=3), site="encoder")),  # 1-D tokens into a per-token projector
    ("llava", lambda: tc.Stage(ToMe(r=5), site="projector")),
    ("internvl", lambda: tc.Stage(OIM(rate=0.25, iterations=2), site="encoder", layers=[0, 1])),
    ("internvl", lambda: tc.Stage(Downsample(factor=2), site="encoder", layers=[1])),
    ("internvl", lambda: tc.Stage(ToMe(r=5), site="projector")),
    ("llava_onevision", lambda: tc.Stage(OIM(rate=0.3, iterations=2), site="projector")),
    ("llava_onevision", lambda: tc.Stage(ToMe(r=5), site="projector")),
    ("llava_onevision", lambda: tc.Stage(Downsample(factor=2), site="projector")),
    ("llava_onevision", lambda: tc.Stage(OIM(rate=0.25, iterations=2), site="encoder", layers=[1])),
    ("llava_onevision", lambda: tc.Stage(OIM(rate=0.5, metric="hidden", mode="pairs"), site="encoder",
                                         layers=[0])),
    ("llava_onevision", lambda: tc.Stage(Downsample(factor=2), site="encoder", layers=[1])),
]


CARRY_IDS = [pytest.param(a, s, id=f"{a}-{i}") for i, (a, s) in enumerate(CARRY)]


@needs_precomputed_features
@pytest.mark.parametrize(("arch", "stage"), CARRY_IDS)
def test_llm_input_follows_the_vision_tower(arch, stage):
    """Compressed == the unpatched model given the compressed features with shorter placeholder runs
    (prefill logits, with the padding-aware positions generate() passes)."""
    model = cached_model(arch)
    inputs = _batch(arch)
    with torch.no_grad(), tc.compress(model, [stage()]) as run:
        out = model(**inputs, position_ids=_positions(inputs["attention_mask"])).logits[:, -1]
        results = run._state.vision
        rep = run.report()
    assert sum(rep.emitted_visual) < sum(rep.uncompressed_visual), "nothing was compressed"
    assert rep.visual_tokens[0] == rep.original_visual  # the layouts follow the emitted items
    shrunk = _shrunk(arch, model, inputs, results)
    with torch.no_grad():
        ref = model(**shrunk, position_ids=_positions(shrunk["attention_mask"])).logits[:, -1]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@needs_precomputed_features
@pytest.mark.parametrize(("arch", "stage"), CARRY_IDS)
def test_generate_continues_from_the_compressed_length(arch, stage):
    """Greedy tokens through generate() == the unpatched model's on the shorter prompt: decoding positions
    continue from the compressed length (the runtime adds ``decode_shift`` to generate()'s 2-D
    position_ids)."""
    model = cached_model(arch)
    inputs = _batch(arch)
    with torch.no_grad(), tc.compress(model, [stage()]) as run:
        toks = model.generate(**inputs, **GEN)[:, inputs["input_ids"].shape[1]:]
        results = run._state.vision
    shrunk = _shrunk(arch, model, inputs, results)
    with torch.no_grad():
        ref_toks = model.generate(**shrunk, **GEN)[:, shrunk["input_ids"].shape[1]:]
    assert torch.equal(toks, ref_toks)


BATCH = [
    ("llava", "sdpa", lambda: [tc.Stage(OIM(rate=0.25), site="encoder", layers=[1]),
                               tc.Stage(Downsample(factor=1.5), site="projector")]),
    ("llava", "eager", lambda: [tc.Stage(ToMe(r=4), site="encoder", layers=[0, 1])]),
    ("internvl", "sdpa", lambda: [tc.Stage(OIM(rate=0.25, iterations=2), site="encoder", layers=[0, 1])]),
    ("internvl", "eager", lambda: [tc.Stage(OIM(rate=0.25), site="encoder", layers=[1]),
                                   tc.Stage(ToMe(r=3), site="projector")]),
    ("llava_onevision", "sdpa", lambda: [tc.Stage(OIM(rate=0.3, iterations=2), site="projector")]),
    ("llava_onevision", "eager", lambda: [tc.Stage(ToMe(r=5), site="projector")]),
    ("llava_onevision", "sdpa", lambda: [tc.Stage(OIM(rate=0.25, iterations=2), site="encoder", layers=[0, 1]),
                                         tc.Stage(ToMe(r=3), site="projector")]),
    ("llava_onevision", "eager", lambda: [tc.Stage(OIM(rate=0.25, proportional_attention=True),
                                                   site="encoder", layers=[1])]),
]


@pytest.mark.parametrize(
    ("arch", "attn", "stages"),
    [pytest.param(a, at, s, id=f"{a}-{at}") for a, at, s in BATCH],
)
def test_batch_equals_samples_and_report(arch, attn, stages):
    model = cached_model(arch, attn)
    batch = _batch(arch)
    gen = {**GEN, "output_logits": True, "return_dict_in_generate": True}
    L = batch["input_ids"].shape[1]
    with torch.no_grad(), tc.compress(model, stages() + [tc.Stage("spu", layers=range(1, 4))]) as run:
        out = model.generate(**batch, **gen)
        rep = run.report()
        singles = [model.generate(**testing.batch_item(batch, i), **gen) for i in range(3)]
    items = [len(lay.items) for lay in tc.find_adapter(model).layouts(dict(batch))]
    per_sample, k = [], 0
    for n in items:
        per_sample.append(sum(rep.emitted_visual[k:k + n]))
        k += n
    assert rep.visual_tokens[0] == per_sample  # tokens entering the LLM == what the vision side emitted
    assert sum(rep.emitted_visual) < sum(rep.uncompressed_visual)
    assert rep.visual_tokens[-1] == [0, 0, 0]
    assert rep.vision_events
    if any(s.site == "encoder" for s in stages()):
        # one count per tower row: per image (LLaVA), per tile (InternVL), per tile or video frame (LLaVA-OV)
        rows = 10 if arch == "llava_onevision" else len(rep.emitted_visual)  # OV: 1 + 4 | 1 | 1 | 3 frames
        assert rep.encoder_tokens and all(len(v) == rows for v in rep.encoder_tokens.values())
    for i, single in enumerate(singles):
        n = single.sequences.shape[1] - GEN["max_new_tokens"]
        torch.testing.assert_close(out.logits[0][i], single.logits[0][0], atol=2e-4, rtol=1e-4)
        assert torch.equal(out.sequences[i, L:], single.sequences[0, n:])


@pytest.mark.parametrize("arch", ["llava", "internvl", "llava_onevision"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_proportional_attention_changes_the_encoder_and_is_restored(arch, attn):
    model = cached_model(arch, attn)
    inputs = testing.tiny_inputs(arch, [[testing.make_image(224, 168, seed=1)]])
    outs = {}
    for prop in (True, False):
        stage = tc.Stage(OIM(rate=0.25, proportional_attention=prop), site="encoder", layers=[0])
        with torch.no_grad(), tc.compress(model, [stage]):
            outs[prop] = model(**inputs).logits[:, -1]
            if prop:  # SigLIP (LLaVA-OV) takes the bias as its attention_mask: the backend never changes
                want = attn if arch == "llava_onevision" else "tokcomp_" + attn
                assert _vision_config(model)._attn_implementation == want
    assert _vision_config(model)._attn_implementation == attn
    assert not torch.allclose(outs[True], outs[False])


class _Uneven(VisualStrategy):
    """Test-only: keeps a different number of columns per image (impossible in a batched tower)."""

    name = "test-uneven"

    def default_layers(self, num_layers):
        return [0]

    def reduce(self, tokens):
        from tokcomp.tokens import FrameGrid, VisualItemTokens, VisualTokens

        items = []
        for j, it in enumerate(tokens.items):
            fr = it.frames[0]
            w = fr.shape[1] - 1 - (j % 2)
            owner = fr.owner.clamp(max=fr.shape[0] * w - 1)
            frame = FrameGrid(fr.x[:, :w], fr.size[:, :w], fr.pos[:, :w], owner)
            items.append(VisualItemTokens(it.kind, [frame], it.original))
        return VisualTokens(items, tokens.site, tokens.layer, tokens.num_layers, tokens.stage_layers)


def test_validation_and_runtime_messages():
    def fails(model, stages, *needles, error=tc.ScheduleError):
        with pytest.raises(error) as info, tc.compress(model, stages):
            model(**_batch(model.config.model_type))
        for n in needles:
            assert n in str(info.value), str(info.value)

    ov, internvl, llava = (cached_model(a) for a in ("llava_onevision", "internvl", "llava"))
    fails(ov, [tc.Stage(ToMe(r=4), site="encoder", layers=[1])], "'llava_onevision' adapter needs the grid",
          "stitched into the AnyRes grid", "site='projector'")
    fails(internvl, [tc.Stage(ToMe(r=4), site="encoder", layers=[1])], "rectangular grid", "site='projector'")
    fails(internvl, [tc.Stage(OIM(r=3), site="encoder", layers=[1])], "multiple of 2")
    fails(llava, [tc.Stage(_Uneven(), site="encoder")], "same number of tokens", error=tc.RuntimeStateError)
    # features read from the input of block 0: an encoder stage at block 1 would change nothing
    config = testing.tiny_config("llava")
    config.vision_feature_layer = -3
    early = LlavaForConditionalGeneration(config).eval()
    hooks = all_hooks(early)
    fails(early, [tc.Stage(OIM(), site="encoder", layers=[1])], "hidden_states[0]", "blocks 0..0")
    assert all_hooks(early) == hooks and not getattr(early, "_tokcomp_active", False)


@pytest.mark.parametrize("arch", ["llava", "internvl", "llava_onevision"])
def test_encoder_stage_with_precomputed_features_says_so(arch):
    """Features computed outside the with block cannot be merged in the encoder: a clear error, not a
    silent run without compression."""
    model = cached_model(arch)
    inputs = _batch(arch)
    with torch.no_grad(), tc.compress(model, [tc.Stage(Downsample(factor=1.0), site="projector")]) as run:
        model(**inputs)  # an identity stage, so that the run records the features
        shrunk = _shrunk(arch, model, inputs, run._state.vision)  # the unmerged features, as precomputed ones
    with pytest.raises(tc.RuntimeStateError, match="did not run inside this tokcomp.compress block"), \
            torch.no_grad(), tc.compress(model, [tc.Stage(OIM(rate=0.25), site="encoder", layers=[1])]):
        model(**shrunk)
