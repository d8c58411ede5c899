"""The sampler loop: prefill, the one-token step, and the outer loop, for image and text modes.

One step, in order (image mode): schedule hooks (host, at declared boundaries) → KV-inject hooks → forward one token
through the layers (hidden-states hooks see the requested layers) → head → pre-logits hooks → guidance → post-CFG
hooks → sample → record → re-embed. Prefill adds the input-embeddings hook before layer 0 and layer hooks between
layers. Text mode is the same loop with ``lm_head``, no guidance, and a device-side EOS mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .batch import PromptBatch
from .cfg import guide_rows, pair_rows
from .exits import head_logits, keep_exits
from .prompt_rows import DistinctRows, distinct_rows
from .protocol import HookRunner, KVAppend, KVEdit, LayerFn, LayerKeep, PromptForward, Rebuild, Rollback
from .sampling import greedy, probabilities_and_flags, sample_row_rng, sample_torch
from .state import StepState

EOS_CHECK_EVERY = 8  # text mode: one host sync per this many tokens to see whether every row has finished


@dataclass
class Sampler:
    greedy: bool = False
    rng: str = "row"
    generator: torch.Generator | None = None  # rng="torch"
    # rng="row": draw(probs [P, V], state) -> ids [P] in place of sample_row_rng (the fast path's precomputed hashes)
    row_draw: Callable[[torch.Tensor, StepState], torch.Tensor] | None = None


@dataclass
class _Boundary:
    """What the loop needs to resume at a step boundary (for rollbacks)."""
    fill: list[int]
    next_positions: torch.Tensor
    logits: torch.Tensor | None  # set when a prefill produced this step's logits


@dataclass
class RunResult:
    tokens: torch.Tensor  # [P, steps]
    lengths: torch.Tensor  # [P] tokens generated per row (text mode stops at EOS)
    state: StepState
    flags: torch.Tensor  # [P] bool: a row whose final logits were NaN, +inf or had no finite entry
    boundaries: list[int] = field(default_factory=list)


def forward(state: StepState, hooks: HookRunner, embeds: torch.Tensor, positions: torch.Tensor,
            new_valid: torch.Tensor, *, prefill: bool, rows: tuple[torch.Tensor, torch.Tensor] | None = None,
            layer_fn: LayerFn | None = None, hidden: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Run ``[B, T, H]`` embeddings through every layer, writing T slots into the cache; returns the last output.

    During a prefill the layer hooks may shorten the sequence from their layer on. ``hidden`` receives the last
    position ``[B, H]`` of the layers ``hooks.hidden_layers`` asks for (the caller hands them to the hidden-states
    hooks and the exits: a captured prompt forward runs no hook). ``rows`` = ``(first [U], inverse [B])``: the
    layers run over rows ``first`` only, the cache and the hooks still get all B rows (b is ``inverse[b]`` of the U),
    the output is ``[U, T, H]``. ``layer_fn`` stands in for the layer modules (``core.fused.PrefillLayers``)."""
    adapter, cache = state.adapter, state.cache
    cache.begin_write(embeds.shape[1], new_valid, rows)
    every_row = (lambda x: x) if rows is None else (lambda x: x[rows[1]])
    if rows is not None:
        embeds, positions = embeds[rows[0]], positions[rows[0]]
    cos_sin = adapter.rotary(embeds, positions)
    wanted = set(hooks.hidden_layers(state))
    points = set(hooks.layer_points(state)) if prefill else set()
    keep_inputs = {p - 1 for p in points}
    captured = {} if hidden is None else hidden
    h, masks = embeds, {}
    for index, layer in enumerate(adapter.layers):
        if index in points:
            keep = hooks.layer(state, index, h)
            if keep is not None:
                h, positions, cos_sin = _apply_keep(state, keep, index, h, positions, adapter)
                masks = {}
        if prefill and index in keep_inputs:
            state._layer_inputs[index] = h
        if prefill and index in state.memory.get("_prompt_layers", ()):
            state._prompt_hidden[index] = every_row(h)
        if index in wanted:
            captured[index] = every_row(h[:, -1])
        group = cache.group[index]
        if group not in masks:
            mask = cache.attention_mask(index, h.shape[1])
            masks[group] = mask if rows is None else mask[rows[0]]
        if layer_fn is None:
            h = layer(h, masks[group], positions, cache, True, cos_sin)
        else:
            h = layer_fn(index, h, masks[group], cos_sin, cache)
    if adapter.num_layers in wanted:
        captured[adapter.num_layers] = every_row(h[:, -1])
    if prefill and adapter.num_layers in state.memory.get("_prompt_layers", ()):
        state._prompt_hidden[adapter.num_layers] = every_row(h)
    cache.end_write()
    return h


