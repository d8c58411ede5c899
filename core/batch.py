"""Turning prompts into one left-padded batch: ids, key validity and per-row positions.

One rule for uncond rows everywhere (DeepSeek's): the row keeps the first token (BOS) and the last
(``<begin_of_image>``), every interior token becomes the pad id and is attended, and the row has the same positions
as its cond row. Only the left padding that aligns rows of different lengths is masked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .cfg import merge_branches


def uncond_ids(ids: Sequence[int], pad_id: int) -> list[int]:
    """DeepSeek's unconditional row: ``ids[0]`` and ``ids[-1]`` kept, the interior replaced by ``pad_id``."""
    if len(ids) < 2:
        return list(ids)
    return [ids[0], *([pad_id] * (len(ids) - 2)), ids[-1]]


@dataclass
class PromptBatch:
    ids: torch.Tensor  # [B, T] left-padded
    valid: torch.Tensor  # [B, T] bool: False only on left padding
    positions: torch.Tensor  # [B, T] position ids (0 at each row's first real token)

    @property
    def next_positions(self) -> torch.Tensor:  # [B]
        return self.positions[:, -1] + 1


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str) -> PromptBatch:
    """Left-pad token rows to one length; padded slots are invalid and take position 0."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt row must hold at least one token")
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    valid = torch.zeros((len(rows), length), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = torch.tensor(list(r), dtype=torch.long)
        valid[i, length - len(r):] = True
    positions = (valid.long().cumsum(-1) - 1).clamp_min(0)
    return PromptBatch(ids.to(device), valid.to(device), positions.to(device))


def image_rows(cond: Sequence[Sequence[int]], uncond: Sequence[Sequence[int]], layout: str) -> list[list[int]]:
    """Order cond/uncond rows as the CFG layout declares (interleaved or halves)."""
    order = torch.arange(2 * len(cond)).view(2, -1)  # [2, P]: row 0 = cond indices, row 1 = uncond indices
    merged = merge_branches(order[0], order[1] + 0, layout)
    pool = [list(r) for r in cond] + [list(r) for r in uncond]
    return [pool[int(i)] for i in merged]
