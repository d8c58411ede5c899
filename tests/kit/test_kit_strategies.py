"""The kit's hypothesis strategies produce what they promise."""

from __future__ import annotations

import torch
from hypothesis import given

from janus_decoding.core.cfg import split_branches
from janus_decoding.testing.strategies import cfg_pairs, histories, logits


@given(logits())
def test_logits_keep_a_finite_entry_per_row(x):
    assert x.dim() == 2 and x.isfinite().any(-1).all() and not x.isnan().any() and not x.isposinf().any()


@given(cfg_pairs())
def test_cfg_pairs_split_back_in_their_layout(pairs):
    cond, uncond = split_branches(pairs.rows, pairs.layout)
    assert torch.equal(cond, pairs.cond) and torch.equal(uncond, pairs.uncond)
    assert pairs.rows.shape[0] == 2 * pairs.num_pairs


@given(cfg_pairs(identical=True))
def test_identical_pairs(pairs):
    assert torch.equal(pairs.cond, pairs.uncond)


@given(histories(vocab=5))
def test_histories_in_range(hist):
    ids, valid = hist
    assert ids.dtype == torch.long and valid.dtype == torch.bool and ids.shape == valid.shape
    assert ((ids >= 0) & (ids < 5)).all()
