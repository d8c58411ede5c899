"""A plugin that claims a built-in's name (``temperature``): the registry must refuse it, naming both sources."""

from __future__ import annotations

from janus_decoding.plugins.hookspecs import hookimpl
from janus_decoding.plugins.strategy import Strategy


class OtherTemperature(Strategy):
    """Another temperature."""

    name = "temperature"
    hooks = ("post_cfg",)

    def post_cfg(self, state, logits):
        return logits


@hookimpl
def register_strategies(register) -> None:
    register(OtherTemperature)
