"""The prompt's forward (the prefill's layers and head) captured as a CUDA graph, replayed by later runs.

Why: the prefill launches ~25 kernels a layer from Python. At the 7B shape with identical rows run once its GPU work
is ~5 ms, but the host takes ~20 ms to launch it, so the first token waited ~22 ms (``benchmarks/generate.py
--phases``). A fast loop that replays its step's graphs for a run of the same signature (``core/reuse.py``) now
replays the prompt's graph too: the inputs are copied into the captured buffers, one replay, and the cache's host
bookkeeping (its fill) set as the captured forward left it.

Only a prefill that calls no hook inside its forward is captured (no layer or prompt-layer hooks): a hook's Python
runs while capturing, not at a replay. The input-embeddings hook runs before, as always; the hidden-state hooks
after, on the forward's outputs (the kept layers' last positions), replayed or not.
"""

from __future__ import annotations

from typing import Any

import torch

from .loop import prompt_logits
from .protocol import HookRunner, LayerFn
from .state import StepState

__all__ = ["PromptGraph", "PromptRunner", "prompt_capturable"]


def prompt_capturable(state: StepState, hooks: HookRunner) -> bool:
    """Whether the prefill's forward calls no hook (what a replay could not run)."""
    return not (list(hooks.layer_points(state)) or state.memory.get("_prompt_layers"))


def _key(state: StepState, embeds: torch.Tensor, rows: Any) -> tuple:
    return (tuple(embeds.shape), embeds.dtype, tuple(state.cache.fill), None if rows is None else rows.key)


class PromptGraph:
    """One captured prompt forward: its input buffers, graph, outputs and the cache fill it leaves. Every tensor
    the graph reads that was made outside the capture is held here or is the model's or the kept cache's."""

    def __init__(self, key: tuple, inputs: tuple[torch.Tensor, ...], graph: torch.cuda.CUDAGraph,
                 outputs: tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]], fill: list[int],
                 rows: Any) -> None:
        self.key, self.inputs, self.graph, self.outputs, self.fill = key, inputs, graph, outputs, fill
        self.rows = rows  # the row maps the graph reads: they must outlive the run that made them

    @classmethod
    def capture(cls, state: StepState, hooks: HookRunner, embeds: torch.Tensor, positions: torch.Tensor,
                valid: torch.Tensor, rows: Any, layer_fn: LayerFn | None) -> "PromptGraph":
        """Record :func:`core.loop.prompt_logits` over copies of the inputs (nothing runs; the cache's host fill is
        as before and after the capture)."""
        cache = state.cache
        key, before = _key(state, embeds, rows), list(cache.fill)
        inputs = (embeds.clone(), positions.clone(), valid.clone())
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=torch.cuda.graph_pool_handle()):
                outputs = prompt_logits(state, hooks, *inputs, rows, layer_fn)
            fill = list(cache.fill)
        finally:
            cache.fill[:] = before
        return cls(key, inputs, graph, outputs, fill, rows)

    def replay(self, state: StepState, embeds: torch.Tensor, positions: torch.Tensor,
               valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
        """The captured forward over these inputs → logits, next positions and kept hidden states (copies: the
        next replay writes the buffers again); the cache holds the prompt's entries and the fill the forward leaves."""
        for buffer, value in zip(self.inputs, (embeds, positions, valid)):
            buffer.copy_(value)
        self.graph.replay()
        state.cache.fill[:] = self.fill
        logits, next_positions, hidden = self.outputs
        return logits.clone(), next_positions.clone(), {k: v.clone() for k, v in hidden.items()}


class PromptRunner:
    """``core.loop.prefill``'s ``through``: replays ``kept`` when the prompt matches it, else runs the forward and,
    when ``capture`` allows, records it for the next run (``captured``)."""

    def __init__(self, kept: PromptGraph | None, capture: bool) -> None:
        self.kept, self.capture = kept, capture
        self.captured: PromptGraph | None = None
        self.replayed = False
        self.failed: str | None = None  # why a capture failed

    def __call__(self, state: StepState, hooks: HookRunner, embeds: torch.Tensor, positions: torch.Tensor,
                 valid: torch.Tensor, rows: Any, layer_fn: LayerFn | None) -> tuple:
        if self.kept is not None and self.kept.key == _key(state, embeds, rows):
            self.captured, self.replayed = self.kept, True
            return self.kept.replay(state, embeds, positions, valid)
        before = list(state.cache.fill)
        out = prompt_logits(state, hooks, embeds, positions, valid, rows, layer_fn)
        if self.capture:
            after = list(state.cache.fill)
            state.cache.fill[:] = before
            try:
                self.captured = PromptGraph.capture(state, hooks, embeds, positions, valid, rows, layer_fn)
            except RuntimeError as error:  # something in the forward cannot be captured: it stays eager
                self.failed = f"{type(error).__name__}: {str(error).splitlines()[0]}"
                if embeds.is_cuda:
                    torch.cuda.synchronize(embeds.device)
            finally:
                state.cache.fill[:] = after
        return out
