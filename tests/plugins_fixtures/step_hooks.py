"""Fixture strategies for the per-step hook points: ``hidden_states``, ``pre_logits``, ``post_cfg``, and the
``heads``, ``guide`` and ``step_buffer`` services."""

from __future__ import annotations

import torch

from janus_decoding.core.cfg import merge_branches, split_branches
from janus_decoding.core.sampling import entropy_nats
from janus_decoding.plugins.hookspecs import hookimpl
from janus_decoding.plugins.strategy import Param, Strategy


class EarlyHeads(Strategy):
    """Run the head over several layers' last hidden states in one batched call, each step."""

    name = "early_heads"
    params = (Param("layers", "list[int]", [0, 2, 4]),)
    hooks = ("hidden_states", "pre_logits")
    graph_safe = False

    def begin(self, state) -> None:
        state.memory[self.name] = {"keys": [], "heads": [], "logits": [], "layer0": []}

    def hidden_layers(self, state):
        return list(self.config["layers"])

    def hidden_states(self, state, hidden):
        seen = state.memory[self.name]
        seen["keys"].append(sorted(hidden))
        stacked = torch.stack([hidden[k] for k in self.config["layers"]])  # [J, B, H]
        seen["heads"].append(state.heads(stacked, final_norm=True))  # [J, B, V]
        if 0 in hidden:
            seen["layer0"].append(hidden[0].clone())

    def pre_logits(self, state, logits):
        state.memory[self.name]["logits"].append(logits.clone())
        return logits

    def end(self, state) -> None:
        state.trace.write(self.name, generated=state.generated.clone(), **state.memory[self.name])


class BanToken(Strategy):
    """Pre-logits: set one token to -inf in the chosen branch ("all", "cond" or "uncond")."""

    name = "ban_token"
    params = (Param("token", "int", 0, low=0), Param("branch", "str", "all", choices=("all", "cond", "uncond")))
    hooks = ("pre_logits",)
    graph_safe = False

    def pre_logits(self, state, logits):
        state.memory.setdefault(self.name, []).append(tuple(logits.shape))
        banned = logits.clone()
        column = banned[:, self.config["token"]]
        if self.config["branch"] == "all":
            column.fill_(float("-inf"))
        else:
            cond, uncond = split_branches(column, state.layout)
            target = cond if self.config["branch"] == "cond" else uncond
            target = torch.full_like(target, float("-inf"))
            cond, uncond = (target, uncond) if self.config["branch"] == "cond" else (cond, target)
            banned[:, self.config["token"]] = merge_branches(cond, uncond, state.layout)
        return banned

    def end(self, state) -> None:
        state.trace.write(self.name, shapes=state.memory.get(self.name, []))


class ForceToken(Strategy):
    """Post-CFG: leave only one token finite, so sampling must pick it."""

    name = "force_token"
    params = (Param("token", "int", 0, low=0),)
    hooks = ("post_cfg",)

    def post_cfg(self, state, logits):
        state.memory.setdefault(self.name, tuple(logits.shape))
        forced = torch.full_like(logits, float("-inf"))
        forced[:, self.config["token"]] = logits[:, self.config["token"]]
        return forced

    def end(self, state) -> None:
        state.trace.write(self.name, shape=state.memory.get(self.name))


class CheckGuide(Strategy):
    """``state.guide`` on the pre-logits rows must equal what the core hands to post-CFG."""

    name = "check_guide"
    hooks = ("pre_logits", "post_cfg")
    graph_safe = False

    def pre_logits(self, state, logits):
        state.memory[self.name + ".guided"] = state.guide(logits)
        return logits

    def post_cfg(self, state, logits):
        diff = (state.memory[self.name + ".guided"] - logits).abs().nan_to_num(0.0).max()
        state.memory.setdefault(self.name, []).append(float(diff))
        return logits

    def end(self, state) -> None:
        state.trace.write(self.name, diffs=state.memory.get(self.name, []))


class EntropyTrace(Strategy):
    """Write the sampled distribution's entropy of every step into a preallocated step buffer."""

    name = "entropy_trace"
    hooks = ("post_cfg",)

    def begin(self, state) -> None:
        self._buffer = state.step_buffer(self.name, (state.num_pairs,))  # [steps, P]
        self._again = state.step_buffer(self.name, (state.num_pairs,))

    def post_cfg(self, state, logits):
        return logits

    def after_sample(self, state, tokens, probs) -> None:
        self._buffer.index_copy_(0, state.step_t.view(1), entropy_nats(probs)[None])

    def end(self, state) -> None:
        state.trace.write(self.name, entropy=self._buffer.clone(), same=self._again is self._buffer,
                          last=entropy_nats(state.last_probs))


@hookimpl
def register_strategies(register) -> None:
    for cls in (EarlyHeads, BanToken, ForceToken, CheckGuide, EntropyTrace):
        register(cls)
