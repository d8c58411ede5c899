"""Pure math of latent control: watch image generation drift from the prompt, steer it through the KV cache.

Per image (per CFG pair; only the conditional row is watched) and per step t, with the hidden states of the last
``window`` generated image tokens at one layer:

- **condenser** (training-free form): ``memory_tokens`` chunk means of the window and the window mean ``m``
  (``pool_window``);
- **similarity** ``s_t = cos(m, p)``, p = the prompt's hidden states at the same layer, mean-pooled (``cosine``);
  ``Var(s)`` over the last ``window`` values of s (``window_variance``); ``u_t`` = entropy in nats of the distribution
  actually sampled (``core.sampling.entropy_nats``);
- **trigger**: ``(Δs_t < −tau_drop and Var(s) > tau_var) or (u_t > tau_entropy and s_t < tau_sim)``, at most
  ``max_injections`` per image and at least ``cooldown`` steps between two firing steps (``trigger``);
- **translator** (training-free): the prompt direction scaled by a gate bounded by ``max_scale`` (``translate``);
- **shaper** (training-free): the prompt's own pooled embedding, moved along the control vector and repeated
  ``control_tokens`` times (prompt re-anchoring, ``shape_tokens``).

The learned counterparts of the condenser, translator and shaper live in ``strategies/latent_control_modules.py``.
Nothing here syncs with the host; every function returns new tensors and leaves its arguments untouched.

Notation: P = images (CFG pairs), W = window, M = memory tokens, K = control tokens, H = hidden size.
Source: the issue's design (a seed research script; no paper); the trigger's two clauses are a sudden similarity drop
in an unstable stretch, or an uncertain step while far from the prompt.
"""

from __future__ import annotations

import torch

__all__ = ["pool_window", "cosine", "window_variance", "trigger", "translate", "shape_tokens", "masked_mean",
           "left_pad", "slide"]

_Scalar = float | int | torch.Tensor
# Norm floor for cosines and unit vectors: below it a vector counts as zero (cos = 0, direction = 0).
_EPS = 1e-8


