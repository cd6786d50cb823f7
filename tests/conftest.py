"""Shared fixtures: tiny real models (cached per configuration) and helpers for the oracles."""

from __future__ import annotations

import functools
import os

import pytest
import torch

from tokcomp import testing

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


@functools.lru_cache(maxsize=32)
def cached_model(arch: str, attn: str = "sdpa", dtype: torch.dtype = torch.float32, layers: int = 4):
    """A tiny model, built once per configuration (tests must not modify its weights)."""
    return testing.tiny_model(arch, attn_implementation=attn, dtype=dtype, num_hidden_layers=layers)


@pytest.fixture
def qwen():
    return cached_model("qwen2_vl")


def all_hooks(model: torch.nn.Module) -> list[tuple[str, int]]:
    """Every hook registered on any submodule (name, count) — to prove nothing is left behind."""
    out = []
    for name, mod in model.named_modules():
        n = sum(
            len(d)
            for d in (
                mod._forward_pre_hooks,
                mod._forward_hooks,
                mod._backward_hooks,
                mod._forward_hooks_with_kwargs,
                mod._forward_pre_hooks_with_kwargs,
            )
        )
        if n:
            out.append((name, n))
    return out
