"""The contract at the hook points that need a real state (input_embeddings, layer, hidden_states, kv_inject,
schedule), run on short runs of the tiny model: well-behaved strategies pass; broken ones fail naming the property."""

from __future__ import annotations

import pytest
import torch

from janus_decoding.core.cfg import merge_branches, split_branches
from janus_decoding.core.protocol import KVAppend, KVEdit, LayerKeep, Rebuild, Rollback
from janus_decoding.plugins.strategy import Param, Strategy
from janus_decoding.testing import ContractError, check_strategy, run_contract
from janus_decoding.testing.model_contract import tiny_model


# -- well-behaved strategies, one per hook point ----------------------------------------------------------------
class ScaleEmbeds(Strategy):
    """Scale the prompt's input embeddings."""

    name = "scale_embeds"
    params = (Param("factor", "float", 1.5, low=0.0, low_open=True),)
    hooks = ("input_embeddings",)

    def input_embeddings(self, state, embeds):
        return embeds * self.config["factor"]


class DropEarliest(Strategy):
    """From layer `layer` on, drop each row's first `count` real (non-padding) prompt tokens; padding slots stay,
    so every row keeps the same count and a row's result does not depend on its neighbours' lengths."""

    name = "drop_earliest"
    params = (Param("layer", "int", 2, low=1), Param("count", "int", 2, low=1))
    hooks = ("layer",)

    def layer_points(self, state):
        return [self.config["layer"]]

    def layer(self, state, layer, hidden):
        valid = state.attention_mask  # [B, T]
        rank = valid.long().cumsum(-1) - 1  # [B, T] index among the row's real tokens
        drop = valid & (rank < self.config["count"])  # [B, T]
        order = torch.argsort(drop.to(torch.int8), dim=-1, stable=True)  # kept positions first, in order
        return LayerKeep(order[:, : hidden.shape[1] - self.config["count"]])


class AppendText(Strategy):
    """Before step `at`, append the embeddings of a short text to every row's cache."""

    name = "append_text"
    params = (Param("at", "int", 3, low=1), Param("text", "str", "look closer"))
    hooks = ("kv_inject",)

    def kv_growth(self, state):
        return len(state.adapter.tokenize(self.config["text"]))

    def kv_inject(self, state):
        if state.step != self.config["at"]:
            return []
        embeds = state.embed_text(self.config["text"])  # [K, H]
        return [KVAppend(embeds=embeds[None].expand(state.rows, -1, -1))]


class NudgeFirstSlot(Strategy):
    """Before step `at`, add a constant to the cached key of slot 0 in layer 1 (all rows)."""

    name = "nudge_first_slot"
    params = (Param("at", "int", 2, low=1),)
    hooks = ("kv_inject",)

    def kv_inject(self, state):
        if state.step != self.config["at"]:
            return []
        return [KVEdit(1, 0, d_key=torch.full((state.adapter.head_dim,), 0.25, device=state.adapter.device))]


class RedoLast(Strategy):
    """At step `at`, regenerate the last `steps` tokens once with RNG stream 1."""

    name = "redo_last"
    params = (Param("at", "int", 5, low=1), Param("steps", "int", 2, low=1))
    hooks = ("schedule",)
    graph_safe = False

    def schedule_points(self, state):
        return [self.config["at"]]

    def schedule(self, state):
        if state.memory.get(self.name):
            return None
        state.memory[self.name] = True
        return Rollback(self.config["steps"], 1)


class LastHiddenNorm(Strategy):
    """Read the last layer's hidden state each step; sharpen each row's logits by its (guided) norm."""

    name = "last_hidden_norm"
    hooks = ("hidden_states", "post_cfg")

    def hidden_layers(self, state):
        return [state.num_layers]

    def hidden_states(self, state, hidden):
        state.memory[self.name] = hidden[state.num_layers].norm(dim=-1)  # [B]

    def post_cfg(self, state, logits):
        norms = state.memory[self.name]  # [B]
        if state.mode == "image":
            norms = state.guide(norms[:, None])[:, 0]  # [P]
        return logits * (1.0 + 0.2 * norms[:, None].abs()).to(logits.dtype)


@pytest.mark.parametrize("cls", [ScaleEmbeds, DropEarliest, AppendText, NudgeFirstSlot, RedoLast, LastHiddenNorm],
                         ids=lambda c: c.name)
def test_well_behaved_strategies_pass(cls):
    check_strategy(cls)


def test_tiny_model_is_cached():
    assert tiny_model() is tiny_model()


# -- deliberately broken strategies ---------------------------------------------------------------------------
class MutatesEmbeds(ScaleEmbeds):
    name = "mutates_embeds"

    def input_embeddings(self, state, embeds):
        return embeds.mul_(self.config["factor"])


class NoisyEmbeds(ScaleEmbeds):
    """Adds noise from the global RNG: not reproducible for a fixed seed."""

    name = "noisy_embeds"

    def input_embeddings(self, state, embeds):
        return embeds + 0.1 * torch.randn_like(embeds)


