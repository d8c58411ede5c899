"""One test per hook point (``test_hook_<name>``, checked by test_docs.py) plus the services a hook receives.

Every fixture plugin is a real module in ``tests/plugins_fixtures/`` registered through ``build_registry``; the
strategies report what they saw through the trace.
"""

from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from janus_decoding import Decoder
from janus_decoding.core.cfg import pair_rows, split_branches
from janus_decoding.core.protocol import Rollback
from janus_decoding.plugins.decoder import StrategyOutputError
from janus_decoding.plugins.registry import build_registry
from plugins_fixtures import kv_hooks, prefill_hooks, recorders, schedule_hooks, step_hooks

FIXTURES = [recorders, prefill_hooks, step_hooks, kv_hooks, schedule_hooks]
PROMPT = "a red cube on a blue sphere"


@pytest.fixture(scope="module")
def registry():
    return build_registry(extra_plugins=FIXTURES)


@pytest.fixture(scope="module")
def reference(janus_folder):
    """A second copy of the tiny Janus for reference computations with ``output_hidden_states``: transformers installs
    output-capturing forward hooks on a model's layers the first time it is asked for them, and those hooks (a
    ContextVar read) would break the decode step's graph for every later test sharing the session model."""
    import janus_decoding

    return janus_decoding.load_model(str(janus_folder))


def _decoder(spec: str, registry) -> Decoder:
    return Decoder.from_spec(spec, registry=registry)


def _images(handle, spec, registry, *, prompts=PROMPT, **kwargs):
    kwargs.setdefault("seed", 0)
    return _decoder(spec, registry).generate_images(handle, prompts, **kwargs)


def _event(result, name: str) -> dict:
    found = [e for e in result.trace if e["strategy"] == name]
    assert found, f"no trace from {name}: {result.trace}"
    return found[-1]


def _language_model(handle):
    return handle.model.model.language_model


def _hidden_entering(reference, embeds, layer: int):
    """[B, T, H] hidden state entering decoder layer ``layer`` (index convention: 0 = embeddings), by transformers."""
    return _language_model(reference)(inputs_embeds=embeds, output_hidden_states=True).hidden_states[layer]


def _prompt_embeds(handle, prompt=PROMPT):
    """[2, T0, H] cond and uncond rows of one prompt (no padding), as the loop builds them."""
    cond = handle.generation_prompt_ids(prompt)
    uncond = [cond[0], *([handle.pad_id] * (len(cond) - 2)), cond[-1]]
    ids = torch.tensor([cond, uncond])
    return ids, handle.embed_text(ids)


# -- hook points, in loop order -----------------------------------------------------------------------------------
def test_hook_schedule(janus, registry):
    """Rollback truncates the cache and regenerates the last steps with a new RNG stream; the grid is complete."""
    plain = _images(janus, "", registry, n=2).tokens[0]  # [2, 16]
    result = _images(janus, "rollback_once(at=8, steps=4, stream=3)", registry, n=2)
    got, seen = result.tokens[0], _event(result, "rollback_once")
    assert torch.equal(seen["before"], plain[:, :8])  # what existed when the schedule hook ran
    assert torch.equal(got[:, :4], plain[:, :4])  # before the rolled-back window: untouched
    assert not torch.equal(got[:, 4:8], plain[:, 4:8])  # regenerated with stream 3: different samples
    assert (seen["keys"][:, 2] == 3).all()
    assert seen["history_complete"]
    assert got.shape == plain.shape and ((got >= 0) & (got < janus.image_vocab_size)).all()
    # the cache holds exactly one run's worth of slots: prompt + 15 fed tokens (the rolled-back ones were dropped)
    t0 = len(janus.generation_prompt_ids(PROMPT))
    assert seen["fill"] == [t0 + 15] * janus.num_layers
    assert seen["fill_at_rollback"] == [t0 + 7] * janus.num_layers


def test_hook_schedule_rebuild(janus, registry):
    """Rebuild restarts from a new prompt plus the image tokens so far, with a fresh prefill."""
    plain = _images(janus, "", registry).tokens[0, 0]
    new_prompt = "a small green dog sleeping"
    result = _images(janus, f'rebuild_once(at=8, prompt="{new_prompt}")', registry)
    got, seen = result.tokens[0, 0], _event(result, "rebuild_once")
    assert torch.equal(got[:8], plain[:8])
    assert not torch.equal(got[8:], plain[8:])
    new_ids = torch.tensor(janus.generation_prompt_ids(new_prompt))
    t = new_ids.numel()
    cond, uncond = split_branches(seen["prompt_ids"], "interleaved")
    assert torch.equal(cond[0, :t], new_ids)
    assert torch.equal(cond[0, t:], plain[:8])  # the generated image tokens follow the new prompt
    assert uncond[0, 0] == new_ids[0] and uncond[0, t - 1] == new_ids[-1]
    assert (uncond[0, 1: t - 1] == janus.pad_id).all()
    assert seen["positions"][0].tolist() == list(range(t + 8))
    assert seen["fill"] == [t + 8 + 7] * janus.num_layers


