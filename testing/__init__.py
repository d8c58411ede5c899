"""The author kit: check a strategy against the hook contract, and hypothesis strategies for its tensors.

    >>> from janus_decoding.testing import check_strategy
    >>> check_strategy(MyStrategy, my_param=0.5)  # raises ContractError naming the broken property
"""

from .contract import ContractError, StubState, check_strategy, run_contract
from .model_contract import tiny_model

__all__ = ["ContractError", "StubState", "check_strategy", "run_contract", "tiny_model"]
