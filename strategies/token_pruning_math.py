"""Pure math of vision-token pruning inside the language model's prefill (FastV and its ablation baselines).

FastV (Chen et al., ECCV 2024, arXiv 2403.06764): entering decoder layer k, score every image position by the
attention that the last prompt position paid it in layer k−1, averaged over heads, keep the top
``ceil(keep_ratio · n_image)`` image positions and every text position, in their original order, with their original
position ids. Baselines rank by seeded random scores (``random``) or by an even stride over the image positions
(``uniform``). FLOPs follow FastV's per-layer model ``4nd² + 2n²d + 2ndm`` (n tokens, hidden d, MLP width m).

Everything here maps tensors and plain numbers to new tensors or numbers; nothing is modified in place, nothing
imports the model. Shapes: ``B`` rows, ``T`` prompt positions, ``heads`` attention heads.
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

__all__ = ["keep_count", "fastv_scores", "uniform_scores", "random_scores", "select_positions", "layer_flops",
           "prefill_flops", "flops_saved"]


def keep_count(n_image: int, keep_ratio: float) -> int:
    """How many image positions survive: ``ceil(keep_ratio · n_image)``, with ``keep_ratio`` read as the decimal
    it prints as (Python's shortest round-trip ``repr``), multiplied exactly.

    :param n_image: image positions per row, ≥ 0.
    :param keep_ratio: in (0, 1]; default 0.5 in the strategy.
    :returns: an int in ``[min(1, n_image), n_image]``.

    Exact decimal arithmetic pins the rounding: ``0.3 · 10`` keeps 3 and ``0.1 · 10`` keeps 1, where the float product
    (``3.0000000000000004``) or the float's exact binary value (``0.1000000000000000055…``) would round up to 4 or 2.
    Source: FastV keeps ``(1 − R)·N`` (R the drop ratio) without pinning the rounding; we round the kept count up so
    that a positive ratio never keeps zero tokens.

    Invariants:
    - ``keep_ratio = 1`` keeps every image position; any ratio in (0, 1] keeps at least one of n ≥ 1
      (``test_keep_count_bounds``)
    - monotone in ``keep_ratio``, and exact for decimal ratios ``p/1000`` (``test_keep_count_exact``)
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"`keep_ratio` must be in (0, 1], got {keep_ratio!r}")
    if n_image < 0:
        raise ValueError(f"`n_image` must be >= 0, got {n_image!r}")
    return math.ceil(Fraction(repr(float(keep_ratio))) * n_image)


def fastv_scores(attention: torch.Tensor) -> torch.Tensor:
    """FastV's ranking score: softmax attention ``[B, heads, T]`` of the last position, averaged over heads → ``[B, T]``.

    Invariants:
    - the result is the head mean and sums to 1 per row when every head's row does (``test_fastv_scores_mean``)
    """
    return attention.float().mean(dim=1)


def uniform_scores(image_mask: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Scores ``[B, T]`` that make the top ``n_keep`` image positions an even stride over them (the grid order).

    Image position of rank ``r`` (0-based, in prompt order) is chosen iff ``r = floor(j · n_image / n_keep)`` for some
    ``j`` in ``[0, n_keep)``; chosen positions score 1, all others 0.

    Invariants:
    - exactly ``n_keep`` image positions score 1 and they are evenly spaced (``test_uniform_scores_stride``)
    """
    if n_keep == 0:
        return torch.zeros(image_mask.shape, dtype=torch.float32, device=image_mask.device)
    rank = image_mask.long().cumsum(-1) - 1  # [B, T] rank r among image positions
    n_image = image_mask.long().sum(-1, keepdim=True).clamp_min(1)  # [B, 1]
    # The smallest j with j·n/k ≥ r is ceil(r·k/n); r is on the stride iff that j also gives floor(j·n/k) = r.
    j = (rank * n_keep + n_image - 1) // n_image
    on_stride = (j * n_image) // n_keep == rank
    return (on_stride & (j < n_keep) & image_mask).float()


def random_scores(shape: tuple[int, int], seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Seeded uniform scores ``[B, T]`` (drawn on the CPU so a seed gives the same choice on every device).

    Invariants:
    - the same seed gives the same scores; a different seed, different ones (``test_random_scores_seeded``)
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.rand(shape, generator=generator).to(device)


def select_positions(scores: torch.Tensor, image_mask: torch.Tensor, n_keep: int) -> torch.Tensor:
    """The kept positions ``[B, T − n_image + n_keep]``, sorted per row: every text position plus the ``n_keep``
    image positions of highest score (ties broken towards the earlier position).

    :param scores: ``[B, T]`` float; only image positions' scores matter.
    :param image_mask: ``[B, T]`` bool, the same number of image positions ``n_image`` in every row.
    :param n_keep: in ``[0, n_image]``.

    No host sync: the kept count is known from the arguments' shapes and ``n_keep``.

    Invariants:
    - the count is exact and the result sorted (``test_select_positions_properties``)
    - every text position is kept, in order (``test_select_positions_properties``)
    - every kept image position scores ≥ every dropped one (``test_select_positions_properties``)
    - inputs are not modified (``test_select_positions_properties``)
    """
    b, t = scores.shape
    n_image = int(image_mask[0].sum()) if b else 0  # host count at setup time (prefill only), not per token
    index = torch.arange(t, device=scores.device).expand(b, t)
    # Order image positions by descending score, then by position; stable sort keeps that order among ties.
    key = torch.where(image_mask, -scores.float(), torch.full_like(scores, math.inf, dtype=torch.float32))
    order = torch.sort(key, dim=-1, stable=True).indices  # [B, T]: image positions first, best first
    chosen = torch.zeros_like(image_mask)
    chosen.scatter_(1, order[:, :n_keep], True)
    keep = ~image_mask | (chosen & image_mask)
    # Kept positions first (in position order), then the dropped ones; cut to the kept count.
    packed = torch.where(keep, index, index + t)
    kept = torch.sort(packed, dim=-1).values[:, : t - n_image + n_keep]
    return kept


def layer_flops(n: int, d: int, m: int) -> int:
    """FastV's FLOPs of one decoder layer over ``n`` tokens: ``4nd² + 2n²d + 2ndm`` (projections, attention, MLP).

    Invariants:
    - equals the formula and is strictly increasing in n (``test_flops_model``)
    """
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def prefill_flops(n: int, d: int, m: int, num_layers: int, layer: int | None = None, n_kept: int | None = None) -> int:
    """Counted prefill FLOPs: ``layer`` layers over ``n`` tokens, the other ``num_layers − layer`` over ``n_kept``.

    ``layer=None`` (no pruning): every layer over ``n``. FastV's ratio is
    ``[K·f(n) + (N−K)·f(n̂)] / [N·f(n)]`` with ``f`` = :func:`layer_flops`.

    Invariants:
    - no pruning and ``n_kept = n`` give the same count (``test_flops_model``)
    """
    if layer is None or n_kept is None:
        return num_layers * layer_flops(n, d, m)
    return layer * layer_flops(n, d, m) + (num_layers - layer) * layer_flops(n_kept, d, m)


def flops_saved(n: int, d: int, m: int, num_layers: int, layer: int, n_kept: int) -> float:
    """The fraction of counted prefill FLOPs that pruning at ``layer`` down to ``n_kept`` tokens saves, in [0, 1).

    Invariants:
    - 0 when nothing is pruned; grows as ``n_kept`` shrinks or ``layer`` moves earlier (``test_flops_model``)
    """
    full = prefill_flops(n, d, m, num_layers)
    return 1.0 - prefill_flops(n, d, m, num_layers, layer, n_kept) / full