def _apply_keep(state, keep: LayerKeep, index, h, positions, adapter):
    if keep.soft:
        dropped = torch.ones(h.shape[:2], dtype=torch.bool, device=h.device)
        dropped.scatter_(1, keep.positions, False)
        return h.masked_fill(dropped[..., None], 0.0), positions, adapter.rotary(h, positions)
    kept = keep.positions  # [B, T']
    h = torch.gather(h, 1, kept[..., None].expand(-1, -1, h.shape[-1]))
    positions = torch.gather(positions, 1, kept)
    state.cache.restrict_write(range(index, adapter.num_layers), kept)
    return h, positions, adapter.rotary(h, positions)


def prefill(state: StepState, hooks: HookRunner, batch: PromptBatch, embeds: torch.Tensor,
            layer_fn: LayerFn | None = None, through: PromptForward | None = None) -> torch.Tensor:
    """The prompt's forward: input-embeddings hook, layers (with layer hooks), head → logits ``[B, V]``.

    Rows with identical inputs (the 16 images of one prompt with CFG share two: the prompt and the unconditional
    one) are run once (:func:`distinct_rows`); every row still gets its cache entries, hidden states and logits.
    ``layer_fn``: as in :func:`forward`; ``through`` stands in for :func:`prompt_logits` (the fast loop replays it)."""
    embeds = hooks.input_embeddings(state, embeds)
    rows = distinct_rows(state, hooks, embeds)
    logits, state.next_positions, hidden = (through or prompt_logits)(state, hooks, embeds, state.prompt_positions,
                                                                      state.attention_mask, rows, layer_fn)
    if hidden:
        hooks.hidden_states(state, hidden)
    keep_exits(state, hooks, hidden)  # their head runs when a hook asks (one step of hundreds)
    return logits


def prompt_logits(state: StepState, hooks: HookRunner, embeds: torch.Tensor, positions: torch.Tensor,
                  valid: torch.Tensor, rows: DistinctRows | None, layer_fn: LayerFn | None) -> tuple[torch.Tensor, ...]:
    """:func:`prefill`'s device work: the layers and the head → logits ``[B, V]``, next positions ``[B]`` and the
    kept hidden states ``{layer: [B, H]}``."""
    hidden: dict[int, torch.Tensor] = {}
    h = forward(state, hooks, embeds, positions, valid, prefill=True, rows=rows, layer_fn=layer_fn, hidden=hidden)
    logits = state.adapter.head(state.adapter.final_norm(h[:, -1]), state.mode)
    return (logits if rows is None else logits[rows[1]]), positions[:, -1] + 1, hidden


