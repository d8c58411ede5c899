"""Classifier-free guidance: a core step of image mode, configured (not a hook strategy).

``l = u + w(t)·(c − u)`` (Janus: ``generation_inference.py``; w = 5 by default). A ``-inf`` in either branch gives
``-inf`` — never ``NaN`` from ``-inf - -inf`` — so masks set by pre-logits strategies survive guidance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Layout = Literal["interleaved", "halves"]
Schedule = Literal["constant", "linear", "cosine"]

LAYOUTS: tuple[str, ...] = ("interleaved", "halves")
SCHEDULES: tuple[str, ...] = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class CFGConfig:
    """Guidance settings. ``weight`` ≥ 0 (1 = conditional only, 0 = unconditional only).

    ``layout``: ``interleaved`` rows are (cond, uncond, cond, uncond, …) as DeepSeek's loop; ``halves`` rows are
    [all cond; all uncond] as transformers' port. ``schedule`` moves the weight over steps from 1 to ``weight``.
    """

    weight: float = 5.0
    schedule: Schedule = "constant"
    layout: Layout = "interleaved"
    negative_prompt: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.weight, (int, float)) or isinstance(self.weight, bool) or not math.isfinite(self.weight) or self.weight < 0:
            raise ValueError(f"`cfg`: `weight` must be a finite number ≥ 0, got {self.weight!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"`cfg`: `schedule` must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"`cfg`: `layout` must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.negative_prompt is not None and not str(self.negative_prompt).strip():
            raise ValueError("`cfg`: `negative_prompt` must not be empty")


def split_branches(rows: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``[2P, …]`` rows → (cond ``[P, …]``, uncond ``[P, …]``) for the declared layout."""
    if layout == "interleaved":
        return rows[0::2], rows[1::2]
    half = rows.shape[0] // 2
    return rows[:half], rows[half:]


def merge_branches(cond: torch.Tensor, uncond: torch.Tensor, layout: str) -> torch.Tensor:
    """Inverse of :func:`split_branches`."""
    if layout == "interleaved":
        return torch.stack((cond, uncond), dim=1).flatten(0, 1)
    return torch.cat((cond, uncond), dim=0)


def pair_rows(values: torch.Tensor, layout: str) -> torch.Tensor:
    """Repeat one value per pair ``[P, …]`` onto both rows of the pair ``[2P, …]``."""
    return merge_branches(values, values, layout)


def guidance_weight(weight: torch.Tensor, schedule: str, step: torch.Tensor, total_steps: int) -> torch.Tensor:
    """w(t): ``constant`` = w; ``linear`` = 1 + (w−1)·t/(T−1); ``cosine`` = 1 + (w−1)·(1 − cos(π·t/(T−1)))/2.

    Schedules start at 1 and end at w (MAR's linear schedule, the power-cosine schedule with power 1).
    ``step`` is a device tensor so a captured step sees the current value.
    """
    if schedule == "constant":
        return weight
    frac = step.to(weight.dtype) / max(total_steps - 1, 1)
    if schedule == "linear":
        return 1 + (weight - 1) * frac
    return 1 + (weight - 1) * (1 - torch.cos(math.pi * frac)) / 2


def apply_guidance(cond: torch.Tensor, uncond: torch.Tensor, weight: torch.Tensor | float) -> torch.Tensor:
    """``u + w·(c − u)`` with ``-inf`` in either branch giving ``-inf``.

    Invariants (tests/core/test_cfg.py): w = 1 gives ``cond``; w = 0 gives ``uncond``; ``cond == uncond`` gives
    ``cond`` for any w; ``-inf`` in either input stays ``-inf``; no NaN from finite or ``-inf`` inputs.
    """
    masked = torch.isneginf(cond) | torch.isneginf(uncond)
    c = cond.masked_fill(masked, 0.0)
    u = uncond.masked_fill(masked, 0.0)
    return (u + weight * (c - u)).masked_fill(masked, float("-inf"))


def guide_rows(rows: torch.Tensor, layout: str, weight: torch.Tensor | float) -> torch.Tensor:
    """The helper strategies use to guide any other pair of logits exactly as the core guides the final ones."""
    cond, uncond = split_branches(rows, layout)
    return apply_guidance(cond, uncond, weight)
