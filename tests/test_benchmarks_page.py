"""``docs/benchmarks.md`` is what ``benchmarks/run.py`` writes from the stored results: rebuilding the page
from ``benchmarks/results/*.json`` (``run.py --render-only``, without the plot) gives the committed page
byte for byte, so a hand edit of the page, or a generator change not rerun, fails here. The built HTML's
layout (tables in their own scroll box, short titles, profiling notes on their own page) is checked in
test_docs.py."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

import tokcomp as tc

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_module():
    spec = importlib.util.spec_from_file_location("benchmarks_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks_run"] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("benchmarks_run", None)


def test_page_is_the_generators_output(run_module) -> None:
    from tokcomp.bench import BenchResult

    run = run_module
    suite = run.cases(False, "cpu")
    results = {}
    for case in suite:
        # the equal-budget schedules are committed as files; the page's commands name them
        for name, spec in case.schedules.items():
            if isinstance(spec, tc.Schedule):
                rel = f"benchmarks/schedules/{case.key}-{name.replace('@', '-at-')}.json"
                assert json.loads((ROOT / rel).read_text()) == spec.to_dict(), f"{rel} is stale: rerun --render-only"
                case.files[name] = rel
        path = run.result_path(case, False)
        if path.exists():
            results[case.key] = BenchResult.load_json(path)
    meta = json.loads((run.RESULTS / "meta.json").read_text())
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    assert run.render(results, suite, meta) == page, (
        "docs/benchmarks.md differs from what benchmarks/run.py renders from benchmarks/results/: run "
        "`python benchmarks/run.py --render-only` (edit the generator, not the page)"
    )


def test_page_links_the_profiling_notes_instead_of_holding_them() -> None:
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    assert "(profiling.md)" in page
    assert "Where the time goes (profiling notes)" not in page and "cProfile" not in page
    notes = (ROOT / "docs" / "profiling.md").read_text()
    assert "cProfile" in notes and "**Strategy overhead.**" in notes