def select_token(state: StepState, hooks: HookRunner, logits: torch.Tensor, sampler: Sampler) -> torch.Tensor:
    """pre-logits hooks → guidance (image mode) → post-CFG hooks → sample → record. ``[B, V]`` → ``[P]`` ids.

    The pure pieces between the hooks (guidance, the softmax with the NaN/inf flags, the row RNG's draw) go through
    ``state.compiled``: a compiling fast loop fuses each into a kernel or two (the row draw alone is ~40 elementwise
    ops), the eager loop runs them as written.
    """
    logits = hooks.pre_logits(state, logits)
    if state.mode == "image":
        logits = state.compiled(guide_rows)(logits, state.layout, state.current_cfg_weight())
    logits = hooks.post_cfg(state, logits)  # [P, V]
    probs, bad = state.compiled(probabilities_and_flags)(logits)
    if sampler.greedy:
        tokens = state.compiled(greedy)(logits)  # compiled: a split reduction, not one block per row
    elif sampler.rng == "row":
        if sampler.row_draw is not None:
            tokens = sampler.row_draw(probs, state)
        else:
            tokens = sample_row_rng(probs, state.rng_keys, state.step_t)
    else:
        tokens = sample_torch(probs, sampler.generator)
    state.memory["_flags"] |= bad
    state.last_probs = probs
    record(state, tokens)
    hooks.after_sample(state, tokens, probs)
    return tokens


def record(state: StepState, tokens: torch.Tensor, *, mark_valid: bool = True) -> None:
    """Write ids ``[P]`` at column ``step_t`` of the generated ids and of the history (and mark it valid).

    The column is the device step (not the host ``state.step``), so a captured step records where each replay is.
    """
    column = state.step_t.view(1)  # [1]
    state.generated.index_copy_(1, column, tokens[:, None])
    history_column = column + state.history_offset
    state.history.index_copy_(1, history_column, tokens[:, None])
    if mark_valid:
        state.history_valid.index_fill_(1, history_column, True)


def finish_text(state: StepState, tokens: torch.Tensor, finished: torch.Tensor, lengths: torch.Tensor,
                eos_id: int | None, pad_id: int) -> torch.Tensor:
    """Text mode after sampling, on the device: rows that already finished get ``pad_id`` (recorded in place of
    their sample), ``lengths`` counts the rows still going, and an EOS finishes its row. Returns the ids ``[P]``."""
    tokens = torch.where(finished, torch.full_like(tokens, pad_id), tokens)
    record(state, tokens, mark_valid=False)  # select_token marked this column already
    lengths += (~finished).long()
    if eos_id is not None:
        finished |= tokens == eos_id
    return tokens


def embed_next(state: StepState, tokens: torch.Tensor) -> torch.Tensor:
    """Sampled ids ``[P]`` → next input embeddings ``[B, 1, H]`` (both rows of a pair get the same token)."""
    if state.mode == "image":
        return state.adapter.embed_image_tokens(pair_rows(tokens, state.layout))[:, None]
    return state.adapter.embed_text(tokens[:, None])


def decode_step(state: StepState, hooks: HookRunner, embeds: torch.Tensor) -> torch.Tensor:
    """Forward one token ``[B, 1, H]`` → logits ``[B, V]`` (fixed shapes; no host syncs)."""
    valid, hidden = torch.ones(embeds.shape[0], 1, dtype=torch.bool, device=embeds.device), {}
    h = forward(state, hooks, embeds, state.next_positions[:, None], valid, prefill=False, hidden=hidden)
    state.next_positions = state.next_positions + 1
    if hidden:
        hooks.hidden_states(state, hidden)
    return head_logits(state, hooks, state.adapter.final_norm(h[:, -1]), hidden)


def inject(state: StepState, hooks: HookRunner, actions: list[KVAppend | KVEdit]) -> None:
    """Apply KV-inject actions between steps: appended entries (masked for rows that did not inject) or edits."""
    for action in actions:
        if isinstance(action, KVEdit):
            state.cache.add_(action.layer, action.slot, action.d_key, action.d_value, action.rows)
            continue
        embeds = action.embeds if action.embeds is not None else state.adapter.embed_text(action.ids)
        k, rows = embeds.shape[1], action.rows
        rows = rows if rows is not None else torch.ones(embeds.shape[0], dtype=torch.bool, device=embeds.device)
        positions = state.next_positions[:, None] + torch.arange(k, device=embeds.device)[None]
        forward(state, hooks, embeds, positions, rows[:, None].expand(-1, k), prefill=False)  # no hook fires
        if action.advance:
            state.next_positions = state.next_positions + k * rows.long()


