"""The author kit's contract: every built-in strategy passes it; deliberately broken ones fail it, and the
message names the broken property."""

from __future__ import annotations

import math

import pytest
import torch

from janus_decoding.plugins.strategy import Param, Strategy
from janus_decoding.strategies import BUILTINS, RepetitionPenalty, Temperature, TopK, TopP
from janus_decoding.strategies.dola import DoLa
from janus_decoding.testing import ContractError, check_strategy


#: Parameters for built-ins whose defaults do not run alone (a required parameter, a tiny-model grid).
BUILTIN_PARAMS = {
    "hf_processor": {"processor": "TopKLogitsProcessor", "top_k": 5},
    "visual_prior_fusion": {"bank_from_question": True},
    "twig": {"stages": 2},
}


@pytest.mark.parametrize("cls", BUILTINS, ids=lambda c: c.name)
def test_every_builtin_passes(cls):
    check_strategy(cls, **BUILTIN_PARAMS.get(cls.name, {}))


@pytest.mark.parametrize(("cls", "params"), [
    (Temperature, {"temperature": 0.7}), (TopK, {"top_k": 3, "min_tokens_to_keep": 2}), (TopP, {"top_p": 0.5}),
    (RepetitionPenalty, {"penalty": 1.5}),
], ids=lambda x: getattr(x, "name", None) or repr(x))
def test_builtins_pass_with_other_parameters(cls, params):
    check_strategy(cls, **params)


@pytest.mark.parametrize("params", [{}, {"selection": "row"}, {"layers": [0, 2], "distance": "textbook"}],
                         ids=["default", "row", "two-layers"])
def test_dola_passes(params):
    """DoLa (exit layers + post_cfg) runs on the tiny model: its hooks are called and checked in both modes."""
    check_strategy(DoLa, **params)


def test_fixture_is_the_function(check_strategy):
    """The pytest11 plugin's fixture hands out the checker itself."""
    check_strategy(Temperature, temperature=2.0)


# -- deliberately broken strategies ---------------------------------------------------------------------------
class ReopensMask(Strategy):
    """Replaces -inf by a large finite value (reopens masked tokens)."""

    name = "reopens_mask"
    hooks = ("post_cfg",)

    def post_cfg(self, state, logits):
        return logits.nan_to_num(neginf=-1e4)


class MixesRows(Strategy):
    """Subtracts the batch's max logit: each row depends on the others."""

    name = "mixes_rows"
    hooks = ("post_cfg",)

    def post_cfg(self, state, logits):
        finite = logits.masked_fill(logits.isneginf(), 0.0)
        return logits - finite.amax(dim=0, keepdim=True).amax()


class MutatesInput(Strategy):
    """Divides the logits in place."""

    name = "mutates_input"
    hooks = ("post_cfg",)

    def post_cfg(self, state, logits):
        return logits.div_(2.0)


class UnpairsRows(Strategy):
    """Scales only the first row of the batch (breaks CFG pairs before guidance)."""

    name = "unpairs_rows"
    hooks = ("pre_logits",)
    modes = ("image",)
    couples_rows = True

    def pre_logits(self, state, logits):
        scale = torch.ones(logits.shape[0], 1, dtype=logits.dtype)
        scale[0] = 2.0
        return logits * scale


class LaxRange(Strategy):
    """Declares `alpha` in [0, 1] but a subclass check accepts anything: the range check must catch it."""

    name = "lax_range"
    params = (Param("alpha", "float", 0.5, low=0.0, high=1.0),)
    hooks = ("post_cfg",)

    def __init__(self, **kwargs):  # bypasses validation on purpose
        self.config = {"alpha": kwargs.get("alpha", 0.5)}
        self.explicit = dict(kwargs)

    def post_cfg(self, state, logits):
        return logits * 1.0


class Undeclared(Strategy):
    """Defines pre_logits without declaring it."""

    name = "undeclared"
    hooks = ("post_cfg",)

    def pre_logits(self, state, logits):
        return logits

    def post_cfg(self, state, logits):
        return logits


@pytest.mark.parametrize(("cls", "prop"), [
    (ReopensMask, "-inf never reopened"),
    (MixesRows, "rows independent"),
    (MutatesInput, "inputs not mutated"),
    (UnpairsRows, "CFG pairs stay paired"),
    (LaxRange, "parameter range"),
    (Undeclared, "hook points"),
], ids=lambda x: getattr(x, "name", x))
def test_broken_strategies_fail_naming_the_property(cls, prop):
    with pytest.raises(ContractError) as info:
        check_strategy(cls)
    assert f"`{cls.name}` broke `{prop}`" in str(info.value)


def test_nan_is_reported():
    class MakesNaN(Strategy):
        name = "makes_nan"
        hooks = ("post_cfg",)

        def post_cfg(self, state, logits):
            return logits.masked_fill(logits == logits.amax(-1, keepdim=True), math.nan)

    with pytest.raises(ContractError, match="broke `no NaN`"):
        check_strategy(MakesNaN)
