"""Hard pruning really shrinks the static KV cache: layers ≥ k are allocated for the kept positions only."""

from __future__ import annotations

import pytest
import torch


from test_token_pruning_strategy import _run


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75])
def test_layers_after_the_pruning_layer_are_allocated_shorter(tiny_model, ratio) -> None:
    plain = _run(tiny_model, None).state.cache
    pruned = _run(tiny_model, {"layer": 2, "keep_ratio": ratio}).state.cache
    n_image = tiny_model.tokens_per_image
    dropped = n_image - int(torch.tensor(ratio * n_image).ceil())
    assert [k.shape[2] for k in pruned.keys[:2]] == [k.shape[2] for k in plain.keys[:2]]
    assert all(p.shape[2] == q.shape[2] - dropped for p, q in zip(pruned.keys[2:], plain.keys[2:]))
    assert pruned.nbytes() < plain.nbytes()


def test_soft_mode_allocates_the_full_cache(tiny_model) -> None:
    plain = _run(tiny_model, None).state.cache
    soft = _run(tiny_model, {"layer": 2, "keep_ratio": 0.5, "mode": "soft"}).state.cache
    assert soft.nbytes() == plain.nbytes()
