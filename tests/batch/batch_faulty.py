"""Strategies that misbehave on purpose (and one that is merely slow), for the batch job's tests."""

from __future__ import annotations

import time

import torch

from janus_decoding.plugins.hookspecs import hookimpl
from janus_decoding.plugins.strategy import Param, Strategy

janus_decoding_interface = 1


class Poison(Strategy):
    """Write NaN, +inf or -inf (a whole row with no finite logit) into the post-CFG logits."""

    name = "poison"
    params = (Param("value", "str", "nan", choices=("nan", "posinf", "all_neginf", "one_neginf")),)
    hooks = ("post_cfg",)

    def post_cfg(self, state, logits):
        out = logits.clone()
        value = self.config["value"]
        if value == "all_neginf":
            out[0] = float("-inf")
        elif value == "one_neginf":  # a legitimate mask: never flagged
            out[:, 0] = float("-inf")
        else:
            out[0, 0] = float("nan") if value == "nan" else float("inf")
        return out


class Narrow(Strategy):
    """Return logits one column short."""

    name = "narrow"
    hooks = ("post_cfg",)

    def post_cfg(self, state, logits):
        return logits[:, :-1]


class Boom(Strategy):
    """Raise from a hook."""

    name = "boom"
    hooks = ("post_cfg",)

    def post_cfg(self, state, logits):
        raise RuntimeError("boom went the strategy")


class Snail(Strategy):
    """Sleep after each sampled token, so a test can interrupt a job in the middle."""

    name = "snail"
    params = (Param("seconds", "float", 0.01, low=0.0),)
    hooks = ("post_cfg",)

    def post_cfg(self, state, logits):
        time.sleep(self.config["seconds"])
        return logits


class Coupler(Strategy):
    """Declares that it couples rows (and does nothing), so the job must not pack prompts."""

    name = "coupler"
    hooks = ("post_cfg",)
    couples_rows = True

    def post_cfg(self, state, logits):
        return logits


STRATEGIES = (Poison, Narrow, Boom, Snail, Coupler)


@hookimpl
def register_strategies(register) -> None:
    for cls in STRATEGIES:
        register(cls)


def install() -> None:
    """Make these strategies part of this process's default registry."""
    from janus_decoding.plugins import registry

    registry._default = registry.build_registry([__import__(__name__, fromlist=["*"])])


torch.set_num_threads(1)