def test_hook_schedule_rebuild_overflow_is_a_clear_error(janus, registry):
    with pytest.raises(RuntimeError, match="KV cache overflow"):
        _images(janus, 'rebuild_once(at=8, prompt="a much much longer prompt than before, with many words", '
                       'growth=0)', registry)


def test_hook_kv_inject(janus, registry):
    """A KVAppend that no row takes (advance=False) leaves the tokens exactly as the plain loop makes them."""
    plain = _images(janus, "", registry, n=2, rng="torch", seed=5).tokens
    masked = _images(janus, "inject(at=3, count=3, image=-1, advance=false)", registry, n=2, rng="torch", seed=5)
    assert torch.equal(masked.tokens, plain)
    seen = _event(masked, "inject")
    assert [b + 3 for b in seen["fill_before"]] == [f - 13 for f in seen["fill"]]  # +3 injected, then steps 3..15 fed
    assert torch.equal(seen["next_positions"], seen["positions_before"] + 13)


def test_hook_kv_inject_one_pair(janus, registry):
    """Injecting for one image grows every layer's fill by K, moves both rows of its pair, masks the others."""
    k = 2
    plain = _images(janus, "", registry, n=2).tokens[0]
    result = _images(janus, f"inject(at=3, count={k}, image=0, advance=true, as_ids=true)", registry, n=2)
    seen = _event(result, "inject")
    t0 = len(janus.generation_prompt_ids(PROMPT))
    assert seen["fill"] == [t0 + 15 + k] * janus.num_layers
    before, after = seen["positions_before"], seen["next_positions"]
    steps_after = 16 - 3
    assert torch.equal(after, before + steps_after + torch.tensor([k, k, 0, 0]))  # interleaved: pair 0 = rows 0, 1
    cond_pos, uncond_pos = split_branches(after, "interleaved")
    assert torch.equal(cond_pos, uncond_pos)  # CFG rows stay paired
    slots = seen["valid"][:, :, seen["fill_before"][0]: seen["fill_before"][0] + k]  # [N, B, K]
    assert slots[:, :2].all() and not slots[:, 2:].any()
    # the image that did not inject is untouched; the one that did changes
    assert torch.equal(result.tokens[0, 1], plain[1])
    assert not torch.equal(result.tokens[0, 0], plain[0])


def test_hook_kv_inject_all_rows_with_embeddings(janus, registry):
    result = _images(janus, "inject(at=2, count=3, image=-2)", registry, n=2)
    seen = _event(result, "inject")
    assert torch.equal(seen["next_positions"], seen["positions_before"] + 3 + 14)
    assert seen["valid"][:, :, seen["fill_before"][0]: seen["fill_before"][0] + 3].all()


def test_hook_kv_inject_edit(janus, registry):
    """KVEdit adds to cached keys/values in place: a zero edit changes nothing, a large one changes the image."""
    plain = _images(janus, "", registry).tokens
    assert torch.equal(_images(janus, "steer_kv(at=2, layer=1, slot=0, scale=0.0)", registry).tokens, plain)
    steered = _images(janus, "steer_kv(at=2, layer=0, slot=12, scale=40.0)", registry).tokens
    assert not torch.equal(steered, plain)


def test_kv_inject_overflow_names_kv_growth(janus, registry):
    class Greedy(kv_hooks.Inject):
        name = "inject_undeclared"

        def kv_growth(self, state):
            return 0

    decoder = Decoder([Greedy(at=2, count=2)])
    with pytest.raises(RuntimeError, match="kv_growth"):
        decoder.generate_images(janus, PROMPT, seed=0)


def test_hook_input_embeddings(janus, registry):
    """The hook sees [B, T0, H]; the identity keeps the tokens; a change to the embeddings changes them."""
    plain = _images(janus, "", registry).tokens
    same = _images(janus, "scale_embeds(factor=1.0)", registry)
    assert torch.equal(same.tokens, plain)
    t0 = len(janus.generation_prompt_ids(PROMPT))
    assert _event(same, "scale_embeds")["received"] == (2, t0, janus.hidden_size)
    assert not torch.equal(_images(janus, "scale_embeds(factor=3.0)", registry).tokens, plain)


