"""Properties of strategies/latent_control_math.py (issue 11: the trigger, the condenser's mean pooling, the
training-free translator and shaper)."""

from __future__ import annotations

import math
import re

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from janus_decoding.core.sampling import entropy_nats
from janus_decoding.strategies import latent_control_math
from janus_decoding.strategies.latent_control_math import (cosine, left_pad, masked_mean, pool_window, shape_tokens,
                                                           slide, translate, trigger, window_variance)

CI = settings(max_examples=60, deadline=None, derandomize=True)
# Values on a 1/64 grid: exact in float32, so the formula's comparisons (ties included) agree with Python's.
_UNIT = st.integers(-64, 64).map(lambda i: i / 64)
_NONNEG = st.integers(0, 320).map(lambda i: i / 64)
_SMALL = st.integers(0, 64).map(lambda i: i / 8192)


@st.composite
def tensors(draw, *shape):
    n = math.prod(shape)
    values = draw(st.lists(st.floats(-4, 4, allow_nan=False, width=32), min_size=n, max_size=n))
    return torch.tensor(values, dtype=torch.float32).view(*shape)


@st.composite
def trigger_inputs(draw, rows=None):
    p = rows or draw(st.integers(1, 5))
    vec = lambda elem: torch.tensor(draw(st.lists(elem, min_size=p, max_size=p)))  # noqa: E731
    return dict(s=vec(_UNIT), prev_s=vec(_UNIT), has_prev=vec(st.booleans()), var=vec(_SMALL),
                u=vec(_NONNEG), since=vec(st.integers(0, 20)), injections=vec(st.integers(0, 5)))


@st.composite
def thresholds(draw):
    return dict(tau_drop=draw(_UNIT.map(abs)), tau_var=draw(_SMALL),
                tau_entropy=draw(_NONNEG), tau_sim=draw(_UNIT), cooldown=draw(st.integers(0, 6)),
                max_injections=draw(st.integers(0, 4)))


@CI
@given(trigger_inputs(), thresholds())
def test_trigger_matches_formula(x, tau):
    fire = trigger(**x, **tau)
    for i in range(fire.shape[0]):
        s, prev, var, u = (float(x[k][i]) for k in ("s", "prev_s", "var", "u"))
        drop = bool(x["has_prev"][i]) and float(x["s"][i] - x["prev_s"][i]) < -tau["tau_drop"] and var > tau["tau_var"]
        lost = u > tau["tau_entropy"] and s < tau["tau_sim"]
        allowed = int(x["since"][i]) > tau["cooldown"] and int(x["injections"][i]) < tau["max_injections"]
        assert bool(fire[i]) == ((drop or lost) and allowed), (i, x, tau)


@CI
@given(trigger_inputs(rows=4), trigger_inputs(rows=4), thresholds(), st.integers(0, 3))
def test_trigger_rows_independent(x, other, tau, row):
    before = {k: v.clone() for k, v in x.items()}
    mixed = {k: torch.where(torch.arange(4) == row, x[k], other[k]) for k in x}
    assert trigger(**mixed, **tau)[row] == trigger(**x, **tau)[row]
    assert all(torch.equal(before[k], x[k]) for k in x)  # inputs not modified


@CI
@given(st.lists(st.tuples(_UNIT, _NONNEG), min_size=1, max_size=60), st.integers(0, 6), st.integers(0, 4),
       _NONNEG, _UNIT)
def test_trigger_respects_cooldown_and_maximum(stream, cooldown, max_injections, tau_entropy, tau_sim):
    """Drive the trigger over a sequence with the strategy's bookkeeping (since resets on a fire)."""
    since, count, prev = torch.tensor([cooldown + 1]), torch.tensor([0]), torch.tensor([0.0])
    fired = []
    for t, (s, u) in enumerate(stream):
        since = since + 1
        fire = trigger(torch.tensor([s]), prev, torch.tensor([t > 0]), torch.tensor([1.0]), torch.tensor([u]), since,
                       count, tau_drop=0.1, tau_var=0.0, tau_entropy=tau_entropy, tau_sim=tau_sim, cooldown=cooldown,
                       max_injections=max_injections)
        if bool(fire[0]):
            fired.append(t)
            count, since = count + 1, torch.tensor([0])
        prev = torch.tensor([s])
    assert len(fired) <= max_injections
    assert all(b - a > cooldown for a, b in zip(fired, fired[1:]))


