"""Pure math of the CTRL repetition penalty over a preallocated, partly valid token history.

The history is a fixed-size ``[B, L]`` buffer plus a ``[B, L]`` validity mask, so the decode step has the same shapes at
every token and can be captured in a CUDA graph: invalid slots are redirected to a dummy vocabulary column that is
dropped at the end, instead of being removed (which would need a data-dependent shape).
"""

from __future__ import annotations

import torch

__all__ = ["apply_repetition_penalty"]

_Scalar = float | int | torch.Tensor


def apply_repetition_penalty(
    logits: torch.Tensor,
    history: torch.Tensor,
    history_valid: torch.Tensor,
    penalty: _Scalar,
) -> torch.Tensor:
    r"""Penalise every token id that occurs in a row's valid history, once per id (CTRL, Keskar et al. 2019).

    For each row b and each id x in ``{history[b, i] : history_valid[b, i]}``:
    ``l'(x) = l(x) * θ`` if ``l(x) < 0`` else ``l(x) / θ``; all other entries are unchanged.

    :param logits: ``[B, V]`` scores. ``-inf`` stays ``-inf`` (``-inf * θ``) and 0 stays 0.
    :param history: ``[B, L]`` long token ids (prompt and/or generated tokens, any order, repeats allowed). Ids outside
        ``[0, V)`` are ignored (transformers likewise drops ids ``>= V``), so ``-1`` works as a padding id.
    :param history_valid: ``[B, L]`` bool; ``False`` slots have no effect whatever id they hold.
    :param penalty: ``θ > 0``; 1.0 is the identity, ``θ > 1`` discourages repeats (DoLa and CTRL use 1.2),
        ``0 < θ < 1`` encourages them. A float or a tensor broadcastable against ``[B, 1]`` (per-row values).
    :returns: ``[B, V]`` new tensor, same dtype.

    Source: Keskar et al., "CTRL" (arXiv 1909.05858) §4.1; transformers 5.24 ``RepetitionPenaltyLogitsProcessor``
    (2-D path: gather, sign-dependent scaling, scatter; ids ``>= V`` dropped through a padded column).

    Invariants:
    - with a fully valid history, equals transformers' ``RepetitionPenaltyLogitsProcessor`` exactly
      (``test_matches_transformers_when_fully_valid``)
    - invalid slots have no effect: any id in an invalid slot gives the result of the history without that slot
      (``test_invalid_slots_have_no_effect``)
    - each id is penalised once however often it repeats (``test_repeated_ids_penalised_once``)
    - only ids in the valid history change; ``-inf`` stays ``-inf``, 0 stays 0 (``test_only_history_ids_change``)
    - ``θ = 1`` is the identity (``test_penalty_one_is_identity``)
    - rows are independent; shape, dtype and inputs unchanged (``test_rows_independent_inputs_unchanged``)
    - a ``[B, 1]`` tensor penalty equals the per-row float result (``test_per_row_tensor_penalty``)
    - compiles with ``fullgraph=True`` (``test_compile_fullgraph``)
    """
    if not isinstance(penalty, torch.Tensor):
        if not penalty > 0:
            raise ValueError(f"`penalty` must be > 0, got {penalty!r}")
        theta: _Scalar = penalty
    else:
        theta = penalty.to(dtype=logits.dtype, device=logits.device)
    batch, vocab = logits.shape
    in_range = history_valid & (history >= 0) & (history < vocab)  # [B, L]
    # Invalid or out-of-range slots point at the dummy column `vocab`, dropped below.
    ids = torch.where(in_range, history, torch.full_like(history, vocab))  # [B, L]
    seen = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=logits.device)
    seen = seen.scatter(1, ids, True)[:, :vocab]  # [B, V]; scatter of a constant: repeats are harmless
    penalised = torch.where(logits < 0, logits * theta, logits / theta)  # [B, V]
    return torch.where(seen, penalised, logits)
