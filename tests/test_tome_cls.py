"""ToMe on a tower with a class token matches as the reference does: on ``[CLS] + patches`` with the CLS
protected (the split, the merged values and the order of the unmerged tokens), whatever the CLS holds."""

from __future__ import annotations

import pytest
import torch
from conftest import cached_model
from tokcomp.strategies import ToMe
from tokcomp.strategies.tome import bipartite_soft_matching, merge_wavg

import tokcomp as tc
from tokcomp import testing
from tokcomp.tokens import FrameGrid, VisualItemTokens, VisualTokens


def _reduce(strategy, x, metric, prefix):
    frame = FrameGrid.fresh(x.reshape(1, -1, x.shape[-1]), metric.reshape(1, -1, metric.shape[-1]))
    vt = VisualTokens([VisualItemTokens("image", [frame], (1, 1, x.shape[0]))], "encoder", 1, 4, (1,), prefix=prefix)
    return strategy.reduce(vt).items[0].frames[0]


@pytest.mark.parametrize(("n", "r"), [(16, 4), (15, 7), (9, 8)])
def test_matches_the_reference_on_cls_plus_patches(n, r):
    g = torch.Generator().manual_seed(n + r)
    x, metric = torch.randn(n, 6, generator=g), torch.randn(n, 5, generator=g)
    got = _reduce(ToMe(r=r, metric="keys"), x, metric, prefix=1)
    for cls_value in (torch.zeros(1, 6), torch.randn(1, 6, generator=g) * 10):  # the CLS's content is irrelevant
        # the reference: one row [CLS] + patches, class_token=True, size-weighted merge; then set the CLS aside
        full_m = torch.cat([torch.randn(1, 5, generator=g), metric])[None]
        merge, _ = bipartite_soft_matching(full_m, r, class_token=True)
        ref, size = merge_wavg(merge, torch.cat([cls_value, x])[None])
        torch.testing.assert_close(ref[0, 0], cls_value[0])  # the CLS stays first and unmerged
        torch.testing.assert_close(got.x.reshape(-1, 6), ref[0, 1:])
        torch.testing.assert_close(got.size.reshape(-1), size[0, 1:, 0])
    # the patches alone (class_token=False) split the other way round: another result
    alone = _reduce(ToMe(r=r, metric="keys", class_token=False), x, metric, prefix=1)
    assert alone.x.shape == got.x.shape and not torch.allclose(alone.x, got.x)


def test_provenance_follows_the_new_order():
    g = torch.Generator().manual_seed(0)
    x, metric = torch.randn(12, 4, generator=g), torch.randn(12, 4, generator=g)
    fr = _reduce(ToMe(r=5, metric="keys"), x, metric, prefix=1)
    # every output token is the size-weighted mean of the patches its provenance gives it
    for j in range(fr.num_tokens):
        members = (fr.owner == j).nonzero().squeeze(1)
        assert members.numel() == int(fr.size.reshape(-1)[j])
        torch.testing.assert_close(fr.x.reshape(-1, 4)[j], x[members].mean(0))


def test_llava_tower_uses_the_reference_split_by_default():
    """LLaVA-1.5's CLIP has a CLS: ToMe(class_token=None) follows it, and differs from patches-only."""
    model = cached_model("llava")
    inputs = testing.tiny_inputs("llava")
    outs = {}
    for cls in (None, True, False):
        with torch.no_grad(), tc.compress(model, [tc.Stage(ToMe(r=3, class_token=cls), site="encoder", layers=[1])]) as run:
            outs[cls] = model(**inputs).logits[:, -1]
        assert run.report().original_visual < run.report().uncompressed_visual
    torch.testing.assert_close(outs[None], outs[True])
    assert not torch.allclose(outs[None], outs[False])
