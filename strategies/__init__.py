"""Built-in strategies. They register through the same discovery hook as third-party plugins."""

from janus_decoding.plugins.hookspecs import hookimpl

from .dola import DoLa
from .hf_interop import HFProcessor
from .latent_control import LatentControl
from .repetition_penalty import RepetitionPenalty
from .sampling import Temperature, TopK, TopP
from .token_pruning import TokenPruning
from .twig import TwiG
from .visual_prior_fusion import VisualPriorFusion

BUILTINS = (Temperature, TopK, TopP, RepetitionPenalty, DoLa, TokenPruning, VisualPriorFusion, HFProcessor, TwiG, LatentControl)


@hookimpl
def register_strategies(register) -> None:
    for cls in BUILTINS:
        register(cls)
