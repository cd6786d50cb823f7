"""GPU-only paths (FlashAttention 2, CUDA dtypes). Skipped on machines without CUDA and flash-attn."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import tokcomp as tc
from tokcomp import testing

needs_flash = pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
    reason="needs a CUDA device and the flash-attn package (pip install -e '.[flash-attn]')",
)
pytestmark = [pytest.mark.gpu, needs_flash]


@pytest.mark.parametrize("preset", ["spu", "fastv", "vtw", "luvc"])
def test_flash_attention_matches_sdpa(preset):
    """The 2-D validity mask FlashAttention gets gives what SDPA's 4-D mask gives, prefill and decode."""
    outs = {}
    for attn in ("sdpa", "flash_attention_2"):
        model = testing.tiny_model("qwen2_vl", attn_implementation=attn, dtype=torch.bfloat16).cuda()
        batch = testing.tiny_inputs("qwen2_vl", dtype=torch.bfloat16).to("cuda")
        with torch.no_grad(), tc.compress(model, tc.Schedule.preset(preset)):
            outs[attn] = model.generate(**batch, max_new_tokens=4, do_sample=False, output_scores=True,
                                        return_dict_in_generate=True)
    assert torch.equal(outs["sdpa"].sequences, outs["flash_attention_2"].sequences)
    torch.testing.assert_close(outs["sdpa"].scores[0].float(), outs["flash_attention_2"].scores[0].float(),
                               atol=5e-2, rtol=5e-2)


def test_pact_needs_proportional_attention_off_under_flash():
    model = testing.tiny_model("qwen2_vl", attn_implementation="flash_attention_2", dtype=torch.bfloat16).cuda()
    with pytest.raises(tc.ScheduleError, match="proportional_attention=False"):
        tc.compress(model, tc.Schedule.preset("pact"))
