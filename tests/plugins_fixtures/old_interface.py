"""A plugin written for another interface version: reported and skipped."""

from __future__ import annotations

from janus_decoding.plugins.hookspecs import hookimpl
from janus_decoding.plugins.strategy import Strategy

janus_decoding_interface = 0


class Ancient(Strategy):
    """Never registered."""

    name = "ancient"


@hookimpl
def register_strategies(register) -> None:
    register(Ancient)
