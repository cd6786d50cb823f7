"""LLaVA-OneVision's packing of merged tiles (`pack_merged_anyres`, `pool_merged_frame`) against the model's
own ``pack_image_features`` / ``apply_pooling`` (the oracle when nothing merged), and its guarantees when
tiles did merge: no image content is cropped, the grid fits the model's placeholder run, provenance is a
partition of the model's packed grid.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import cached_model
from hypothesis import given, settings
from hypothesis import strategies as st
from tokcomp.adapters.llava_onevision import pack_merged_anyres, pool_merged_frame
from tokcomp.strategies import OIM
from tokcomp.strategies.oim import init_grid_state, oim_merge_lines
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionForConditionalGeneration,
    get_anyres_image_grid_shape,
    unpad_image,
)

import tokcomp as tc
from tokcomp import testing

D = 8
SIZES = [(168, 224), (224, 168), (100, 300), (300, 100), (112, 112), (57, 113), (200, 61)]  # (height, width)


def _model():
    return cached_model("llava_onevision")


def _layout(model, size):
    cfg = model.config
    return tuple(get_anyres_image_grid_shape(size, cfg.image_grid_pinpoints, cfg.vision_config.image_size))


def _identity_owners(n, h0, w0):
    return torch.arange(h0 * w0).expand(n, -1)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("max_tiles", [9, 1])  # anyres_max_1 makes the model shrink every multi-tile grid
def test_unmerged_tiles_pack_exactly_like_the_model(size, max_tiles):
    model = _model()
    h0 = w0 = model.config.vision_config.image_size // model.config.vision_config.patch_size
    R, C = _layout(model, size)
    tiles = torch.randn(1 + R * C, h0 * w0, D, generator=torch.Generator().manual_seed(sum(size)))
    (want,), _ = model.model.pack_image_features([tiles], torch.tensor([size]), image_newline=None,
                                                 vision_aspect_ratio=f"anyres_max_{max_tiles}")
    x, owner, original = pack_merged_anyres(tiles[1:].view(R * C, h0, w0, D), _identity_owners(R * C, h0, w0),
                                            (R, C), (h0, w0), torch.tensor(size), max_tiles)
    assert x.shape[:2] == original
    torch.testing.assert_close(x.reshape(-1, D), want[h0 * w0:], rtol=0, atol=1e-6)
    torch.testing.assert_close(owner, torch.arange(original[0] * original[1]))


def test_unmerged_frame_pools_exactly_like_the_model():
    model = _model()
    h0 = model.config.vision_config.image_size // model.config.vision_config.patch_size
    frames = torch.randn(3, h0 * h0, D)
    want = model.model.apply_pooling(frames)
    for f in range(3):
        pooled, owner, original = pool_merged_frame(frames[f].view(h0, h0, D), torch.arange(h0 * h0), (h0, h0))
        torch.testing.assert_close(pooled.reshape(-1, D), want[f], rtol=0, atol=1e-6)
        assert original == (math.ceil(h0 / 2),) * 2
        torch.testing.assert_close(owner, torch.arange(original[0] * original[1]))


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(SIZES), st.integers(1, 3), st.integers(1, 3), st.sampled_from([9, 1]),
       st.integers(0, 2**16))
def test_merged_tiles_keep_all_content_and_fit_the_run(size, r_w, r_h, max_tiles, seed):
    """Each tile merged by OIM with its own choices (random features): the packed grid is no larger than the
    model's, every patch of the unpadded image is held by a kept token, provenance is a partition."""
    model = _model()
    h0 = w0 = model.config.vision_config.image_size // model.config.vision_config.patch_size
    R, C = _layout(model, size)
    g = torch.Generator().manual_seed(seed)
    xs, owners = [], []
    for _ in range(R * C):
        x = torch.randn(h0, w0, D, generator=g)
        s, p, o = init_grid_state(h0, w0)
        x, s, p, o = oim_merge_lines(x, s, p, o, None, "width", r_w)
        x, s, p, o = oim_merge_lines(x, s, p, o, None, "height", r_h)
        xs.append(x)
        owners.append(o)
    tiles = torch.stack(xs)
    x, owner, original = pack_merged_anyres(tiles, torch.stack(owners), (R, C), (h0, w0), torch.tensor(size),
                                            max_tiles)
    canvas = unpad_image(torch.zeros(1, R * h0, C * w0), torch.tensor(size))
    hc, wc = canvas.shape[1:]
    ratio = math.sqrt(hc * wc / (max_tiles * h0**2))
    want_original = (int(hc // ratio), int(wc // ratio)) if ratio > 1.1 else (hc, wc)
    assert original == want_original
    assert x.shape[0] <= original[0] and x.shape[1] <= original[1], "must fit the model's placeholder run"
    assert owner.shape == (original[0] * original[1],)
    assert int(owner.min()) >= 0 and int(owner.max()) < x.shape[0] * x.shape[1]
    if ratio <= 1.1:  # no interpolation: the packed tokens are the merged tokens themselves
        h2, w2 = tiles.shape[1:3]
        stitched = tiles.view(R, C, h2, w2, D).permute(0, 2, 1, 3, 4).reshape(R * h2, C * w2, D)
        flat = stitched.reshape(-1, D)
        for cell in x.reshape(-1, D)[owner.unique()]:
            assert (flat == cell).all(-1).any()
        held = torch.zeros(x.shape[0] * x.shape[1], dtype=torch.bool)
        held[owner] = True
        held = held.view(x.shape[:2])
        # whole lines are kept or cropped (as the model crops): each kept line holds some image content
        assert held.any(1).all() and held.any(0).all(), "a kept row or column holds only padding"


def test_encoder_merge_reaches_the_llm_with_newlines_per_new_row(monkeypatch):
    """End to end: the AnyRes grid the LLM receives has the merged size, one newline per new row, and the
    model with ``anyres_max_1`` (interpolation) still equals the unpatched model when nothing merges."""
    config = testing.tiny_config("llava_onevision")
    config.vision_aspect_ratio = "anyres_max_1"
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    make = testing.tiny_processor

    def processor(arch):  # the processor must expand placeholders for the same anyres_max budget
        proc = make(arch)
        proc.vision_aspect_ratio = "anyres_max_1"
        return proc

    monkeypatch.setattr(testing, "tiny_processor", processor)
    inputs = testing.tiny_inputs("llava_onevision", [[testing.make_image(300, 100, seed=4)]])
    with torch.no_grad():
        ref = model(**inputs).logits
        with tc.compress(model, [tc.Stage(OIM(rate=0.0), site="encoder", layers=[0])]):
            same = model(**inputs).logits
        torch.testing.assert_close(same, ref, atol=1e-5, rtol=1e-5)
        with tc.compress(model, [tc.Stage(OIM(rate=0.25, iterations=2), site="encoder", layers=[1])]) as run:
            model(**inputs)
            inp = run._state
    grids = [g for r in inp.vision for g in r.grids]
    base, anyres = grids
    assert base == (1, 3, 3)  # a 4x4 tile after one width and one height merge
    ids = inputs["input_ids"][0]
    kept = inp.initial_keep[0]
    kept_image_slots = int(kept[ids == 4].sum())
    # kept placeholder slots = base tile + AnyRes tokens + one newline per AnyRes row
    assert kept_image_slots == 9 + anyres[1] * anyres[2] + anyres[1]
    assert [it.count for it in inp.layouts[0].items] == [9, anyres[1] * anyres[2]]  # newlines are not visual
