"""Properties of strategies/repetition_penalty_math.py, with transformers' processor as the reference."""

from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from janus_decoding.strategies import repetition_penalty_math
from janus_decoding.strategies.repetition_penalty_math import apply_repetition_penalty

CI = settings(max_examples=60, deadline=None, derandomize=True)

_ELEM = st.one_of(
    st.floats(-30, 30, width=32),
    st.sampled_from([-2.0, 0.0, 1.5]),
    st.just(-math.inf),
)
_PENALTY = st.one_of(st.floats(0.0625, 4.0, width=32), st.just(1.2))


@st.composite
def case(draw, max_rows: int = 3, max_vocab: int = 8, max_len: int = 7):
    """(logits [B, V], history [B, L], valid [B, L]); history ids include out-of-range values."""
    rows, vocab, length = draw(st.integers(1, max_rows)), draw(st.integers(1, max_vocab)), draw(st.integers(1, max_len))
    logits = torch.tensor(draw(st.lists(_ELEM, min_size=rows * vocab, max_size=rows * vocab))).view(rows, vocab)
    ids = st.integers(0, vocab - 1) | st.integers(vocab, vocab + 3)  # ids >= V are dropped (as in transformers)
    history = torch.tensor(draw(st.lists(ids, min_size=rows * length, max_size=rows * length))).view(rows, length)
    valid = torch.tensor(draw(st.lists(st.booleans(), min_size=rows * length, max_size=rows * length)))
    return logits.float(), history.long(), valid.view(rows, length)


def _reference_row(logits_row: torch.Tensor, ids: list[int], penalty: float) -> torch.Tensor:
    # transformers on one row with only the valid ids; the identity when there are none
    if not ids:
        return logits_row.clone()
    proc = RepetitionPenaltyLogitsProcessor(penalty)
    return proc(torch.tensor([ids]), logits_row.unsqueeze(0).clone())[0]


@CI
@given(case(), _PENALTY)
def test_matches_transformers_when_fully_valid(c, penalty):
    logits, history, _ = c
    valid = torch.ones_like(history, dtype=torch.bool)
    expected = RepetitionPenaltyLogitsProcessor(penalty)(history.clone(), logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, history, valid, penalty), expected)


@CI
@given(case(), _PENALTY, st.data())
def test_invalid_slots_have_no_effect(c, penalty, data):
    logits, history, valid = c
    junk = data.draw(st.lists(st.integers(-5, 20), min_size=history.numel(), max_size=history.numel()))
    scrambled = torch.where(valid, history, torch.tensor(junk).view_as(history))
    out = apply_repetition_penalty(logits, scrambled, valid, penalty)
    assert torch.equal(out, apply_repetition_penalty(logits, history, valid, penalty))
    for r in range(logits.shape[0]):
        ids = history[r][valid[r]].tolist()
        assert torch.equal(out[r], _reference_row(logits[r], ids, penalty))


@CI
@given(case(), _PENALTY, st.integers(2, 6))
def test_repeated_ids_penalised_once(c, penalty, repeats):
    logits, history, _ = c
    once = torch.ones_like(history, dtype=torch.bool)
    many = history.repeat_interleave(repeats, dim=1)
    out_once = apply_repetition_penalty(logits, history, once, penalty)
    out_many = apply_repetition_penalty(logits, many, torch.ones_like(many, dtype=torch.bool), penalty)
    assert torch.equal(out_once, out_many)


@CI
@given(case(), _PENALTY)
def test_only_history_ids_change(c, penalty):
    logits, history, valid = c
    out = apply_repetition_penalty(logits, history, valid, penalty)
    vocab = logits.shape[-1]
    for r in range(logits.shape[0]):
        seen = {i for i in history[r][valid[r]].tolist() if i < vocab}
        for x in range(vocab):
            before, after = logits[r, x].item(), out[r, x].item()
            if x not in seen:
                assert after == before or (math.isnan(before) and math.isnan(after))
            elif before < 0:
                assert after == pytest.approx(before * penalty, rel=1e-6)
            else:
                assert after == pytest.approx(before / penalty, rel=1e-6)
    assert torch.equal(torch.isneginf(out), torch.isneginf(logits))
    assert torch.equal(out == 0, logits == 0)


@CI
@given(case())
def test_penalty_one_is_identity(c):
    logits, history, valid = c
    assert torch.equal(apply_repetition_penalty(logits, history, valid, 1.0), logits)


@CI
@given(case(), _PENALTY)
def test_rows_independent_inputs_unchanged(c, penalty):
    logits, history, valid = c
    saved = logits.clone(), history.clone(), valid.clone()
    out = apply_repetition_penalty(logits, history, valid, penalty)
    assert out.shape == logits.shape and out.dtype == logits.dtype
    assert all(torch.equal(a, b) for a, b in zip((logits, history, valid), saved))
    for r in range(logits.shape[0]):
        alone = apply_repetition_penalty(logits[r : r + 1], history[r : r + 1], valid[r : r + 1], penalty)
        assert torch.equal(out[r : r + 1], alone)
    wide = apply_repetition_penalty(logits.double(), history, valid, penalty)
    assert wide.dtype == torch.float64


@CI
@given(case(), st.data())
def test_per_row_tensor_penalty(c, data):
    logits, history, valid = c
    rows = logits.shape[0]
    pens = data.draw(st.lists(_PENALTY, min_size=rows, max_size=rows))
    out = apply_repetition_penalty(logits, history, valid, torch.tensor(pens, dtype=torch.float64).unsqueeze(-1))
    assert out.dtype == logits.dtype
    for r, p in enumerate(pens):
        assert torch.equal(out[r : r + 1], apply_repetition_penalty(logits[r : r + 1], history[r : r + 1],
                                                                     valid[r : r + 1], p))


def test_rejects_bad_python_penalty():
    with pytest.raises(ValueError, match="`penalty`"):
        apply_repetition_penalty(torch.zeros(1, 3), torch.zeros(1, 1, dtype=torch.long),
                                 torch.ones(1, 1, dtype=torch.bool), 0.0)


def test_compile_fullgraph():
    torch._dynamo.reset()
    logits = torch.tensor([[1.0, -2.0, 0.0, -math.inf, 3.0], [0.5, 0.5, -1.0, 2.0, 4.0]])
    history = torch.tensor([[0, 1, 3, 9], [4, 4, -1, 2]])
    valid = torch.tensor([[True, True, False, True], [True, True, True, False]])
    fn = torch.compile(apply_repetition_penalty, fullgraph=True, backend="eager")
    for penalty in (1.2, torch.tensor([[1.3], [0.8]])):
        expected = apply_repetition_penalty(logits, history, valid, penalty)
        assert torch.equal(fn(logits, history, valid, penalty), expected)


def test_invariants_name_existing_tests():
    for name in repetition_penalty_math.__all__:
        section = getattr(repetition_penalty_math, name).__doc__.split("Invariants:")[1]
        named = re.findall(r"``(test_\w+)``", section)
        assert named, name
        for test in named:
            assert callable(globals().get(test)), f"{name} names missing test {test}"
