"""A plugin that hands ``register`` something that is not a Strategy class."""

from __future__ import annotations

from janus_decoding.plugins.hookspecs import hookimpl


class NotAStrategy:
    name = "not_a_strategy"


@hookimpl
def register_strategies(register) -> None:
    register(NotAStrategy)
