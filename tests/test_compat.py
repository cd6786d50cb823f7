"""The transformers version guard and the renamed cache keyword (5.24: past_key_values -> cache)."""

from __future__ import annotations

import pytest
import torch
from conftest import cached_model
from tokcomp.strategies import SPU

import tokcomp as tc
from tokcomp import compat, testing


@pytest.mark.parametrize("version", ["4.57.6", "5.16.1", "6.0.0", "5.30.0"])
def test_out_of_range_version_is_refused_with_range_and_override(version):
    with pytest.raises(tc.UnsupportedVersionError) as err:
        compat.check_transformers_version(version=version)
    msg = str(err.value)
    low, high = compat.TESTED_TRANSFORMERS
    assert version in msg and low in msg and high in msg
    assert compat.ALLOW_UNTESTED_ENV in msg and "allow_untested_transformers=True" in msg


@pytest.mark.parametrize("version", ["5.17.0", "5.23.0", "5.24.0", "5.24.3"])
def test_tested_versions_pass(version):
    compat.check_transformers_version(version=version)


def test_override_warns_instead(monkeypatch):
    with pytest.warns(RuntimeWarning, match="outside the range"):
        compat.check_transformers_version(allow_untested=True, version="4.57.6")
    monkeypatch.setenv(compat.ALLOW_UNTESTED_ENV, "1")
    with pytest.warns(RuntimeWarning, match="outside the range"):
        compat.check_transformers_version(version="4.57.6")


def test_compress_refuses_before_installing_anything(monkeypatch):
    import transformers

    model = cached_model("qwen2_vl")
    monkeypatch.setattr(transformers, "__version__", "4.57.6")
    before = [len(m._forward_pre_hooks) for m in model.modules()]
    with pytest.raises(tc.UnsupportedVersionError):
        tc.compress(model, tc.Schedule.preset("spu"))
    assert [len(m._forward_pre_hooks) for m in model.modules()] == before
    with pytest.warns(RuntimeWarning):
        run = tc.compress(model, tc.Schedule.preset("spu"), allow_untested_transformers=True)
    assert isinstance(run, tc.CompressionRun)


def test_cache_found_under_every_name():
    marker = object()
    for name in compat.CACHE_KEYWORDS:
        assert compat.cache_of({name: marker, "x": 1}) is marker
        assert compat.without_cache({name: marker, "x": 1}) == {"x": 1}
    assert compat.cache_of({"use_cache": True}) is None


def test_decode_steps_are_not_taken_for_prefills():
    """The symptom 5.24 showed before the fix: every decode step looked like a new prefill, 0 tokens."""
    model = cached_model("qwen2_vl")
    inputs = testing.tiny_inputs("qwen2_vl")
    stage = tc.Stage(SPU(), site="llm", layers=range(1, 4))
    with torch.no_grad(), tc.compress(model, tc.Schedule([stage])) as run:
        model.generate(**inputs, max_new_tokens=3, do_sample=False)
    rep = run.report()
    assert rep.num_prefills == 1
    assert all(n > 0 for n in rep.visual_tokens[0])
