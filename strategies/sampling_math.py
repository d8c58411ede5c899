"""Pure math of the sampling warpers: temperature, top-k and top-p.

Each function maps logits to a NEW tensor of the same shape and dtype and never modifies its arguments. None of them
syncs with the host (no ``.item()``, no boolean-mask indexing, no data-dependent shapes), so they can be captured in a
CUDA graph and compiled with ``torch.compile(fullgraph=True)``.

Numeric parameters that may change between steps (``temperature``, ``top_p``) are a Python number or a tensor that
broadcasts against the logits (0-d, or ``[B, 1]`` for one value per row). Python numbers are range-checked here; tensors
are not (checking them would sync), so the plugin wrapper validates them once, at build time.
"""

from __future__ import annotations

import math

import torch

__all__ = ["apply_temperature", "top_k_filter", "top_p_filter"]

_Scalar = float | int | torch.Tensor


def _as_operand(value: _Scalar, like: torch.Tensor) -> _Scalar:
    # Python numbers stay Python numbers (bitwise the arithmetic transformers does); tensors are cast to the
    # logits' dtype/device so a float64 parameter never promotes float32 logits.
    if isinstance(value, torch.Tensor):
        return value.to(dtype=like.dtype, device=like.device)
    return value


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}")


def apply_temperature(logits: torch.Tensor, temperature: _Scalar) -> torch.Tensor:
    r"""Divide the logits by a temperature: ``l' = l / T``.

    :param logits: ``[..., V]`` scores of any float dtype; ``-inf`` entries stay ``-inf``.
    :param temperature: ``T > 0`` (no default here; the loop's default is 1.0, which is the identity). A float or a
        tensor broadcastable against ``logits`` (``[B, 1]`` for one temperature per row). ``T -> 0`` approaches greedy;
        use greedy decoding instead of ``T = 0``.
    :returns: ``[..., V]`` new tensor, same dtype.

    Source: transformers 5.24 ``TemperatureLogitsWarper.__call__`` (``scores / temperature``).

    Invariants:
    - equals transformers' ``TemperatureLogitsWarper`` bit for bit (``test_temperature_matches_transformers``)
    - ``-inf`` stays ``-inf``, shape and dtype kept, input unchanged (``test_temperature_keeps_masks_shape_dtype``)
    - a ``[B, 1]`` tensor temperature acts on each row alone (``test_temperature_per_row_tensor``)
    - compiles with ``fullgraph=True`` (``test_compile_fullgraph``)
    """
    if not isinstance(temperature, torch.Tensor) and not temperature > 0:
        hint = " For greedy decoding use argmax instead of temperature 0." if temperature == 0 else ""
        raise ValueError(f"`temperature` must be > 0, got {temperature!r}.{hint}")
    return logits / _as_operand(temperature, logits)  # [..., V]


def top_k_filter(
    logits: torch.Tensor,
    top_k: int,
    *,
    min_tokens_to_keep: int = 1,
    filter_value: float = -math.inf,
) -> torch.Tensor:
    r"""Keep the ``k = min(max(top_k, min_tokens_to_keep), V)`` largest logits of each row; set the rest to
    ``filter_value``.

    ``l'(x) = l(x)`` if ``l(x) >= l_(k)`` (the k-th largest value of the row), else ``filter_value``. Ties with the
    k-th value are all kept, so a row may keep more than k tokens.

    :param logits: ``[..., V]`` scores.
    :param top_k: int ``>= 1``; values above V keep everything.
    :param min_tokens_to_keep: int ``>= 1`` (default 1); raises the effective k.
    :param filter_value: value written to removed entries (default ``-inf``). A finite value is also written over
        ``-inf`` entries below the cut, as transformers does.
    :returns: ``[..., V]`` new tensor, same dtype.

    Source: transformers 5.24 ``TopKLogitsWarper`` (``max(top_k, min_tokens_to_keep)``, capped at V, strict ``<``).

    Invariants:
    - equals transformers' ``TopKLogitsWarper`` exactly, ties and ``-inf`` included
      (``test_top_k_matches_transformers``)
    - at least ``min(k, #finite)`` finite entries survive, each ``>=`` every removed one; ``-inf`` is never
      reopened with the default ``filter_value`` (``test_top_k_keeps_at_least_k``)
    - rows are independent, input unchanged (``test_top_k_rows_independent``)
    - compiles with ``fullgraph=True`` (``test_compile_fullgraph``)
    """
    _check_int("top_k", top_k, 1)
    _check_int("min_tokens_to_keep", min_tokens_to_keep, 1)
    k = min(max(top_k, min_tokens_to_keep), logits.shape[-1])  # static: a Python int
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # [..., 1]
    return logits.masked_fill(logits < kth, filter_value)  # [..., V]


def top_p_filter(
    logits: torch.Tensor,
    top_p: _Scalar,
    *,
    min_tokens_to_keep: int = 1,
    filter_value: float = -math.inf,
) -> torch.Tensor:
    r"""Nucleus filter: keep the smallest set of most probable tokens whose probability adds up to at least ``top_p``.

    Sort ascending, ``c_i = sum_{j <= i} softmax(l)_(j)``; remove sorted position i when ``c_i <= 1 - top_p``,
    except the ``min_tokens_to_keep`` largest. Removed entries become ``filter_value``.

    :param logits: ``[B, V]`` scores.
    :param top_p: in ``[0, 1]``; 1.0 keeps every token, 0.0 keeps only ``min_tokens_to_keep`` (plus nothing else).
        A float or a tensor broadcastable against ``[B, V]`` (``[B, 1]`` per row).
    :param min_tokens_to_keep: int ``>= 1`` (default 1).
    :param filter_value: value written to removed entries (default ``-inf``). A finite value is also written over
        ``-inf`` entries outside the nucleus, as transformers does.
    :returns: ``[B, V]`` new tensor, same dtype.

    Source: transformers 5.24 ``TopPLogitsWarper.__call__`` (the same sort, cumulative sum and comparison, so ties
    are broken identically on the same device).

    Invariants:
    - equals transformers' ``TopPLogitsWarper`` exactly, ties and ``-inf`` included
      (``test_top_p_matches_transformers``)
    - the kept mass is ``>= top_p`` and a maximal logit always survives (``test_top_p_keeps_mass_and_argmax``)
    - ``-inf`` never reopened, rows independent, input unchanged (``test_top_p_rows_independent``)
    - a ``[B, 1]`` tensor ``top_p`` equals the per-row float result (``test_top_p_per_row_tensor``)
    - compiles with ``fullgraph=True`` (``test_compile_fullgraph``)
    """
    _check_int("min_tokens_to_keep", min_tokens_to_keep, 1)
    if not isinstance(top_p, torch.Tensor) and not 0.0 <= top_p <= 1.0:
        raise ValueError(f"`top_p` must be in [0, 1], got {top_p!r}")
    vocab = logits.shape[-1]
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)  # [B, V] ascending
    cum_probs = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [B, V]
    remove_sorted = cum_probs <= (1 - _as_operand(top_p, logits))  # [B, V]
    # The last min_tokens_to_keep sorted positions (the largest logits) are never removed; an out-of-place mask
    # instead of transformers' in-place slice assignment, same result.
    protected = torch.arange(vocab, device=logits.device) >= vocab - min_tokens_to_keep  # [V]
    remove_sorted = remove_sorted & ~protected
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)  # [B, V] back to vocabulary order
    return logits.masked_fill(remove, filter_value)
