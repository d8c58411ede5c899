"""A well-behaved third-party plugin: one strategy, ``shout``."""

from __future__ import annotations

from janus_decoding.plugins.hookspecs import hookimpl
from janus_decoding.plugins.strategy import Param, Strategy

janus_decoding_interface = 1


class Shout(Strategy):
    """Scale post-CFG logits by a factor (a stand-in for a real strategy)."""

    name = "shout"
    params = (Param("factor", "float", 2.0, low=0.0, low_open=True),)
    hooks = ("post_cfg",)

    def post_cfg(self, state, logits):
        return logits * self.config["factor"]


@hookimpl
def register_strategies(register) -> None:
    register(Shout)
