"""The public oracles of `tokcomp.testing` (issue #14, item 6) catch what they promise to catch.

`check_llm_strategy` passing on good strategies is exercised by the plugin guide's example (docs/plugins.md)
and by the adapter matrix, which uses the same helpers; here: a strategy that decides from its batch row fails
"batch equals samples", and a merging strategy is reported as outside the drop-equals-mask oracle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import tokcomp as tc
from tokcomp import testing


@dataclass
class _RowDependent(tc.LLMStrategy):
    """Breaks the first rule of the plugin guide: keeps a different share of tokens per batch row."""

    name: ClassVar[str] = "test-row-dependent"

    def select(self, view: tc.LLMView) -> tc.LLMDecision:
        n = view.num_present // (2 + view.sample)
        return tc.LLMDecision(keep=torch.arange(n, device=view.hidden.device))


@dataclass
class _MergeAll(tc.LLMStrategy):
    """Merges all visual tokens into the first one (a legitimate merge: not a drop)."""

    name: ClassVar[str] = "test-merge-all"

    def select(self, view: tc.LLMView) -> tc.LLMDecision:
        keep = torch.zeros(1, dtype=torch.long, device=view.hidden.device)
        return tc.LLMDecision(keep=keep, hidden=view.hidden.mean(0, keepdim=True),
                              sizes=view.sizes.sum().reshape(1))


def test_row_dependent_strategy_fails_batch_equals_samples():
    with pytest.raises(AssertionError, match="llava/sdpa: sample 1: batch differs from the sample alone"):
        testing.check_llm_strategy(_RowDependent(), archs=["llava"], layers=[1])


def test_merging_strategy_is_outside_the_mask_oracle():
    result = testing.check_llm_strategy(_MergeAll(), archs=["llava"], layers=[2])
    assert result == {"llava/sdpa": {"batch_equals_samples": "passed",
                                     "drop_equals_mask": "not applicable: the strategy merges tokens"}}
