"""The real-checkpoint scripts (examples/real-checkpoints/*.py, shown on docs/real-checkpoints.md) run
end to end against tiny checkpoints saved with ``save_pretrained``, loaded with ``from_pretrained``.

Each script is run as a program (``__main__``, its own argument parsing) and its printed answers are
compared with the tiny model built in code generating each sample alone under the same schedule
(`tokcomp.testing.tiny_model` / `tiny_inputs`: no folder, no chat template, no batching).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen2VLProcessor
from transformers.utils import is_torchvision_available

import tokcomp as tc
from tokcomp.integrations.processors import VideoProcessorUnavailableError, load_processor
from tokcomp.testing import make_image, save_tiny_pretrained, tiny_inputs, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "examples" / "real-checkpoints"
# script -> the architectures it serves
CASES = [
    ("qwen2_vl.py", "qwen2_vl"),
    ("qwen2_vl.py", "qwen2_5_vl"),
    ("llava_onevision.py", "llava_onevision"),
    ("internvl.py", "internvl"),
    ("llava.py", "llava"),
]
QUESTIONS = ["w5 w6 w7", "w9"]
SIZES = [(224, 168), (140, 196)]
MAX_NEW_TOKENS = 4


def _reference(arch: str, schedule: str) -> list[str]:
    model = tiny_model(arch)
    tok = tiny_tokenizer(arch)
    answers = []
    for k, ((w, h), question) in enumerate(zip(SIZES, QUESTIONS)):
        # The saved chat template renders a user turn as "w0 w1 <image> <text> w2" (tiny_chat_template).
        inputs = tiny_inputs(arch, [[make_image(w, h, seed=k)]], prompts=[f"{question} w2"])
        with tc.compress(model, None if schedule == "none" else schedule):
            out = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        answers.append(tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return answers


def test_every_script_is_tested() -> None:
    assert sorted({script for script, _ in CASES}) == sorted(p.name for p in SCRIPTS.glob("*.py"))


@pytest.mark.parametrize(("script", "arch"), CASES, ids=[arch for _, arch in CASES])
def test_script_runs_on_a_saved_checkpoint(
    script: str,
    arch: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = save_tiny_pretrained(arch, tmp_path / arch)
    images = []
    for k, (w, h) in enumerate(SIZES):
        images.append(tmp_path / f"image{k}.png")
        make_image(w, h, seed=k).save(images[-1])
    argv = [script, "--model", str(folder), "--schedule", "luvc", "--device", "cpu"]
    argv += ["--images", *map(str, images), "--prompts", *QUESTIONS, "--max-new-tokens", str(MAX_NEW_TOKENS)]
    if script == "qwen2_vl.py":
        argv += ["--max-pixels", str(28 * 28 * 64)]  # the tiny processor's budget (tiny_processor)
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(SCRIPTS / script), run_name="__main__")
    printed = capsys.readouterr().out
    answers = [line.removeprefix("A: ") for line in printed.splitlines() if line.startswith("A: ")]
    assert answers == _reference(arch, "luvc")
    assert "retained visual-token fraction" in printed  # the run's report


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava_onevision", "internvl", "llava"])
def test_saved_folder_loads_like_the_model_built_in_code(arch: str, tmp_path: Path) -> None:
    folder = save_tiny_pretrained(arch, tmp_path / arch)
    loaded = AutoModelForImageTextToText.from_pretrained(folder)
    built = tiny_model(arch)
    assert type(loaded) is type(built)
    theirs = built.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name
    processor = load_processor(folder)
    inputs = processor(
        text=[
            processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w5"}]}],
                add_generation_prompt=True,
                tokenize=False,
            )
        ],
        images=[make_image(224, 168)],
        return_tensors="pt",
    )
    expected = tiny_inputs(arch, [[make_image(224, 168)]], prompts=["w5 w2"])
    assert set(expected) <= set(inputs)
    for key in expected:
        assert torch.equal(inputs[key], expected[key]), key


@pytest.mark.skipif(
    is_torchvision_available(), reason="the failure being worked around needs torchvision absent"
)
def test_load_processor_is_the_way_through_without_torchvision(tmp_path: Path) -> None:
    folder = save_tiny_pretrained("qwen2_vl", tmp_path / "qwen")
    with pytest.raises(OSError, match="video processor"):
        AutoProcessor.from_pretrained(folder)
    processor = load_processor(folder)
    assert isinstance(processor, Qwen2VLProcessor)
    assert processor.video_processor is None
    frames = [make_image(56, 56, seed=k) for k in range(2)]
    with pytest.raises(VideoProcessorUnavailableError, match="torchvision"):
        processor(
            text=["<|vision_start|><|video_pad|><|vision_end|> w5"], videos=[frames], return_tensors="pt"
        )


def test_load_processor_without_a_video_processor_is_autoprocessor(tmp_path: Path) -> None:
    folder = save_tiny_pretrained("llava", tmp_path / "llava")
    assert type(load_processor(folder)) is type(AutoProcessor.from_pretrained(folder))


def test_load_processor_passes_other_errors_through(tmp_path: Path) -> None:
    # An empty folder: nothing to load, and no video processor to blame; the library's own error comes out.
    with pytest.raises(Exception) as library:
        AutoProcessor.from_pretrained(tmp_path)
    with pytest.raises(type(library.value)) as ours:
        load_processor(tmp_path)
    assert str(ours.value) == str(library.value)
