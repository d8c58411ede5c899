"""Classifier-free guidance (core/cfg.py): properties of the formula, schedules, layouts, and end-to-end runs."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from janus_decoding import Decoder
from janus_decoding.core.cfg import (
    LAYOUTS,
    SCHEDULES,
    CFGConfig,
    apply_guidance,
    guidance_weight,
    guide_rows,
    merge_branches,
    pair_rows,
    split_branches,
)
from janus_decoding.plugins.registry import build_registry
from plugins_fixtures import recorders

_VALUE = st.one_of(st.floats(-50, 50, width=32), st.just(-math.inf))
_WEIGHT = st.floats(0, 20)


@st.composite
def branch_pair(draw):
    """Two ``[R, V]`` logit tensors with finite values and ``-inf`` masks."""
    rows, vocab = draw(st.integers(1, 3)), draw(st.integers(1, 8))
    values = st.lists(_VALUE, min_size=rows * vocab, max_size=rows * vocab)
    cond = torch.tensor(draw(values), dtype=torch.float32).view(rows, vocab)
    uncond = torch.tensor(draw(values), dtype=torch.float32).view(rows, vocab)
    return cond, uncond


def _both_finite(cond, uncond):
    return torch.isfinite(cond) & torch.isfinite(uncond)


def _close_up_to_rounding(out, expected, cond, uncond):
    # u + w·(c − u) is the published formula; at w ∈ {0, 1} it equals a branch up to one rounding of c − u
    tolerance = 4 * torch.finfo(out.dtype).eps * (cond.abs() + uncond.abs())
    assert ((out - expected).abs() <= tolerance).all(), (out, expected)


@given(branch_pair())
def test_weight_one_gives_cond(pair):
    cond, uncond = pair
    out = apply_guidance(cond, uncond, 1.0)
    ok = _both_finite(cond, uncond)
    _close_up_to_rounding(out[ok], cond[ok], cond[ok], uncond[ok])


@given(branch_pair())
def test_weight_zero_gives_uncond(pair):
    cond, uncond = pair
    out = apply_guidance(cond, uncond, 0.0)
    ok = _both_finite(cond, uncond)
    _close_up_to_rounding(out[ok], uncond[ok], cond[ok], uncond[ok])


@given(branch_pair(), _WEIGHT)
def test_equal_branches_do_not_depend_on_weight(pair, w):
    cond, _ = pair
    out = apply_guidance(cond, cond.clone(), w)
    assert torch.equal(out, cond)


@given(branch_pair(), _WEIGHT)
def test_neg_inf_in_either_branch_stays_neg_inf_and_no_nan(pair, w):
    cond, uncond = pair
    before = (cond.clone(), uncond.clone())
    out = apply_guidance(cond, uncond, torch.tensor(w))
    masked = torch.isneginf(cond) | torch.isneginf(uncond)
    assert torch.isneginf(out[masked]).all()
    assert torch.isfinite(out[~masked]).all()
    assert not torch.isnan(out).any()
    assert out.shape == cond.shape and out.dtype == cond.dtype
    assert torch.equal(cond, before[0]) and torch.equal(uncond, before[1])  # inputs not mutated


@given(st.sampled_from(SCHEDULES), st.floats(0, 12), st.integers(2, 600))
def test_schedules_start_at_one_and_end_at_weight(schedule, w, steps):
    weight = torch.tensor(w, dtype=torch.float32)
    first = guidance_weight(weight, schedule, torch.tensor(0), steps)
    last = guidance_weight(weight, schedule, torch.tensor(steps - 1), steps)
    assert torch.allclose(last, weight, atol=1e-5)
    if schedule != "constant":
        assert torch.allclose(first, torch.tensor(1.0), atol=1e-6)
    # monotone from 1 towards w
    ticks = range(0, steps, max(1, steps // 7))
    values = torch.stack([guidance_weight(weight, schedule, torch.tensor(t), steps) for t in ticks])
    diffs = (values[1:] - values[:-1]) * (1 if w >= 1 else -1)
    assert (diffs >= -1e-5).all()


@given(st.sampled_from(LAYOUTS), st.integers(1, 5), st.integers(1, 4))
def test_split_merge_round_trip(layout, pairs, width):
    rows = torch.arange(2 * pairs * width, dtype=torch.float32).view(2 * pairs, width)
    cond, uncond = split_branches(rows, layout)
    assert cond.shape == (pairs, width)
    assert torch.equal(merge_branches(cond, uncond, layout), rows)
    doubled = pair_rows(cond, layout)
    c2, u2 = split_branches(doubled, layout)
    assert torch.equal(c2, cond) and torch.equal(u2, cond)


def test_layouts_place_rows_as_declared():
    cond, uncond = torch.tensor([[1.0], [2.0]]), torch.tensor([[10.0], [20.0]])
    assert merge_branches(cond, uncond, "interleaved").flatten().tolist() == [1, 10, 2, 20]
    assert merge_branches(cond, uncond, "halves").flatten().tolist() == [1, 2, 10, 20]


@given(st.sampled_from(LAYOUTS), branch_pair(), _WEIGHT)
def test_guide_rows_equals_core_guidance(layout, pair, w):
    cond, uncond = pair
    rows = merge_branches(cond, uncond, layout)
    assert torch.equal(guide_rows(rows, layout, w), apply_guidance(cond, uncond, w))


@pytest.mark.parametrize("bad", [{"weight": -1}, {"weight": math.nan}, {"schedule": "cubic"}, {"layout": "rows"},
                                 {"negative_prompt": "  "}, {"weight": True}])
def test_cfg_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="`cfg`"):
        CFGConfig(**bad)


def _recorded_prompts(handle, spec_cfg: str, **kwargs):
    registry = build_registry(extra_plugins=[recorders])
    decoder = Decoder.from_spec(f"record_prompt > {spec_cfg}" if spec_cfg else "record_prompt", registry=registry)
    result = decoder.generate_images(handle, ["a cat", "a tall dog"], seed=0, **kwargs)
    return result, _recorded(result)


def _recorded(result) -> dict:
    return [e for e in result.trace if e["strategy"] == "record_prompt"][-1]


def test_halves_layout_runs_end_to_end(janus):
    interleaved, rows_i = _recorded_prompts(janus, "cfg(layout=\"interleaved\")", n=2)
    halves, rows_h = _recorded_prompts(janus, "cfg(layout=\"halves\")", n=2)
    assert rows_h["layout"] == "halves" and rows_i["layout"] == "interleaved"
    # the same images either way (rows are independent; rng="row")
    assert torch.equal(interleaved.tokens, halves.tokens)
    ids_i, ids_h = rows_i["ids"], rows_h["ids"]
    assert torch.equal(split_branches(ids_i, "interleaved")[0], split_branches(ids_h, "halves")[0])
    assert torch.equal(split_branches(ids_i, "interleaved")[1], split_branches(ids_h, "halves")[1])


def test_negative_prompt_changes_the_uncond_rows_only(janus):
    plain, rows = _recorded_prompts(janus, "")
    negative, neg_rows = _recorded_prompts(janus, "", negative_prompt="blurry, low quality")
    cond, uncond = split_branches(rows["ids"], "interleaved")
    ncond, nuncond = split_branches(neg_rows["ids"], "interleaved")
    pad = janus.pad_id
    # without a negative prompt the uncond row keeps BOS and BOI and pads the interior
    valid = split_branches(rows["valid"], "interleaved")[1][0]
    interior = uncond[0][valid][1:-1]
    assert (interior == pad).all()
    negative_ids = torch.tensor(janus.generation_prompt_ids("blurry, low quality"))
    assert torch.equal(nuncond[0][-negative_ids.numel():], negative_ids)
    # cond rows are unchanged, and the images change
    assert torch.equal(cond[:, -5:], ncond[:, -5:])
    assert not torch.equal(plain.tokens, negative.tokens)


def test_cfg_weight_changes_images_and_one_is_conditional_only(janus):
    decoder = Decoder.from_spec("")
    a = decoder.generate_images(janus, "a cat", cfg=1.0, seed=0).tokens
    b = decoder.generate_images(janus, "a cat", cfg=7.0, seed=0).tokens
    assert not torch.equal(a, b)


def test_cfg_schedule_from_spec_is_used(janus):
    registry = build_registry(extra_plugins=[recorders])
    decoder = Decoder.from_spec("record_prompt > cfg(weight=3.0, schedule=\"linear\")", registry=registry)
    assert decoder.cfg.schedule == "linear" and decoder.cfg.weight == 3.0
    weights = _recorded(decoder.generate_images(janus, "a cat", seed=0))["weights"]
    assert weights[0] == pytest.approx(1.0) and weights[-1] == pytest.approx(3.0)


def test_empty_negative_prompt_is_an_error_not_ignored(janus):
    with pytest.raises(ValueError, match="`negative_prompt` must not be empty"):
        Decoder.from_spec("").generate_images(janus, "a cat", negative_prompt="")
