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

    def __init__(self, key, logits, next_positions, hidden=None):
        self.key, self.out, self.replays = key, (logits, next_positions, hidden or {}), 0

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


class _LayerHookAt1(Decoder):
    """A decoder whose hook acts between layers 0 and 1 of the prefill (as a pruning hook does)."""

    def layer_points(self, state):
        return [1]


@pytest.mark.parametrize("make, capturable", [
    (Decoder, True), (lambda: Decoder.from_spec("top_k(top_k=5)"), True),
    (lambda: Decoder.from_spec("dola(layers=[0, 1])"), True),  # its hidden states are outputs; the hook runs after
    (_LayerHookAt1, False)], ids=["plain", "top_k", "dola", "layer-hook"])
def test_only_a_prefill_whose_forward_calls_no_hook_is_captured(janus, make, capturable):
    decoder = make()
    state, _ = _state(janus, decoder)
    assert prompt_capturable(state, decoder) is capturable


def test_a_replayed_prefill_hands_its_hidden_states_to_the_exits(janus, monkeypatch):
    """DoLa's prefill replays too: the forward's kept hidden states are outputs of the graph, and the exits (and the
    hidden-state hooks) get the replay's, so the first token's contrast uses this run's prompt."""
    decoder = Decoder.from_spec("dola(layers=[0, 1])")
    state, batch = _state(janus, decoder)
    hidden = {layer: torch.randn(state.rows, janus.hidden_size) for layer in (0, 1)}
    kept = _Captured(prompt_graph._key(state, janus.embed_text(batch.ids), None), None,
                     state.prompt_positions[:, -1] + 1, hidden)
    runner = PromptRunner(kept, capture=False)
    monkeypatch.setattr(prompt_graph, "_key", lambda *args: kept.key)  # whatever the rows: this is the kept prompt
    logits = prefill(state, decoder, batch, janus.embed_text(batch.ids), through=runner)
    assert runner.replayed and logits is None
    assert state.exits.keys == ((0, True), (1, True)) and state.exits.logits is None
    assert all(state.exits.hidden[layer] is hidden[layer] for layer in (0, 1))
    early = state.exit_logits([0, 1], final_norm=True)  # the head runs now, over the replay's hidden states
    assert early.shape == (2, state.rows, janus.image_vocab_size)
