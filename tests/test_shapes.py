"""The shipped model shapes (``tokcomp/data/shapes/<name>/config.json``): each folder loads with
``AutoConfig.from_pretrained``, ships as package data, and builds a model with the parameter count the
checkpoint's model card publishes. (The widths and depths against the published values, and a one-layer
prefill of every shape, are in test_bench.py.)"""

from __future__ import annotations

import fnmatch
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig

from tokcomp import shapes, testing

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]

# The "Model size" each checkpoint's hub page shows (parameters, rounded as shown there), with the published
# vocabulary. Qwen3-VL-2B is left out: its page gives no figure to three digits.
MODEL_CARD_PARAMETERS = {
    "qwen2-vl-2b": 2.21e9,
    "qwen2.5-vl-3b": 3.75e9,
    "llava-ov-0.5b": 0.894e9,
    "internvl2.5-1b": 0.938e9,
    "qwen3-vl-8b": 8.77e9,
}


def test_the_six_shapes_are_shipped() -> None:
    assert sorted(shapes.SHAPES) == sorted(
        ["qwen2-vl-2b", "qwen2.5-vl-3b", "llava-ov-0.5b", "internvl2.5-1b", "qwen3-vl-2b", "qwen3-vl-8b"]
    )
    assert {p.name for p in shapes.SHAPES_DIR.iterdir() if p.is_dir()} == set(shapes.SHAPES)


@pytest.mark.parametrize("name", sorted(shapes.SHAPES))
def test_each_folder_loads_with_autoconfig(name: str) -> None:
    folder = shapes.SHAPES_DIR / name
    config = AutoConfig.from_pretrained(folder)
    assert config.model_type in testing.ARCHITECTURES
    assert config.text_config.num_hidden_layers == shapes.SHAPES[name].num_layers
    source = json.loads((folder / "source.json").read_text())
    assert "/" in source["checkpoint"]  # a hub id, owner/name
    # the shape, reduced, builds from a fresh copy: the shipped config is left as it was read
    shapes.shape_config(name, layers=2, vision_blocks=1)
    assert shapes.SHAPES[name].config.text_config.num_hidden_layers == config.text_config.num_hidden_layers


@pytest.mark.parametrize("name", sorted(MODEL_CARD_PARAMETERS))
def test_published_config_has_the_model_cards_parameter_count(name: str) -> None:
    shape = shapes.SHAPES[name]
    with torch.device("meta"):  # no memory: only the parameter shapes
        model = testing._MODEL_CLASSES[shape.arch]._from_config(AutoConfig.from_pretrained(shape.folder))
    total = sum(p.numel() for p in model.parameters())
    expected = MODEL_CARD_PARAMETERS[name]
    assert float(f"{total:.3g}") == pytest.approx(expected), (name, total)  # the hub shows three digits


def test_every_shipped_file_is_package_data() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["tokcomp"]
    shipped = [p.relative_to(ROOT / "tokcomp").as_posix() for p in shapes.SHAPES_DIR.rglob("*") if p.is_file()]
    assert len(shipped) == 2 * len(shapes.SHAPES)
    for rel in shipped:
        assert any(fnmatch.fnmatch(rel, pat) for pat in patterns), rel


def test_a_folder_without_shapes_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no model shape"):
        shapes.load_shapes(tmp_path)
