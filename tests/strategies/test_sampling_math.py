"""Properties of strategies/sampling_math.py, with transformers' warpers as the reference."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from janus_decoding.strategies import sampling_math
from janus_decoding.strategies.sampling_math import apply_temperature, top_k_filter, top_p_filter

CI = settings(max_examples=60, deadline=None, derandomize=True)

# A few repeated values make ties likely; -inf entries act as masks from earlier processors.
_TIED = st.sampled_from([-3.0, -1.0, 0.0, 0.5, 2.0])
_FINITE = st.one_of(st.floats(-30, 30, width=32), _TIED)


@st.composite
def logits(draw, max_rows: int = 3, max_vocab: int = 9, neg_inf: bool = True, dtype=torch.float32):
    rows = draw(st.integers(1, max_rows))
    vocab = draw(st.integers(1, max_vocab))
    elem = st.one_of(_FINITE, st.just(-math.inf)) if neg_inf else _FINITE
    values = draw(st.lists(elem, min_size=rows * vocab, max_size=rows * vocab))
    out = torch.tensor(values, dtype=torch.float64).view(rows, vocab)
    # every row keeps at least one finite entry (an all-masked row is the loop's bug, not a sampler's)
    keep = draw(st.lists(st.integers(0, vocab - 1), min_size=rows, max_size=rows))
    fill = draw(st.lists(_FINITE, min_size=rows, max_size=rows))
    for r in range(rows):
        if torch.isinf(out[r]).all():
            out[r, keep[r]] = fill[r]
    return out.to(dtype)


_IDS = torch.zeros(1, 1, dtype=torch.long)  # transformers' warpers ignore input_ids


@CI
@given(logits(), st.floats(0.0625, 5.0, width=32))
def test_temperature_matches_transformers(scores, temperature):
    expected = TemperatureLogitsWarper(temperature)(_IDS, scores.clone())
    assert torch.equal(apply_temperature(scores, temperature), expected)


@CI
@given(logits(dtype=torch.float64), st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       st.floats(0.05, 5.0))
def test_temperature_keeps_masks_shape_dtype(scores, dtype, temperature):
    scores = scores.to(dtype)
    before = scores.clone()
    out = apply_temperature(scores, torch.tensor(temperature, dtype=torch.float64))
    assert out.dtype == dtype and out.shape == scores.shape
    assert torch.equal(torch.isneginf(out), torch.isneginf(scores))
    assert torch.equal(scores, before)


@CI
@given(logits(), st.data())
def test_temperature_per_row_tensor(scores, data):
    temps = data.draw(st.lists(st.floats(0.0625, 5.0, width=32), min_size=scores.shape[0], max_size=scores.shape[0]))
    out = apply_temperature(scores, torch.tensor(temps).unsqueeze(-1))  # [B, 1]
    for r, t in enumerate(temps):
        assert torch.equal(out[r : r + 1], apply_temperature(scores[r : r + 1], t))


@CI
@given(logits(), st.integers(1, 12), st.integers(1, 4))
def test_top_k_matches_transformers(scores, top_k, min_keep):
    expected = TopKLogitsWarper(top_k, min_tokens_to_keep=min_keep)(_IDS, scores.clone())
    assert torch.equal(top_k_filter(scores, top_k, min_tokens_to_keep=min_keep), expected)


@CI
@given(logits(), st.integers(1, 12), st.integers(1, 4))
def test_top_k_keeps_at_least_k(scores, top_k, min_keep):
    out = top_k_filter(scores, top_k, min_tokens_to_keep=min_keep)
    assert torch.isneginf(out[torch.isneginf(scores)]).all()  # masks never reopened
    finite_in, finite_out = torch.isfinite(scores), torch.isfinite(out)
    k = min(max(top_k, min_keep), scores.shape[-1])
    assert (finite_out.sum(-1) >= finite_in.sum(-1).clamp(max=k)).all()
    assert torch.equal(out[finite_out], scores[finite_out])  # survivors untouched
    for r in range(scores.shape[0]):  # every survivor beats every removed finite value
        removed = finite_in[r] & ~finite_out[r]
        if removed.any():
            assert scores[r][finite_out[r]].min() >= scores[r][removed].max()


@CI
@given(logits(), st.integers(1, 12))
def test_top_k_rows_independent(scores, top_k):
    before = scores.clone()
    out = top_k_filter(scores, top_k)
    assert torch.equal(scores, before)
    for r in range(scores.shape[0]):
        assert torch.equal(out[r : r + 1], top_k_filter(scores[r : r + 1], top_k))


@CI
@given(logits(), st.integers(0, 64).map(lambda i: i / 64), st.integers(1, 4))
def test_top_p_matches_transformers(scores, top_p, min_keep):
    expected = TopPLogitsWarper(top_p, min_tokens_to_keep=min_keep)(_IDS, scores.clone())
    assert torch.equal(top_p_filter(scores, top_p, min_tokens_to_keep=min_keep), expected)


@CI
@given(logits(), st.floats(0.0, 1.0))
def test_top_p_keeps_mass_and_argmax(scores, top_p):
    out = top_p_filter(scores, top_p)
    probs = scores.double().softmax(-1)
    kept_mass = (probs * torch.isfinite(out)).sum(-1)
    assert (kept_mass >= top_p - 1e-5).all()
    is_max = scores == scores.amax(-1, keepdim=True)
    assert (torch.isfinite(out) & is_max).any(-1).all()  # a maximal logit always survives


@CI
@given(logits(), st.floats(0.0, 1.0))
def test_top_p_rows_independent(scores, top_p):
    before = scores.clone()
    out = top_p_filter(scores, top_p)
    assert torch.equal(scores, before)
    assert torch.isneginf(out[torch.isneginf(scores)]).all()
    for r in range(scores.shape[0]):
        assert torch.equal(out[r : r + 1], top_p_filter(scores[r : r + 1], top_p))


@CI
@given(logits(), st.data())
def test_top_p_per_row_tensor(scores, data):
    rows = scores.shape[0]
    ps = data.draw(st.lists(st.integers(0, 64).map(lambda i: i / 64), min_size=rows, max_size=rows))
    out = top_p_filter(scores, torch.tensor(ps, dtype=torch.float64).unsqueeze(-1))
    for r, p in enumerate(ps):
        assert torch.equal(out[r : r + 1], top_p_filter(scores[r : r + 1], p))


def test_rejects_bad_python_params():
    x = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="`temperature`.*greedy"):
        apply_temperature(x, 0.0)
    with pytest.raises(ValueError, match="`top_k`"):
        top_k_filter(x, 0)
    with pytest.raises(ValueError, match="`min_tokens_to_keep`"):
        top_p_filter(x, 0.5, min_tokens_to_keep=0)
    with pytest.raises(ValueError, match="`top_p`"):
        top_p_filter(x, 1.5)


def test_compile_fullgraph():
    torch._dynamo.reset()
    scores = torch.tensor([[1.0, -math.inf, 0.5, 0.5, 3.0], [0.0, 0.0, -1.0, 2.0, -math.inf]])
    calls = [
        (apply_temperature, (scores, torch.tensor(0.7)), {}),
        (top_k_filter, (scores, 2), {"min_tokens_to_keep": 1}),
        (top_p_filter, (scores, torch.tensor([[0.9], [0.5]])), {"min_tokens_to_keep": 2}),
    ]
    for fn, args, kwargs in calls:
        compiled = torch.compile(fn, fullgraph=True, backend="eager")
        assert torch.equal(compiled(*args, **kwargs), fn(*args, **kwargs)), fn.__name__


def test_invariants_name_existing_tests():
    for name in sampling_math.__all__:
        doc = getattr(sampling_math, name).__doc__
        section = doc.split("Invariants:")[1]
        named = re.findall(r"``(test_\w+)``", section)
        assert named, name
        for test in named:
            assert callable(globals().get(test)), f"{name} names missing test {test}"
