"""Early exits (``core/exits.py``): declared layers' last positions through the head in the final head call."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from janus_decoding.core.exits import exit_logits, head_logits, keep_exits


class _Hooks:
    def __init__(self, exits):
        self.exits = exits

    def exit_layers(self, state):
        return self.exits


def _state(rows=3, hidden=8, vocab=11, seed=0):
    """A stand-in state: a linear head, an affine 'final norm', no compiling; ``heads`` as the StepState's."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab, hidden, generator=g)
    head = lambda h, mode: h @ weight.T  # noqa: E731
    norm = lambda h: 2.0 * h + 1.0  # noqa: E731
    state = SimpleNamespace(mode="image", compile_backend=None, exits=None,
                            adapter=SimpleNamespace(head=head, final_norm=norm))
    state.compiled = lambda fn: fn
    state.heads = lambda h, final_norm: head(norm(h) if final_norm else h, "image")
    hiddens = {layer: torch.randn(rows, hidden, generator=g) for layer in range(4)}
    return state, hiddens, torch.randn(rows, hidden, generator=g)


@pytest.mark.parametrize("exits", [[(0, True), (2, True)], [(1, False), (3, True), (0, False)]],
                         ids=["normed", "mixed"])
def test_the_exits_go_through_the_final_head_call_and_equal_their_own(exits):
    state, hidden, final = _state()
    calls = []
    head = state.adapter.head
    state.adapter.head = lambda h, mode: calls.append(tuple(h.shape)) or head(h, mode)
    logits = head_logits(state, _Hooks(exits), final, hidden)
    assert calls == [(3 * (1 + len(exits)), 8)]  # one call for the final rows and every exit
    torch.testing.assert_close(logits, head(final, "image"))
    for layer, norm in exits:
        alone = state.heads(hidden[layer][None], final_norm=norm)
        torch.testing.assert_close(exit_logits(state, [layer], norm), alone)
    normed = [layer for layer, norm in exits if norm]
    want = state.heads(torch.stack([hidden[k] for k in normed[::-1]]), final_norm=True)
    torch.testing.assert_close(exit_logits(state, normed[::-1], True), want)  # another order: stacked rows


def test_after_a_prefill_the_exits_keep_their_hidden_states_until_asked():
    state, hidden, _ = _state()
    keep_exits(state, _Hooks([(1, True), (2, True)]), hidden)
    assert state.exits.logits is None
    torch.testing.assert_close(exit_logits(state, [1, 2], True),
                               state.heads(torch.stack([hidden[1], hidden[2]]), final_norm=True))
    keep_exits(state, _Hooks([]), hidden)
    assert state.exits is None


def test_an_undeclared_exit_is_refused_naming_it():
    state, hidden, final = _state()
    head_logits(state, _Hooks([(1, True)]), final, hidden)
    with pytest.raises(ValueError, match="layer 1 with final_norm=False was not declared"):
        exit_logits(state, [1], False)
    with pytest.raises(ValueError, match="layer 2 with final_norm=True"):
        exit_logits(state, [1, 2], True)
