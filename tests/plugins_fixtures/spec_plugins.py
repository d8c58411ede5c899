"""Strategies for spec and ordering tests: every parameter kind, cross-hook-point order, logit taps."""

from __future__ import annotations

from janus_decoding.plugins.hookspecs import hookimpl
from janus_decoding.plugins.strategy import Param, Strategy


class AllKinds(Strategy):
    """Takes one parameter of every kind (nothing happens at run time)."""

    name = "all_kinds"
    params = (
        Param("count", "int", 0),
        Param("ratio", "float", 0.5),
        Param("label", "str", ""),
        Param("flag", "bool", False),
        Param("layers", "list[int]", []),
        Param("words", "list[str]", []),
        Param("either", "str|list[int]", "auto"),
        Param("mode", "str", "a", choices=("a", "b")),
        Param("bounded", "int", 1, low=1, high=10),
    )
    hooks = ("post_cfg",)

    def post_cfg(self, state, logits):
        return logits


class EarlyTransform(Strategy):
    """A pre-logits transform that must run after `late_transform` (a post-CFG one): impossible in the loop."""

    name = "early_transform"
    hooks = ("pre_logits",)
    runs_after = ("late_transform",)

    def pre_logits(self, state, logits):
        return logits


class LateTransform(Strategy):
    """A post-CFG transform that must run after `branch_transform` (pre-logits): the loop's order satisfies it."""

    name = "late_transform"
    hooks = ("post_cfg",)
    runs_after = ("branch_transform",)

    def post_cfg(self, state, logits):
        return logits


class BranchTransform(Strategy):
    """A pre-logits transform."""

    name = "branch_transform"
    hooks = ("pre_logits",)

    def pre_logits(self, state, logits):
        return logits


class _Tap(Strategy):
    hooks = ("post_cfg",)
    graph_safe = False

    def post_cfg(self, state, logits):
        seen = state.memory.setdefault(self.name, [])
        length = state.history_offset + state.step
        seen.append((state.history[:, :length].clone(), state.history_valid[:, :length].clone(), logits.clone()))
        return logits

    def end(self, state) -> None:
        state.trace.write(self.name, seen=state.memory.get(self.name, []))


class TapBefore(_Tap):
    """Record the post-CFG logits (and the history) as they arrive."""

    name = "tap_before"


class TapAfter(_Tap):
    """Record the post-CFG logits as left by the strategies before it."""

    name = "tap_after"


class ImageOnly(Strategy):
    """A strategy that declares image mode only (used in text mode, it must be refused)."""

    name = "image_only"
    modes = ("image",)
    hooks = ("post_cfg",)

    def post_cfg(self, state, logits):
        return logits


@hookimpl
def register_strategies(register) -> None:
    for cls in (AllKinds, EarlyTransform, LateTransform, BranchTransform, TapBefore, TapAfter, ImageOnly):
        register(cls)
