"""The lmms-eval model plugin (``--model tokcomp``) on tiny saved checkpoints.

Run with ``python -m pytest -m lmms_eval tests/test_lmms_eval.py`` after installing the extra
(docs/lmms-eval.md). Skipped when lmms-eval is not installed.

The oracle for every answer is the tiny model generating each sample alone, built in code
(`tokcomp.testing.tiny_model` / `tiny_inputs`, not the saved folder, not the plugin's processor or
batching), under the same schedule. lmms-eval exits 0 even when evaluation raises, so the command-line
tests read the results JSON and never trust the exit code.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install -e '.[lmms-eval]')")
pytest.importorskip("accelerate", reason="the lmms-eval extra is not installed")

from lmms_eval.api.instance import Instance
from lmms_eval.models.model_utils.gen_metrics import get_logged_metrics_history, reset_logged_metrics

import tokcomp as tc
from tokcomp.flops import model_shapes
from tokcomp.integrations.lmms_eval import TokcompModel
from tokcomp.testing import (
    ARCHITECTURES,
    make_image,
    save_tiny_pretrained,
    tiny_inputs,
    tiny_model,
    tiny_tokenizer,
)

pytestmark = pytest.mark.lmms_eval

QUESTIONS = ["w5 w6 w7", "w9", "w10 w11", "w12 w13 w14 w15"]
IMAGE_SIZES = [(224, 168), (140, 196), (168, 168), (196, 140)]
MAX_NEW_TOKENS = 4


def _images() -> list[Any]:
    return [make_image(w, h, seed=k) for k, (w, h) in enumerate(IMAGE_SIZES)]


def _reference(arch: str, schedule: str, n: int = len(QUESTIONS)) -> tuple[list[str], dict[str, float]]:
    """Each sample alone through the in-code tiny model: answers and pooled tokcomp numbers."""
    model = tiny_model(arch)
    tok = tiny_tokenizer(arch)
    shape = model_shapes(model.config)[0]
    answers, layers, layers_base, flops, flops_base = [], 0, 0, 0, 0
    for image, question in list(zip(_images(), QUESTIONS))[:n]:
        # The saved chat template renders a user turn as "w0 w1 <image> <text> w2" (tiny_chat_template).
        inputs = tiny_inputs(arch, [[image]], prompts=[f"{question} w2"])
        with tc.compress(model, None if schedule == "none" else schedule) as run:
            out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        answers.append(tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
        report = run.report()
        layers += sum(report.tokens_for(0))
        layers_base += report.baseline_visual[0] * report.num_layers
        flops += report.llm_flops(shape)
        flops_base += report.llm_flops(shape, baseline=True)
    return answers, {"retained": layers / layers_base, "flops_ratio": flops / flops_base}


def _doc_to_messages(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [{"type": "image", "url": doc["image"]}, {"type": "text", "text": doc["q"]}],
        }
    ]


def _requests(n: int, gen: dict[str, Any] | None = None) -> list[Instance]:
    gen = {"max_new_tokens": MAX_NEW_TOKENS, **(gen or {})}
    return [
        Instance(
            "generate_until",
            ("ctx", _doc_to_messages, dict(gen), i, "tiny", "test"),
            idx=0,
            metadata={"task": "tiny", "doc_id": i, "repeats": 1},
        )
        for i in range(n)
    ]


def _run(model: TokcompModel, requests: list[Instance]) -> tuple[list[str], dict[str, Any]]:
    model.task_dict = {"tiny": {"test": [{"q": q, "image": im} for q, im in zip(QUESTIONS, _images())]}}
    reset_logged_metrics()
    texts = [r.text for r in model.generate_until(requests)]
    return texts, get_logged_metrics_history()[-1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: save_tiny_pretrained(arch, root / arch) for arch in ARCHITECTURES}


def test_entry_point_registers_the_chat_model() -> None:
    from lmms_eval import models

    assert (
        models.get_model_manifest("tokcomp").chat_class_path == "tokcomp.integrations.lmms_eval.TokcompModel"
    )
    assert models.get_model("tokcomp") is TokcompModel


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_batched_answers_and_numbers_match_samples_run_alone(arch: str, folders: dict[str, Path]) -> None:
    model = TokcompModel(pretrained=str(folders[arch]), schedule="luvc", device="cpu", batch_size=2)
    texts, metrics = _run(model, _requests(3))  # batches of 2 (padded) and 1
    answers, expected = _reference(arch, "luvc", n=3)
    assert texts == answers
    assert metrics["tokcomp_retained_visual_fraction"] == pytest.approx(expected["retained"])
    assert metrics["tokcomp_llm_flops_ratio"] == pytest.approx(expected["flops_ratio"])
    assert metrics["tokcomp_retained_visual_fraction"] < 1.0
    assert metrics["tokcomp_batches"] == 2
    assert metrics["tokcomp_prefill_s"] > 0.0


def test_schedule_none_is_the_unpatched_model(folders: dict[str, Path]) -> None:
    model = TokcompModel(pretrained=str(folders["qwen2_vl"]), schedule="none", device="cpu", batch_size=2)
    texts, metrics = _run(model, _requests(2))
    reference = tiny_model("qwen2_vl")
    tok = tiny_tokenizer("qwen2_vl")
    for text, image, question in zip(texts, _images(), QUESTIONS):
        inputs = tiny_inputs("qwen2_vl", [[image]], prompts=[f"{question} w2"])
        out = reference.generate(
            **inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False
        )  # no tokcomp at all
        assert text == tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert metrics["tokcomp_retained_visual_fraction"] == 1.0
    assert metrics["tokcomp_llm_flops_ratio"] == 1.0
    assert metrics["tokcomp_visual_tokens"] == metrics["tokcomp_visual_tokens_uncompressed"] > 0


def test_until_cuts_the_answer(folders: dict[str, Path]) -> None:
    model = TokcompModel(pretrained=str(folders["llava"]), schedule="fastv", device="cpu")
    answers, _ = _reference("llava", "fastv", n=1)
    words = answers[0].split()
    assert len(words) >= 2, "the reference answer is too short to cut"
    texts, _ = _run(model, _requests(1, {"until": [words[1]]}))
    assert texts == [answers[0].split(words[1], 1)[0]]


def test_plain_prompt_without_chat_template(folders: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "no-template"
    shutil.copytree(folders["internvl"], folder)
    (folder / "chat_template.jinja").unlink()
    batched = TokcompModel(pretrained=str(folder), schedule="luvc", device="cpu", batch_size=3)
    assert not batched.processor.chat_template
    texts, _ = _run(batched, _requests(3))
    single = TokcompModel(pretrained=str(folder), schedule="luvc", device="cpu", batch_size=1)
    assert texts == _run(single, _requests(3))[0]
    assert any(texts)


def test_unsupported_request_types_say_why(folders: dict[str, Path]) -> None:
    model = TokcompModel(pretrained=str(folders["llava"]), device="cpu")
    with pytest.raises(NotImplementedError, match="'loglikelihood'.*chat model"):
        model.loglikelihood([])
    with pytest.raises(NotImplementedError, match="generate_until_multi_round"):
        model.generate_until_multi_round([])
    model.task_dict = {"tiny": {"test": [{"q": "w5"}]}}
    video = [
        {"role": "user", "content": [{"type": "video", "url": "clip.mp4"}, {"type": "text", "text": "w5"}]}
    ]
    request = Instance(
        "generate_until",
        ("ctx", lambda doc: video, {}, 0, "tiny", "test"),
        idx=0,
        metadata={"task": "tiny", "doc_id": 0, "repeats": 1},
    )
    with pytest.raises(NotImplementedError, match="video and audio"):
        model.generate_until([request])


def test_bad_arguments_fail_at_load(folders: dict[str, Path], tmp_path: Path) -> None:
    path = str(folders["llava"])
    with pytest.raises(TypeError, match="unknown model_args.*sheduel"):
        TokcompModel(pretrained=path, sheduel="luvc")
    with pytest.raises(ValueError, match="unknown schedule 'lucv'"):
        TokcompModel(pretrained=path, schedule="lucv", device="cpu")
    with pytest.raises(ValueError, match="batch_size"):
        TokcompModel(pretrained=path, batch_size="auto", device="cpu")
    too_deep = tmp_path / "deep.json"  # a layer past the tiny LLM's 4: refused at load, not mid-run
    too_deep.write_text(json.dumps({"stages": [{"strategy": "fastv", "site": "llm", "layers": [9]}]}))
    with pytest.raises(tc.ScheduleError):
        TokcompModel(pretrained=path, schedule=str(too_deep), device="cpu")


def test_schedule_by_file_and_by_module_attribute(
    folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stages = [{"strategy": "fastv", "site": "llm", "layers": [2], "params": {"keep_ratio": 0.25}}]
    (tmp_path / "fastv.json").write_text(json.dumps({"stages": stages}))
    (tmp_path / "my_schedules.py").write_text(
        "import tokcomp as tc\n"
        "def quarter():\n"
        "    return tc.Schedule([tc.Stage('fastv', site='llm', layers=[2], keep_ratio=0.25)])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    by_file = TokcompModel(
        pretrained=str(folders["llava"]), schedule=str(tmp_path / "fastv.json"), device="cpu"
    )
    by_attr = TokcompModel(pretrained=str(folders["llava"]), schedule="my_schedules:quarter", device="cpu")
    file_texts, file_metrics = _run(by_file, _requests(2))
    attr_texts, attr_metrics = _run(by_attr, _requests(2))
    assert file_texts == attr_texts
    assert (
        file_metrics["tokcomp_retained_visual_fraction"]
        == attr_metrics["tokcomp_retained_visual_fraction"]
        < 1
    )


# ---------------------------------------------------------------------------------------------------------
# The command line, single process and `accelerate launch` data parallelism
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory, folders: dict[str, Path]) -> Path:
    """A local lmms-eval task (``--include_path``) over a dataset saved with ``datasets.save_to_disk``."""
    import datasets

    root = tmp_path_factory.mktemp("task")
    features = datasets.Features(
        {"question": datasets.Value("string"), "answer": datasets.Value("string"), "image": datasets.Image()}
    )
    rows = {"question": QUESTIONS, "answer": ["w3"] * len(QUESTIONS), "image": _images()}
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(
        root / "data"
    )
    (root / "tokcomp_tiny.yaml").write_text(
        f"""task: tokcomp_tiny