def roll_back(state: StepState, boundaries: dict[int, _Boundary], action: Rollback, t: int):
    """Return to boundary ``t − steps``: truncate the cache, restore positions, forget the history, switch the RNG
    stream. Returns the new step, that boundary's logits (set when a prefill produced them) and the token to feed."""
    target = boundaries[t - action.steps]
    state.cache.truncate_to(target.fill)
    state.next_positions = target.next_positions.clone()
    state.rng_keys[:, 2] = action.stream
    state.history_valid[:, state.history_offset + t - action.steps:] = False
    t -= action.steps
    return t, target.logits, (state.generated[:, t - 1] if t > 0 else None)


def apply_schedule(state: StepState, hooks: HookRunner, boundaries: dict[int, _Boundary],
                   rebuild: Callable[[StepState, Rebuild], tuple] | None, t: int, logits, tokens):
    """Ask the schedule hooks at boundary ``t`` and carry out what they return (a rollback or a rebuilt prefill).

    Returns ``(t, logits, tokens, acted)`` with ``acted`` one of ``"rollback"``, ``"rebuild"`` or ``None``.
    """
    action = hooks.schedule(state)
    if isinstance(action, Rollback):
        return (*roll_back(state, boundaries, action, t), "rollback")
    if isinstance(action, Rebuild):
        if t == state.total_steps:
            raise ValueError("schedule: a Rebuild after the last step has nothing left to generate")
        batch, embeds = rebuild(state, action)
        state.cache.reset()
        return t, prefill(state, hooks, batch, embeds), tokens, "rebuild"
    return t, logits, tokens, None


def run(state: StepState, hooks: HookRunner, batch: PromptBatch, embeds: torch.Tensor, sampler: Sampler, *,
        eos_id: int | None = None, pad_id: int = 0, rebuild: Callable[[StepState, Rebuild], tuple] | None = None,
        progress: Callable[[int], None] | None = None) -> RunResult:
    """The outer loop over ``state.total_steps`` steps, with rollbacks and rebuilds from schedule hooks."""
    hooks.begin(state)
    state.memory["_flags"] = torch.zeros(state.num_pairs, dtype=torch.bool, device=embeds.device)
    state.memory["_prompt_layers"] = set(hooks.prompt_layers(state))
    logits: torch.Tensor | None = prefill(state, hooks, batch, embeds)
    points = set(hooks.schedule_points(state))
    boundaries: dict[int, _Boundary] = {}
    finished = torch.zeros(state.num_pairs, dtype=torch.bool, device=embeds.device)
    lengths = torch.zeros(state.num_pairs, dtype=torch.long, device=embeds.device)
    tokens = None
    t = 0
    while True:  # t == total_steps is visited once more, for a schedule hook after the last token
        state.step = t
        if t < state.total_steps:
            state.step_t.fill_(t)
        if t in points:
            t, logits, tokens, acted = apply_schedule(state, hooks, boundaries, rebuild, t, logits, tokens)
            if acted == "rollback":
                continue
        if t == state.total_steps:
            state.step = t - 1  # as after the last step
            break
        boundaries[t] = _Boundary(list(state.cache.fill), state.next_positions.clone(), logits)
        if logits is None:
            inject(state, hooks, hooks.kv_inject(state))
            logits = decode_step(state, hooks, embed_next(state, tokens))
        tokens = select_token(state, hooks, logits, sampler)
        logits = None
        if state.mode == "text":
            tokens = finish_text(state, tokens, finished, lengths, eos_id, pad_id)
            if eos_id is not None and (t + 1) % EOS_CHECK_EVERY == 0 and bool(finished.all()):
                break
        if progress is not None:
            progress(1)
        t += 1
    if state.mode == "image":
        lengths.fill_(state.total_steps)
    hooks.end(state)
    return RunResult(state.generated, lengths, state, state.memory["_flags"], sorted(boundaries))
