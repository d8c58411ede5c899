"""Built-in strategies. They register through the same discovery hook as third-party plugins."""

from janus_decoding.plugins.hookspecs import hookimpl

from .dola import DoLa
from .repetition_penalty import RepetitionPenalty
from .sampling import Temperature, TopK, TopP
from .token_pruning import TokenPruning

BUILTINS = (Temperature, TopK, TopP, RepetitionPenalty, DoLa, TokenPruning)


@hookimpl
def register_strategies(register) -> None:
    for cls in BUILTINS:
        register(cls)
