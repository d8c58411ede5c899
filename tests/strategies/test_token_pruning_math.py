"""Properties of strategies/token_pruning_math.py on small hypothesis tensors (CPU)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from janus_decoding.strategies import token_pruning_math
from janus_decoding.strategies.token_pruning_math import (
    fastv_scores,
    flops_saved,
    keep_count,
    layer_flops,
    prefill_flops,
    random_scores,
    select_positions,
    uniform_scores,
)

CI = settings(max_examples=60, deadline=None, derandomize=True)
_RATIO = st.floats(0.0, 1.0, exclude_min=True)


@st.composite
def prompts(draw, max_rows: int = 3, max_len: int = 24):
    """(scores [B, T], image_mask [B, T], n_keep): every row holds the same number of image positions."""
    rows, length = draw(st.integers(1, max_rows)), draw(st.integers(1, max_len))
    n_image = draw(st.integers(0, length))
    masks = []
    for _ in range(rows):
        where = draw(st.lists(st.integers(0, length - 1), min_size=n_image, max_size=n_image, unique=True))
        mask = torch.zeros(length, dtype=torch.bool)
        mask[where] = True
        masks.append(mask)
    values = st.one_of(st.floats(0, 1, width=32), st.sampled_from([0.0, 0.5]))  # repeats exercise the ties
    scores = torch.tensor(draw(st.lists(values, min_size=rows * length, max_size=rows * length))).view(rows, length)
    return scores, torch.stack(masks), draw(st.integers(0, n_image))


@CI
@given(st.integers(1, 600), _RATIO)
def test_keep_count_bounds(n, ratio):
    kept = keep_count(n, ratio)
    assert 1 <= kept <= n
    assert keep_count(n, 1.0) == n and keep_count(0, ratio) == 0


@CI
@given(st.integers(1, 600), st.integers(1, 1000), st.data())
def test_keep_count_exact(n, per_mille, data):
    assert keep_count(n, per_mille / 1000) == -(-per_mille * n // 1000)  # integer ceil
    a, b = sorted(data.draw(st.lists(_RATIO, min_size=2, max_size=2)))
    assert keep_count(n, a) <= keep_count(n, b)
    assert keep_count(10, 0.3) == 3 and keep_count(10, 0.1) == 1
    assert (keep_count(576, 0.25), keep_count(576, 0.5), keep_count(576, 0.75)) == (144, 288, 432)


def test_keep_count_rejects_bad_ratio():
    for bad in (0.0, -0.5, 1.5, math.nan):
        with pytest.raises(ValueError, match="keep_ratio"):
            keep_count(16, bad)


@CI
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 9), st.integers(0, 2**31 - 1))
def test_fastv_scores_mean(b, heads, length, seed):
    logits = torch.randn(b, heads, length, generator=torch.Generator().manual_seed(seed))
    attention = torch.softmax(logits, -1)
    scores = fastv_scores(attention)
    assert torch.allclose(scores, attention.mean(1))
    assert torch.allclose(scores.sum(-1), torch.ones(b))


@CI
@given(prompts())
def test_select_positions_properties(case):
    scores, mask, n_keep = case
    s0, m0 = scores.clone(), mask.clone()
    kept = select_positions(scores, mask, n_keep)
    assert torch.equal(scores, s0) and torch.equal(mask, m0)
    b, t = scores.shape
    n_image = int(mask[0].sum())
    assert kept.shape == (b, t - n_image + n_keep)
    for row in range(b):
        ids = kept[row].tolist()
        assert ids == sorted(set(ids))
        text = [i for i in range(t) if not mask[row, i]]
        assert [i for i in ids if not mask[row, i]] == text
        chosen = [i for i in ids if mask[row, i]]
        dropped = [i for i in range(t) if mask[row, i] and i not in ids]
        assert len(chosen) == n_keep
        if chosen and dropped:
            assert min(scores[row, chosen]) >= max(scores[row, dropped])


@CI
@given(prompts(), st.data())
def test_uniform_scores_stride(case, data):
    _, mask, _ = case
    n_image = int(mask[0].sum())
    n_keep = data.draw(st.integers(0, n_image))
    scores = uniform_scores(mask, n_keep)
    for row in range(mask.shape[0]):
        image = mask[row].nonzero().flatten().tolist()
        on = [r for r, i in enumerate(image) if scores[row, i] == 1]
        assert on == [j * n_image // n_keep for j in range(n_keep)]
        assert float(scores[row][~mask[row]].abs().sum()) == 0.0
    if n_keep:
        kept = select_positions(scores, mask, n_keep)
        assert kept.shape[1] == mask.shape[1] - n_image + n_keep


def test_uniform_scores_on_a_grid():
    mask = torch.tensor([[False] + [True] * 8 + [False]])
    assert uniform_scores(mask, 4)[0, 1:9].tolist() == [1, 0, 1, 0, 1, 0, 1, 0]
    assert uniform_scores(mask, 8)[0, 1:9].tolist() == [1.0] * 8


@CI
@given(st.integers(0, 2**31 - 1))
def test_random_scores_seeded(seed):
    a, b = random_scores((2, 7), seed), random_scores((2, 7), seed)
    assert torch.equal(a, b)
    assert not torch.equal(a, random_scores((2, 7), seed + 1))


@CI
@given(st.integers(1, 700), st.integers(1, 64), st.integers(1, 128), st.integers(2, 40), st.data())
def test_flops_model(n, d, m, depth, data):
    assert layer_flops(n, d, m) == 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
    assert layer_flops(n + 1, d, m) > layer_flops(n, d, m)
    layer = data.draw(st.integers(1, depth - 1))
    n_kept = data.draw(st.integers(1, n))
    assert prefill_flops(n, d, m, depth) == prefill_flops(n, d, m, depth, layer, n)
    assert flops_saved(n, d, m, depth, layer, n) == 0.0
    saved = flops_saved(n, d, m, depth, layer, n_kept)
    assert 0.0 <= saved < 1.0
    if n_kept > 1:
        assert flops_saved(n, d, m, depth, layer, n_kept - 1) > saved
    if layer > 1 and n_kept < n:
        assert flops_saved(n, d, m, depth, layer - 1, n_kept) > saved


def test_flops_at_the_janus_pro_7b_shape():
    """FastV's 45% at K=2, R=50% is for LLaVA-1.5 (576 image tokens in ~650); same order here at d=4096, m=11008."""
    n_image, n = 576, 576 + 60
    saved = flops_saved(n, 4096, 11008, 30, 2, n - n_image + keep_count(n_image, 0.5))
    assert 0.40 < saved < 0.46


def test_invariants_name_existing_tests():
    for name in token_pruning_math.__all__:
        section = getattr(token_pruning_math, name).__doc__.split("Invariants:")[1]
        named = re.findall(r"``(test_\w+)``", section)
        assert named, name
        for test in named:
            assert callable(globals().get(test)), f"{name} names missing test {test}"
