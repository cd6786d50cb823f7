"""Third-party plugins: the example package installs and runs; clashes and broken plugins fail clearly.

The example plugin (``examples/tokcomp-example-plugin``) is installed with pip into a temporary folder, which
is put on ``sys.path`` only while a test uses it. Every test restores ``sys.path``, ``sys.modules`` and the
registry in ``finally`` blocks, so tests that run later see the built-ins only.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import cached_model

import tokcomp as tc
from tokcomp import registry, testing
from tokcomp.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tokcomp-example-plugin"
EXAMPLE_PACKAGE = "tokcomp-example-plugin"
EXAMPLE_MODULE = "tokcomp_example_plugin"


@contextlib.contextmanager
def on_path(folder: Path, *modules: str) -> Iterator[None]:
    """``folder`` on ``sys.path`` with a freshly loaded registry; afterwards ``sys.path``, the named modules
    (and their submodules) and the registry are as before."""
    before = list(sys.path)
    sys.path.insert(0, str(folder))
    registry.reload()
    try:
        yield
    finally:
        sys.path[:] = before
        for name in list(sys.modules):
            if any(name == m or name.startswith(f"{m}.") for m in modules):
                del sys.modules[name]
        registry.reload()


@pytest.fixture(scope="module")
def example_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin, pip-installed (no dependencies, no index) into a temporary ``--target`` folder."""
    work = tmp_path_factory.mktemp("example-plugin")
    src = work / "src"
    # Build from a copy: an in-tree build would leave build/ and *.egg-info in the repository.
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = work / "target"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(src)],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )
    assert proc.returncode == 0, f"pip install of the example plugin failed:\n{proc.stdout}\n{proc.stderr}"
    return target


@pytest.fixture
def example_plugin(example_target: Path) -> Iterator[Path]:
    with on_path(example_target, EXAMPLE_MODULE):
        yield example_target


def test_example_plugin_is_registered_under_its_package(example_plugin: Path) -> None:
    strategy = registry.strategies()["keep_every_nth"]
    preset = registry.presets()["every-other"]
    assert strategy.package == EXAMPLE_PACKAGE and preset.package == EXAMPLE_PACKAGE
    # loaded from the installed copy, through its entry point
    assert Path(sys.modules[EXAMPLE_MODULE].__file__).is_relative_to(example_plugin)
    assert strategy.obj.__module__ == f"{EXAMPLE_MODULE}.strategies"
    assert strategy.description.startswith("Keep every ``n``-th visual token")
    # the built-ins are still there, from tokcomp
    assert registry.strategies()["spu"].package == "tokcomp"


def test_example_strategy_runs_through_generate(example_plugin: Path) -> None:
    model = cached_model("qwen2_vl")
    inputs = testing.tiny_inputs("qwen2_vl")
    n_prompt = inputs["input_ids"].shape[1]
    with torch.no_grad(), tc.compress(model, tc.Schedule([tc.Stage("keep_every_nth", site="llm", layers=[1], n=3)])) \
            as run:
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape == (2, n_prompt + 3)
    rep = run.report()
    n0 = rep.original_visual
    assert all(n > 3 for n in n0)
    assert rep.visual_tokens[0] == n0
    for layer in range(1, rep.num_layers):
        assert rep.visual_tokens[layer] == [math.ceil(n / 3) for n in n0]
    assert [(e.layer, e.tokens_in, e.tokens_out, e.info) for e in rep.events] == [
        (1, n, math.ceil(n / 3), {"n": 3}) for n in n0
    ]


def test_example_preset_runs(example_plugin: Path) -> None:
    model = cached_model("qwen2_vl")
    inputs = testing.tiny_inputs("qwen2_vl")
    with torch.no_grad(), tc.compress(model, tc.Schedule.preset("every-other")) as run:
        model(**inputs)
    rep = run.report()
    assert rep.visual_tokens[1] == rep.original_visual
    assert rep.visual_tokens[2] == [math.ceil(n / 2) for n in rep.original_visual]


@pytest.mark.parametrize("n", [0, -2, 1.5])
def test_example_strategy_validates_n(example_plugin: Path, n: object) -> None:
    with pytest.raises(tc.ScheduleError, match="keep_every_nth: n must be an integer >= 1"):
        tc.compress(cached_model("qwen2_vl"), [tc.Stage("keep_every_nth", site="llm", layers=[1], n=n)])


