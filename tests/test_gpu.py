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


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "llava"])
def test_encoder_attention_rows_under_flash_equal_sdpa(arch):
    """Encoder attention rows come from the block's own q/k, so a FlashAttention tower gives the rows (and the
    VisionZip selection) that an SDPA tower gives; output_attentions is never needed."""
    from tokcomp.contracts import EncoderAttention
    from tokcomp.strategies import VisionZip

    site = "encoder" if arch == "llava" else "projector"
    rows, kept = {}, {}
    for attn in ("sdpa", "flash_attention_2"):
        model = testing.tiny_model(arch, attn_implementation=attn, dtype=torch.bfloat16).cuda()
        batch = testing.tiny_inputs(arch, dtype=torch.bfloat16).to("cuda")
        strategy = VisionZip(dominant=4, contextual=2)
        seen = []
        reduce = strategy.reduce

        def spy(tokens, reduce=reduce, seen=seen):
            seen.extend(fr.attention for it in tokens.items for fr in it.frames)
            return reduce(tokens)

        strategy.reduce = spy
        with torch.no_grad(), tc.compress(model, [tc.Stage(strategy, site=site)]) as run:
            model(**batch)
        rows[attn] = [a for d in seen for k, a in sorted(d.items(), key=lambda kv: kv[0].block)
                      if isinstance(k, EncoderAttention)]
        kept[attn] = run.report().original_visual
    assert kept["sdpa"] == kept["flash_attention_2"] and rows["sdpa"]
    for a, b in zip(rows["sdpa"], rows["flash_attention_2"]):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)
