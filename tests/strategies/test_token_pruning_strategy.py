"""token_pruning as a strategy on the tiny Janus model (CPU, fp32, greedy): identity at keep_ratio=1, kept counts,
text order, original position ids, per-layer KV lengths, and the same tokens as a reference that runs the full
forward with the pruned positions masked out of layers >= k (or zeroed at layer k, for soft mode)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from janus_decoding.cli import main
from janus_decoding.core.loop import Sampler
from janus_decoding.core.runs import ImageRequest, run_images, run_text
from janus_decoding.core.cfg import CFGConfig
from janus_decoding.plugins.decoder import Decoder
from janus_decoding.plugins.strategy import Strategy, StrategyError
from janus_decoding.strategies.token_pruning import TokenPruning
from janus_decoding.testing import check_strategy

STEPS = 8
QUESTION = "What is in the picture?"


def _picture() -> Image.Image:
    pixels = torch.arange(48 * 32 * 3, dtype=torch.uint8).view(32, 48, 3) * 7  # a fixed, non-flat picture
    return Image.fromarray(pixels.numpy(), "RGB")


class _Recorder(Strategy):
    """Records the final logits of every step."""

    name = "recorder"
    hooks = ("post_cfg",)

    def post_cfg(self, state, logits):
        state.memory.setdefault("recorded", []).append(logits.clone())
        return logits


class _Spy(TokenPruning):
    """token_pruning that also keeps the slots it returned, for the test to read."""

    def layer(self, state, layer, hidden):
        keep = super().layer(state, layer, hidden)
        state.memory["kept_slots"] = keep.positions.clone()
        return keep


def _run(model, spec: dict | None, *, questions=(QUESTION,), steps: int = STEPS):
    strategies = [_Spy(**spec)] if spec is not None else []
    rows = [model.understanding_prompt_ids(q, 1) for q in questions]
    pixels = [model.preprocess_images([_picture()]) for _ in questions]
    decoder = Decoder(strategies + [_Recorder()])
    with torch.inference_mode():
        return run_text(model, decoder, rows, max_new_tokens=steps, sampler=Sampler(greedy=True),
                        seeds=[0] * len(rows), pixel_values=pixels, eos_id=None)


def _embeds(model, question: str = QUESTION):
    """The prompt's input embeddings ``[1, T0, H]`` (image features in their slots) and the image mask ``[T0]``."""
    ids = torch.tensor([model.understanding_prompt_ids(question, 1)])
    embeds = model.embed_text(ids).clone()
    mask = (ids == model.special_id("<image_placeholder>"))[0]
    embeds[0, mask] = model.encode_images(model.preprocess_images([_picture()]))[0].to(embeds.dtype)
    return embeds, mask


def _fastv_reference_scores(model, embeds, layer: int) -> torch.Tensor:
    """Head-averaged attention of the last prompt position in layer ``layer - 1``, from transformers' eager
    attention weights (full maps: fine for a reference)."""
    config = model.lm.config
    saved, config._attn_implementation = config._attn_implementation, "eager"
    caught = {}
    handle = model.layers[layer - 1].self_attn.register_forward_hook(lambda m, a, out: caught.update(w=out[1]))
    try:
        t = embeds.shape[1]
        positions = torch.arange(t)[None]
        cos_sin = model.rotary(embeds, positions)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        additive = torch.zeros(t, t).masked_fill(~causal, float("-inf"))[None, None]  # eager adds its mask
        h = embeds
        for block in model.layers[:layer]:
            h = block(h, additive, positions, None, False, cos_sin)
    finally:
        handle.remove()
        config._attn_implementation = saved
    return caught["w"][0, :, -1].mean(0)  # [T0]


