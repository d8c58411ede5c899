"""Properties of strategies/twig_math.py (TwiG, arXiv 2511.16671; shared/reference/strategies.md §3.1)."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from janus_decoding.core.cfg import LAYOUTS, split_branches
from janus_decoding.strategies import twig_math
from janus_decoding.strategies.twig_math import (band_rows, compose_prompt, inject_growth, inject_rows, nested_seed,
                                                 parse_score, passes, place_names, rebuild_growth, score_question,
                                                 stage_boundaries, think_question, to_uint8)

CI = settings(max_examples=50, deadline=None, derandomize=True)
JANUS_PRO_ROWS = 24  # Janus-Pro's 24×24 grid (384 px / patch 16)


@st.composite
def grids(draw):
    rows = draw(st.integers(1, 48))
    stages = draw(st.sampled_from([d for d in range(1, rows + 1) if rows % d == 0]))
    return rows, draw(st.integers(1, 32)), stages


@CI
@given(grids())
def test_bands_tile_the_grid(grid):
    rows, _, stages = grid
    bands = band_rows(rows, stages)
    assert len(bands) == stages and bands[0][0] == 0 and bands[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(bands, bands[1:]))
    assert {end - start for start, end in bands} == {rows // stages}


@pytest.mark.parametrize("stages, first_end, tokens", [(2, 12, 288), (3, 8, 192), (4, 6, 144), (6, 4, 96),
                                                        (8, 3, 72)])
def test_bands_for_janus_pro(stages, first_end, tokens):
    bands = band_rows(JANUS_PRO_ROWS, stages)
    assert bands[0] == (0, first_end)
    bounds = stage_boundaries(JANUS_PRO_ROWS, JANUS_PRO_ROWS, stages)
    assert [b - a for a, b in zip(bounds, bounds[1:])] == [tokens] * stages


@pytest.mark.parametrize("rows, stages", [(24, 5), (24, 7), (24, 0), (24, -2), (4, 3), (24, 48)])
def test_bands_refuse_bad_stages(rows, stages):
    with pytest.raises(ValueError, match=r"`twig`: `stages` must"):
        band_rows(rows, stages)


@CI
@given(grids())
def test_boundaries_token_counts(grid):
    rows, cols, stages = grid
    bounds = stage_boundaries(rows, cols, stages)
    n = rows * cols // stages
    assert bounds == [k * n for k in range(stages + 1)]
    assert stage_boundaries(24, 24, 3) == [0, 192, 384, 576]


@pytest.mark.parametrize("stages", [1, 2, 3, 4, 6, 8, 24])
def test_place_names(stages):
    names = place_names(stages)
    assert len(names) == stages == len(set(names))
    if stages >= 2:
        assert "top" in names[0] and "bottom" in names[-1]
    assert place_names(3) == ["top part", "middle part", "bottom part"]


def test_compose_prompt():
    assert compose_prompt("a red cube", []) == "a red cube"
    assert compose_prompt("a red cube", ["", "  "]) == "a red cube"
    assert compose_prompt("a red cube", [" sky above ", "", "grass"]) == "a red cube sky above grass"


def test_questions():
    first = think_question("a red cube", "top part", 0, 3, [])
    later = think_question("a red cube", "middle part", 1, 3, ["blue sky"])
    assert "a red cube" in first and "top part" in first and "picture" not in first
    assert "picture" in later and "blue sky" in later and "middle part" in later
    question = score_question("a red cube", "middle part")
    assert "a red cube" in question and "SCORE:" in question and "0" in question and "100" in question


@CI
@given(st.integers(0, 100) | st.floats(0, 100).map(lambda x: round(x, 2)), st.text(max_size=20), st.text(max_size=20),
       st.sampled_from(["SCORE: {}", "score:{}", "Score = {}", "SCORE: {}/100"]))
def test_parse_score_roundtrip(value, before, after, form):
    # text around the score must not itself contain a "score:" form
    before, after = (re.sub(r"(?i)score", "", t) for t in (before, after))
    assert parse_score(f"{before} {form.format(value)} {after}") == pytest.approx(float(value))
    assert parse_score(str(value)) == pytest.approx(float(value))


@pytest.mark.parametrize("reply", ["", "no idea", "SCORE: high", "SCORE: 101", "SCORE: -3", "150", "scores are 80",
                                   "I give it 80 points"])
def test_parse_score_rejects(reply):
    assert parse_score(reply) is None


@CI
@given(st.lists(st.none() | st.floats(0, 100), max_size=6), st.floats(0, 100), st.floats(0, 100),
       st.sampled_from(["accept", "regenerate"]))
def test_passes_monotone(scores, a, b, policy):
    low, high = sorted((a, b))
    at_low, at_high = passes(scores, low, policy), passes(scores, high, policy)
    assert all(h <= lo for lo, h in zip(at_low, at_high))  # a pass at the higher threshold passes at the lower
    assert passes(scores, 0.0, policy) == [True if s is not None else policy == "accept" for s in scores]
    with pytest.raises(ValueError, match="on_unparseable"):
        passes(scores, low, "ignore")


def test_nested_seed_distinct():
    seeds = {nested_seed(7, i, k, a) for i in range(16) for k in range(24) for a in range(4)}
    assert len(seeds) == 16 * 24 * 4 and min(seeds) >= 0
    assert nested_seed(7, 1, 2, 0) == nested_seed(7, 1, 2, 0) != nested_seed(8, 1, 2, 0)


def test_growth_bounds():
    from janus_decoding.models.prompts import generation_text
    from janus_decoding.models.tokenizer import build_tokenizer

    tok = build_tokenizer()
    limit, stages = 5, 4
    words = "zebra quixotic glyphs vex nymph lighthouse dusk café ☃ 123".split()
    guidance = []
    for k in range(stages):  # each stage's guidance clipped to `limit` tokens, as the strategy clips it
        ids = tok(" ".join(words[k:] * 3), add_special_tokens=False).input_ids[:limit]
        guidance.append(tok.decode(ids, skip_special_tokens=True).strip())
    prompt = "a red cube on a blue sphere"
    grown = len(tok(generation_text(compose_prompt(prompt, guidance))).input_ids)
    assert grown - len(tok(generation_text(prompt)).input_ids) <= rebuild_growth(stages, limit)
    assert inject_growth(1, limit, 4) == inject_growth(1, limit, 1) < inject_growth(2, limit, 1) < inject_growth(2, limit, 2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_inject_rows_pairs(layout):
    ids, rows = inject_rows([5, 6, 7], 1, 3, 0, layout)
    assert ids.shape == (6, 3) and rows.shape == (6,)
    cond, uncond = split_branches(ids, layout)
    cond_rows, uncond_rows = split_branches(rows, layout)
    assert cond_rows.tolist() == uncond_rows.tolist() == [False, True, False]
    assert cond[1].tolist() == [5, 6, 7] and uncond[1].tolist() == [0, 0, 0]


def test_to_uint8():
    pixels = torch.tensor([-1.0, 1.0, 0.0, -3.0, 2.0, 0.5]).view(1, 3, 1, 2)
    before = pixels.clone()
    out = to_uint8(pixels)
    assert out.shape == (1, 1, 2, 3) and out.dtype == torch.uint8
    assert out[0, 0, :, 0].tolist() == [0, 255] and out[0, 0, :, 1].tolist() == [128, 0]
    assert out[0, 0, :, 2].tolist() == [255, 191]
    assert torch.equal(pixels, before)


def test_invariants_name_existing_tests():
    for name in twig_math.__all__:
        doc = getattr(twig_math, name).__doc__
        assert "Invariants:" in doc, name
        named = re.findall(r"``(test_\w+)``", doc.split("Invariants:")[1])
        assert named, name
        for test in named:
            assert callable(globals().get(test)), f"{name} names missing test {test}"
