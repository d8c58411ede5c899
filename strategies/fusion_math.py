"""Pure math of visual-prior fusion: ``F_joint(x) = F_L(x) + λ · r_V(x)``.

A set of P candidate phrases is scored against the image (e.g. SigLIP similarities, computed elsewhere); the scores
become a phrase prior ``ρ`` (``phrase_prior``), which is spread onto the vocabulary through each phrase's first token
(``token_prior``) and added to the language-side scores with a weight λ (``fuse``); ``cosine_scores`` is the built-in
``aligned`` scorer's similarity. Run the fusion after any masking strategy
(DoLa's APC, top-k): ``-inf`` entries stay ``-inf``, so masked tokens are never re-admitted.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["phrase_prior", "token_prior", "fuse", "cosine_scores"]

_Scalar = float | int | torch.Tensor


def phrase_prior(
    scores: torch.Tensor,
    *,
    temperature: _Scalar = 1.0,
    kind: Literal["centered", "logprob"] = "centered",
) -> torch.Tensor:
    r"""Phrase prior ``ρ = log_softmax(s / τ)`` over the P candidates; ``"centered"`` subtracts its mean.

    - ``"centered"`` (default): ``ρ_k = log_softmax(s/τ)_k − mean_i log_softmax(s/τ)_i`` — relative, sums to 0, so
      better-than-average phrases are boosted and worse ones penalised.
    - ``"logprob"``: ``ρ_k = log_softmax(s/τ)_k <= 0`` — every candidate token is penalised, the best ones least.

    Both are invariant to adding a constant to all scores.

    :param scores: ``[P]`` (or ``[..., P]``) finite image-phrase scores, P >= 1.
    :param temperature: ``τ > 0`` (default 1.0); a float or a 0-d / broadcastable tensor. Smaller τ sharpens the prior.
    :param kind: ``"centered"`` (default) or ``"logprob"``.
    :returns: ``[P]`` new tensor, dtype of ``scores``.

    Source: design note ``shared/reference/strategies.md`` §2.3 (items 2 and 5); CLIP-guided decoding (Deng et al.,
    arXiv 2402.15300) scores phrases with SigLIP but reranks sentences instead of biasing tokens.

    Invariants:
    - a constant added to all phrase scores changes nothing (``test_phrase_prior_shift_invariant``)
    - the centred prior sums to 0; the logprob prior is ``<= 0`` with ``logsumexp`` 0
      (``test_phrase_prior_centered_sums_to_zero``)
    - the order of ρ follows the order of the scores (``test_phrase_prior_monotone``)
    - compiles with ``fullgraph=True`` (``test_compile_fullgraph``)
    """
    if kind not in ("centered", "logprob"):
        raise ValueError(f"`kind` must be 'centered' or 'logprob', got {kind!r}")
    if isinstance(temperature, torch.Tensor):
        tau: _Scalar = temperature.to(dtype=scores.dtype, device=scores.device)
    elif not temperature > 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature!r}")
    else:
        tau = temperature
    rho = torch.log_softmax(scores / tau, dim=-1)  # [P]
    if kind == "centered":
        rho = rho - rho.mean(dim=-1, keepdim=True)
    return rho


def token_prior(prior: torch.Tensor, first_token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    r"""Spread a phrase prior onto the vocabulary through each phrase's first token.

    ``r_V(x) = max {ρ_k : T(c_k) = x}`` for x in the image of T (the first-token map), ``r_V(x) = 0`` otherwise. The
    max means a token shared by several phrases is never pushed below its best phrase.

    :param prior: ``[P]`` phrase prior from ``phrase_prior``, or ``[R, P]``: one prior per row (e.g. per image).
    :param first_token_ids: ``[P]`` (or ``[R, P]``) long first token id of each phrase. Ids outside
        ``[0, vocab_size)`` are ignored, so a fixed-size phrase buffer can be padded with ``-1``.
    :param vocab_size: V >= 1, a Python int.
    :returns: ``[V]`` (or ``[R, V]``) new tensor, dtype of ``prior``.

    Source: ``shared/reference/strategies.md`` §2.3 item 3.

    Invariants:
    - a token shared by several phrases takes the best (max) phrase's prior
      (``test_token_prior_shared_first_token_takes_max``)
    - tokens no phrase starts with, and padding ids, get exactly 0 (``test_token_prior_zero_off_image``)
    - invariant to permuting or duplicating the phrases (``test_token_prior_permutation_invariant``)
    - each row of a ``[R, P]`` prior gives that row's ``[V]`` table (``test_token_prior_batched_rows``)
    - compiles with ``fullgraph=True`` (``test_compile_fullgraph``)
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"`vocab_size` must be an int >= 1, got {vocab_size!r}")
    ids = first_token_ids.to(device=prior.device, dtype=torch.long).expand(prior.shape)  # [..., P]
    in_range = (ids >= 0) & (ids < vocab_size)
    ids = torch.where(in_range, ids, torch.full_like(ids, vocab_size))  # out of range -> dummy slot V
    table = torch.zeros((*prior.shape[:-1], vocab_size + 1), dtype=prior.dtype, device=prior.device)  # [..., V + 1]
    # include_self=False: a token's value is the max over its phrases only, not max(0, ...).
    table = table.scatter_reduce(-1, ids, prior, reduce="amax", include_self=False)
    return table[..., :vocab_size]  # [..., V]


