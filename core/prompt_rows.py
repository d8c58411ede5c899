"""Which rows of a prompt batch are the same: a prefill runs each distinct row once (``core.loop.prefill``).

The 16 images of one prompt with CFG are 32 rows holding two distinct prompts (the prompt and the unconditional
one); their prefill is the same computation 16 times over.
"""

from __future__ import annotations

import torch

from .protocol import HookRunner
from .state import StepState

__all__ = ["DistinctRows", "distinct_rows"]


class DistinctRows(tuple):
    """``(first [U], inverse [B])`` on the device, with ``key``: the same two as host tuples (what a captured
    prefill compares, without a sync)."""

    key: tuple[tuple[int, ...], tuple[int, ...]]


def distinct_rows(state: StepState, hooks: HookRunner, embeds: torch.Tensor) -> DistinctRows | None:
    """For a prefill: ``(first [U], inverse [B])`` when only U < B of the rows differ — in their input embeddings
    (bit for bit), positions and validity — so that the layers run over rows ``first`` and row b takes the results
    of row ``first[inverse[b]]``; None when every row differs, when the cache already holds entries (rows could
    differ there) or when layer hooks will act during the prefill (a pruning hook chooses positions per row).

    Why: a batch of images of one prompt prefills two distinct rows 16 times each; at the 7B shape the prefill is
    compute-bound, and running it over 2 rows instead of 32 takes ~25 ms off every batch. Two host syncs per
    prefill (the ids to the host, the check of the embeddings)."""
    b = embeds.shape[0]
    if b < 2 or max(state.cache.fill) > 0 or list(hooks.layer_points(state)):
        return None
    # rows grouped on the host by their ids, positions and validity (small), then checked on the device bit for bit
    # in their embeddings (an input-embeddings hook may have changed rows differently)
    keys = torch.cat([state.prompt_ids.reshape(b, -1), state.prompt_positions.reshape(b, -1),
                      state.attention_mask.reshape(b, -1).long()], dim=1).tolist()
    index: dict[tuple[int, ...], int] = {}
    inverse_list = [index.setdefault(tuple(key), len(index)) for key in keys]
    if len(index) == b:
        return None
    first_list = [inverse_list.index(u) for u in range(len(index))]
    device = embeds.device
    first = torch.tensor(first_list, dtype=torch.long, device=device)
    inverse = torch.tensor(inverse_list, dtype=torch.long, device=device)
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[embeds.element_size()]
    if not torch.equal(embeds.view(bits), embeds[first[inverse]].view(bits)):
        return None
    rows = DistinctRows((first, inverse))
    rows.key = (tuple(first_list), tuple(inverse_list))
    return rows
