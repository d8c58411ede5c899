"""Sampling warpers as strategies: ``temperature``, ``top_k``, ``top_p`` (post-CFG, both modes).

Thin plugin classes over ``strategies/sampling_math.py``; they run last in the canonical order, after the logits
transforms (``repetition_penalty > dola > visual_prior_fusion``).
"""

from __future__ import annotations

import torch

from janus_decoding.plugins.strategy import Param, Strategy

from .sampling_math import apply_temperature, top_k_filter, top_p_filter

#: Warpers reshape the final distribution, so the transforms that produce it run first.
TRANSFORMS = ("repetition_penalty", "dola", "visual_prior_fusion")


class Temperature(Strategy):
    """Divide the guided logits by a temperature (T → 0 approaches greedy; 1 is the identity)."""

    name = "temperature"
    params = (Param("temperature", "float", 1.0, "T", low=0.0, low_open=True),)
    hooks = ("post_cfg",)
    runs_after = TRANSFORMS

    def begin(self, state) -> None:
        self._t = self.tensor(state, "temperature")

    def post_cfg(self, state, logits: torch.Tensor) -> torch.Tensor:
        return apply_temperature(logits, self._t.to(logits.dtype))


class TopK(Strategy):
    """Keep the k highest logits of each row (transformers' TopKLogitsProcessor)."""

    name = "top_k"
    params = (Param("top_k", "int", 50, "k", low=1), Param("min_tokens_to_keep", "int", 1, low=1))
    hooks = ("post_cfg",)
    runs_after = TRANSFORMS

    def post_cfg(self, state, logits: torch.Tensor) -> torch.Tensor:
        return top_k_filter(logits, self.config["top_k"], min_tokens_to_keep=self.config["min_tokens_to_keep"])


class TopP(Strategy):
    """Nucleus filtering: keep the smallest set of tokens whose probability reaches p (TopPLogitsProcessor)."""

    name = "top_p"
    params = (Param("top_p", "float", 0.9, "p", low=0.0, high=1.0), Param("min_tokens_to_keep", "int", 1, low=1))
    hooks = ("post_cfg",)
    runs_after = TRANSFORMS

    def begin(self, state) -> None:
        self._p = self.tensor(state, "top_p")

    def post_cfg(self, state, logits: torch.Tensor) -> torch.Tensor:
        return top_p_filter(logits, self._p, min_tokens_to_keep=self.config["min_tokens_to_keep"])