class ScalesFirstRow(ScaleEmbeds):
    """Scales only row 0 (the cond row of the first pair), so the pair's rows drift apart."""

    name = "scales_first_row"

    def input_embeddings(self, state, embeds):
        scale = torch.ones(embeds.shape[0], 1, 1, dtype=embeds.dtype)
        scale[0] = self.config["factor"]
        return embeds * scale


class DropsFirstPositions(DropEarliest):
    """Drops the first positions of the padded sequence, whatever the padding: rows depend on their neighbours."""

    name = "drops_first_positions"

    def layer(self, state, layer, hidden):
        b, t, _ = hidden.shape
        return LayerKeep(torch.arange(self.config["count"], t).expand(b, -1))


class UnsortedKeep(DropEarliest):
    name = "unsorted_keep"

    def layer(self, state, layer, hidden):
        b, t, _ = hidden.shape
        return LayerKeep(torch.arange(t - 1, -1, -1).expand(b, -1))


class NeverAsked(DropEarliest):
    """Declares the layer hook but no layer points: the loop never calls it."""

    name = "never_asked"

    def layer_points(self, state):
        return []


class MutatesHidden(LastHiddenNorm):
    name = "mutates_hidden"

    def hidden_states(self, state, hidden):
        super().hidden_states(state, hidden)
        hidden[state.num_layers].zero_()


class MixesRowsViaHidden(LastHiddenNorm):
    """Uses the batch mean of the hidden-state norms: each row depends on the others."""

    name = "mixes_rows_via_hidden"

    def hidden_states(self, state, hidden):
        norms = hidden[state.num_layers].norm(dim=-1)  # [B]
        state.memory[self.name] = norms.mean().expand_as(norms)


class CondOnlyInject(AppendText):
    """Appends for the cond rows only (image mode): one row of each pair without the other."""

    name = "cond_only_inject"
    modes = ("image",)

    def kv_inject(self, state):
        actions = super().kv_inject(state)
        rows = torch.zeros(state.rows, dtype=torch.bool)
        rows[0] = True
        return [KVAppend(embeds=a.embeds, rows=rows) for a in actions]


class UndeclaredGrowth(AppendText):
    name = "undeclared_growth"

    def kv_growth(self, state):
        return 0


class RollsBackTooFar(RedoLast):
    name = "rolls_back_too_far"

    def schedule(self, state):
        return Rollback(state.step + 1, 1)


class RebuildsForOnePair(RedoLast):
    name = "rebuilds_for_one_pair"
    modes = ("image",)

    def schedule(self, state):
        return Rebuild(["a dog"] * (state.num_pairs + 1))


class RebuildsInTextMode(RedoLast):
    """Rebuild restarts image generation; the core has no rebuild in text mode, so the text run fails."""

    name = "rebuilds_in_text_mode"

    def schedule(self, state):
        if state.memory.get(self.name):
            return None
        state.memory[self.name] = True
        return Rebuild(["a dog"] * state.num_pairs)


class ExitPastTheLastLayer(Strategy):
    """Asks for an early exit at a layer the model does not have."""

    name = "exit_past_the_last_layer"
    hooks = ("post_cfg",)

    def exit_layers(self, state):
        return [(state.num_layers + 1, True)]

    def post_cfg(self, state, logits):
        return logits


@pytest.mark.parametrize(("cls", "prop"), [
    (MutatesEmbeds, "inputs not mutated"),
    (ExitPastTheLastLayer, "hook points"),
    (NoisyEmbeds, "deterministic"),
    (ScalesFirstRow, "CFG pairs stay paired"),
    (DropsFirstPositions, "rows independent"),
    (UnsortedKeep, "output types"),
    (NeverAsked, "hook points"),
    (MutatesHidden, "inputs not mutated"),
    (MixesRowsViaHidden, "rows independent"),
    (CondOnlyInject, "CFG pairs stay paired"),
    (UndeclaredGrowth, "modes"),  # the core refuses the overflow mid-run
    (RollsBackTooFar, "output types"),
    (RebuildsForOnePair, "output types"),
    (RebuildsInTextMode, "modes"),
], ids=lambda x: getattr(x, "name", x))
def test_broken_strategies_fail_naming_the_property(cls, prop):
    with pytest.raises(ContractError) as info:
        check_strategy(cls)
    assert f"`{cls.name}` broke `{prop}`" in str(info.value)


def test_mode_is_named_in_the_message():
    with pytest.raises(ContractError, match=r"text mode"):
        check_strategy(RebuildsInTextMode)


class ScalesCondRows(ScaleEmbeds):
    """Scales the cond row of every pair on purpose (row-independent, but the pair's rows differ)."""

    name = "scales_cond_rows"
    modes = ("image",)

    def input_embeddings(self, state, embeds):
        cond, uncond = split_branches(embeds, state.layout)
        return merge_branches(cond * self.config["factor"], uncond, state.layout)


def test_cfg_pairs_check_can_be_turned_off():
    """A strategy that must treat the two branches differently opts out of the pair check."""
    with pytest.raises(ContractError, match="CFG pairs stay paired"):
        run_contract(ScalesCondRows, {})
    run_contract(ScalesCondRows, {}, cfg_pairs=False)


def test_fixture_hands_out_the_tiny_model(janus_tiny_model):
    assert janus_tiny_model is tiny_model() and janus_tiny_model.kind == "janus"
