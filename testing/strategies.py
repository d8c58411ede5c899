"""Hypothesis strategies for strategy authors: logits with ``-inf`` masks, CFG row pairs in both layouts, and
generated-token histories.

Every tensor is small, on CPU, and built from hypothesis draws (so failures shrink). Each logits row keeps at least
one finite entry, as the loop guarantees after guidance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from janus_decoding.core.cfg import LAYOUTS, merge_branches

__all__ = ["CFGPairs", "cfg_pairs", "dtypes", "histories", "logits"]

#: Float dtypes a logits transform must accept.
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float64, torch.bfloat16)

# A few repeated values make ties common (top-k/top-p must break them like transformers does).
_VALUES = st.one_of(st.floats(-30.0, 30.0, width=32, allow_subnormal=False), st.sampled_from([0.0, 1.0, -1.0, 5.0]))


def dtypes() -> st.SearchStrategy[torch.dtype]:
    """One of :data:`FLOAT_DTYPES`."""
    return st.sampled_from(FLOAT_DTYPES)


@st.composite
def logits(draw, rows: int | st.SearchStrategy[int] = st.integers(1, 4),
           vocab: int | st.SearchStrategy[int] = st.integers(2, 12), *, dtype: torch.dtype | None = None,
           masked: bool = True) -> torch.Tensor:
    """Logits ``[rows, vocab]``; with ``masked``, some entries are ``-inf`` but every row keeps a finite one.

    :param rows: an int or a strategy for the row count.
    :param vocab: an int or a strategy for the vocabulary size.
    :param dtype: fixed dtype, or ``None`` to draw one of :data:`FLOAT_DTYPES`.
    :param masked: whether to place ``-inf`` masks.
    """
    r = rows if isinstance(rows, int) else draw(rows)
    v = vocab if isinstance(vocab, int) else draw(vocab)
    dt = dtype if dtype is not None else draw(dtypes())
    values = draw(hnp.arrays(np.float32, (r, v), elements=_VALUES))  # [R, V]
    out = torch.from_numpy(values).to(dt)
    if masked:
        mask = torch.from_numpy(draw(hnp.arrays(np.bool_, (r, v))))  # [R, V]
        keep = torch.tensor(draw(st.lists(st.integers(0, v - 1), min_size=r, max_size=r)))  # [R] one finite per row
        mask[torch.arange(r), keep] = False
        out = out.masked_fill(mask, float("-inf"))
    return out


@dataclass(frozen=True)
class CFGPairs:
    """``rows`` ``[2P, V]`` in ``layout``: the cond and uncond logits ``[P, V]`` each, merged as the loop does."""

    rows: torch.Tensor
    cond: torch.Tensor
    uncond: torch.Tensor
    layout: str

    @property
    def num_pairs(self) -> int:
        return self.cond.shape[0]


@st.composite
def cfg_pairs(draw, num_pairs: int | st.SearchStrategy[int] = st.integers(1, 3),
              vocab: int | st.SearchStrategy[int] = st.integers(2, 12), *, layout: str | None = None,
              dtype: torch.dtype | None = None, identical: bool = False) -> CFGPairs:
    """CFG row pairs in ``layout`` (``interleaved`` or ``halves``; ``None`` draws one).

    :param identical: the uncond rows equal the cond rows (a pair-preserving transform must keep them equal).
    """
    p = num_pairs if isinstance(num_pairs, int) else draw(num_pairs)
    v = vocab if isinstance(vocab, int) else draw(vocab)
    dt = dtype if dtype is not None else draw(dtypes())
    lay = layout if layout is not None else draw(st.sampled_from(LAYOUTS))
    cond = draw(logits(p, v, dtype=dt))
    uncond = cond.clone() if identical else draw(logits(p, v, dtype=dt))
    return CFGPairs(merge_branches(cond, uncond, lay), cond, uncond, lay)


@st.composite
def histories(draw, num_pairs: int | st.SearchStrategy[int] = st.integers(1, 3),
              length: int | st.SearchStrategy[int] = st.integers(0, 8),
              vocab: int | st.SearchStrategy[int] = st.integers(2, 12)) -> tuple[torch.Tensor, torch.Tensor]:
    """A generated-token history: ids ``[P, L]`` (long, in ``[0, vocab)``) and validity ``[P, L]`` (bool)."""
    p = num_pairs if isinstance(num_pairs, int) else draw(num_pairs)
    n = length if isinstance(length, int) else draw(length)
    v = vocab if isinstance(vocab, int) else draw(vocab)
    ids = draw(hnp.arrays(np.int64, (p, n), elements=st.integers(0, v - 1)))
    valid = draw(hnp.arrays(np.bool_, (p, n)))
    return torch.from_numpy(ids), torch.from_numpy(valid)
