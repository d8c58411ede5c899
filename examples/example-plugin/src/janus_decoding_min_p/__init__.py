"""``min_p`` for janus-decoding: the plugin module named by the ``janus_decoding.strategies`` entry point."""

from __future__ import annotations

import torch

from janus_decoding.plugins.hookspecs import hookimpl
from janus_decoding.plugins.strategy import Param, Strategy

from ._math import min_p_filter

__all__ = ["MinP", "min_p_filter", "register_strategies"]


class MinP(Strategy):
    """Keep tokens with probability ≥ min_p · (the top probability) (MinPLogitsWarper)."""

    name = "min_p"
    params = (Param("min_p", "float", 0.1, "fraction of the top probability", low=0.0, high=1.0),
              Param("min_tokens_to_keep", "int", 1, low=1))
    hooks = ("post_cfg",)
    runs_after = ("repetition_penalty", "dola", "visual_prior_fusion")

    def begin(self, state) -> None:
        self._min_p = self.tensor(state, "min_p")

    def post_cfg(self, state, logits: torch.Tensor) -> torch.Tensor:
        return min_p_filter(logits, self._min_p.to(logits.dtype),
                            min_tokens_to_keep=self.config["min_tokens_to_keep"])


@hookimpl
def register_strategies(register) -> None:
    register(MinP)