def test_trigger_each_clause_alone():
    base = dict(prev_s=torch.tensor([0.5]), has_prev=torch.tensor([True]), since=torch.tensor([99]),
                injections=torch.tensor([0]))
    tau = dict(tau_drop=0.05, tau_var=0.002, tau_entropy=3.5, tau_sim=0.25, cooldown=16, max_injections=4)
    drop = dict(s=torch.tensor([0.4]), var=torch.tensor([0.003]), u=torch.tensor([0.0]))
    assert trigger(**base, **drop, **tau).item()
    assert not trigger(**base, **{**drop, "var": torch.tensor([0.002])}, **tau).item()  # Var must exceed tau_var
    assert not trigger(**{**base, "has_prev": torch.tensor([False])}, **drop, **tau).item()
    lost = dict(s=torch.tensor([0.2]), var=torch.tensor([0.0]), u=torch.tensor([3.6]))
    base_up = {**base, "prev_s": torch.tensor([0.2])}
    assert trigger(**base_up, **lost, **tau).item()
    assert not trigger(**base_up, **{**lost, "u": torch.tensor([3.4])}, **tau).item()
    assert not trigger(**base_up, **{**lost, "s": torch.tensor([0.3])}, **tau).item()


def test_entropy_is_in_nats():
    """u_t uses core.sampling.entropy_nats: a uniform distribution over V has entropy ln V (not log2 V)."""
    for v in (2, 7, 512):
        assert math.isclose(float(entropy_nats(torch.full((1, v), 1.0 / v))[0]), math.log(v), rel_tol=1e-5)
    assert float(entropy_nats(torch.tensor([[1.0, 0.0, 0.0]]))[0]) == 0.0


@CI
@given(tensors(3, 5, 4), st.lists(st.booleans(), min_size=15, max_size=15))
def test_masked_mean_ignores_invalid(x, mask):
    valid = torch.tensor(mask).view(3, 5)
    out = masked_mean(x, valid)
    noisy = torch.where(valid[..., None], x, torch.full_like(x, 1e3))
    assert torch.allclose(masked_mean(noisy, valid), out)
    assert torch.allclose(masked_mean(x, torch.ones(3, 5, dtype=torch.bool)), x.mean(1), atol=1e-6)


@CI
@given(st.integers(1, 4), st.integers(2, 9), st.integers(1, 9), st.integers(0, 12), tensors(4))
def test_pool_window_constant(p, w, m_tokens, count, value):
    m_tokens = min(m_tokens, w)
    window = value.expand(p, w, 4).clone()
    memory, m = pool_window(window, count, m_tokens)
    assert memory.shape == (p, m_tokens, 4) and m.shape == (p, 4)
    if count > 0:
        assert torch.allclose(memory, value.expand_as(memory), atol=1e-5)
        assert torch.allclose(m, value.expand_as(m), atol=1e-5)


@CI
@given(tensors(2, 6, 3), tensors(2, 6, 3), st.integers(1, 6), st.integers(1, 6))
def test_pool_window_ignores_unfilled(window, noise, count, m_tokens):
    filled = torch.arange(6) >= 6 - count
    other = torch.where(filled[None, :, None], window, noise)
    memory, m = pool_window(window, count, m_tokens)
    memory2, m2 = pool_window(other, count, m_tokens)
    assert torch.equal(memory, memory2) and torch.equal(m, m2)
    assert torch.allclose(m, window[:, 6 - count:].mean(1), atol=1e-5)
    if m_tokens == 1 or count % m_tokens == 0:  # equal chunks: m is the mean of the memory tokens
        assert torch.allclose(memory.mean(1), m, atol=1e-5)


@CI
@given(tensors(2, 5, 3), st.integers(1, 8))
def test_pool_window_single_token(window, count):
    memory, m = pool_window(window, count, 1)
    assert torch.allclose(memory[:, 0], m, atol=1e-6)


@CI
@given(tensors(3, 4, 2), tensors(3, 4, 2), st.integers(0, 2), st.integers(0, 6), st.integers(1, 4))
def test_pool_window_rows_independent(window, other, row, count, m_tokens):
    before = window.clone()
    mixed = other.clone()
    mixed[row] = window[row]
    a, b = pool_window(window, count, m_tokens), pool_window(mixed, count, m_tokens)
    assert torch.equal(a[0][row], b[0][row]) and torch.equal(a[1][row], b[1][row])
    assert torch.equal(window, before)


@CI
@given(tensors(3, 5), tensors(3, 5), st.integers(1, 100).map(lambda i: i / 10))
def test_cosine_properties(a, b, scale):
    c = cosine(a, b)
    assert torch.allclose(c, cosine(b, a)) and bool(((c >= -1) & (c <= 1)).all())
    assert torch.allclose(cosine(a * scale, b), c, atol=1e-5)
    nonzero = a.norm(dim=-1) > 1e-3
    assert torch.allclose(cosine(a, a)[nonzero], torch.ones(int(nonzero.sum())), atol=1e-5)