def test_hook_input_embeddings_may_shorten(janus, registry):
    """A shorter sequence with its own position ids: the prefill runs on exactly that (checked against transformers)."""
    count = 3
    result = _images(janus, f"drop_first(count={count})", registry)
    seen = _event(result, "drop_first")
    ids, embeds = _prompt_embeds(janus)
    t0 = ids.shape[1]
    positions = torch.arange(count, t0)[None].expand(2, -1)
    assert torch.equal(seen["positions"], positions)
    with torch.inference_mode():
        out = _language_model(janus)(inputs_embeds=embeds[:, count:], position_ids=positions).last_hidden_state
        expected = janus.model.model.generation_head(out[:, -1])
    torch.testing.assert_close(seen["logits"], expected, rtol=1e-5, atol=1e-5)
    assert seen["fill"] == [t0 - count + 15] * janus.num_layers


def test_hook_input_embeddings_bad_shape_names_the_strategy(janus, registry):
    class Broken(prefill_hooks.ScaleEmbeds):
        name = "broken_embeds"

        def input_embeddings(self, state, embeds):
            return embeds[:, 1:]  # shorter, without updating positions and mask

    with pytest.raises(StrategyOutputError, match="broken_embeds"):
        Decoder([Broken()]).generate_images(janus, PROMPT, seed=0)


def test_hook_layer(janus, registry):
    """Keeping every position changes nothing; dropping positions shortens the cache of layers >= k only."""
    plain = _images(janus, "keep_positions(layer=2, drop=0)", registry)
    base = _images(janus, "", registry)
    assert torch.equal(plain.tokens, base.tokens)
    t0 = len(janus.generation_prompt_ids(PROMPT))
    k, drop = 2, 4
    full = _event(plain, "keep_positions")
    assert full["layer_seen"] == k and full["hidden"].shape == (2, t0, janus.hidden_size)
    pruned = _images(janus, f"keep_positions(layer={k}, drop={drop})", registry)
    seen = _event(pruned, "keep_positions")
    assert seen["fill"] == [t0 + 15] * k + [t0 - drop + 15] * (janus.num_layers - k)
    assert seen["group"][:k] == [0] * k and len(set(seen["group"][k:])) == 1 and seen["group"][k] != 0
    assert pruned.tokens.shape == base.tokens.shape


def test_hook_layer_keep_all_gives_identical_logits(janus, registry):
    keep_all = _event(_images(janus, "keep_positions(layer=2, drop=0)", registry), "keep_positions")["logits"]
    record = _event(_images(janus, "scale_embeds(factor=1.0)", registry), "scale_embeds")["logits"]
    assert torch.equal(keep_all, record)


def test_hook_layer_pruned_prefill_matches_a_manual_forward(janus, registry, reference):
    """Layers >= k see only kept positions with their original position ids (checked layer by layer by hand)."""
    k, drop = 2, 4
    seen = _event(_images(janus, f"keep_positions(layer={k}, drop={drop})", registry), "keep_positions")
    ids, embeds = _prompt_embeds(janus)
    t0 = ids.shape[1]
    lm = _language_model(janus)
    with torch.inference_mode():
        positions = torch.arange(t0)[None].expand(2, -1)
        h = _hidden_entering(reference, embeds, k)
        kept = h[:, drop:]
        pos = positions[:, drop:]
        cos_sin = lm.rotary_emb(kept, pos)
        mask = torch.ones(t0 - drop, t0 - drop, dtype=torch.bool).tril()[None, None].expand(2, 1, -1, -1)
        for layer in lm.layers[k:]:
            kept = layer(kept, mask, pos, None, False, cos_sin)
        expected = janus.model.model.generation_head(lm.norm(kept[:, -1]))
    torch.testing.assert_close(seen["hidden"], h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["logits"], expected, rtol=1e-5, atol=1e-5)


def test_hook_layer_soft_keeps_the_cache_length(janus, registry):
    t0 = len(janus.generation_prompt_ids(PROMPT))
    seen = _event(_images(janus, "keep_positions(layer=2, drop=4, soft=true)", registry), "keep_positions")
    assert seen["fill"] == [t0 + 15] * janus.num_layers


def test_hook_hidden_states(janus, registry):
    """Only the requested layers arrive, [B, H] each; layer 0 is the input embedding (index convention)."""
    n = janus.num_layers
    result = _images(janus, f"early_heads(layers=[0, 2, {n}])", registry, n=2)
    seen = _event(result, "early_heads")
    assert all(keys == [0, 2, n] for keys in seen["keys"]) and len(seen["keys"]) == 16
    generated = seen["generated"]  # [P, 16]
    with torch.inference_mode():
        for t in range(1, 16):
            fed = janus.embed_image_tokens(pair_rows(generated[:, t - 1], "interleaved"))  # [B, H]
            torch.testing.assert_close(seen["layer0"][t], fed)