def test_cli_list_shows_the_plugin(example_plugin: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["list"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert EXAMPLE_PACKAGE in lines["keep_every_nth"]
    assert EXAMPLE_PACKAGE in lines["every-other"]


def test_leaving_the_path_forgets_the_plugin(example_target: Path) -> None:
    before = list(sys.path)
    with on_path(example_target, EXAMPLE_MODULE):
        assert "keep_every_nth" in registry.strategies()
    assert sys.path == before
    assert EXAMPLE_MODULE not in sys.modules
    assert "keep_every_nth" not in registry.strategies()
    assert "every-other" not in registry.presets()
    with pytest.raises(tc.ScheduleError, match="unknown strategy 'keep_every_nth'"):
        tc.Stage("keep_every_nth", layers=[1]).build_strategy()


# ---------------------------------------------------------------------------------------------------------
# Clashes and broken plugins
# ---------------------------------------------------------------------------------------------------------
def _strategy_named(name: str) -> type:
    @dataclass
    class Impostor(tc.LLMStrategy):
        """A strategy registered under a name that may already be taken."""

        def select(self, view: tc.LLMView) -> tc.LLMDecision:
            return tc.LLMDecision(keep=torch.arange(view.num_present))

    Impostor.name = name  # type: ignore[misc]
    return Impostor


def _plugin_module(module_name: str, *, strategy: str | None = None, preset: str | None = None) -> types.ModuleType:
    """An in-process plugin module registering a strategy and/or a preset under the given names."""
    mod = types.ModuleType(module_name)
    if strategy is not None:
        cls = _strategy_named(strategy)

        @tc.hookimpl
        def tokcomp_register_strategies(register):
            register(cls)

        mod.tokcomp_register_strategies = tokcomp_register_strategies
    if preset is not None:

        @tc.hookimpl
        def tokcomp_register_presets(register):
            register(preset, lambda num_layers: tc.Schedule([]), "an empty schedule")

        mod.tokcomp_register_presets = tokcomp_register_presets
    return mod


@pytest.mark.parametrize(("kind", "name"), [("strategy", "fastv"), ("preset", "spu")])
def test_clash_with_a_builtin_names_both_packages(kind: str, name: str) -> None:
    plugin = _plugin_module("clash_plugin", **{kind: name})
    table = registry.strategies if kind == "strategy" else registry.presets
    try:
        with pytest.raises(tc.PluginError) as info:
            registry.register_plugin(plugin, name="clashing-package")
        msg = str(info.value)
        assert f"{kind} name clash" in msg and repr(name) in msg
        assert "'tokcomp'" in msg and "'clashing-package'" in msg
        # the failed registration is rolled back: the built-in still answers to the name
        assert not registry.plugin_manager().is_registered(plugin)
        assert table()[name].package == "tokcomp"
    finally:
        if registry.plugin_manager().is_registered(plugin):
            registry.unregister_plugin(plugin)
        registry.reload()


def test_clash_between_two_plugins_names_both() -> None:
    first = _plugin_module("first_plugin", strategy="shared_name")
    second = _plugin_module("second_plugin", strategy="shared_name")
    try:
        registry.register_plugin(first, name="first-package")
        assert registry.strategies()["shared_name"].package == "first-package"
        with pytest.raises(tc.PluginError, match="strategy name clash: 'shared_name'") as info:
            registry.register_plugin(second, name="second-package")
        assert "'first-package'" in str(info.value) and "'second-package'" in str(info.value)
        assert registry.strategies()["shared_name"].package == "first-package"
        registry.unregister_plugin(first)
        assert "shared_name" not in registry.strategies()
    finally:
        registry.reload()
    assert "shared_name" not in registry.strategies()


def test_broken_entry_point_names_its_package(tmp_path: Path) -> None:
    """A distribution whose ``tokcomp`` entry point fails to import: the error names the package."""
    dist_info = tmp_path / "broken_tokcomp_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-tokcomp-plugin\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[tokcomp]\nbroken = broken_tokcomp_plugin_mod\n")
    (tmp_path / "broken_tokcomp_plugin_mod.py").write_text(
        'raise RuntimeError("this plugin is broken on purpose")\n'
    )
    with on_path(tmp_path, "broken_tokcomp_plugin_mod"):
        with pytest.raises(tc.PluginError) as info:
            registry.strategies()
        msg = str(info.value)
        assert "'broken-tokcomp-plugin'" in msg, msg
        assert "broken_tokcomp_plugin_mod" in msg and "this plugin is broken on purpose" in msg
        assert "pip uninstall broken-tokcomp-plugin" in msg
        assert isinstance(info.value.__cause__, RuntimeError)
        with pytest.raises(tc.PluginError, match="broken-tokcomp-plugin"):  # also where users meet it
            tc.compress(cached_model("qwen2_vl"), tc.Schedule([]))
    assert "broken_tokcomp_plugin_mod" not in sys.modules
    assert "spu" in registry.strategies()  # and the registry works again without it


def test_tokcomp_eval_scores_a_plugin_strategy(example_plugin: Path) -> None:
    from tokcomp.evaluate import evaluate

    model, processor = testing.trained_model()
    nth = tc.Schedule([tc.Stage("keep_every_nth", site="llm", layers=[1], n=3)])
    res = evaluate(model, processor, {"nth": nth, "every-other": "every-other"}, budgets=(), examples=7,
                   batch=7, progress=False)
    layers = res.num_layers
    for name, first, n in (("nth", 1, 3), ("every-other", 2, 2)):
        r = res.by_name(name)
        assert r.error is None and r.kind == ("custom" if name == "nth" else "preset")
        assert len(r.answers) == 7
        # Every sample keeps ceil(144 / n) tokens from the stage's layer on.
        expected = (first * 144 + (layers - first) * math.ceil(144 / n)) / (layers * 144)
        assert math.isclose(r.retained, expected, rel_tol=1e-9), (name, r.retained, expected)


class _PresetAndBudgetPlugin:
    """An in-process plugin that composes a built-in strategy into a preset and an equal-budget schedule,
    the way ``tokcomp.strategies.presets`` and ``tokcomp.strategies.budgets`` register tokcomp's own."""

    @tc.hookimpl
    def tokcomp_register_presets(self, register):
        register("fastv-at-1", lambda num_layers: tc.Schedule([tc.Stage("fastv", layers=[1], keep_ratio=0.25)]),
                 "FastV at layer 1 keeping a quarter (test plugin)")

    @tc.hookimpl
    def tokcomp_register_budgets(self, register):
        def build(layers: int, llm_tokens: int, f: float) -> tuple[float, tc.Schedule]:
            return f, tc.Schedule([tc.Stage("random", layers=[0], keep_ratio=f)])

        register("random-at-0", build, "random pruning at the LLM input (test plugin)")


def test_a_plugin_preset_is_found_wherever_a_preset_name_is_taken(tmp_path: Path) -> None:
    from tokcomp.bench import load_schedule
    from tokcomp.budgets import budget_schedules

    plugin = _PresetAndBudgetPlugin()
    model = cached_model("qwen2_vl")
    inputs = testing.tiny_inputs("qwen2_vl")
    try:
        registry.register_plugin(plugin, name="preset-test-package")
        assert registry.presets()["fastv-at-1"].package == "preset-test-package"
        assert tc.presets.PRESETS["fastv-at-1"][1].endswith("(test plugin)")
        (tmp_path / "s.json").write_text('{"preset": "fastv-at-1"}')
        for schedule in ("fastv-at-1", tc.Schedule.preset("fastv-at-1"),
                         tc.Schedule.from_file(tmp_path / "s.json"), load_schedule("fastv-at-1")):
            with torch.no_grad(), tc.compress(model, schedule) as run:
                model(**inputs)
            rep = run.report()
            assert rep.visual_tokens[0] == rep.original_visual
            assert rep.visual_tokens[1] == [math.ceil(n * 0.25) for n in rep.original_visual], schedule
        # the budget factory joins every strategy's equal-budget schedules, next to the built-ins
        scheds = budget_schedules(6, 48, 0.25)
        assert "random-at-0@0.25" in scheds and "fastv@0.25" in scheds
        assert scheds["random-at-0@0.25"].to_dict()["stages"][0]["layers"] == [0]
    finally:
        if registry.plugin_manager().is_registered(plugin):
            registry.unregister_plugin(plugin)
        registry.reload()
    assert "fastv-at-1" not in registry.presets()
    assert not any(k.startswith("random-at-0") for k in budget_schedules(6, 48, 0.25))
