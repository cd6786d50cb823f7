"""``tokcomp bench --format table|markdown|csv|json`` and ``--wide``: the narrow default fits a 100-column
terminal without cutting a cell, the wide table does not, and the machine formats parse back to the
measured numbers."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch
from rich.console import Console

import tokcomp as tc
from tokcomp import testing
from tokcomp.bench import BenchResult, render, run_bench
from tokcomp.bench.tables import CSV_FIELDS, NARROW, WIDE, rich_table
from tokcomp.cli import main


@pytest.fixture(scope="module")
def bench() -> BenchResult:
    model = testing.tiny_model("qwen2_vl", num_hidden_layers=4, dtype=torch.bfloat16)
    inputs = testing.tiny_inputs("qwen2_vl", dtype=torch.bfloat16)
    return run_bench(
        model,
        inputs,
        {"spu": tc.Schedule.preset("spu"), "luvc-document": "luvc-document", "broken": "no-such"},
        repeats=1,
        new_tokens=2,
        progress=False,
    )


def _drawn(res: BenchResult, wide: bool, width: int) -> list[str]:
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(rich_table(res, wide=wide))
    return console.export_text().splitlines()


def test_narrow_table_fits_100_columns_whole(bench):
    lines = _drawn(bench, wide=False, width=100)
    assert max(map(len, lines)) <= 100
    text = "\n".join(lines)
    assert "…" not in text  # rich shrinks a table that does not fit by cutting cells: none was cut
    for header in ("kept", "prefill s", "LLM × (ideal)", "TTFT s", "agree"):
        assert header in text
    for name in ("uncompressed", "spu", "luvc-document", "broken"):
        assert name in text
    spu = bench.schedules["spu"]
    assert f"{spu.retained_fraction:.3f}" in text and f"{spu.speedup['llm']:.2f}×" in text


def test_wide_table_has_every_column_and_needs_more_room(bench):
    lines = _drawn(bench, wide=True, width=300)
    assert max(map(len, lines)) > 100  # what --wide adds is why the default leaves it out
    text = "\n".join(lines)
    for c in WIDE:
        assert c.header in text
    assert {c.header for c in NARROW} < {c.header for c in WIDE}
    assert f"{bench.schedules['spu'].kv_cache_bytes / 2**20:.1f}" in text


@pytest.mark.parametrize("wide", [False, True])
def test_markdown_is_a_pipe_table_of_the_same_columns(bench, wide):
    lines = render(bench, "markdown", wide=wide).splitlines()
    cols = WIDE if wide else NARROW
    assert lines[0] == "| " + " | ".join(c.header for c in cols) + " |"
    assert set(lines[1]) <= set("|-:") and lines[1].count("|") == len(cols) + 1
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert [r[0] for r in rows] == ["uncompressed", "spu", "luvc-document", "broken"]
    assert all(len(r) == len(cols) for r in rows)
    assert rows[3][1] == "error"


def test_csv_parses_to_the_measured_numbers(bench):
    rows = list(csv.DictReader(io.StringIO(render(bench, "csv"))))
    assert tuple(rows[0]) == CSV_FIELDS
    by = {r["schedule"]: r for r in rows}
    assert list(by) == ["uncompressed", "spu", "luvc-document", "broken"]
    spu = bench.schedules["spu"]
    assert float(by["spu"]["retained_fraction"]) == pytest.approx(spu.retained_fraction)
    assert float(by["spu"]["prefill_s"]) == pytest.approx(spu.prefill_s.median)
    assert float(by["spu"]["speedup_llm"]) == pytest.approx(spu.speedup["llm"])
    assert int(by["spu"]["kv_cache_bytes"]) == spu.kv_cache_bytes
    assert by["broken"]["error"] and by["broken"]["prefill_s"] == ""
    assert by["spu"]["error"] == ""


def test_json_is_the_whole_result(bench):
    again = BenchResult.from_dict(json.loads(render(bench, "json")))
    assert set(again.schedules) == set(bench.schedules)
    assert again.schedules["spu"].prefill_s == bench.schedules["spu"].prefill_s


def test_unknown_format_is_refused(bench):
    with pytest.raises(ValueError, match="unknown format 'xml'"):
        render(bench, "xml")


ARGS = ["bench", "--model", "tiny:qwen2_vl", "--layers", "3", "-s", "spu", "--repeats", "1", "--new-tokens", "2",
        "--no-progress"]


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_cli_machine_formats_print_only_data_on_stdout(fmt, capsys):
    assert main([*ARGS, "--format", fmt]) == 0
    out, err = capsys.readouterr()
    if fmt == "csv":
        rows = list(csv.DictReader(io.StringIO(out)))
        assert [r["schedule"] for r in rows] == ["uncompressed", "spu"]
        assert float(rows[1]["retained_fraction"]) < 1.0
    else:
        d = json.loads(out)
        assert set(d["schedules"]) == {"spu"} and d["model"]["short"] == "tiny qwen2_vl"
    assert "model: tiny qwen2_vl" in err  # the notes went to stderr


def test_cli_default_table_fits_100_columns(capsys):
    assert main(ARGS) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.strip()]
    assert "uncompressed" in out and "spu" in out
    assert max(len(line) for line in table if not line.startswith(("model:", "inputs:", "- "))) <= 100


def test_cli_rejects_an_unknown_format(capsys):
    with pytest.raises(SystemExit) as info:
        main([*ARGS, "--format", "xml"])
    assert info.value.code == 2
    assert "invalid choice: 'xml'" in capsys.readouterr().err
