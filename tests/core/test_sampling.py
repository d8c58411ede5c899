"""The counter-based row RNG and the exponential race (core/sampling.py)."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from janus_decoding.core.sampling import (RACE_PIECES, entropy_nats, probabilities, race, row_uniforms, sample_row_rng,
                                          sample_torch)

_KEY = st.tuples(st.integers(0, 2**63 - 1), st.integers(0, 1000), st.integers(0, 50))


def _keys(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long)  # [R, 3]


@given(st.lists(_KEY, min_size=1, max_size=4), st.integers(0, 10_000), st.integers(1, 300))
def test_uniforms_are_in_the_open_unit_interval_and_deterministic(keys, step, vocab):
    k = _keys(*keys)
    u = row_uniforms(k, torch.tensor(step), vocab)
    assert u.shape == (len(keys), vocab) and u.dtype == torch.float32
    assert ((u > 0) & (u < 1)).all()
    assert torch.equal(u, row_uniforms(k.clone(), torch.tensor(step), vocab))


@given(_KEY, st.integers(0, 10_000))
def test_a_row_does_not_depend_on_its_neighbours(key, step):
    alone = row_uniforms(_keys(key), torch.tensor(step), 64)
    together = row_uniforms(_keys((1, 2, 3), key, (4, 5, 6)), torch.tensor(step), 64)
    assert torch.equal(alone[0], together[1])


@given(_KEY, st.integers(0, 10_000), st.sampled_from([0, 1, 2, "step"]))
def test_uniforms_differ_across_seed_image_stream_and_step(key, step, which):
    base = row_uniforms(_keys(key), torch.tensor(step), 128)
    if which == "step":
        other = row_uniforms(_keys(key), torch.tensor(step + 1), 128)
    else:
        changed = list(key)
        changed[which] += 1
        other = row_uniforms(_keys(changed), torch.tensor(step), 128)
    assert not torch.equal(base, other)
    # not merely shifted: most entries change
    assert (base != other).float().mean() > 0.9


def test_seeds_above_32_bits_matter():
    low = row_uniforms(_keys((5, 0, 0)), torch.tensor(0), 32)
    high = row_uniforms(_keys((5 + 2**32, 0, 0)), torch.tensor(0), 32)
    assert not torch.equal(low, high)


@st.composite
def distributions(draw):
    vocab = draw(st.integers(2, 40))
    weights = draw(st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 1.0)), min_size=vocab, max_size=vocab))
    if sum(weights) == 0:
        weights[draw(st.integers(0, vocab - 1))] = 1.0
    p = torch.tensor(weights, dtype=torch.float32)
    return p / p.sum()


@given(distributions(), st.lists(_KEY, min_size=1, max_size=3), st.integers(0, 1000))
def test_exponential_race_never_picks_a_zero_probability_token(p, keys, step):
    probs = p.expand(len(keys), -1).contiguous()
    before = probs.clone()
    tokens = sample_row_rng(probs, _keys(*keys), torch.tensor(step))
    assert tokens.shape == (len(keys),) and tokens.dtype == torch.long
    assert (p[tokens] > 0).all()
    assert torch.equal(probs, before)


def test_exponential_race_with_one_possible_token():
    probs = torch.zeros(3, 10)
    probs[:, 4] = 1.0
    keys = _keys((0, 0, 0), (1, 2, 3), (9, 9, 9))
    for step in range(20):
        assert (sample_row_rng(probs, keys, torch.tensor(step)) == 4).all()


def _chi_square(counts: torch.Tensor, p: torch.Tensor) -> float:
    expected = p * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_empirical_frequencies_match_probabilities():
    """Over many (seed, step) draws the race samples each token at its probability (chi-square, 5 dof)."""
    p = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.07, 0.03])
    draws = 20_000
    keys = torch.stack([torch.arange(draws), torch.zeros(draws, dtype=torch.long),
                        torch.zeros(draws, dtype=torch.long)], dim=1)  # one row per seed
    tokens = torch.cat([sample_row_rng(p.expand(draws, -1), keys, torch.tensor(step)) for step in range(3)])
    counts = torch.bincount(tokens, minlength=p.numel()).float()
    # 99.99th percentile of chi-square with 5 degrees of freedom is about 25.7
    assert _chi_square(counts, p) < 25.7, counts / counts.sum()


def test_empirical_frequencies_over_steps_of_one_row():
    """The same row over successive steps is also an unbiased stream (the step is part of the counter)."""
    p = torch.tensor([0.5, 0.3, 0.2])
    keys = _keys((123, 4, 0))
    tokens = torch.stack([sample_row_rng(p[None], keys, torch.tensor(step))[0] for step in range(6000)])
    counts = torch.bincount(tokens, minlength=3).float()
    assert _chi_square(counts, p) < 18.4  # 99.99th percentile, 2 dof


def test_torch_rng_is_multinomial_with_the_generator():
    p = torch.softmax(torch.randn(3, 50, generator=torch.Generator().manual_seed(0)), -1)
    expected = torch.multinomial(p, 1, generator=torch.Generator().manual_seed(7)).squeeze(-1)
    assert torch.equal(sample_torch(p, torch.Generator().manual_seed(7)), expected)


def test_probabilities_are_fp32_softmax_and_entropy_is_in_nats():
    logits = torch.tensor([[0.0, 0.0, float("-inf"), 0.0]], dtype=torch.bfloat16)
    p = probabilities(logits)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p, torch.tensor([[1 / 3, 1 / 3, 0.0, 1 / 3]]))
    torch.testing.assert_close(entropy_nats(p), torch.tensor([math.log(3)]))


@given(st.integers(1, 4), st.sampled_from([RACE_PIECES, 2 * RACE_PIECES, 5 * RACE_PIECES, 3 * RACE_PIECES + 1]),
       st.integers(0, 2**31), st.sampled_from(["plain", "ties", "nan", "zeros"]))
def test_race_in_pieces_is_the_whole_rows_first_argmax(rows, vocab, seed, kind):
    """The race's argmax taken piece by piece gives argmax's answer: the first index of the maximum, ties (equal
    scores) included, a NaN winning as in argmax, an all-zero row giving index 0."""
    gen = torch.Generator().manual_seed(seed)
    probs = torch.rand(rows, vocab, generator=gen)
    uniforms = torch.rand(rows, vocab, generator=gen).clamp_min(1e-7)
    if kind == "ties":
        probs, uniforms = (probs * 3).round() / 3, torch.full_like(uniforms, 0.5)
    elif kind == "nan":
        probs[0, vocab // 2] = probs[0, vocab - 1] = float("nan")
    elif kind == "zeros":
        probs[0] = 0
    assert torch.equal(race(probs, uniforms), torch.argmax(probs / -torch.log(uniforms), dim=-1))