def masked_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` ``[P, T, H]`` over the positions where ``valid`` ``[P, T]`` is true → ``[P, H]`` (0 if none).

    Invariants:
    - invalid positions never matter and an all-valid mask is the plain mean (``test_masked_mean_ignores_invalid``)
    """
    w = valid.to(x.dtype)[..., None]  # [P, T, 1]
    return (x * w).sum(1) / w.sum(1).clamp_min(1.0)


def left_pad(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``[T_i, H]`` rows of different lengths into ``[P, T, H]`` (T = max T_i), each at the end, and the
    ``[P, T]`` mask of real positions (the prompts' embeddings, left-padded as the model's prompts are).

    Invariants:
    - row i's last T_i positions are row i, marked valid; everything before is zero and invalid
      (``test_left_pad_places_rows_at_the_end``)
    """
    length = max(r.shape[0] for r in rows)
    padded = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])  # [P, T, H]
    valid = torch.zeros(len(rows), length, dtype=torch.bool, device=rows[0].device)  # [P, T]
    for i, r in enumerate(rows):
        padded[i, length - r.shape[0]:] = r
        valid[i, length - r.shape[0]:] = True
    return padded, valid


def slide(buffer: torch.Tensor, newest: torch.Tensor) -> torch.Tensor:
    """A window ``[P, W, …]`` (oldest first) moved on by one: drop slot 0, append ``newest`` ``[P, …]``.

    Invariants:
    - the result is ``buffer[:, 1:]`` then ``newest``, and the buffer is not modified (``test_slide_drops_the_oldest``)
    """
    return torch.cat([buffer[:, 1:], newest[:, None]], 1)


def pool_window(window: torch.Tensor, count: torch.Tensor | int, memory_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Training-free condenser: mean pooling of the window into memory tokens.

    ``window`` ``[P, W, H]`` holds the last hidden states oldest first; only its last ``n = min(count, W)`` slots are
    filled. The filled slots, in order, are cut into ``memory_tokens`` = M contiguous chunks (slot i of the n goes to
    chunk ``floor(i·M/n)``); memory token j is the mean of chunk j, or ``m`` when the chunk is empty (n < M).
    ``m`` is the mean of the n filled slots (the mean of the memory tokens when M divides n).

    :param window: ``[P, W, H]`` float.
    :param count: hidden states seen so far (≥ 0; an int or a 0-d / ``[P]`` long tensor).
    :param memory_tokens: M ≥ 1.
    :returns: (memory ``[P, M, H]``, m ``[P, H]``); zeros when nothing was seen.

    Invariants:
    - a constant window gives M copies of the constant and m = the constant (``test_pool_window_constant``)
    - unfilled slots never matter; m is the mean of the filled ones (``test_pool_window_ignores_unfilled``)
    - M = 1 gives the single memory token m (``test_pool_window_single_token``)
    - rows are independent and the input is not modified (``test_pool_window_rows_independent``)
    """
    p, w, _ = window.shape
    device = window.device
    n = torch.as_tensor(count, device=device).clamp(0, w).expand(p)  # [P]
    slot = torch.arange(w, device=device)[None]  # [1, W]
    index = slot - (w - n[:, None])  # [P, W]: position among the filled slots, < 0 if unfilled
    filled = index >= 0
    chunk = torch.div(index.clamp_min(0) * memory_tokens, n.clamp_min(1)[:, None], rounding_mode="floor")  # [P, W]
    assign = (chunk[:, None, :] == torch.arange(memory_tokens, device=device)[None, :, None]) & filled[:, None, :]
    weights = assign.to(window.dtype)  # [P, M, W]
    sizes = weights.sum(-1, keepdim=True)  # [P, M, 1]
    m = masked_mean(window, filled)  # [P, H]
    memory = torch.where(sizes > 0, weights @ window / sizes.clamp_min(1.0), m[:, None])
    return memory, m


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity over the last dimension ``[…, H]`` → ``[…]``; 0 when either vector is (near) zero.

    Invariants:
    - symmetric, in [−1, 1], scale-invariant, cos(a, a) = 1 (``test_cosine_properties``)
    """
    na, nb = a.norm(dim=-1), b.norm(dim=-1)
    return ((a * b).sum(-1) / (na * nb).clamp_min(_EPS)).clamp(-1.0, 1.0)


def window_variance(values: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
    """Population variance of the last ``n = min(count, W)`` entries of ``values`` ``[P, W]`` → ``[P]`` (0 if n < 2).

    Invariants:
    - equals ``torch.var(…, unbiased=False)`` of the filled entries; unfilled entries never matter
      (``test_window_variance_matches_torch``)
    """
    p, w = values.shape
    n = torch.as_tensor(count, device=values.device).clamp(0, w).expand(p)  # [P]
    filled = torch.arange(w, device=values.device)[None] >= (w - n[:, None])  # [P, W]
    weight = filled.to(values.dtype)
    k = weight.sum(-1).clamp_min(1.0)
    mean = (values * weight).sum(-1) / k
    var = (((values - mean[:, None]) ** 2) * weight).sum(-1) / k
    return torch.where(n >= 2, var, torch.zeros_like(var))


def trigger(s: torch.Tensor, prev_s: torch.Tensor, has_prev: torch.Tensor, var: torch.Tensor, u: torch.Tensor,
            since: torch.Tensor, injections: torch.Tensor, *, tau_drop: _Scalar, tau_var: _Scalar,
            tau_entropy: _Scalar, tau_sim: _Scalar, cooldown: _Scalar, max_injections: _Scalar) -> torch.Tensor:
    r"""Which images fire now → ``[P]`` bool.

    ``fire = [(Δs < −tau_drop ∧ has_prev ∧ Var > tau_var) ∨ (u > tau_entropy ∧ s < tau_sim)]
    ∧ since > cooldown ∧ injections < max_injections`` with ``Δs = s − prev_s``.

    :param s, prev_s, var, u: ``[P]`` float: s_t, s_{t−1}, Var(s) over the window, entropy in nats.
    :param has_prev: ``[P]`` bool: s_{t−1} exists (Δs is undefined at the first watched step, so the drop clause is off).
    :param since: ``[P]`` long: steps since this image's last injection (anything > ``cooldown`` if none yet).
    :param injections: ``[P]`` long: injections this image has had.
    :param tau_drop, tau_var, tau_entropy: ≥ 0 (defaults 0.05, 0.002, 3.5 nats); ``tau_sim`` in [−1, 1] (0.25);
        ``cooldown`` ≥ 0 (16); ``max_injections`` ≥ 0 (4). Floats or 0-d tensors.

    Invariants:
    - fires exactly under the stated formula (``test_trigger_matches_formula``)
    - each row's decision depends on that row only (``test_trigger_rows_independent``)
    - over any sequence: at most ``max_injections`` fires and at least ``cooldown`` steps between two
      (``test_trigger_respects_cooldown_and_maximum``)
    """
    drop = (s - prev_s < -tau_drop) & has_prev & (var > tau_var)
    lost = (u > tau_entropy) & (s < tau_sim)
    return (drop | lost) & (since > cooldown) & (injections < max_injections)


def translate(m: torch.Tensor, p: torch.Tensor, max_scale: _Scalar) -> torch.Tensor:
    r"""Training-free translator: control vector ``c = g · p/‖p‖`` with gate ``g = max_scale · (1 − cos(m, p))/2``.

    The further the window has drifted from the prompt, the larger the gate; it lies in [0, max_scale].
    :param m, p: ``[P, H]``. :param max_scale: > 0 (default 1.0). :returns: c ``[P, H]``.

    Invariants:
    - ‖c‖ ≤ max_scale, c ∥ p, and c = 0 when m points along p (``test_translate_gate_bounds``)
    """
    gate = max_scale * (1.0 - cosine(m, p)) / 2  # [P]
    direction = p / p.norm(dim=-1, keepdim=True).clamp_min(_EPS)
    return gate[:, None] * direction


def shape_tokens(c: torch.Tensor, anchor: torch.Tensor, control_tokens: int) -> torch.Tensor:
    r"""Training-free shaper (prompt re-anchoring): ``control_tokens`` copies of ``e + ‖e‖·c`` → ``[P, K, H]``.

    ``anchor`` e ``[P, H]`` is the mean of the plain prompt's token embeddings; c ``[P, H]`` the control vector.

    Invariants:
    - c = 0 gives the anchor repeated; the K tokens are equal; ‖token − e‖ = ‖e‖·‖c‖ (``test_shape_tokens``)
    """
    token = anchor + anchor.norm(dim=-1, keepdim=True) * c  # [P, H]
    return token[:, None].expand(-1, control_tokens, -1).clone()
