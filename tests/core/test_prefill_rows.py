"""A prefill runs identical rows once (``core.loop.distinct_rows``) and still gives every row its cache entries,
hidden states and logits — the same as running every row."""

from __future__ import annotations

import pytest
import torch

from janus_decoding import Decoder
from janus_decoding.core import loop
from janus_decoding.core.cfg import CFGConfig
from janus_decoding.core.runs import _image_prompt_rows, _new_state


def _prefill(model, prompts, decoder, *, dedup: bool, layout: str = "halves", layer_fn=None):
    """A state after the prefill of ``prompts`` (one image each, with CFG) and the prefill's logits."""
    cfg = CFGConfig(weight=5.0, layout=layout)
    batch = _image_prompt_rows(model, prompts, [None] * len(prompts), layout)
    state = _new_state(model, decoder, batch, mode="image", layout=layout, steps=8, seeds=list(range(len(prompts))),
                       indices=[0] * len(prompts), prompts=list(prompts), cfg=cfg, history_prefix=None)
    decoder.begin(state)
    state.memory["_flags"] = torch.zeros(state.num_pairs, dtype=torch.bool)
    state.memory["_prompt_layers"] = set(decoder.prompt_layers(state))
    seen: list = []
    original = loop.distinct_rows

    def spy(*args):
        rows = original(*args) if dedup else None
        seen.append(rows)
        return rows

    loop_distinct, loop.distinct_rows = loop.distinct_rows, spy
    try:
        logits = loop.prefill(state, decoder, batch, model.embed_text(batch.ids), layer_fn)
    finally:
        loop.distinct_rows = loop_distinct
    return state, logits, seen[0]


def _assert_same_prefill(a, b):
    (state_a, logits_a, _), (state_b, logits_b, _) = a, b
    torch.testing.assert_close(logits_a, logits_b, rtol=1e-5, atol=1e-5)
    assert state_a.cache.fill == state_b.cache.fill
    assert torch.equal(state_a.cache.valid, state_b.cache.valid)
    for layer in range(state_a.num_layers):
        torch.testing.assert_close(state_a.cache.keys[layer], state_b.cache.keys[layer], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state_a.cache.values[layer], state_b.cache.values[layer], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state_a.next_positions, state_b.next_positions)


@pytest.mark.parametrize("layout", ["halves", "interleaved"])
def test_images_of_one_prompt_prefill_two_rows(janus, layout):
    prompts = ["a red cube"] * 4
    with torch.inference_mode():
        deduped = _prefill(janus, prompts, Decoder(), dedup=True, layout=layout)
        plain = _prefill(janus, prompts, Decoder(), dedup=False, layout=layout)
    first, inverse = deduped[2]
    assert first.numel() == 2 and inverse.numel() == 8  # the prompt and the unconditional prompt
    rows = deduped[0].prompt_ids
    for b in range(8):  # row b stands for a row with the same ids
        assert torch.equal(rows[b], rows[first[inverse[b]]])
    assert len(set(inverse.tolist())) == 2
    _assert_same_prefill(deduped, plain)


def test_mixed_prompts_keep_their_distinct_rows(janus):
    prompts = ["a red cube", "a lighthouse at dusk", "a red cube"]
    with torch.inference_mode():
        deduped = _prefill(janus, prompts, Decoder(), dedup=True)
        plain = _prefill(janus, prompts, Decoder(), dedup=False)
    first, inverse = deduped[2]
    assert first.numel() < 6
    _assert_same_prefill(deduped, plain)
    assert not torch.equal(plain[1][0], plain[1][1])  # different prompts, different logits (the test can fail)


def test_all_distinct_rows_run_as_they_are(janus):
    with torch.inference_mode():
        _, _, rows = _prefill(janus, ["a red cube"], Decoder(), dedup=True,
                              layout="halves")  # one image: a prompt row and an unconditional row
    assert rows is None