@CI
@given(tensors(2, 9), st.integers(0, 12))
def test_window_variance_matches_torch(values, count):
    var = window_variance(values, count)
    n = min(count, 9)
    expected = values[:, 9 - n:].var(dim=1, unbiased=False) if n >= 2 else torch.zeros(2)
    assert torch.allclose(var, expected, atol=1e-5)
    noisy = values.clone()
    noisy[:, : 9 - n] = 1e3
    assert torch.allclose(window_variance(noisy, count), var, atol=1e-5)


@CI
@given(tensors(3, 6), tensors(3, 6), st.integers(1, 400).map(lambda i: i / 100))
def test_translate_gate_bounds(m, p, max_scale):
    c = translate(m, p, max_scale)
    assert bool((c.norm(dim=-1) <= max_scale * (1 + 1e-5)).all())
    live = p.norm(dim=-1) > 1e-3
    assert torch.allclose(cosine(c, p)[live].abs() * (c.norm(dim=-1)[live] > 1e-6), (c.norm(dim=-1)[live] > 1e-6).float(),
                          atol=1e-4)  # c ∥ p where c ≠ 0
    assert torch.allclose(translate(p * 2, p, max_scale), torch.zeros_like(p), atol=1e-5)  # no drift, no push


@CI
@given(tensors(2, 5), tensors(2, 5), st.integers(1, 5))
def test_shape_tokens(c, anchor, k):
    tokens = shape_tokens(c, anchor, k)
    assert tokens.shape == (2, k, 5)
    assert torch.equal(shape_tokens(torch.zeros_like(c), anchor, k), anchor[:, None].expand(-1, k, -1))
    assert torch.equal(tokens, tokens[:, :1].expand_as(tokens))
    assert torch.allclose((tokens[:, 0] - anchor).norm(dim=-1), anchor.norm(dim=-1) * c.norm(dim=-1), rtol=1e-4,
                          atol=1e-4)


@CI
@given(st.lists(st.integers(1, 6), min_size=1, max_size=4))
def test_left_pad_places_rows_at_the_end(lengths):
    rows = [torch.randn(n, 3) for n in lengths]
    padded, valid = left_pad(rows)
    assert padded.shape == (len(rows), max(lengths), 3) and valid.shape == padded.shape[:2]
    for i, (row, n) in enumerate(zip(rows, lengths)):
        assert torch.equal(padded[i, padded.shape[1] - n:], row)
        assert valid[i].tolist() == [False] * (padded.shape[1] - n) + [True] * n
        assert not padded[i, : padded.shape[1] - n].any()


@CI
@given(tensors(2, 4), st.integers(1, 5))
def test_slide_drops_the_oldest(newest, width):
    buffer = torch.randn(2, width, 4)
    before = buffer.clone()
    moved = slide(buffer, newest)
    assert moved.shape == buffer.shape
    assert torch.equal(moved[:, :-1], before[:, 1:]) and torch.equal(moved[:, -1], newest)
    assert torch.equal(buffer, before)
    scalars = torch.arange(6.0).view(2, 3)  # [P, W] windows of scalars (the similarities) slide the same way
    assert slide(scalars, torch.tensor([9.0, 8.0])).tolist() == [[1.0, 2.0, 9.0], [4.0, 5.0, 8.0]]


def test_per_step_math_compiles_without_graph_breaks():
    """The trigger path the strategy runs every step is capturable (no host syncs, fixed shapes)."""
    def step(window, sims, seen, probs, p):
        memory, m = pool_window(window, seen, 2)
        s = cosine(m, p)
        var = window_variance(sims, seen)
        return memory, trigger(s, sims[:, -1], seen >= 2, var, entropy_nats(probs), torch.full_like(seen, 9).expand(2),
                               torch.zeros(2, dtype=torch.long), tau_drop=0.05, tau_var=0.002, tau_entropy=0.5,
                               tau_sim=0.9, cooldown=3, max_injections=4)

    args = (torch.randn(2, 6, 4), torch.rand(2, 6), torch.tensor(4), torch.softmax(torch.randn(2, 7), -1),
            torch.randn(2, 4))
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    for a, b in zip(compiled(*args), step(*args)):
        assert torch.equal(a, b)


def test_invariants_name_existing_tests():
    for name in latent_control_math.__all__:
        section = getattr(latent_control_math, name).__doc__.split("Invariants:")[1]
        named = re.findall(r"``(test_\w+)``", section)
        assert named, name
        for test in named:
            assert callable(globals().get(test)), f"{name} names missing test {test}"
