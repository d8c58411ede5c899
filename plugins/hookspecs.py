"""The hook contract, in one documented place.

Two kinds of hooks live here:

* the **discovery hook** ``register_strategies(register)`` — a pluggy hookspec. Plugins (the built-ins too) hand their
  :class:`~janus_decoding.plugins.strategy.Strategy` classes to ``register``. pluggy discovers; it never decides
  call order.
* the **hook points** of the loop — methods a ``Strategy`` may define. The user's spec decides their order; the loop
  calls them at fixed places in a step (``core/loop.py``). :data:`HOOK_POINTS` lists them in loop order and
  :class:`StrategyHookPoints` documents each signature. ``docs/hook-points.md`` has a section per hook headed by its
  exact signature; a test fails if one is missing.

Layer indices everywhere: index k is the hidden state entering decoder layer k (0 = the input embeddings), N = the
output of the last layer before the final norm. CFG layouts: ``interleaved`` rows are (cond, uncond, cond, …);
``halves`` rows are [all cond; all uncond]; ``state.layout`` says which, ``state.guide(rows)`` guides any pair.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import pluggy
import torch

if TYPE_CHECKING:
    from janus_decoding.core.protocol import KVAppend, KVEdit, LayerKeep, Rebuild, Rollback
    from janus_decoding.core.state import StepState

PROJECT = "janus_decoding"
#: Bumped when a hook point's signature or meaning changes; plugins may declare ``janus_decoding_interface``.
INTERFACE_VERSION = 1

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: The hook points, in the order the loop reaches them within a step.
HOOK_POINTS: tuple[str, ...] = (
    "schedule",
    "kv_inject",
    "input_embeddings",
    "layer",
    "hidden_states",
    "pre_logits",
    "post_cfg",
)


class DiscoverySpec:
    """pluggy hookspecs (the only hooks pluggy calls)."""

    @hookspec
    def register_strategies(self, register: Callable[[type], None]) -> None:
        """Register strategy classes: call ``register(StrategyClass)`` once per strategy the plugin provides."""


class StrategyHookPoints:
    """The hook points a strategy may implement (as methods of the same name). All run on the host thread;
    those marked *per step* run inside the decode step and must be capturable: tensor ops only, no ``.item()``,
    ``.cpu()``, Python branches on tensor values or data-dependent shapes, numeric parameters as device tensors.
    """

    def input_embeddings(self, state: "StepState", embeds: torch.Tensor) -> torch.Tensor:
        """Prefill, before layer 0: transform the prompt's input embeddings ``[B, T0, H]`` (image features are
        already merged into their placeholder slots). May return a shorter sequence, in which case it must also
        set ``state.prompt_positions`` and ``state.attention_mask`` ``[B, T']`` to match. Must not mutate ``embeds``.
        """

    def layer(self, state: "StepState", layer: int, hidden: torch.Tensor) -> "LayerKeep | None":
        """Prefill only, entering decoder layer ``layer`` (declared by ``layer_points(state)``): may return
        ``LayerKeep(positions [B, T'])`` — sorted per row, the same count for every row — and the loop continues
        with the shorter sequence: layers ≥ ``layer`` cache only kept positions, kept tokens keep their original
        position ids, every later step attends to exactly that cache. ``state.attention_scores(layer - 1)`` gives
        the attention the last prompt position paid in the previous layer. ``hidden`` is ``[B, T, H]``; not mutated.
        """

    def hidden_states(self, state: "StepState", hidden: dict[int, torch.Tensor]) -> None:
        """Per step, after the forward: read the last-position hidden states ``{k: [B, H]}`` of the layers declared by
        ``hidden_layers(state)`` (only those are kept). Read-only; store what you need in ``state.memory``. (For
        early-exit logits, declare ``exit_layers(state)`` and read ``state.exit_logits`` at a logits hook instead.)
        """

    def pre_logits(self, state: "StepState", logits: torch.Tensor) -> torch.Tensor:
        """Per step, per branch: logits ``[B, V]`` of every row (cond and uncond rows in ``state.layout``) before
        guidance. Return new logits of the same shape and dtype; never reopen a ``-inf``; keep CFG rows paired.
        """

    def post_cfg(self, state: "StepState", logits: torch.Tensor) -> torch.Tensor:
        """Per step: the guided logits ``[P, V]`` (one row per image or sequence), as left by the strategies before
        this one in the spec, before sampling. Return new logits; never reopen a ``-inf``; rows independent unless
        the strategy declares ``couples_rows``.
        """

    def kv_inject(self, state: "StepState") -> "list[KVAppend | KVEdit]":
        """Between steps (before the next token is fed): return ``KVAppend`` (K entries, ids or embeddings, for all
        rows or the rows in a ``[B]`` mask; the others get masked slots; positions advance by K unless
        ``advance=False``) and/or ``KVEdit`` (in-place additive edits of cached keys/values). Declare the most
        entries a run may append in ``kv_growth(state)`` so the static cache is sized at setup.
        """

    def schedule(self, state: "StepState") -> "Rebuild | Rollback | None":
        """Host side, at the step boundaries declared by ``schedule_points(state)`` (not graph-safe): may pause the
        loop, run nested generation through ``state.answer(...)``, and return ``Rebuild(prompts)`` (restart from new
        prompt texts plus the image tokens so far, fresh cache) or ``Rollback(steps, stream)`` (drop the last
        ``steps`` tokens from history and cache and regenerate them with RNG stream ``stream``). Boundary ``0`` is
        after the prefill, before the first token; boundary ``total_steps`` is after the last token, where only
        ``Rollback`` (or nothing) may be returned. After a rollback the loop calls ``schedule`` again at the boundary
        it returned to.
        """
