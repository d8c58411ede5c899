"""``repetition_penalty``: CTRL's penalty on tokens already seen (post-CFG, both modes).

History, from the loop's state: in text mode the prompt plus the generated ids (transformers' semantics); in image
mode the pair's generated image tokens. Math: ``strategies/repetition_penalty_math.py``.
"""

from __future__ import annotations

import torch

from janus_decoding.plugins.strategy import Param, Strategy

from .repetition_penalty_math import apply_repetition_penalty


class RepetitionPenalty(Strategy):
    """Divide positive (multiply negative) logits of tokens already in the history by `penalty`."""

    name = "repetition_penalty"
    params = (Param("penalty", "float", 1.2, "θ (1 = identity, > 1 discourages repeats)", low=0.0, low_open=True),)
    hooks = ("post_cfg",)

    def begin(self, state) -> None:
        self._penalty = self.tensor(state, "penalty")

    def post_cfg(self, state, logits: torch.Tensor) -> torch.Tensor:
        return apply_repetition_penalty(logits, state.history, state.history_valid, self._penalty.to(logits.dtype))
