"""bf16 and fp16 on every architecture, with a vision-side stage: the identity oracle (a stage that merges
nothing equals the unpatched model run in the same dtype) and the LUVC preset through generate() on a padded
batch (finite, compressed, no visual token left at the last layer)."""

from __future__ import annotations

import pytest
import torch
from conftest import cached_model
from tokcomp.strategies import OIM

import tokcomp as tc
from tokcomp import testing

ARCHS = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "internvl", "llava"]


def _inputs(arch, dtype):
    img = testing.make_image
    return testing.tiny_inputs(arch, [[img(224, 168, seed=1)], [img(140, 196, seed=2)]], dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_vision_stage_in_low_precision(arch, dtype):
    model = cached_model(arch, "sdpa", dtype)
    inputs = _inputs(arch, dtype)
    with torch.no_grad():
        ref = model(**inputs).logits
        with tc.compress(model, [tc.Stage(OIM(rate=0.0), site="encoder", layers=[1])]):
            same = model(**inputs).logits
        torch.testing.assert_close(same, ref, atol=0, rtol=0)  # the same computation, bit for bit
        with tc.compress(model, "luvc") as run:
            logits = model(**inputs).logits
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    rep = run.report()
    assert torch.isfinite(logits).all()
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    assert sum(rep.emitted_visual) < sum(rep.uncompressed_visual), "OIM merged nothing"
    assert rep.visual_tokens[-1] == [0, 0]
