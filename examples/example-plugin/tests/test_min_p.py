"""min_p's tests, using only the public author kit and transformers as the reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from janus_decoding.testing import check_strategy
from janus_decoding.testing.strategies import logits
from janus_decoding_min_p import MinP, min_p_filter


@pytest.mark.parametrize("params", [{}, {"min_p": 0.0}, {"min_p": 0.5, "min_tokens_to_keep": 2}, {"min_p": 1.0}])
def test_contract(params):
    check_strategy(MinP, **params)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(logits(dtype=torch.float32), st.floats(0.0, 1.0), st.integers(1, 4))
def test_matches_transformers(scores, min_p, keep):
    from transformers import MinPLogitsWarper

    ids = torch.zeros(scores.shape[0], 1, dtype=torch.long)
    expected = MinPLogitsWarper(min_p, min_tokens_to_keep=keep)(ids, scores.clone())
    assert torch.equal(min_p_filter(scores, min_p, min_tokens_to_keep=keep), expected)


def test_worked_example():
    # p = softmax([2, 1, 0, -inf]) ≈ [0.665, 0.245, 0.090, 0]; min_p 0.2 → threshold 0.133: keep the first two.
    scores = torch.tensor([[2.0, 1.0, 0.0, float("-inf")]])
    out = min_p_filter(scores, 0.2)
    assert out.tolist() == [[2.0, 1.0, float("-inf"), float("-inf")]]
    assert scores[0, 2] == 0.0  # input unchanged
