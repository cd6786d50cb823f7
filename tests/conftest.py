"""Shared fixtures: tiny real models (cached per configuration) and helpers for the oracles."""

from __future__ import annotations

import functools
import inspect
import os

import pytest
import torch
from transformers import LlavaModel

from tokcomp import testing

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# transformers 5.18 added `mm_encoder_outputs` to the models' forward (generate() runs the vision tower once
# and hands the features to the prefill call). The carry-through oracles feed the *unpatched* model the
# compressed features that way; 5.17 has no way to feed precomputed features, so those oracles cannot run
# there. On 5.17 generate() calls the model with the pixel inputs, which is the direct-forward path that the
# same oracles check on the newer releases.
HAS_PRECOMPUTED_FEATURES = "mm_encoder_outputs" in inspect.signature(LlavaModel.forward).parameters
needs_precomputed_features = pytest.mark.skipif(
    not HAS_PRECOMPUTED_FEATURES,
    reason="the oracle feeds precomputed features (mm_encoder_outputs), which transformers < 5.18 lacks",
)
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
