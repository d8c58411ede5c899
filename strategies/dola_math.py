"""Pure math of DoLa, Decoding by Contrasting Layers (Chuang et al., ICLR 2024, arXiv 2309.03883).

One step: early-exit logits ``l_j`` of the candidate layers and the final logits ``l_N`` come in; the premature layer M
is the candidate whose distribution is farthest from the final one (``layer_distance`` + ``select_premature``); the
output is the contrast ``F = log q_N - log q_M`` on the plausible head ``V_head`` and ``-inf`` elsewhere
(``dola_contrast``). Everything here is tensor code without host syncs, except ``candidate_layers``, which runs once
when the pipeline is built.

Notation: ``q_j = softmax(l_j)``, ``ls = log_softmax``, V = vocabulary, J = number of candidate layers, R = rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

__all__ = ["candidate_layers", "layer_distance", "select_premature", "dola_contrast", "dola_step"]

_Scalar = float | int | torch.Tensor


def _start_layer(num_layers: int, tied_embeddings: bool) -> int:
    # With tied embeddings an exit at layer 0 (the embedding output) through the LM head is close to the identity map,
    # so transformers skips it: 2 for N > 2, 1 for N == 2, 0 otherwise.
    if not tied_embeddings:
        return 0
    if num_layers > 2:
        return 2
    if num_layers == 2:
        return 1
    return 0


def candidate_layers(
    spec: Literal["low", "high"] | Sequence[int],
    num_layers: int,
    *,
    tied_embeddings: bool,
) -> list[int]:
    r"""The candidate premature layers J (indices into the hidden states; 0 = embedding output, N = final layer).

    With N = ``num_layers`` and ``start`` = 0 (untied), or 2 / 1 / 0 (tied, for N > 2 / N == 2 / N < 2):

    - ``"low"``: ``[start]`` if ``start == N // 2``; else ``range(start, N // 2, 2)`` for N <= 40 and
      ``range(start, 20, 2)`` for N > 40. Recommended for long answers and reasoning.
    - ``"high"``: ``range(N // 2, N, 2)`` for N <= 40 and ``range(N - 20, N, 2)`` for N > 40. Recommended for short
      answers (TruthfulQA).
    - an explicit sequence of ints: returned as a list after validation (non-empty, each in ``[0, N)``).

    :param spec: ``"low"``, ``"high"`` or a non-empty sequence of layer indices (no default here; DoLa-HF has none).
    :param num_layers: N >= 1, the model's ``num_hidden_layers``.
    :param tied_embeddings: the model's ``tie_word_embeddings``.
    :returns: a list of ints, ascending for the buckets.
    :raises ValueError: naming ``layers``, the value and the allowed range, for a bad list, an unknown string, N < 1,
        or an empty bucket (only ``"low"`` with N = 3 and tied embeddings: ``range(2, 1, 2)``).

    Source: transformers 4.55.4 ``GenerationMixin._dola_decoding`` (bucket rules). Deviation: transformers silently
    drops list entries ``>= N``; here they are an error.

    Invariants:
    - the buckets equal transformers' rules for N in 1..80, tied and untied (``test_candidate_layers_buckets``)
    - every returned index is in ``[0, N)`` and even-spaced (``test_candidate_layers_buckets``)
    - a bad spec raises ``ValueError`` naming ``layers`` and the range (``test_candidate_layers_rejects_bad_spec``)
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"`layers`: `num_layers` must be an int >= 1, got {num_layers!r}")
    n = num_layers
    if isinstance(spec, str):
        start = _start_layer(n, tied_embeddings)
        if spec == "low":
            if start == n // 2:
                layers = [start]
            else:
                layers = list(range(start, n // 2, 2)) if n <= 40 else list(range(start, 20, 2))
        elif spec == "high":
            layers = list(range(n // 2, n, 2)) if n <= 40 else list(range(n - 20, n, 2))
        else:
            raise ValueError(f"`layers` must be 'low', 'high' or a list of ints in [0, {n}), got {spec!r}")
        if not layers:
            raise ValueError(
                f"`layers`: the {spec!r} bucket is empty for a {n}-layer model with tied embeddings; "
                f"pass an explicit list of ints in [0, {n})"
            )
        return layers
    if not isinstance(spec, Sequence) or len(spec) == 0:
        raise ValueError(f"`layers` must be 'low', 'high' or a non-empty list of ints in [0, {n}), got {spec!r}")
    for layer in spec:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
            raise ValueError(f"`layers` entries must be ints in [0, {n}), got {layer!r} in {list(spec)!r}")
    return list(spec)


def _kl_to(target: torch.Tensor, log_target: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    # Elementwise target * (log target - log q), with 0 * anything = 0: where the target has no mass (e.g. a token both
    # distributions mask with -inf) the term is 0 instead of 0 * (-inf - -inf) = NaN. Where the target has mass and
    # log_q = -inf the term is +inf, the true KL.
    terms = target * (log_target - log_q)
    return torch.where(target > 0, terms, torch.zeros_like(terms))


def layer_distance(
    final_logits: torch.Tensor,
    premature_logits: torch.Tensor,
    kind: Literal["official", "textbook"] = "official",
) -> torch.Tensor:
    r"""Distance between the final distribution and each candidate layer's distribution (natural log).

    With ``M = (q_N + q_j) / 2``:

    - ``"official"`` (default; DoLa's and transformers' code): ``d_j = (KL(M‖q_N) + KL(M‖q_j)) / (2|V|)`` — reversed KL
      direction and a mean over the vocabulary, as ``F.kl_div(ls(l), M, reduction='none').mean(-1)``. Not bounded by
      ln 2; ``+inf`` when one distribution has mass where the other has a ``-inf`` logit.
    - ``"textbook"``: the Jensen-Shannon divergence ``d_j = KL(q_N‖M)/2 + KL(q_j‖M)/2``, summed over V, in
      ``[0, ln 2]``.

    Terms with zero mass count 0 (``0·log 0 = 0``), so ``-inf`` logits never give NaN as long as every row has a
    finite logit (an all ``-inf`` row has no distribution). Results are clamped at 0 to absorb rounding.

    :param final_logits: ``[..., V]`` logits of the final layer (broadcast against every candidate).
    :param premature_logits: ``[J, ..., V]`` early-exit logits of the J candidates.
    :param kind: ``"official"`` (default) or ``"textbook"``.
    :returns: ``[J, ...]`` new tensor, dtype of the inputs.

    Source: arXiv 2309.03883 eq. 3 (JSD); code: voidism/DoLa @805230e ``dola_greedy_decode`` and transformers 4.55.4
    ``_dola_select_contrast`` (the official variant).

    Invariants:
    - ``"official"`` equals ``F.kl_div``'s formula on finite logits (``test_distance_matches_kl_div_formula``)
    - symmetric in the two distributions (``test_distance_symmetric_nonnegative``)
    - ``>= 0``, and ``>= ‖q_N − q_j‖₁² / 8`` (divided by V for ``"official"``), so 0 only for equal distributions
      (``test_distance_symmetric_nonnegative``)
    - equal distributions (logits equal up to a shift) give ≈ 0 (``test_distance_zero_for_equal``)
    - ``-inf`` logits never give NaN (each row needs one finite logit); a mask shared by both inputs gives a finite
      distance; the textbook variant stays within ``[0, ln 2]``
      (``test_distance_with_neg_inf_no_nan``)
    - compiles with ``fullgraph=True`` (``test_compile_fullgraph``)
    """
    if kind not in ("official", "textbook"):
        raise ValueError(f"`kind` must be 'official' or 'textbook', got {kind!r}")
    ls_n = torch.log_softmax(final_logits.unsqueeze(0), dim=-1)  # [1, ..., V]
    return _distance(ls_n, torch.log_softmax(premature_logits, dim=-1), kind)


def _distance(ls_n: torch.Tensor, ls_j: torch.Tensor, kind: str) -> torch.Tensor:
    """:func:`layer_distance` from the log-probabilities ``[1, ..., V]`` and ``[J, ..., V]``."""
    mix = 0.5 * (ls_n.exp() + ls_j.exp())  # [J, ..., V]
    log_mix = mix.log()  # -inf where both distributions have no mass
    if kind == "official":
        kl_n = _kl_to(mix, log_mix, ls_n).mean(dim=-1)  # [J, ...]
        kl_j = _kl_to(mix, log_mix, ls_j).mean(dim=-1)
    else:
        kl_n = _kl_to(ls_n.exp().expand_as(mix), ls_n, log_mix).sum(dim=-1)
        kl_j = _kl_to(ls_j.exp(), ls_j, log_mix).sum(dim=-1)
    return (0.5 * (kl_n + kl_j)).clamp_min(0.0)  # [J, ...]


def select_premature(
    scores: torch.Tensor,
    *,
    selection: Literal["batch", "row"] = "batch",
    group: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Index of the premature layer M among the J candidates: the argmax of the layer distance.

    - ``"batch"`` (default; official semantics): ``M = argmax_j mean_r scores[j, r]``, one layer for all rows. With
      ``group`` (a ``[R]`` long tensor of group ids in ``[0, R)``), the mean runs over the rows of each group instead,
      so each group (e.g. the parallel samples of one prompt) shares one layer.
    - ``"row"``: ``M_r = argmax_j scores[j, r]``, each row on its own.

    Ties go to the first (lowest-index) candidate, as ``torch.argmax`` does. Gather the premature logits with
    ``premature_logits[index, torch.arange(R)]`` (``[J, R, V]`` -> ``[R, V]``). CFG pairs are the caller's business:
    pass the guided logits, one row per pair.

    :param scores: ``[J, R]`` distances from ``layer_distance`` (finite or ``+inf``).
    :param selection: ``"batch"`` (default) or ``"row"``.
    :param group: ``None`` (default) or ``[R]`` long group ids in ``[0, R)``; only with ``selection="batch"``.
    :returns: ``[R]`` long indices into the candidate axis.

    Source: voidism/DoLa @805230e and transformers 4.55.4 ``_dola_select_contrast`` (``js.mean(-1)`` over the batch,
    then argmax); ``"row"`` and ``group`` are extensions.

    Invariants:
    - ``"batch"`` gives every row the same index, the argmax of the row mean (``test_select_batch_shared``)
    - ``"row"`` rows are independent: each row's index depends only on its own column (``test_select_row_independent``)
    - ties go to the first candidate (``test_select_ties_first``)
    - ``group`` = all zeros equals ``"batch"``; ``group`` = ``arange(R)`` equals ``"row"``
      (``test_select_group_extremes``)
    - compiles with ``fullgraph=True`` (``test_compile_fullgraph``)
    """
    num_rows = scores.shape[-1]
    if selection == "row":
        if group is not None:
            raise ValueError("`group` only applies to selection='batch' (rows of a group share one layer)")
        return scores.argmax(dim=0)  # [R]
    if selection != "batch":
        raise ValueError(f"`selection` must be 'batch' or 'row', got {selection!r}")
    if group is None:
        best = scores.mean(dim=-1).argmax(dim=0)  # [] one layer for the whole batch
        return best.expand(num_rows).contiguous()  # [R]
    # Per-group mean without data-dependent shapes: at most R groups, ids index a [J, R] accumulator.
    gid = group.to(device=scores.device, dtype=torch.long).unsqueeze(0).expand_as(scores)  # [J, R]
    sums = torch.zeros_like(scores).scatter_add(1, gid, scores)  # [J, R(groups)]
    counts = torch.zeros_like(scores[:1]).scatter_add(1, gid[:1], torch.ones_like(scores[:1]))  # [1, R(groups)]
    means = sums / counts.clamp_min(1.0)  # empty groups: 0, never read below
    best = means.argmax(dim=0)  # [R(groups)]
    return best.gather(0, gid[0])  # [R]


def _plausible(log_probs: torch.Tensor, alpha: _Scalar, min_tokens_to_keep: int,
               top: torch.Tensor | None = None) -> torch.Tensor:
    # V_head as DoLa's relative_top_filter builds it, in the log domain:
    # keep x iff ls(x) >= min(k-th largest ls, max ls + log α); -inf entries are never kept. `top`: the row max
    # [R, 1] when the caller has it.
    if isinstance(alpha, torch.Tensor):
        log_alpha = alpha.to(dtype=log_probs.dtype, device=log_probs.device).log()  # log 0 = -inf keeps all
    else:
        log_alpha = math.log(alpha) if alpha > 0 else -math.inf
    k = min(min_tokens_to_keep, log_probs.shape[-1])
    top = log_probs.amax(dim=-1, keepdim=True) if top is None else top  # [R, 1]
    # k = 1 (the default) is the max itself: topk's kernel costs ~65 µs a step on an H200, the max ~3 µs
    kth = top if k == 1 else torch.topk(log_probs, k, dim=-1).values[..., -1:]  # [R, 1]
    threshold = torch.minimum(kth, top + log_alpha)  # [R, 1]
    return (log_probs >= threshold) & (log_probs > -math.inf)  # [R, V]


def dola_contrast(
    final_logits: torch.Tensor,
    premature_logits: torch.Tensor,
    *,
    alpha: _Scalar = 0.1,
    min_tokens_to_keep: int = 1,
) -> torch.Tensor:
    r"""The DoLa contrast with the adaptive plausibility constraint (APC).

    ``V_head = {x : q_N(x) >= α · max_w q_N(w)}``, computed as ``ls_N(x) >= min(k-th largest ls_N, max ls_N + log α)``
    with k = ``min_tokens_to_keep`` (so at least k finite tokens survive);
    ``F(x) = ls(l_N)(x) − ls(l_M)(x)`` for x in ``V_head``, ``−inf`` elsewhere. Not renormalised (irrelevant for
    argmax and softmax). A premature ``-inf`` inside ``V_head`` is clamped to the dtype's lowest finite value, so
    ``F`` stays finite there (the token wins) instead of ``+inf`` (which would make softmax NaN).

    :param final_logits: ``[R, V]`` final-layer logits ``l_N`` (after CFG, for image tokens).
    :param premature_logits: ``[R, V]`` logits of the selected premature layer ``l_M``.
    :param alpha: ``α`` in ``[0, 1]`` (default 0.1, as the paper and both reference codes); 0 keeps every finite token,
        1 keeps only the argmax (and its ties). A float or a tensor broadcastable against ``[R, 1]``.
    :param min_tokens_to_keep: int ``>= 1`` (default 1).
    :returns: ``[R, V]`` new tensor, dtype of ``final_logits``.

    Source: arXiv 2309.03883 eqs. 5-6; voidism/DoLa @805230e ``relative_top_filter`` (threshold, strict ``<`` removes)
    and ``dola_greedy_decode``. DoLa-HF hard-wires α = 0.1; here it is a parameter.

    Invariants:
    - adding a per-row constant to either input leaves F unchanged (``test_contrast_shift_invariant``)
    - the argmax of ``q_N`` is in ``V_head``, and so is the greedy token ``argmax F``
      (``test_contrast_head_contains_argmax``)
    - ``V_head`` shrinks as α grows (``test_contrast_head_shrinks_with_alpha``)
    - exactly ``|V| − |V_head|`` entries are ``−inf`` for finite inputs, and ``|V_head| >= min_tokens_to_keep``
      (``test_contrast_neg_inf_count``)
    - α = 0 keeps every finite token; ``-inf`` final logits stay ``-inf`` (``test_contrast_alpha_zero_keeps_finite``)
    - uniform premature and α = 0 give ``softmax(F) == softmax(l_N)`` (``test_contrast_uniform_premature_is_baseline``)
    - premature == final gives ``softmax(F)`` uniform over ``V_head`` (``test_contrast_same_layer_uniform_on_head``)
    - matches a transcription of the official ``relative_top_filter`` path (``test_contrast_matches_official``)
    - rows independent, shape/dtype kept, inputs unchanged (``test_contrast_rows_independent``)
    - compiles with ``fullgraph=True`` (``test_compile_fullgraph``)
    """
    if isinstance(min_tokens_to_keep, bool) or not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
        raise ValueError(f"`min_tokens_to_keep` must be an int >= 1, got {min_tokens_to_keep!r}")
    if not isinstance(alpha, torch.Tensor) and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha!r}")
    ls_final = torch.log_softmax(final_logits, dim=-1)  # [R, V]
    ls_premature = torch.log_softmax(premature_logits.to(ls_final.dtype), dim=-1)  # [R, V]
    return _contrast(ls_final, ls_premature, alpha, min_tokens_to_keep)


def _contrast(ls_final: torch.Tensor, ls_premature: torch.Tensor, alpha: _Scalar,
              min_tokens_to_keep: int, top: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`dola_contrast` from the log-probabilities ``[R, V]`` of the final and the premature layer."""
    ls_premature = ls_premature.clamp_min(torch.finfo(ls_final.dtype).min)
    head = _plausible(ls_final, alpha, min_tokens_to_keep, top)  # [R, V] bool
    contrast = ls_final - ls_premature
    return torch.where(head, contrast, torch.full_like(contrast, -math.inf))  # [R, V]


def dola_step(
    final_logits: torch.Tensor,
    premature_logits: torch.Tensor,
    *,
    alpha: _Scalar = 0.1,
    distance: Literal["official", "textbook"] = "official",
    selection: Literal["batch", "row"] = "batch",
    min_tokens_to_keep: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One DoLa step from the candidates' logits: pick each row's premature layer, then contrast against it.

    ``M = select_premature(layer_distance(l_N, l_j))`` (index 0 when there is one candidate: no distance to compute),
    ``F = dola_contrast(l_N, l_M)``, in fp32. One function so that a compiling loop can fuse the whole per-step math
    (``state.compiled``).

    :param final_logits: ``[R, V]`` final logits (guided, for image tokens).
    :param premature_logits: ``[J, R, V]`` the candidates' logits (guided alike).
    :returns: ``F`` ``[R, V]`` in ``final_logits``' dtype, and the chosen candidate index ``[R]``.

    Invariants:
    - equals ``layer_distance`` → ``select_premature`` → gather → ``dola_contrast`` composed by hand, and index 0 with
      one candidate (``test_step_is_the_composition``)
    - compiles with ``fullgraph=True`` (``test_compile_fullgraph``)
    """
    if distance not in ("official", "textbook"):
        raise ValueError(f"`distance` must be 'official' or 'textbook', got {distance!r}")
    if isinstance(min_tokens_to_keep, bool) or not isinstance(min_tokens_to_keep, int) or min_tokens_to_keep < 1:
        raise ValueError(f"`min_tokens_to_keep` must be an int >= 1, got {min_tokens_to_keep!r}")
    if not isinstance(alpha, torch.Tensor) and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha!r}")
    rows, final = final_logits.shape[0], final_logits.float()
    # One log-softmax over the final and the candidates' rows (a row's result does not depend on the others), shared
    # by the distance and the contrast. The head's threshold needs max ls_final: log-softmax is x ↦ x − c per row,
    # monotone in fp32 too, so that max is ls_final at the argmax of the logits — a reduction over the raw input,
    # which a compiler fuses into the log-softmax's own pass instead of a pass of its own over ls_final.
    ls = torch.log_softmax(torch.cat([final[None], premature_logits.float()]), dim=-1)  # [1 + J, R, V]
    ls_final, ls_early = ls[0], ls[1:]
    top = ls_final.gather(-1, final.argmax(dim=-1, keepdim=True))  # [R, 1] = ls_final.amax(-1), exactly
    if ls_early.shape[0] == 1:
        index = torch.zeros(rows, dtype=torch.long, device=ls_final.device)
    else:
        index = select_premature(_distance(ls_final[None], ls_early, distance), selection=selection)  # [R]
    ls_premature = ls_early[index, torch.arange(rows, device=ls_final.device)]  # [R, V]
    contrast = _contrast(ls_final, ls_premature, alpha, min_tokens_to_keep, top)
    return contrast.to(final_logits.dtype), index