dataset_path: {root / "data"}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function tiny_utils.doc_to_visual
doc_to_text: "{{{{question}}}}"
doc_to_target: "answer"
generation_kwargs:
  max_new_tokens: {MAX_NEW_TOKENS}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
    )
    (root / "tiny_utils.py").write_text('def doc_to_visual(doc):\n    return [doc["image"].convert("RGB")]\n')
    return root


def _cli(
    launcher: list[str], folder: Path, task_dir: Path, out: Path, schedule: str
) -> tuple[dict, list[dict]]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(out / "hf-home"),
        "TOKENIZERS_PARALLELISM": "false",
    }
    cmd = [
        *launcher,
        "eval",
        "--model",
        "tokcomp",
        "--model_args",
        f"pretrained={folder},schedule={schedule},device=cpu",
        "--tasks",
        "tokcomp_tiny",
        "--include_path",
        str(task_dir),
        "--batch_size",
        "2",
        "--output_path",
        str(out),
        "--log_samples",
    ]
    proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    results = sorted(out.glob("*/*_results.json"))
    samples = sorted(out.glob("*/*_samples_tokcomp_tiny.jsonl"))
    assert results and samples, f"lmms-eval wrote no results (exit {proc.returncode}):\n{log}"
    docs = [json.loads(line) for line in samples[-1].read_text().splitlines()]
    return json.loads(results[-1].read_text()), sorted(docs, key=lambda d: d["doc_id"])


