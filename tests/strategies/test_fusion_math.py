"""Properties of strategies/fusion_math.py (F_joint = F_L + λ·r_V; shared/reference/strategies.md §2.3)."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from janus_decoding.strategies import fusion_math
from janus_decoding.strategies.fusion_math import cosine_scores, fuse, phrase_prior, token_prior

CI = settings(max_examples=60, deadline=None, derandomize=True)

_SCORE = st.one_of(st.floats(-20, 20), st.sampled_from([-1.0, 0.0, 0.25]))
_KIND = st.sampled_from(["centered", "logprob"])


@st.composite
def phrase_scores(draw, max_phrases: int = 6):
    return torch.tensor(draw(st.lists(_SCORE, min_size=1, max_size=max_phrases)), dtype=torch.float64)


@st.composite
def phrases(draw, max_vocab: int = 8):
    """(prior [P], first-token ids [P] incl. padding ids, V)."""
    vocab = draw(st.integers(1, max_vocab))
    scores = draw(phrase_scores())
    ids = draw(st.lists(st.integers(-1, vocab), min_size=len(scores), max_size=len(scores)))  # -1 and V: padding
    return phrase_prior(scores, kind=draw(_KIND)), torch.tensor(ids), vocab


@st.composite
def fuse_case(draw):
    prior, ids, vocab = draw(phrases())
    rows = draw(st.integers(1, 3))
    elem = st.one_of(st.floats(-30, 30), st.just(-math.inf))
    logits = torch.tensor(draw(st.lists(elem, min_size=rows * vocab, max_size=rows * vocab)), dtype=torch.float64)
    return logits.view(rows, vocab), prior, ids, vocab


@CI
@given(phrase_scores(), st.floats(-100, 100), st.floats(0.1, 5.0), _KIND)
def test_phrase_prior_shift_invariant(scores, shift, temperature, kind):
    base = phrase_prior(scores, temperature=temperature, kind=kind)
    torch.testing.assert_close(phrase_prior(scores + shift, temperature=temperature, kind=kind), base,
                               atol=1e-9, rtol=1e-9)
    tensor_tau = phrase_prior(scores, temperature=torch.tensor(temperature, dtype=torch.float64), kind=kind)
    torch.testing.assert_close(tensor_tau, base, atol=1e-12, rtol=0)


@CI
@given(phrase_scores(), st.floats(0.1, 5.0))
def test_phrase_prior_centered_sums_to_zero(scores, temperature):
    centred = phrase_prior(scores, temperature=temperature)
    assert abs(centred.sum().item()) <= 1e-9 * max(1.0, centred.abs().sum().item())
    logprob = phrase_prior(scores, temperature=temperature, kind="logprob")
    assert (logprob <= 1e-12).all()
    assert abs(torch.logsumexp(logprob, -1).item()) <= 1e-9
    assert centred.shape == scores.shape and centred.dtype == scores.dtype


@CI
@given(phrase_scores(), _KIND)
def test_phrase_prior_monotone(scores, kind):
    rho = phrase_prior(scores, kind=kind)
    for i in range(len(scores)):
        for j in range(len(scores)):
            if scores[i] < scores[j]:
                assert rho[i] <= rho[j]
            if scores[i] == scores[j]:
                assert rho[i] == rho[j]


@CI
@given(phrases())
def test_token_prior_shared_first_token_takes_max(c):
    prior, ids, vocab = c
    table = token_prior(prior, ids, vocab)
    best: dict[int, float] = {}
    for rho, x in zip(prior.tolist(), ids.tolist()):
        if 0 <= x < vocab:
            best[x] = max(best.get(x, -math.inf), rho)
    for x, rho in best.items():
        assert table[x].item() == rho
    assert table.shape == (vocab,) and table.dtype == prior.dtype


@CI
@given(phrases())
def test_token_prior_zero_off_image(c):
    prior, ids, vocab = c
    table = token_prior(prior, ids, vocab)
    image = {x for x in ids.tolist() if 0 <= x < vocab}
    for x in range(vocab):
        if x not in image:
            assert table[x].item() == 0.0
    padded = token_prior(torch.cat([prior, prior]), torch.cat([ids, torch.full_like(ids, -1)]), vocab)
    assert torch.equal(padded, table)  # -1 padding changes nothing


@CI
@given(phrases(), st.randoms(use_true_random=False))
def test_token_prior_permutation_invariant(c, rnd):
    prior, ids, vocab = c
    order = list(range(len(prior)))
    rnd.shuffle(order)
    perm = torch.tensor(order)
    assert torch.equal(token_prior(prior[perm], ids[perm], vocab), token_prior(prior, ids, vocab))
    doubled = token_prior(torch.cat([prior, prior]), torch.cat([ids, ids]), vocab)
    assert torch.equal(doubled, token_prior(prior, ids, vocab))


@CI
@given(fuse_case())
def test_fuse_zero_weight_identity(c):
    logits, prior, ids, vocab = c
    table = token_prior(prior, ids, vocab)
    saved = logits.clone(), table.clone()
    for weight in (0.0, torch.tensor(0.0), torch.zeros(logits.shape[0], 1)):
        assert torch.equal(fuse(logits, table, weight), logits)
    assert torch.equal(logits, saved[0]) and torch.equal(table, saved[1])


@CI
@given(fuse_case(), st.floats(0.0, 10.0))
def test_fuse_keeps_neg_inf(c, weight):
    logits, prior, ids, vocab = c
    out = fuse(logits, token_prior(prior, ids, vocab), weight)
    assert torch.equal(torch.isneginf(out), torch.isneginf(logits))
    assert not torch.isnan(out).any()


@CI
@given(fuse_case(), st.floats(0.0, 10.0))
def test_fuse_changes_only_image_tokens(c, weight):
    logits, prior, ids, vocab = c
    out = fuse(logits, token_prior(prior, ids, vocab), weight)
    image = {x for x in ids.tolist() if 0 <= x < vocab}
    for x in range(vocab):
        if x not in image:
            assert torch.equal(out[:, x], logits[:, x])


@CI
@given(fuse_case(), st.floats(0.0, 10.0))
def test_fuse_rows_independent(c, weight):
    logits, prior, ids, vocab = c
    table = token_prior(prior, ids, vocab)  # [V]
    out = fuse(logits, table, weight)
    assert out.shape == logits.shape and out.dtype == logits.dtype
    assert torch.equal(out, fuse(logits, table.expand_as(logits).clone(), weight))  # [V] == [R, V]
    for r in range(logits.shape[0]):
        assert torch.equal(out[r : r + 1], fuse(logits[r : r + 1], table, weight))
    assert fuse(logits.float(), table, torch.tensor(weight, dtype=torch.float64)).dtype == torch.float32


def test_fuse_worked_example():
    # two phrases start with token 1 ("▁cat", "▁car"), one with token 3; token 1 takes the better phrase's prior
    scores = torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64)
    rho = phrase_prior(scores, kind="logprob")  # log_softmax([2, 0, 1])
    table = token_prior(rho, torch.tensor([1, 1, 3]), 5)
    assert table.tolist() == [0.0, rho[0].item(), 0.0, rho[2].item(), 0.0]
    logits = torch.tensor([[0.0, 1.0, -math.inf, 2.0, 0.5]], dtype=torch.float64)
    out = fuse(logits, table, 2.0)
    expected = logits + 2.0 * table
    assert torch.equal(out, expected) and out[0, 2].item() == -math.inf


def test_rejects_bad_python_params():
    with pytest.raises(ValueError, match="`kind`"):
        phrase_prior(torch.zeros(2), kind="sigmoid")
    with pytest.raises(ValueError, match="`temperature`"):
        phrase_prior(torch.zeros(2), temperature=0.0)
    with pytest.raises(ValueError, match="`vocab_size`"):
        token_prior(torch.zeros(2), torch.zeros(2, dtype=torch.long), 0)


def test_compile_fullgraph():
    torch._dynamo.reset()
    scores = torch.tensor([0.3, -1.0, 2.0, 0.5])
    ids = torch.tensor([2, 2, 0, -1])
    logits = torch.tensor([[1.0, -math.inf, 0.5, 0.0], [0.0, 2.0, -1.0, 3.0]])
    calls = [
        (phrase_prior, (scores,), {"temperature": 0.5, "kind": "centered"}),
        (phrase_prior, (scores,), {"temperature": torch.tensor(2.0), "kind": "logprob"}),
        (token_prior, (phrase_prior(scores), ids, 4), {}),
        (fuse, (logits, token_prior(phrase_prior(scores), ids, 4), torch.tensor([[0.5], [1.0]])), {}),
    ]
    for fn, args, kwargs in calls:
        compiled = torch.compile(fn, fullgraph=True, backend="eager")
        assert torch.equal(compiled(*args, **kwargs), fn(*args, **kwargs)), fn.__name__


def test_invariants_name_existing_tests():
    for name in fusion_math.__all__:
        section = getattr(fusion_math, name).__doc__.split("Invariants:")[1]
        named = re.findall(r"``(test_\w+)``", section)
        assert named, name
        for test in named:
            assert callable(globals().get(test)), f"{name} names missing test {test}"


@CI
@given(phrases(), st.integers(1, 3), st.randoms(use_true_random=False))
def test_token_prior_batched_rows(c, rows, rnd):
    prior, ids, vocab = c
    priors = torch.stack([prior[torch.randperm(len(prior), generator=torch.Generator().manual_seed(rnd.randint(0, 99)))]
                          for _ in range(rows)])  # [R, P]: a different prior per row, shared ids
    table = token_prior(priors, ids, vocab)
    assert table.shape == (rows, vocab)
    for r in range(rows):
        assert torch.equal(table[r], token_prior(priors[r], ids, vocab))
    per_row_ids = ids.expand(rows, -1).clone()
    assert torch.equal(token_prior(priors, per_row_ids, vocab), table)


@st.composite
def cosine_case(draw):
    hidden = draw(st.integers(1, 5))
    n = draw(st.integers(1, 4))
    k = draw(st.integers(1, 4))
    length = draw(st.integers(1, 3))
    values = st.floats(-5, 5).filter(lambda v: abs(v) > 1e-3)
    image = torch.tensor(draw(st.lists(values, min_size=n * hidden, max_size=n * hidden)), dtype=torch.float64)
    tokens = torch.tensor(draw(st.lists(values, min_size=k * length * hidden, max_size=k * length * hidden)),
                          dtype=torch.float64)
    lengths = draw(st.lists(st.integers(1, length), min_size=k, max_size=k))
    mask = torch.arange(length)[None] < torch.tensor(lengths)[:, None]
    return image.view(n, hidden), tokens.view(k, length, hidden), mask


@CI
@given(cosine_case(), st.floats(0.01, 100.0), st.floats(0.01, 100.0))
def test_cosine_scores_scale_invariant(c, a, b):
    image, tokens, mask = c
    scores = cosine_scores(image, tokens, mask)
    assert scores.shape == (tokens.shape[0],) and scores.dtype == image.dtype
    assert (scores.abs() <= 1 + 1e-9).all()
    scaled = tokens.clone()
    scaled[0] *= b
    torch.testing.assert_close(cosine_scores(image * a, scaled, mask), scores, atol=1e-9, rtol=1e-9)


@CI
@given(cosine_case(), st.floats(-50, 50), st.randoms(use_true_random=False))
def test_cosine_scores_ignores_padding(c, junk, rnd):
    image, tokens, mask = c
    saved = image.clone(), tokens.clone(), mask.clone()
    scores = cosine_scores(image, tokens, mask)
    assert torch.equal(image, saved[0]) and torch.equal(tokens, saved[1]) and torch.equal(mask, saved[2])
    padded = tokens.masked_fill(~mask[..., None], junk)
    assert torch.equal(cosine_scores(image, padded, mask), scores)
    order = list(range(tokens.shape[0]))
    rnd.shuffle(order)
    perm = torch.tensor(order)
    torch.testing.assert_close(cosine_scores(image, tokens[perm], mask[perm]), scores[perm], atol=1e-12, rtol=0)
