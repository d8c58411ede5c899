"""Properties of strategies/dola_math.py (DoLa, arXiv 2309.03883; shared/reference/strategies.md §1)."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from janus_decoding.strategies import dola_math
from janus_decoding.strategies.dola_math import (candidate_layers, dola_contrast, dola_step, layer_distance,
                                                 select_premature)

CI = settings(max_examples=50, deadline=None, derandomize=True)

# Logits on a 1/8 grid: ties are common, and every logit gap is at least 0.004 away from -log α for the α below, so
# rounding never moves a token across the APC boundary (shift-invariance and counting tests compare exactly).
_GRID = st.integers(-64, 64).map(lambda i: i / 8)
_ALPHAS = st.sampled_from([0.0, 0.05, 0.1, 0.3, 0.5, 1.0])


@st.composite
def grid_logits(draw, rows=None, vocab=None, neg_inf=False, max_rows=3, max_vocab=8):
    rows = rows or draw(st.integers(1, max_rows))
    vocab = vocab or draw(st.integers(1, max_vocab))
    elem = st.one_of(_GRID, st.just(-math.inf)) if neg_inf else _GRID
    out = torch.tensor(draw(st.lists(elem, min_size=rows * vocab, max_size=rows * vocab)), dtype=torch.float64)
    out = out.view(rows, vocab)
    for r in range(rows):  # at least one finite token per row
        if torch.isinf(out[r]).all():
            out[r, draw(st.integers(0, vocab - 1))] = draw(_GRID)
    return out


@st.composite
def pair(draw, neg_inf=False, **kw):
    final = draw(grid_logits(neg_inf=neg_inf, **kw))
    premature = draw(grid_logits(rows=final.shape[0], vocab=final.shape[1], neg_inf=neg_inf))
    return final, premature


# ---------------------------------------------------------------------------------------------- candidate_layers


def _hf_buckets(spec: str, n: int, tied: bool) -> list[int]:
    # transcription of transformers 4.55.4 GenerationMixin._dola_decoding
    start = 0 if not tied else (2 if n > 2 else 1 if n == 2 else 0)
    if spec == "low":
        if start == n // 2:
            return [start]
        return list(range(start, n // 2, 2)) if n <= 40 else list(range(start, 20, 2))
    return list(range(n // 2, n, 2)) if n <= 40 else list(range(n - 20, n, 2))


def test_candidate_layers_buckets():
    for n in range(1, 81):
        for tied in (False, True):
            for spec in ("low", "high"):
                expected = _hf_buckets(spec, n, tied)
                if not expected:  # only N = 3, tied, "low"
                    assert (spec, n, tied) == ("low", 3, True)
                    with pytest.raises(ValueError, match="`layers`"):
                        candidate_layers(spec, n, tied_embeddings=tied)
                    continue
                got = candidate_layers(spec, n, tied_embeddings=tied)
                assert got == expected, (spec, n, tied)
                assert all(0 <= i < n for i in got)
                assert all(b - a == 2 for a, b in zip(got, got[1:]))
    # Janus-Pro 7B (30 layers) and 1B (24 layers), untied
    assert candidate_layers("low", 30, tied_embeddings=False) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert candidate_layers("high", 30, tied_embeddings=False) == [15, 17, 19, 21, 23, 25, 27, 29]
    assert candidate_layers("high", 24, tied_embeddings=False) == [12, 14, 16, 18, 20, 22]
    assert candidate_layers("low", 80, tied_embeddings=True) == [2, 4, 6, 8, 10, 12, 14, 16, 18]
    assert candidate_layers([3, 1], 4, tied_embeddings=True) == [3, 1]
    assert candidate_layers((0,), 1, tied_embeddings=False) == [0]


@pytest.mark.parametrize(
    "spec, n, match",
    [
        ("mid", 30, r"`layers`.*'mid'"),
        ([], 30, r"`layers`.*\[0, 30\)"),
        ([30], 30, r"`layers`.*\[0, 30\).*got 30"),
        ([-1, 2], 30, r"`layers`.*-1"),
        ([1.5], 30, r"`layers`.*1\.5"),
        ([True], 30, r"`layers`.*True"),
        ("low", 0, r"`layers`.*num_layers"),
        (5, 30, r"`layers`"),
    ],
)
def test_candidate_layers_rejects_bad_spec(spec, n, match):
    with pytest.raises(ValueError, match=match):
        candidate_layers(spec, n, tied_embeddings=False)


# ---------------------------------------------------------------------------------------------- layer_distance


@st.composite
def float_logits(draw, shape):
    n = math.prod(shape)
    values = draw(st.lists(st.floats(-20, 20), min_size=n, max_size=n))
    return torch.tensor(values, dtype=torch.float64).view(shape)


@st.composite
def distance_case(draw):
    j, rows, vocab = draw(st.integers(1, 4)), draw(st.integers(1, 3)), draw(st.integers(1, 8))
    return draw(float_logits((rows, vocab))), draw(float_logits((j, rows, vocab)))


@CI
@given(distance_case())
def test_distance_matches_kl_div_formula(c):
    final, premature = c
    p_n, p_j = final.softmax(-1).unsqueeze(0), premature.softmax(-1)
    mix = 0.5 * (p_n + p_j)
    kl1 = F.kl_div(final.log_softmax(-1).unsqueeze(0), mix, reduction="none").mean(-1)
    kl2 = F.kl_div(premature.log_softmax(-1), mix, reduction="none").mean(-1)
    official = (0.5 * (kl1 + kl2)).clamp_min(0)
    torch.testing.assert_close(layer_distance(final, premature), official, atol=1e-12, rtol=1e-9)
    # textbook JSD: ½KL(q_N‖M) + ½KL(q_j‖M), summed
    js = 0.5 * (F.kl_div(mix.log(), p_n, reduction="none").sum(-1) + F.kl_div(mix.log(), p_j, reduction="none").sum(-1))
    torch.testing.assert_close(layer_distance(final, premature, "textbook"), js.clamp_min(0), atol=1e-12, rtol=1e-9)


@CI
@given(distance_case(), st.sampled_from(["official", "textbook"]))
def test_distance_symmetric_nonnegative(c, kind):
    final, premature = c
    a, b = final, premature[0]  # [R, V] each
    d_ab = layer_distance(a, b.unsqueeze(0), kind)[0]
    d_ba = layer_distance(b, a.unsqueeze(0), kind)[0]
    assert torch.equal(d_ab, d_ba)
    assert (d_ab >= 0).all()
    # Pinsker: KL(P‖M) >= ½‖P − M‖₁² and ‖q − M‖₁ = ½‖q_N − q_j‖₁, so d >= ‖q_N − q_j‖₁² / 8 (official: / |V|)
    l1 = (a.softmax(-1) - b.softmax(-1)).abs().sum(-1)
    bound = l1**2 / 8 / (a.shape[-1] if kind == "official" else 1)
    assert (d_ab >= bound - 1e-9).all()
    full = layer_distance(final, premature, kind)
    assert full.shape == premature.shape[:-1] and full.dtype == final.dtype


@CI
@given(distance_case(), st.floats(-50, 50), st.sampled_from(["official", "textbook"]))
def test_distance_zero_for_equal(c, shift, kind):
    final, _ = c
    d = layer_distance(final, (final + shift).unsqueeze(0), kind)
    assert torch.allclose(d, torch.zeros_like(d), atol=1e-9)


@CI
@given(pair(neg_inf=True), st.sampled_from(["official", "textbook"]), st.data())
def test_distance_with_neg_inf_no_nan(c, kind, data):
    final, premature = c  # both with -inf masks in different places; every row keeps a finite logit
    dense = data.draw(grid_logits(rows=final.shape[0], vocab=final.shape[1]))
    d = layer_distance(final, premature.unsqueeze(0), kind)
    assert not torch.isnan(d).any() and (d >= 0).all()
    if kind == "textbook":
        assert (d <= math.log(2) + 1e-9).all()
    # a mask shared by both (e.g. a vocabulary restriction) gives a finite distance
    shared = dense.masked_fill(torch.isneginf(final), -math.inf)
    d = layer_distance(final, shared.unsqueeze(0), kind)
    assert torch.isfinite(d).all() and (d >= 0).all()


# ---------------------------------------------------------------------------------------------- select_premature

_SCORE_GRID = st.integers(0, 4).map(float)  # coarse: ties on purpose


@st.composite
def scores_case(draw):
    j, rows = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    values = draw(st.lists(_SCORE_GRID, min_size=j * rows, max_size=j * rows))
    return torch.tensor(values, dtype=torch.float64).view(j, rows)


def _first_argmax(values: list[float]) -> int:
    best = max(values)
    return values.index(best)


@CI
@given(scores_case())
def test_select_batch_shared(scores):
    idx = select_premature(scores)
    assert idx.dtype == torch.long and idx.shape == (scores.shape[1],)
    assert (idx == idx[0]).all()
    assert idx[0].item() == _first_argmax(scores.mean(-1).tolist())


@CI
@given(scores_case())
def test_select_row_independent(scores):
    idx = select_premature(scores, selection="row")
    for r in range(scores.shape[1]):
        assert idx[r].item() == _first_argmax(scores[:, r].tolist())
        assert idx[r] == select_premature(scores[:, r : r + 1], selection="row")[0]


def test_select_ties_first():
    tied = torch.tensor([[1.0, 2.0], [3.0, 2.0], [3.0, 0.0]])  # [J=3, R=2]
    assert select_premature(tied, selection="row").tolist() == [1, 0]
    assert select_premature(tied).tolist() == [1, 1]  # means 1.5, 2.5, 1.5
    assert select_premature(torch.zeros(4, 3)).tolist() == [0, 0, 0]
    assert select_premature(torch.full((2, 2), math.inf), selection="row").tolist() == [0, 0]


@CI
@given(scores_case(), st.data())
def test_select_group_extremes(scores, data):
    rows = scores.shape[1]
    zeros = torch.zeros(rows, dtype=torch.long)
    assert torch.equal(select_premature(scores, group=zeros), select_premature(scores))
    assert torch.equal(select_premature(scores, group=torch.arange(rows)), select_premature(scores, selection="row"))
    group = torch.tensor(data.draw(st.lists(st.integers(0, rows - 1), min_size=rows, max_size=rows)))
    idx = select_premature(scores, group=group)
    for r in range(rows):
        members = group == group[r]
        assert idx[r].item() == _first_argmax((scores[:, members].sum(-1) / members.sum()).tolist())
    with pytest.raises(ValueError, match="`group`"):
        select_premature(scores, selection="row", group=zeros)


# ---------------------------------------------------------------------------------------------- dola_contrast


def _expected_head(final: torch.Tensor, alpha: float, k: int) -> torch.Tensor:
    # V_head from the definition, on raw logits: q(x) >= α max q  ⇔  l(x) − max l >= log α; plus the k largest
    gap = final - final.amax(-1, keepdim=True)
    by_alpha = gap >= (math.log(alpha) if alpha > 0 else -math.inf)
    kth = final.sort(-1, descending=True).values[:, min(k, final.shape[-1]) - 1 : min(k, final.shape[-1])]
    return (by_alpha | (final >= kth)) & torch.isfinite(final)


@CI
@given(pair(), _ALPHAS, st.data())
def test_contrast_shift_invariant(c, alpha, data):
    final, premature = c
    rows = final.shape[0]
    shifts = torch.tensor(data.draw(st.lists(_GRID, min_size=rows, max_size=rows)), dtype=torch.float64).unsqueeze(-1)
    base = dola_contrast(final, premature, alpha=alpha)
    for f, p in ((final + shifts, premature), (final, premature + shifts), (final + shifts, premature - shifts)):
        out = dola_contrast(f, p, alpha=alpha)
        assert torch.equal(torch.isneginf(out), torch.isneginf(base))
        torch.testing.assert_close(out, base, atol=1e-9, rtol=0)


@CI
@given(pair(neg_inf=True), _ALPHAS, st.integers(1, 3))
def test_contrast_head_contains_argmax(c, alpha, k):
    final, premature = c
    out = dola_contrast(final, premature, alpha=alpha, min_tokens_to_keep=k)
    assert torch.isfinite(out.gather(-1, final.argmax(-1, keepdim=True))).all()
    assert torch.isfinite(out.gather(-1, out.argmax(-1, keepdim=True))).all()  # the greedy token is in V_head


@CI
@given(pair(neg_inf=True), _ALPHAS, _ALPHAS, st.integers(1, 3))
def test_contrast_head_shrinks_with_alpha(c, a1, a2, k):
    final, premature = c
    lo, hi = min(a1, a2), max(a1, a2)
    head_lo = torch.isfinite(dola_contrast(final, premature, alpha=lo, min_tokens_to_keep=k))
    head_hi = torch.isfinite(dola_contrast(final, premature, alpha=hi, min_tokens_to_keep=k))
    assert not (head_hi & ~head_lo).any()


@CI
@given(pair(), _ALPHAS, st.integers(1, 4))
def test_contrast_neg_inf_count(c, alpha, k):
    final, premature = c
    out = dola_contrast(final, premature, alpha=alpha, min_tokens_to_keep=k)
    head = _expected_head(final, alpha, k)
    vocab = final.shape[-1]
    assert torch.equal(torch.isneginf(out).sum(-1), vocab - head.sum(-1))
    assert torch.equal(torch.isfinite(out), head)
    assert (head.sum(-1) >= min(k, vocab)).all()


@CI
@given(pair(neg_inf=True))
def test_contrast_alpha_zero_keeps_finite(c):
    final, premature = c
    out = dola_contrast(final, premature, alpha=0.0)
    assert torch.equal(torch.isfinite(out), torch.isfinite(final))
    assert not torch.isnan(out).any()
    assert torch.equal(dola_contrast(final, premature, alpha=torch.tensor(0.0)), out)


@CI
@given(grid_logits(neg_inf=True), st.floats(-10, 10))
def test_contrast_uniform_premature_is_baseline(final, level):
    uniform = torch.full_like(final, level)
    out = dola_contrast(final, uniform, alpha=0.0)
    torch.testing.assert_close(out.softmax(-1), final.softmax(-1), atol=1e-12, rtol=1e-9)


@CI
@given(grid_logits(neg_inf=True), _ALPHAS, st.integers(1, 3))
def test_contrast_same_layer_uniform_on_head(final, alpha, k):
    out = dola_contrast(final, final, alpha=alpha, min_tokens_to_keep=k)
    head = torch.isfinite(out)
    probs = out.softmax(-1)
    expected = head.to(probs.dtype) / head.sum(-1, keepdim=True).to(probs.dtype)
    torch.testing.assert_close(probs, expected, atol=1e-12, rtol=0)


def _official(final: torch.Tensor, base: torch.Tensor, alpha: float, k: int) -> torch.Tensor:
    # transcription of voidism/DoLa @805230e: relative_top_filter + dola_greedy_decode's contrast
    s = final.log_softmax(dim=-1)
    sorted_s, _ = torch.sort(s, descending=True)
    min_thresh = sorted_s[..., k - 1]
    thresh = torch.min(min_thresh, s.max(dim=-1).values + math.log(alpha)).unsqueeze(-1)
    s[s < thresh] = -math.inf
    b = base.log_softmax(dim=-1)
    b[s < -1e3] = -1e3
    return s - b


@CI
@given(pair(), st.sampled_from([0.05, 0.1, 0.3, 0.5, 1.0]), st.integers(1, 3),
       st.sampled_from([torch.float32, torch.float64]))
def test_contrast_matches_official(c, alpha, k, dtype):
    final, premature = (x.to(dtype) for x in c)
    k = min(k, final.shape[-1])
    out = dola_contrast(final, premature, alpha=alpha, min_tokens_to_keep=k)
    assert torch.equal(out, _official(final, premature, alpha, k))


@CI
@given(pair(neg_inf=True), _ALPHAS, st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_contrast_rows_independent(c, alpha, dtype):
    final, premature = (x.to(dtype) for x in c)
    saved = final.clone(), premature.clone()
    out = dola_contrast(final, premature, alpha=alpha)
    assert out.shape == final.shape and out.dtype == dtype
    assert torch.equal(final, saved[0]) and torch.equal(premature, saved[1])
    for r in range(final.shape[0]):
        assert torch.equal(out[r : r + 1], dola_contrast(final[r : r + 1], premature[r : r + 1], alpha=alpha))
    per_row = torch.full((final.shape[0], 1), alpha, dtype=torch.float64)
    assert torch.equal(dola_contrast(final, premature, alpha=per_row), out)


def test_contrast_rejects_bad_python_params():
    x = torch.zeros(1, 3)
    with pytest.raises(ValueError, match="`alpha`"):
        dola_contrast(x, x, alpha=1.5)
    with pytest.raises(ValueError, match="`min_tokens_to_keep`"):
        dola_contrast(x, x, min_tokens_to_keep=0)
    with pytest.raises(ValueError, match="`kind`"):
        layer_distance(x, x.unsqueeze(0), "jsd")
    with pytest.raises(ValueError, match="`selection`"):
        select_premature(x, selection="layer")


def test_compile_fullgraph():
    torch._dynamo.reset()
    final = torch.tensor([[1.0, -math.inf, 0.5, 0.5, 3.0], [0.0, 0.0, -1.0, 2.0, -math.inf]])
    premature = torch.stack([final.flip(-1), final * 0.5, torch.zeros_like(final)])  # [J=3, R=2, V=5]
    calls = [
        (layer_distance, (final, premature), {"kind": "official"}),
        (layer_distance, (final, premature), {"kind": "textbook"}),
        (select_premature, (torch.rand(3, 2),), {"selection": "batch"}),
        (select_premature, (torch.rand(3, 2),), {"selection": "row"}),
        (select_premature, (torch.rand(3, 2),), {"group": torch.tensor([1, 1])}),
        (dola_contrast, (final, premature[1]), {"alpha": 0.1, "min_tokens_to_keep": 2}),
        (dola_contrast, (final, premature[0]), {"alpha": torch.tensor([[0.0], [0.5]])}),
    ]
    for fn, args, kwargs in calls:
        compiled = torch.compile(fn, fullgraph=True, backend="eager")
        assert torch.equal(compiled(*args, **kwargs), fn(*args, **kwargs)), (fn.__name__, kwargs)
    # the per-step path end to end: distance -> layer index -> gather -> contrast
    def step(final, premature):
        idx = select_premature(layer_distance(final, premature))  # [R]
        chosen = premature[idx, torch.arange(final.shape[0])]  # [R, V]
        return dola_contrast(final, chosen)

    assert torch.equal(torch.compile(step, fullgraph=True, backend="eager")(final, premature), step(final, premature))
    for candidates in (premature, premature[:1]):
        compiled_step = torch.compile(dola_step, fullgraph=True, backend="eager")
        for got, want in zip(compiled_step(final, candidates, selection="row"), dola_step(final, candidates,
                                                                                           selection="row")):
            assert torch.equal(got, want)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_step_is_the_composition(data):
    """dola_step = distance -> select -> gather -> contrast, composed by hand; one candidate needs no distance."""
    j = data.draw(st.integers(1, 4))
    r, v = data.draw(st.integers(1, 4)), data.draw(st.integers(2, 12))
    seed = data.draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    final = torch.randn(r, v, generator=gen) * 3
    premature = torch.randn(j, r, v, generator=gen) * 3
    if data.draw(st.booleans()):  # a mask on the final logits (as a top-k before DoLa leaves): ties at the max too
        final[:, : v // 2] = -math.inf
        final[:, -2:] = final[:, -1:]
    selection = data.draw(st.sampled_from(["batch", "row"]))
    distance = data.draw(st.sampled_from(["official", "textbook"]))
    alpha = data.draw(st.sampled_from([0.0, 0.1, 0.5]))
    contrast, index = dola_step(final.to(torch.bfloat16), premature, alpha=alpha, distance=distance,
                                selection=selection)
    if j == 1:
        want_index = torch.zeros(r, dtype=torch.long)
    else:
        want_index = select_premature(layer_distance(final.bfloat16().float(), premature, kind=distance),
                                      selection=selection)
    chosen = premature[want_index, torch.arange(r)]
    want = dola_contrast(final.bfloat16().float(), chosen, alpha=alpha).to(torch.bfloat16)
    assert torch.equal(index, want_index)
    assert torch.equal(contrast, want) and contrast.dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs, match", [({"distance": "cosine"}, "`distance`"), ({"alpha": 1.5}, "`alpha`"),
                                           ({"min_tokens_to_keep": 0}, "`min_tokens_to_keep`")])
def test_step_refuses_bad_parameters_in_one_line(kwargs, match):
    """dola_step computes the distance and the contrast itself, so it checks their parameters itself."""
    with pytest.raises(ValueError, match=match):
        dola_step(torch.zeros(2, 5), torch.zeros(3, 2, 5), **kwargs)


def test_invariants_name_existing_tests():
    for name in dola_math.__all__:
        section = getattr(dola_math, name).__doc__.split("Invariants:")[1]
        named = re.findall(r"``(test_\w+)``", section)
        assert named, name
        for test in named:
            assert callable(globals().get(test)), f"{name} names missing test {test}"