def _check_results(results: dict, docs: list[dict], arch: str, schedule: str) -> None:
    answers, expected = _reference(arch, schedule)
    assert [d["filtered_resps"] for d in docs] == answers
    assert results["n-samples"]["tokcomp_tiny"]["effective"] == len(QUESTIONS)
    assert 0.0 <= results["results"]["tokcomp_tiny"]["exact_match,none"] <= 1.0
    tp = results["throughput"]
    assert tp["avg_tokcomp_retained_visual_fraction"] == pytest.approx(expected["retained"])
    assert tp["avg_tokcomp_llm_flops_ratio"] == pytest.approx(expected["flops_ratio"])
    assert tp["avg_tokcomp_prefill_s"] > 0.0
    assert tp["total_gen_tokens"] == sum(d["token_counts"][0]["output_tokens"] for d in docs)


def test_cli_writes_tokcomp_numbers_into_the_results(
    folders: dict[str, Path], task_dir: Path, tmp_path: Path
) -> None:
    results, docs = _cli([sys.executable, "-m", "lmms_eval"], folders["qwen2_vl"], task_dir, tmp_path, "luvc")
    _check_results(results, docs, "qwen2_vl", "luvc")
    assert results["throughput"]["avg_tokcomp_batches"] == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_accelerate_launch_data_parallel(folders: dict[str, Path], task_dir: Path, tmp_path: Path) -> None:
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which(
        "accelerate"
    )
    assert accelerate, "the accelerate launcher is not on PATH"
    launcher = [
        accelerate,
        "launch",
        "--cpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "lmms_eval",
    ]
    results, docs = _cli(launcher, folders["qwen2_vl"], task_dir, tmp_path, "luvc")
    # Every doc answered once, by one of the two ranks, and the numbers pooled over both ranks.
    _check_results(results, docs, "qwen2_vl", "luvc")
    assert results["throughput"]["avg_tokcomp_visual_tokens_uncompressed"] == sum(
        _uncompressed_visual_tokens("qwen2_vl")
    )


def _uncompressed_visual_tokens(arch: str) -> list[int]:
    image_id = tiny_model(arch).config.image_token_id
    counts = []
    for image, question in zip(_images(), QUESTIONS):
        ids = tiny_inputs(arch, [[image]], prompts=[f"{question} w2"])["input_ids"]
        counts.append(int((ids == image_id).sum()))
    return counts


def test_dtype_argument(folders: dict[str, Path]) -> None:
    model = TokcompModel(pretrained=str(folders["llava"]), dtype="bfloat16", device="cpu")
    assert model.model.dtype == torch.bfloat16
    texts, _ = _run(model, _requests(1))
    assert isinstance(texts[0], str)