def _reference_dropped(model, embeds, image, method: str, layer: int, n_keep: int, seed: int = 0) -> torch.Tensor:
    """``[T0]`` bool: the image positions the reference prunes (chosen without the strategy's code)."""
    where = image.nonzero().flatten()
    n_image = where.numel()
    if method == "fastv":
        chosen = where[_fastv_reference_scores(model, embeds, layer)[where].topk(n_keep).indices]
    elif method == "uniform":
        chosen = where[[j * n_image // n_keep for j in range(n_keep)]]
    else:
        draws = torch.rand(image.shape[0], generator=torch.Generator().manual_seed(seed))
        chosen = where[draws[where].topk(n_keep).indices]
    dropped = image.clone()
    dropped[chosen] = False
    return dropped


def _reference_decode(model, embeds, dropped, layer: int, soft: bool, steps: int = STEPS):
    """Greedy decoding with no cache: each step runs the whole sequence through every layer; in layers >= ``layer``
    the dropped prompt positions are masked out as keys (hard) or zeroed on entering ``layer`` (soft)."""
    tokens, logits_seen, seq = [], [], embeds
    for _ in range(steps):
        t = seq.shape[1]
        positions = torch.arange(t)[None]
        cos_sin = model.rotary(seq, positions)
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        gone = torch.zeros(t, dtype=torch.bool)
        gone[: dropped.shape[0]] = dropped
        h = seq
        for index, block in enumerate(model.layers):
            mask = causal
            if index >= layer and not soft:
                mask = causal & ~gone[None, :]
            if index == layer and soft:
                h = h.masked_fill(gone[None, :, None], 0.0)
            h = block(h, mask[None, None], positions, None, False, cos_sin)
        logits = model.head(model.final_norm(h[:, -1]), "text")  # [1, V]
        token = logits.argmax(-1)
        tokens.append(int(token))
        logits_seen.append(logits)
        seq = torch.cat([seq, model.embed_text(token[None])], 1)
    return tokens, logits_seen


# -- identity ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fastv", "random", "uniform"])
@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_keep_ratio_one_gives_the_unpruned_logits(tiny_model, method, mode):
    plain = _run(tiny_model, None).state.memory["recorded"]
    pruned = _run(tiny_model, dict(method=method, keep_ratio=1.0, mode=mode, layer=2)).state.memory["recorded"]
    assert len(pruned) == len(plain) == STEPS
    for a, b in zip(pruned, plain):
        assert torch.equal(a, b)


# -- what the loop keeps -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer, ratio", [(1, 0.25), (2, 0.5), (3, 0.75)])
def test_kept_positions_ids_and_kv_lengths(tiny_model, layer, ratio):
    seen: dict[int, torch.Tensor] = {}

    def position_ids(index):
        def hook(module, args):  # the loop calls layer(h, mask, positions, cache, use_cache, cos_sin)
            seen.setdefault(index, args[2].clone())  # the first call is the prefill
        return hook

    handles = [block.register_forward_pre_hook(position_ids(i)) for i, block in enumerate(tiny_model.layers)]
    try:
        result = _run(tiny_model, dict(layer=layer, keep_ratio=ratio), questions=[QUESTION, "Describe it."])
    finally:
        for h in handles:
            h.remove()
    state = result.state
    image = state.image_token_mask  # [B, T0]
    t0, n_image = image.shape[1], int(image[0].sum())
    n_keep = -(-int(ratio * 100) * n_image // 100)
    kept_len = t0 - n_image + n_keep
    # position ids entering each layer during the prefill (the first call): originals, pruned from `layer` on
    for i in range(tiny_model.num_layers):
        assert seen[i].shape == ((2, t0) if i < layer else (2, kept_len))
    slots = state.memory["kept_slots"]  # [B, T'] prompt slots the strategy kept
    assert torch.equal(seen[0], state.prompt_positions)
    assert torch.equal(seen[layer], torch.gather(state.prompt_positions, 1, slots))  # original position ids
    for row in range(2):
        ids = slots[row].tolist()
        assert ids == sorted(set(ids))
        text = [j for j in range(t0) if not image[row, j]]
        assert [j for j in ids if not image[row, j]] == text
        assert sum(bool(image[row, j]) for j in ids) == n_keep
    # the decode continues at the original next position; per-layer KV lengths
    assert torch.equal(state.next_positions, state.prompt_positions[:, -1] + STEPS)
    fills = [t0 + STEPS - 1] * layer + [kept_len + STEPS - 1] * (tiny_model.num_layers - layer)
    assert state.cache.fill == fills
    event = state.trace.events[0]
    assert (event["image_tokens"], event["kept_image_tokens"], event["kept_tokens"]) == (n_image, n_keep, kept_len)


def test_soft_mode_keeps_every_position_in_the_cache(tiny_model):
    state = _run(tiny_model, dict(mode="soft", keep_ratio=0.25)).state
    t0 = state.prompt_ids.shape[1]
    assert state.cache.fill == [t0 + STEPS - 1] * tiny_model.num_layers
    assert state.trace.events[0]["flops_saved"] == 0.0


# -- the masked reference ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["fastv", "random", "uniform"])
@pytest.mark.parametrize("layer, ratio", [(1, 0.25), (2, 0.5), (2, 0.25), (3, 0.75)])
@pytest.mark.parametrize("mode", ["hard", "soft"])
def test_same_tokens_as_the_masked_full_forward(tiny_model, method, layer, ratio, mode):
    result = _run(tiny_model, dict(method=method, layer=layer, keep_ratio=ratio, mode=mode, seed=7))
    with torch.inference_mode():
        embeds, image = _embeds(tiny_model)
        n_keep = result.state.trace.events[0]["kept_image_tokens"]
        dropped = _reference_dropped(tiny_model, embeds, image, method, layer, n_keep, seed=7)
        tokens, logits = _reference_decode(tiny_model, embeds, dropped, layer, soft=mode == "soft")
    assert int(dropped.sum()) == int(image.sum()) - n_keep
    assert result.tokens[0].tolist() == tokens
    for ours, theirs in zip(result.state.memory["recorded"], logits):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_pruning_changes_the_answer_somewhere(tiny_model):
    """Else the reference comparison would prove little: pruned and unpruned logits differ."""
    plain = _run(tiny_model, None).state.memory["recorded"]
    pruned = _run(tiny_model, dict(layer=1, keep_ratio=0.25)).state.memory["recorded"]
    assert not torch.allclose(plain[0], pruned[0])


def test_rows_are_pruned_independently(tiny_model):
    spec = dict(layer=2, keep_ratio=0.5)
    together = _run(tiny_model, spec, questions=[QUESTION, "Describe it."]).tokens
    alone = _run(tiny_model, spec, questions=["Describe it."]).tokens
    assert torch.equal(together[1], alone[0])


# -- contract, CLI, bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("params", [dict(layer=2, keep_ratio=0.5),
                                    dict(method="uniform", mode="soft", layer=1, keep_ratio=0.25)])
def test_check_strategy(params):
    """The author kit's contract, on its tiny-model-backed state (hard and soft, two layers)."""
    check_strategy(TokenPruning, **params)


def test_cli_explain_prints_answer_kept_count_and_flops_saved(tiny_model, tmp_path):
    picture = tmp_path / "in.png"
    _picture().save(picture)
    result = CliRunner().invoke(main, ["understand", str(picture), QUESTION, "--model", tiny_model.name,
                                       "--decoder", "token_pruning(layer=2, keep_ratio=0.5)", "--explain",
                                       "--greedy", "--max-new-tokens", "4"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].strip()  # the answer comes first
    trace = [line for line in lines if line.startswith("  trace ")]
    assert len(trace) == 1
    assert '"kept_image_tokens": 8' in trace[0] and '"image_tokens": 16' in trace[0] and '"flops_saved": 0.0' in trace[0]


@pytest.mark.parametrize("spec, culprit", [
    ("token_pruning(layer=0)", "`layer`"), ("token_pruning(keep_ratio=0)", "`keep_ratio`"),
    ("token_pruning(keep_ratio=1.5)", "`keep_ratio`"), ("token_pruning(keep_ratio=-0.5)", "`keep_ratio`"),
    ('token_pruning(method="topk")', "`method`"), ('token_pruning(mode="half")', "`mode`"),
])
def test_bad_parameters_name_the_parameter(spec, culprit):
    with pytest.raises(StrategyError, match=culprit):
        Decoder.from_spec(spec)


def test_layer_beyond_the_depth_is_refused(tiny_model):
    with pytest.raises(StrategyError, match=r"`token_pruning`: `layer` must be in \[1, 4\).*got 4"):
        _run(tiny_model, dict(layer=4))


def test_no_image_is_refused(tiny_model):
    with pytest.raises(StrategyError, match="`token_pruning` needs an input image"):
        Decoder.from_spec("token_pruning").chat(tiny_model, "hello", max_new_tokens=2)
    with pytest.raises(StrategyError, match="`token_pruning` needs an input image"):
        run_text(tiny_model, Decoder([TokenPruning()]), [tiny_model.chat_prompt_ids("hello")], max_new_tokens=2,
                 sampler=Sampler(greedy=True), seeds=[0])


def test_image_mode_is_refused(tiny_model):
    with pytest.raises(StrategyError, match="`token_pruning` does not support image mode"):
        Decoder.from_spec("token_pruning").generate_images(tiny_model, ["a cube"], seed=0)
    with pytest.raises(StrategyError, match="`token_pruning`.*image mode"):
        run_images(tiny_model, Decoder([TokenPruning()]), [ImageRequest("a cube", 0)], cfg=CFGConfig(),
                   sampler=Sampler(greedy=True))


def test_benchmark_runs_on_the_tiny_shape(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "result.json"
    subprocess.run([sys.executable, "-m", "benchmarks.token_pruning", "--shape", "tiny", "--runs", "1", "--warmup", "0",
                    "--ratios", "0.5", "--out", str(out)], cwd=Path(__file__).resolve().parents[2], check=True,
                   capture_output=True)
    result = json.loads(out.read_text())
    none, pruned = result["configs"]["none"], result["configs"]["keep_0.5"]
    assert pruned["kv_bytes"] < none["kv_bytes"] and 0 < pruned["flops_saved"] < 1
    assert pruned["kv_slots_per_layer"][2:] == [pruned["kept_tokens"]] * (result["num_layers"] - 2)
