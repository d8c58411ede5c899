"""Pure math of min-p filtering (no pluggy, no model)."""

from __future__ import annotations

import math

import torch

__all__ = ["min_p_filter"]


def min_p_filter(logits: torch.Tensor, min_p: float | torch.Tensor, *, min_tokens_to_keep: int = 1,
                 filter_value: float = -math.inf) -> torch.Tensor:
    r"""Keep the tokens whose probability is at least ``min_p`` times the row's largest; the rest get ``filter_value``.

    ``p = softmax(l)``; remove x when ``p(x) < min_p · max p``, except the ``min_tokens_to_keep`` largest logits.

    :param logits: ``[B, V]`` scores of any float dtype.
    :param min_p: in ``[0, 1]``: 0 keeps everything, 1 keeps only the most likely token(s). A float or a tensor
        broadcastable against ``[B, 1]``.
    :param min_tokens_to_keep: int ``>= 1`` (default 1).
    :param filter_value: value written to removed entries (default ``-inf``).
    :returns: ``[B, V]`` new tensor, same dtype.

    Source: transformers 5.24 ``MinPLogitsWarper.__call__`` (same softmax, comparison and argsort).

    Invariants:
    - equals transformers' ``MinPLogitsWarper`` exactly (``test_matches_transformers``)
    - the hook contract: ``-inf`` kept, rows independent, input unchanged (``test_contract``)
    """
    probs = logits.softmax(dim=-1)  # [B, V]
    threshold = min_p * probs.amax(dim=-1, keepdim=True)  # [B, 1]
    remove = probs < threshold  # [B, V]
    order = torch.argsort(logits, descending=True, dim=-1)  # [B, V]
    remove_sorted = remove.gather(-1, order)
    protected = torch.arange(logits.shape[-1], device=logits.device) < min_tokens_to_keep  # [V]
    remove_sorted = remove_sorted & ~protected
    remove = remove_sorted.scatter(-1, order, remove_sorted)  # back to vocabulary order
    return logits.masked_fill(remove, filter_value)