def test_hidden_state_and_prompt_hooks_see_every_row(janus):
    """latent_control asks for a layer's hidden states and its prompt hidden states: both come back with B rows,
    equal to running every row (its prefill hooks see the rows the loop has)."""
    spec = "latent_control(layer=2)"
    with torch.inference_mode():
        deduped = _prefill(janus, ["a red cube"] * 3, Decoder.from_spec(spec), dedup=True)
        plain = _prefill(janus, ["a red cube"] * 3, Decoder.from_spec(spec), dedup=False)
    assert deduped[2] is not None
    _assert_same_prefill(deduped, plain)
    hidden = deduped[0].prompt_hidden(2)
    assert hidden.shape[0] == 6
    torch.testing.assert_close(hidden, plain[0].prompt_hidden(2), rtol=1e-5, atol=1e-5)


def test_dola_prefill_hidden_states_cover_every_row(janus):
    spec = 'dola(layers="high")'
    with torch.inference_mode():
        deduped = _prefill(janus, ["a red cube"] * 2, Decoder.from_spec(spec), dedup=True)
        plain = _prefill(janus, ["a red cube"] * 2, Decoder.from_spec(spec), dedup=False)
    assert deduped[2] is not None
    _assert_same_prefill(deduped, plain)  # DoLa's contrast at the prefill used every row's early-layer states


class _LayerHookAt2(Decoder):
    """A decoder whose hooks act between layers 1 and 2 of the prefill (as a pruning hook does)."""

    def layer_points(self, state):
        return [2]


def test_layer_hooks_and_a_filled_cache_turn_it_off(janus):
    with torch.inference_mode():
        state, _, rows = _prefill(janus, ["a red cube"] * 3, Decoder(), dedup=True)
        assert rows is not None
        embeds = janus.embed_text(state.prompt_ids)
        assert loop.distinct_rows(state, _LayerHookAt2(), embeds) is None
        assert loop.distinct_rows(state, Decoder(), embeds) is None  # the cache holds the prompt now
        state.cache.reset()
        assert loop.distinct_rows(state, Decoder(), embeds) is not None
        changed = embeds.clone()  # the same ids, but an input-embeddings hook moved one row's embeddings
        changed[0, -1, 0] += 1.0
        first, inverse = loop.distinct_rows(state, Decoder(), embeds)
        assert first.numel() == 2
        assert loop.distinct_rows(state, Decoder(), changed) is None


@pytest.mark.parametrize("spec", ["", 'dola(layers="high")', "repetition_penalty(penalty=1.3) > top_k(top_k=20)"])
def test_runs_of_one_prompt_give_the_tokens_of_the_full_prefill(janus, monkeypatch, spec):
    from janus_decoding.core.runs import ImageRequest, run_images
    from janus_decoding.core.loop import Sampler

    decoder = Decoder.from_spec(spec) if spec else Decoder()
    requests = [ImageRequest("a red cube", 0, k) for k in range(3)]

    def go():
        with torch.inference_mode():
            return run_images(janus, decoder, requests, cfg=decoder.cfg, sampler=Sampler(rng="row")).tokens

    deduped = go()
    monkeypatch.setattr(loop, "distinct_rows", lambda *args: None)
    assert torch.equal(deduped, go())


@pytest.mark.parametrize("dedup", [True, False])
@pytest.mark.parametrize("spec", ["", "latent_control(layer=2)"])
def test_the_fused_prefill_layers_give_the_modules_prefill(janus, dedup, spec):
    """``core.fused.PrefillLayers`` (the fast loop's prompt forward) against transformers' layer modules: the same
    cache, logits and prompt hidden states (fp32), with identical rows run once or not."""
    from janus_decoding.core.fused import PrefillLayers, fuse_projections

    prompts = ["a red cube", "a red cube", "a lighthouse at dusk"]
    layers = PrefillLayers(fuse_projections(janus), janus.head_dim, janus.num_kv_heads)
    with torch.inference_mode():
        fused = _prefill(janus, prompts, Decoder.from_spec(spec), dedup=dedup, layer_fn=layers)
        plain = _prefill(janus, prompts, Decoder.from_spec(spec), dedup=dedup)
    _assert_same_prefill(fused, plain)
    if spec:
        torch.testing.assert_close(fused[0].prompt_hidden(2), plain[0].prompt_hidden(2), rtol=1e-5, atol=1e-5)