def fuse(logits: torch.Tensor, token_prior: torch.Tensor, weight: _Scalar) -> torch.Tensor:
    r"""Add the weighted visual prior: ``F_joint = F_L + λ · r_V``.

    :param logits: ``[R, V]`` language-side scores ``F_L`` (raw logits, or DoLa's contrast with ``-inf`` outside
        the head).
    :param token_prior: ``[V]`` (shared by all rows) or ``[R, V]`` finite prior ``r_V`` from ``token_prior``.
    :param weight: ``λ >= 0`` (no default here; 0 is the identity). A float or a tensor broadcastable against
        ``[R, 1]``. Negative values are allowed mathematically (they invert the prior) but not validated here.
    :returns: ``[R, V]`` new tensor, dtype of ``logits``.

    Source: ``shared/reference/strategies.md`` §2.3 item 4.

    Invariants:
    - λ = 0 is the identity (``test_fuse_zero_weight_identity``)
    - ``-inf`` stays ``-inf`` (``test_fuse_keeps_neg_inf``)
    - only tokens in the image of the first-token map change (``test_fuse_changes_only_image_tokens``)
    - rows are independent; ``[V]`` prior equals the same prior repeated as ``[R, V]`` (``test_fuse_rows_independent``)
    - compiles with ``fullgraph=True`` (``test_compile_fullgraph``)
    """
    prior = token_prior.to(dtype=logits.dtype, device=logits.device)  # [V] or [R, V]
    lam = weight.to(dtype=logits.dtype, device=logits.device) if isinstance(weight, torch.Tensor) else weight
    return logits + lam * prior  # [R, V]


def cosine_scores(image_features: torch.Tensor, phrase_tokens: torch.Tensor,
                  phrase_mask: torch.Tensor) -> torch.Tensor:
    r"""The ``aligned`` scorer's similarity: ``s_k = cos(mean_i v_i, mean_j e_kj)``.

    The image side is the mean of its feature vectors (every token of every image of one row, already in the
    language model's embedding space); each phrase is the mean of its token embeddings. An unvalidated heuristic:
    Janus's aligner is trained to feed image features to the LLM, not to place them near the words that name them.

    :param image_features: ``[N, H]`` finite image feature vectors (N >= 1).
    :param phrase_tokens: ``[K, L, H]`` token embeddings of K phrases, padded to L.
    :param phrase_mask: ``[K, L]`` bool, True on real tokens; every phrase has at least one.
    :returns: ``[K]`` scores in ``[-1, 1]``, dtype of ``image_features``.

    Source: ``shared/reference/strategies.md`` §2.3 item 1 (plain cosine, as CLIP-guided decoding scores phrases).

    Invariants:
    - scores lie in ``[-1, 1]`` and do not change when the image features or a phrase's embeddings are scaled by a
      positive number (``test_cosine_scores_scale_invariant``)
    - padding tokens change nothing; permuting the phrases permutes the scores
      (``test_cosine_scores_ignores_padding``)
    """
    image = image_features.mean(dim=0)  # [H]
    mask = phrase_mask.to(phrase_tokens.dtype)[..., None]  # [K, L, 1]
    phrases = (phrase_tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)  # [K, H]
    phrases = phrases.to(image.dtype)
    return torch.nn.functional.cosine_similarity(phrases, image[None], dim=-1)  # [K]