def test_service_heads(janus, registry):
    """One batched head call over several layers; layer N (final-normed) reproduces the loop's own logits."""
    n = janus.num_layers
    seen = _event(_images(janus, f"early_heads(layers=[1, 3, {n}])", registry, n=2), "early_heads")
    for heads, logits in zip(seen["heads"], seen["logits"]):
        assert heads.shape == (3, *logits.shape)  # [J, B, V]
        torch.testing.assert_close(heads[-1], logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(heads[0], logits)


def test_hook_pre_logits(janus, registry):
    """Pre-logits sees every row [2P, V]; a token masked in one branch is never sampled (-inf survives guidance)."""
    plain = _images(janus, "", registry, n=2).tokens
    common = int(torch.mode(plain.flatten()).values)
    for branch in ("all", "cond", "uncond"):
        result = _images(janus, f'ban_token(token={common}, branch="{branch}")', registry, n=2)
        assert not (result.tokens == common).any(), branch
        shapes = _event(result, "ban_token")["shapes"]
        assert set(shapes) == {(4, janus.image_vocab_size)}


def test_hook_post_cfg(janus, registry):
    """Post-CFG sees one row per image [P, V]; what it returns is what gets sampled."""
    result = _images(janus, "force_token(token=7)", registry, n=3)
    assert (result.tokens == 7).all()
    assert _event(result, "force_token")["shape"] == (3, janus.image_vocab_size)


def test_hook_post_cfg_in_text_mode(janus, registry):
    result = _decoder("force_token(token=7)", registry).chat(janus, "hello", max_new_tokens=5, seed=0)
    assert result.tokens == [[7] * 5]


def test_post_cfg_nan_names_the_strategy(janus):
    class MakesNaN(step_hooks.ForceToken):
        name = "makes_nan"

        def post_cfg(self, state, logits):
            return logits * math.nan

    with pytest.raises(StrategyOutputError, match="makes_nan"):
        Decoder([MakesNaN()]).generate_images(janus, PROMPT, seed=0)


# -- services ----------------------------------------------------------------------------------------------------
def test_service_guide(janus, registry):
    """state.guide applied to the pre-logits rows equals the core's guided logits, under a schedule too."""
    for cfg in ("", ' > cfg(weight=3.5, schedule="cosine")', ' > cfg(layout="halves")'):
        result = _images(janus, "check_guide" + cfg, registry, n=2)
        diffs = _event(result, "check_guide")["diffs"]
        assert len(diffs) == 16 and max(diffs) == 0.0, cfg


def test_service_step_buffer(janus, registry):
    result = _images(janus, "entropy_trace", registry, n=2)
    seen = _event(result, "entropy_trace")
    assert seen["same"]  # one preallocated buffer per name
    entropy = seen["entropy"]
    assert entropy.shape == (16, 2)
    assert (entropy > 0).all() and (entropy <= math.log(janus.image_vocab_size) + 1e-4).all()
    torch.testing.assert_close(entropy[-1], seen["last"])


def test_service_attention_scores(janus, registry, reference):
    """Attention of the last prompt position over layer k-1's cache equals a full eager attention computed here."""
    k = 2
    seen = _event(_images(janus, f"keep_positions(layer={k}, drop=0)", registry), "keep_positions")
    ids, embeds = _prompt_embeds(janus)
    t0 = ids.shape[1]
    lm = _language_model(janus)
    block = lm.layers[k - 1]
    attn = block.self_attn
    with torch.inference_mode():
        h = _hidden_entering(reference, embeds, k - 1)
        x = block.input_layernorm(h)
        heads, kv_heads, d = lm.config.num_attention_heads, lm.config.num_key_value_heads, attn.head_dim
        q = attn.q_proj(x).view(2, t0, heads, d).transpose(1, 2)
        key = attn.k_proj(x).view(2, t0, kv_heads, d).transpose(1, 2)
        cos, sin = lm.rotary_emb(x, torch.arange(t0)[None].expand(2, -1))
        cos, sin = cos[:, None], sin[:, None]
        rotate = lambda v: torch.cat((-v[..., d // 2:], v[..., : d // 2]), dim=-1)
        q, key = q * cos + rotate(q) * sin, key * cos + rotate(key) * sin
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        scores = (q @ key.transpose(-1, -2)) / math.sqrt(d)  # [B, heads, T0, T0]
        scores = scores.masked_fill(~torch.ones(t0, t0, dtype=torch.bool).tril(), float("-inf"))
        expected = torch.softmax(scores, dim=-1)[:, :, -1]  # [B, heads, T0]
    assert seen["attention"].shape == (2, heads, t0)
    torch.testing.assert_close(seen["attention"], expected, rtol=1e-4, atol=1e-5)


def test_service_attention_scores_refuses_unkept_layers(janus):
    class Asks(prefill_hooks.KeepPositions):
        name = "asks_wrong_layer"

        def layer(self, state, layer, hidden):
            state.attention_scores(0)
            return None

    with pytest.raises(ValueError, match="attention_scores: layer 0"):
        Decoder([Asks(layer=3)]).generate_images(janus, PROMPT, seed=0)


def _services(janus, registry, **kwargs):
    result = _images(janus, "use_services(at=9, layer=2)", registry, **kwargs)
    return result, _event(result, "use_services")


def test_service_prompt_hidden(janus, registry, reference):
    _, seen = _services(janus, registry)
    ids, embeds = _prompt_embeds(janus)
    with torch.inference_mode():
        expected = _hidden_entering(reference, embeds, 2)
    torch.testing.assert_close(seen["prompt_hidden"], expected, rtol=1e-5, atol=1e-5)


def test_service_lm_forward(janus, registry):
    _, seen = _services(janus, registry)
    with torch.inference_mode():
        expected = _language_model(janus)(inputs_embeds=seen["text_embeds"][None]).last_hidden_state
    torch.testing.assert_close(seen["lm_out"], expected, rtol=1e-5, atol=1e-5)


def test_service_embed_text(janus, registry):
    _, seen = _services(janus, registry)
    ids = janus.tokenizer("a red cube", add_special_tokens=True).input_ids
    assert ids[0] == janus.tokenizer.bos_token_id
    with torch.inference_mode():
        expected = _language_model(janus).embed_tokens(torch.tensor(ids))
    assert torch.equal(seen["text_embeds"], expected)


def test_service_decode_partial(janus, registry):
    result, seen = _services(janus, registry, n=2)
    rows, cols = janus.image_grid
    done = seen["grid_rows"]
    assert done == 9 // cols and done >= 1
    full_h, full_w = result.images[0][0].height, result.images[0][0].width
    assert seen["partial"].shape == (2, 3, done * (full_h // rows), full_w)
    with torch.inference_mode():
        whole = janus.decode_image_tokens(result.tokens[0])
    # the decoder is convolutional: a partial grid is a faithful picture of its rows, not a crop of the whole
    assert torch.isfinite(seen["partial"]).all() and seen["partial"].shape[-2] < whole.shape[-2]


def test_service_answer(janus, registry):
    plain = _images(janus, "", registry).tokens
    result, seen = _services(janus, registry)
    expected = Decoder.from_spec("").chat(janus, "what is in the picture?", max_new_tokens=6, greedy=True).texts[0]
    assert seen["answer"] == expected
    assert torch.equal(result.tokens, plain)  # a nested run leaves the outer one untouched


def test_service_encode_image(janus, registry):
    """In understanding mode the features merged into the prompt are exactly what encode_image returns."""
    picture = Image.new("RGB", (40, 24), (200, 30, 30))
    result = _decoder("check_image_features", registry).answer(janus, [picture], "what colour?", max_new_tokens=3,
                                                               greedy=True)
    seen = [e for e in result.trace if e["strategy"] == "check_image_features"][-1]
    features = seen["features"]
    assert features.shape == (1, janus.tokens_per_image, janus.hidden_size)
    torch.testing.assert_close(seen["merged"], features[0])
    # the index convention: N = the tower's last output (normed), which is what Janus feeds its aligner
    torch.testing.assert_close(seen["last_layer"], features)


def test_check_image_features_needs_an_image(janus, registry):
    with pytest.raises(ValueError, match="needs an input image"):
        _decoder("check_image_features", registry).chat(janus, "hi", max_new_tokens=2)


@pytest.mark.parametrize("steps", [0, 9])
def test_rollback_past_the_start_names_the_strategy(janus, steps):
    class Overreach(schedule_hooks.RollbackOnce):
        name = "overreach"

        def schedule(self, state):
            return Rollback(steps, 1)

    with pytest.raises(StrategyOutputError, match=r"`overreach` \(schedule\) returned Rollback\(steps=%d\) at step 8"
                       % steps):
        Decoder([Overreach(at=8)]).generate_images(janus, PROMPT, seed=0)
