"""Fixture strategies for the prefill hook points: ``input_embeddings`` and ``layer``."""

from __future__ import annotations

import torch

from janus_decoding.core.protocol import LayerKeep
from janus_decoding.plugins.hookspecs import hookimpl
from janus_decoding.plugins.strategy import Param, Strategy


class _RecordsFirstLogits(Strategy):
    """Shared: keep the step-0 branch logits and the final cache bookkeeping in the trace."""

    graph_safe = False

    def pre_logits(self, state, logits):
        if state.step == 0:
            state.memory[self.name + ".logits"] = logits.clone()
        return logits

    def end(self, state) -> None:
        state.trace.write(self.name, logits=state.memory.get(self.name + ".logits"), fill=list(state.cache.fill),
                          group=list(state.cache.group), positions=state.prompt_positions.clone(),
                          mask=state.attention_mask.clone(), **state.memory.get(self.name + ".extra", {}))


class ScaleEmbeds(_RecordsFirstLogits):
    """Multiply the prompt's input embeddings by a factor (1 = identity)."""

    name = "scale_embeds"
    params = (Param("factor", "float", 1.0),)
    hooks = ("input_embeddings", "pre_logits")

    def input_embeddings(self, state, embeds):
        state.memory[self.name + ".extra"] = {"received": tuple(embeds.shape)}
        return embeds * self.config["factor"]


class DropFirst(_RecordsFirstLogits):
    """Shorten the prompt: drop its first `count` positions; kept tokens keep their original position ids."""

    name = "drop_first"
    params = (Param("count", "int", 1, low=1),)
    hooks = ("input_embeddings", "pre_logits")

    def input_embeddings(self, state, embeds):
        c = self.config["count"]
        state.prompt_positions = state.prompt_positions[:, c:]
        state.attention_mask = state.attention_mask[:, c:]
        return embeds[:, c:]


class KeepPositions(_RecordsFirstLogits):
    """At decoder layer `layer`, keep the prompt positions from `drop` on (drop = 0 keeps all)."""

    name = "keep_positions"
    params = (Param("layer", "int", 2, low=1), Param("drop", "int", 0, low=0), Param("soft", "bool", False))
    hooks = ("layer", "pre_logits")

    def layer_points(self, state):
        return [self.config["layer"]]

    def layer(self, state, layer, hidden):
        b, t, _ = hidden.shape
        kept = torch.arange(self.config["drop"], t, device=hidden.device).expand(b, -1)  # [B, T']
        state.memory[self.name + ".extra"] = {
            "layer_seen": layer,
            "hidden": hidden.clone(),
            "attention": state.attention_scores(layer - 1),  # [B, heads, T0]
        }
        return LayerKeep(kept, soft=self.config["soft"])


@hookimpl
def register_strategies(register) -> None:
    for cls in (ScaleEmbeds, DropFirst, KeepPositions):
        register(cls)
