"""The bookkeeping around the prompt's captured forward (``core/prompt_graph.py``), on CPU with a stand-in for the
CUDA graph: when a run replays, when it captures, and that the cache's host fill is what the eager prefill left
whatever the capture does. (The capture and replay themselves run in the CUDA tests of ``test_graph_reuse.py``.)"""

from __future__ import annotations

import pytest
import torch

from janus_decoding import Decoder
from janus_decoding.core import prompt_graph
from janus_decoding.core.cfg import CFGConfig
from janus_decoding.core.loop import prefill
from janus_decoding.core.prompt_graph import PromptRunner, prompt_capturable
from janus_decoding.core.runs import _image_prompt_rows, _new_state


def _state(model, decoder, prompts=("a red fox", "a red fox")):
    cfg = CFGConfig(weight=5.0, layout="interleaved")
    batch = _image_prompt_rows(model, list(prompts), [None] * len(prompts), "interleaved")
    state = _new_state(model, decoder, batch, mode="image", layout="interleaved", steps=4, seeds=[0] * len(prompts),
                       indices=list(range(len(prompts))), prompts=list(prompts), cfg=cfg, history_prefix=None)
    decoder.begin(state)
    state.memory["_prompt_layers"] = set(decoder.prompt_layers(state))
    return state, batch


class _Captured:
    """Stands in for a PromptGraph: its key, and what a replay returns."""

    def __init__(self, key, logits, next_positions):
        self.key, self.out, self.replays = key, (logits, next_positions), 0

    def replay(self, state, embeds, positions, valid):
        self.replays += 1
        state.cache.fill[:] = [embeds.shape[1]] * len(state.cache.fill)
        return self.out


def test_a_run_captures_after_its_eager_prefill_and_keeps_the_fill(janus, monkeypatch):
    decoder = Decoder()
    state, batch = _state(janus, decoder)
    seen = {}

    def capture(state, hooks, embeds, positions, valid, rows, layer_fn):
        seen["fill"] = list(state.cache.fill)  # as before the prefill: the capture records from there
        return _Captured(prompt_graph._key(state, embeds, rows), None, None)

    monkeypatch.setattr(prompt_graph.PromptGraph, "capture", staticmethod(capture))
    runner = PromptRunner(None, capture=True)
    logits = prefill(state, decoder, batch, janus.embed_text(batch.ids), through=runner)
    length = batch.ids.shape[1]
    assert seen["fill"] == [0] * janus.num_layers and state.cache.fill == [length] * janus.num_layers
    assert runner.captured is not None and not runner.replayed and logits.shape[0] == state.rows

    again, batch = _state(janus, decoder)  # the same prompt shape and rows: the next run replays
    sentinel = (torch.zeros(again.rows, 3), again.prompt_positions[:, -1] + 1)
    kept = _Captured(runner.captured.key, *sentinel)
    replaying = PromptRunner(kept, capture=True)
    assert prefill(again, decoder, batch, janus.embed_text(batch.ids), through=replaying) is sentinel[0]
    assert replaying.replayed and kept.replays == 1 and again.cache.fill == [length] * janus.num_layers

    other, batch = _state(janus, decoder, ("a red fox", "a blue fox in the snow"))  # another shape: no replay
    fresh = PromptRunner(kept, capture=False)
    prefill(other, decoder, batch, janus.embed_text(batch.ids), through=fresh)
    assert not fresh.replayed and kept.replays == 1 and fresh.captured is None


def test_a_failed_capture_leaves_the_eager_prefill_and_says_why(janus, monkeypatch):
    decoder = Decoder()
    state, batch = _state(janus, decoder)

    def capture(*args):
        raise RuntimeError("Cannot copy between CPU and CUDA tensors during CUDA graph capture\nmore")

    monkeypatch.setattr(prompt_graph.PromptGraph, "capture", staticmethod(capture))
    runner = PromptRunner(None, capture=True)
    prefill(state, decoder, batch, janus.embed_text(batch.ids), through=runner)
    assert runner.captured is None and runner.failed.startswith("RuntimeError: Cannot copy")
    assert state.cache.fill == [batch.ids.shape[1]] * janus.num_layers


@pytest.mark.parametrize("spec, capturable", [("", True), ("top_k(top_k=5)", True), ("dola(layers=[0, 1])", False)])
def test_only_a_prefill_that_calls_no_hook_with_tensors_is_captured(janus, spec, capturable):
    decoder = Decoder.from_spec(spec)
    state, _ = _state(janus, decoder)
    assert prompt_capturable(state, decoder) is capturable
