"""Early exits: the last-position hidden states of declared layers through the mode's head.

A strategy declares ``exit_layers(state)`` — ``(layer, final_norm)`` pairs — and reads
``state.exit_logits(layers, final_norm=...)`` (``[J, B, V]``) in its ``pre_logits`` or ``post_cfg`` hook. In the
one-token step the loop runs those rows through the head in the same call as the final rows
(:func:`head_logits`): the head's weights are read once a step instead of twice. At the 1B shape ``gen_head`` is
75 MB (~20 µs a read on an H200) and the two calls' kernels and gaps were ~30 µs of DoLa's ~80 µs a step. After a
prefill the exits keep their hidden states and go through the head on their own when asked (a prefill is one step
of hundreds, and its forward may be a replayed graph whose outputs are only the logits and these hidden states).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .fused import final_rms_norm, rms_norm
from .protocol import HookRunner

__all__ = ["Exits", "exit_keys", "keep_exits", "head_logits", "exit_logits"]

ExitKey = tuple[int, bool]  # (layer, final_norm)


@dataclass
class Exits:
    """One forward's exits: the declared keys in row-block order, their hidden states ``{layer: [B, H]}``, and
    their logits ``[J, B, V]`` when the loop ran them with the final rows."""

    keys: tuple[ExitKey, ...]
    hidden: dict[int, torch.Tensor]
    logits: torch.Tensor | None = None


def exit_keys(state, hooks: HookRunner) -> tuple[ExitKey, ...]:
    """The declared exits, normed ones first (one norm call over a contiguous block), then by layer."""
    return tuple(sorted(set(hooks.exit_layers(state)), key=lambda k: (not k[1], k[0])))


def _stack_rows(final: torch.Tensor, normed: Sequence[torch.Tensor], raw: Sequence[torch.Tensor],
                norm: tuple[torch.Tensor, float] | None) -> torch.Tensor:
    # [B, H] final rows, then each exit's [B, H] (the normed block through the LLaMA rms norm): one [B·(1+J), H]
    parts = [final]
    if normed:
        parts.append(rms_norm(torch.stack(list(normed)), *norm).flatten(0, 1))
    if raw:
        parts.append(torch.stack(list(raw)).flatten(0, 1))
    return torch.cat(parts)


def _rows(state, final: torch.Tensor, keys: tuple[ExitKey, ...], hidden: dict[int, torch.Tensor]) -> torch.Tensor:
    normed = [hidden[layer] for layer, norm in keys if norm]
    raw = [hidden[layer] for layer, norm in keys if not norm]
    rms = final_rms_norm(state.adapter) if state.compile_backend is not None else None
    if rms is not None or not normed:  # one compiled call: the stack, the norm and the concatenation
        return state.compiled(_stack_rows)(final, normed, raw, rms)
    parts = [final, state.adapter.final_norm(torch.stack(normed)).flatten(0, 1)]
    return torch.cat(parts + ([torch.stack(raw).flatten(0, 1)] if raw else []))


def keep_exits(state, hooks: HookRunner, hidden: dict[int, torch.Tensor]) -> None:
    """After a prefill: the exits keep their hidden states; :func:`exit_logits` runs the head when a hook asks."""
    keys = exit_keys(state, hooks)
    state.exits = Exits(keys, {layer: hidden[layer] for layer, _ in keys}) if keys else None


def head_logits(state, hooks: HookRunner, final: torch.Tensor, hidden: dict[int, torch.Tensor]) -> torch.Tensor:
    """The one-token step's head: final-normed rows ``[B, H]`` → logits ``[B, V]``, with the declared exits' rows in
    the same head call (their logits go to ``state.exits``)."""
    keys = exit_keys(state, hooks)
    if not keys:
        state.exits = None
        return state.adapter.head(final, state.mode)
    kept, rows = {layer: hidden[layer] for layer, _ in keys}, final.shape[0]
    out = state.adapter.head(_rows(state, final, keys, kept), state.mode)  # [B·(1+J), V]
    state.exits = Exits(keys, kept, out[rows:].unflatten(0, (len(keys), rows)))
    return out[:rows]


def exit_logits(state, layers: Sequence[int], final_norm: bool) -> torch.Tensor:
    """``state.exit_logits``: ``[J, B, V]`` for ``layers`` (declared with this ``final_norm``), this forward."""
    exits: Exits | None = state.exits
    wanted = [(layer, final_norm) for layer in layers]
    missing = [k for k in wanted if exits is None or k not in exits.keys]
    if missing:
        raise ValueError(f"exit_logits: layer {missing[0][0]} with final_norm={final_norm} was not declared by "
                         f"any strategy's exit_layers")
    if exits.logits is None:  # after a prefill: the head runs for them now
        return state.heads(torch.stack([exits.hidden[layer] for layer in layers]), final_norm=final_norm)
    index = [exits.keys.index(k) for k in wanted]
    if index == list(range(index[0], index[0] + len(index))):
        return exits.logits[index[0]:index[0] + len(index)]  # a view: the usual case, one strategy's block
    return torch.stack([exits.logits[i] for i in index])  # host ints: no index tensor to copy inside a capture
