"""Schedules survive ``to_dict`` -> JSON/YAML -> ``from_dict`` for every registered strategy and every
parameter form its annotations allow (ToMe's ``(r, inflect)`` stays a tuple), and the loaded schedule
compresses exactly as the original does."""

from __future__ import annotations

import json
import typing

import pytest
import torch
import yaml
from conftest import cached_model
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tokcomp.strategies import SPU, FastV, ToMe

import tokcomp as tc
from tokcomp import registry, testing
from tokcomp.params import field_hints


def _values(hint):
    """Hypothesis values for a field annotation (small, so most combinations pass the strategy's check)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        return st.booleans()
    if hint is int:
        return st.integers(0, 6)
    if hint is float:
        return st.one_of(st.floats(0.05, 1.0), st.integers(1, 1))
    if hint is str:
        return st.sampled_from(["keys", "hidden", "auto"])
    if hint is type(None):
        return st.none()
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin in (typing.Union, __import__("types").UnionType):
        return st.one_of(*[_values(a) for a in args])
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return st.lists(_values(args[0]), max_size=3).map(tuple)
        return st.tuples(*[_values(a) for a in args])
    if origin in (list, __import__("collections.abc").abc.Sequence):
        return st.lists(_values(args[0] if args else int), max_size=3)
    if origin is dict:
        return st.dictionaries(_values(args[0]), _values(args[1]), max_size=2)
    return st.nothing()


@st.composite
def _strategy(draw, cls):
    kwargs = {name: draw(_values(hint)) for name, hint in field_hints(cls).items() if hint is not typing.Any}
    try:
        s = cls(**kwargs)
        s.check()
    except (tc.ScheduleError, ValueError, TypeError):
        assume(False)
    return s


def _through(schedule, fmt):
    d = schedule.to_dict()
    text = json.dumps(d) if fmt == "json" else yaml.safe_dump(d)
    return tc.Schedule.from_dict(json.loads(text) if fmt == "json" else yaml.safe_load(text))


@pytest.mark.parametrize("name", sorted(registry.strategies()))
@pytest.mark.parametrize("fmt", ["json", "yaml"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(data=st.data())
def test_every_parameter_form_round_trips(name, fmt, data):
    cls = registry.get_strategy(name).obj
    s = data.draw(_strategy(cls))
    layers = data.draw(st.one_of(st.none(), st.lists(st.integers(0, 5), min_size=1, max_size=3)))
    site = min(cls.sites)
    back = _through(tc.Schedule([tc.Stage(s, site=site, layers=layers)]), fmt).stages[0]
    got = back.build_strategy()
    assert type(got) is cls and got == s  # equal values *and* forms: (8, 0) != [8, 0]
    for field in field_hints(cls):
        assert type(getattr(got, field)) is type(getattr(s, field)) or isinstance(getattr(s, field), int)
    assert back.site == site and back.layers == layers


def test_tome_inflect_form_is_kept():
    for r in [(8, -1), (8, 0), (8, 0.5), [8, 0], [8, 4, 2], 8]:
        back = _through(tc.Schedule([tc.Stage(ToMe(r=r), site="projector")]), "json").stages[0].build_strategy()
        assert back.r == r and type(back.r) is type(r), (r, back.r)


def _site_and_layers(cls, model):
    """Where a strategy runs on the tiny Qwen2-VL with its own default layers."""
    for site in ("llm", "encoder", "projector"):
        if site not in cls.sites:
            continue
        try:
            tc.compress(model, [tc.Stage(cls(), site=site)])
        except tc.ScheduleError:
            continue
        return site
    pytest.skip(f"{cls.name} has no default placement on the tiny Qwen2-VL")


_FORMS = {  # the non-default forms worth running: each changes what the strategy does
    "tome": [ToMe(r=(3, -1.0)), ToMe(r=[3]), ToMe(r=2, metric="hidden", class_token=True)],
    "fastv": [FastV(keep=5, query="mean")],
    "spu": [SPU(steps=[(2, 0.5), (3, 0.25)]), SPU(schedule="geometric", decay=0.5)],
}


@pytest.mark.parametrize("name", sorted(registry.strategies()))
def test_loaded_schedule_compresses_exactly_as_the_original(name):
    model = cached_model("qwen2_vl")
    cls = registry.get_strategy(name).obj
    site = _site_and_layers(cls, model)
    inputs = testing.tiny_inputs("qwen2_vl")
    for i, s in enumerate([cls(), *_FORMS.get(name, [])]):
        layers = [2, 3] if isinstance(s, SPU) and s.steps else None
        original = tc.Schedule([tc.Stage(s, site=site, layers=layers)])
        outs = []
        for sched in (original, _through(original, "json" if i % 2 == 0 else "yaml")):
            with torch.no_grad(), tc.compress(model, sched) as run:
                logits = model(**inputs).logits
            outs.append((logits, run.report().visual_tokens, run.report().original_visual))
        assert outs[1][1:] == outs[0][1:]
        assert torch.equal(outs[1][0], outs[0][0])
