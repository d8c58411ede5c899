"""Strategies that only record what the loop hands them (prompt rows, CFG weights, execution order)."""

from __future__ import annotations

from janus_decoding.plugins.hookspecs import hookimpl
from janus_decoding.plugins.strategy import Param, Strategy


class RecordPrompt(Strategy):
    """Record the prompt rows, the CFG layout and the guidance weight of every step."""

    name = "record_prompt"
    hooks = ("pre_logits",)
    graph_safe = False

    def begin(self, state) -> None:
        state.memory[self.name] = []

    def pre_logits(self, state, logits):
        state.memory[self.name].append(float(state.current_cfg_weight()))
        return logits

    def end(self, state) -> None:
        state.trace.write(self.name, ids=state.prompt_ids.clone(), valid=state.attention_mask.clone(),
                          positions=state.prompt_positions.clone(), layout=state.layout,
                          weights=list(state.memory[self.name]))


class _Tag(Strategy):
    """Add a marker to a post-CFG logit and log the call, so tests can see who ran when and what each received."""

    hooks = ("post_cfg",)
    graph_safe = False
    params = (Param("mark", "float", 0.0),)

    def post_cfg(self, state, logits):
        order = state.memory.setdefault("order", [])
        if state.step == 0:
            order.append((self.name, float(logits[0, 0])))
        out = logits.clone()
        out[:, 0] += self.config["mark"]
        return out

    def end(self, state) -> None:
        if not state.memory.get("order_written"):  # the first tag to finish writes the whole log once
            state.memory["order_written"] = True
            state.trace.write("order", calls=list(state.memory.get("order", [])))


class TagA(_Tag):
    """Order marker a."""

    name = "tag_a"


class TagB(_Tag):
    """Order marker b."""

    name = "tag_b"


class TagC(_Tag):
    """Order marker c."""

    name = "tag_c"


@hookimpl
def register_strategies(register) -> None:
    for cls in (RecordPrompt, TagA, TagB, TagC):
        register(cls)
