"""TwiG as a strategy on the tiny model (4×4 grid): staging is transparent, both contexts give full pictures, the
reflection redraws exactly when the injected scorer says so, runs are deterministic, bad input is refused."""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import pytest
import torch

from janus_decoding.core.protocol import Rebuild, Rollback
from janus_decoding.plugins.decoder import Decoder
from janus_decoding.plugins.strategy import StrategyError
from janus_decoding.strategies.twig import TwiG
from janus_decoding.testing import check_strategy

PROMPTS = ["a red cube on a blue sphere", "a lighthouse at dusk"]


def _silent(state, ask, *, max_new_tokens, greedy):
    return ""


def _scores(*replies):
    """A scorer replying ``replies[a]`` at attempt ``a`` of a band (the last reply repeats); records the asks."""
    calls = []

    def scorer(state, ask, *, max_new_tokens, greedy):
        calls.append(ask)
        return replies[min(ask.attempt, len(replies) - 1)]

    scorer.calls = calls
    return scorer


@pytest.fixture
def actions(monkeypatch):
    """Every (step, action) the strategy's schedule hook returns."""
    seen = []
    original = TwiG.schedule

    def spy(self, state):
        action = original(self, state)
        seen.append((state.step, action))
        return action

    monkeypatch.setattr(TwiG, "schedule", spy)
    return seen


def _generate(model, spec, prompts=PROMPTS, **kwargs):
    kwargs = {"n": 2, "seed": 5, **kwargs}
    with torch.inference_mode():
        return Decoder.from_spec(spec).generate_images(model, prompts, **kwargs)


@pytest.mark.parametrize("stages", [2, 4])
def test_staging_is_transparent_under_greedy_decoding(tiny_model, monkeypatch, actions, stages):
    """Empty guidance, no reflection: every band boundary re-prefills [prompt ; tokens so far] and greedy decoding
    still gives the plain loop's tokens (CPU fp32)."""
    monkeypatch.setattr(TwiG, "thinker", _silent)
    plain = _generate(tiny_model, "", greedy=True)
    staged = _generate(tiny_model, f'twig(stages={stages}, reflect=false, context="rebuild")', greedy=True)
    assert torch.equal(staged.tokens, plain.tokens)
    rebuilds = [step for step, action in actions if isinstance(action, Rebuild)]
    band = 16 // stages
    assert rebuilds == [k * band for k in range(1, stages)]  # stage 0 needs none: its prompt is unchanged


@pytest.mark.parametrize("context", ["rebuild", "inject"])
def test_both_contexts_give_a_full_grid_and_pictures(tiny_model, monkeypatch, actions, context):
    monkeypatch.setattr(TwiG, "thinker", lambda state, ask, **kw: f"draw the {ask.place} in warm colors")
    scorer = _scores("SCORE: 95")
    monkeypatch.setattr(TwiG, "scorer", scorer)
    result = _generate(tiny_model, f'twig(stages=2, context="{context}")')
    assert result.tokens.shape == (2, 2, 16)
    assert all(p.size == (64, 64) for images in result.images for p in images)
    heights = sorted({(item["label"], item["picture"].size) for item in result.intermediates})
    assert heights == [("stage1of2", (64, 32)), ("stage2of2", (64, 64))]
    assert len(result.intermediates) == 2 * 4  # two stages × four images
    kinds = [(step, type(a).__name__) for step, a in actions if a is not None]
    # stage 0's guidance goes into the prompt; stage 1's is re-prefilled (rebuild) or appended by kv_inject
    assert kinds == ([(0, "Rebuild"), (8, "Rebuild")] if context == "rebuild" else [(0, "Rebuild")])
    events = [e for e in result.trace if e["strategy"] == "twig"]
    assert [e["stage"] for e in events] == [1, 2]
    assert events[1]["guidance"] == ["draw the bottom part in warm colors"] * 4
    assert events[0]["scores"] == [[95.0] * 4] and events[0]["regenerations"] == 0
    json.dumps(events)  # the manifest can hold them
    assert [a.picture is not None for a in scorer.calls] == [True] * 8


def test_inject_appends_guidance_to_the_cache(tiny_model, monkeypatch):
    """The injected text reaches the model: tokens after the boundary change, the first band does not."""
    monkeypatch.setattr(TwiG, "thinker", lambda state, ask, **kw: "" if ask.stage == 0 else "a blue sky full of stars")
    silent = _generate(tiny_model, 'twig(stages=2, reflect=false, context="inject", think=false)', greedy=True)
    told = _generate(tiny_model, 'twig(stages=2, reflect=false, context="inject")', greedy=True)
    assert torch.equal(told.tokens[..., :8], silent.tokens[..., :8])
    assert not torch.equal(told.tokens[..., 8:], silent.tokens[..., 8:])


def test_cache_is_sized_for_the_guidance(tiny_model, monkeypatch):
    """Guidance as long as allowed, every stage, both contexts: the static cache is big enough."""
    monkeypatch.setattr(TwiG, "thinker", lambda state, ask, **kw: "zebra quixotic glyphs " * 40)
    for context in ("rebuild", "inject"):
        result = _generate(tiny_model, f'twig(stages=4, reflect=false, think_max_tokens=6, context="{context}")')
        assert result.tokens.shape == (2, 2, 16)


def test_regeneration_follows_the_scorer_and_stops_at_the_limit(tiny_model, monkeypatch, actions):
    monkeypatch.setattr(TwiG, "thinker", _silent)
    low = _scores("SCORE: 10")
    monkeypatch.setattr(TwiG, "scorer", low)
    result = _generate(tiny_model, "twig(stages=2, threshold=50, max_regenerations=2)", prompts=PROMPTS[:1])
    rollbacks = [(step, a.steps, a.stream) for step, a in actions if isinstance(a, Rollback)]
    assert rollbacks == [(8, 8, 1), (8, 8, 2), (16, 8, 3), (16, 8, 4)]  # each band redrawn twice, fresh streams
    events = [e for e in result.trace if e["strategy"] == "twig"]
    assert [e["regenerations"] for e in events] == [2, 2]
    assert len(low.calls) == 2 * 3 * 2  # stages × (1 + max_regenerations) × images
    # a passing score never rolls back; a low score at exactly the threshold passes
    actions.clear()
    monkeypatch.setattr(TwiG, "scorer", _scores("SCORE: 50"))
    result = _generate(tiny_model, "twig(stages=2, threshold=50, max_regenerations=2)", prompts=PROMPTS[:1])
    assert not [a for _, a in actions if isinstance(a, Rollback)]
    # low once, then fine: exactly one redraw of each band
    actions.clear()
    monkeypatch.setattr(TwiG, "scorer", _scores("SCORE: 49.5", "SCORE: 80"))
    result = _generate(tiny_model, "twig(stages=2, threshold=50, max_regenerations=3)", prompts=PROMPTS[:1])
    assert [e["regenerations"] for e in result.trace if e["strategy"] == "twig"] == [1, 1]
    assert [e["scores"] for e in result.trace if e["strategy"] == "twig"][0] == [[49.5, 49.5], [80.0, 80.0]]


@pytest.mark.parametrize("policy, redraws", [("accept", 0), ("regenerate", 1)])
def test_unparseable_reply_follows_the_policy_and_is_recorded(tiny_model, monkeypatch, policy, redraws):
    monkeypatch.setattr(TwiG, "thinker", _silent)
    monkeypatch.setattr(TwiG, "scorer", _scores("looks nice"))
    result = _generate(tiny_model, f'twig(stages=2, on_unparseable="{policy}")', prompts=PROMPTS[:1])
    events = [e for e in result.trace if e["strategy"] == "twig"]
    assert [e["regenerations"] for e in events] == [redraws, redraws]
    assert events[0]["unparseable"] == [[True, True]] * (1 + redraws) and events[0]["scores"][0] == [None, None]
    assert events[0]["replies"][0] == ["looks nice"] * 2


def test_forced_regeneration_changes_the_band_under_sampling(tiny_model, monkeypatch):
    monkeypatch.setattr(TwiG, "thinker", _silent)
    monkeypatch.setattr(TwiG, "scorer", _scores("SCORE: 99"))
    kept = _generate(tiny_model, "twig(stages=2)", prompts=PROMPTS[:1])
    # the first band is accepted; the last is rejected once
    monkeypatch.setattr(TwiG, "scorer", lambda state, ask, **kw: "SCORE: 0" if (ask.stage, ask.attempt) == (1, 0)
                        else "SCORE: 99")
    redrawn = _generate(tiny_model, "twig(stages=2)", prompts=PROMPTS[:1])
    assert torch.equal(redrawn.tokens[..., :8], kept.tokens[..., :8])
    assert not torch.equal(redrawn.tokens[0, 0, 8:], kept.tokens[0, 0, 8:])
    events = [e for e in redrawn.trace if e["strategy"] == "twig"]
    assert [e["regenerations"] for e in events] == [0, 1]


def test_fixed_seed_is_deterministic_with_the_model_thinking(tiny_model):
    """The real thinker and scorer (the same model through `state.answer`), sampled: same seed, same run."""
    spec = 'twig(stages=2, think_max_tokens=3, think_greedy=false, threshold=50, on_unparseable="regenerate")'
    first = _generate(tiny_model, spec, prompts=PROMPTS[:1], seed=11)
    again = _generate(tiny_model, spec, prompts=PROMPTS[:1], seed=11)
    other = _generate(tiny_model, spec, prompts=PROMPTS[:1], seed=12)
    assert torch.equal(first.tokens, again.tokens) and first.trace == again.trace
    assert not torch.equal(first.tokens, other.tokens)
    events = [e for e in first.trace if e["strategy"] == "twig"]
    assert all(len(g) > 0 for e in events for g in e["guidance"])  # the model did write something


@pytest.mark.parametrize("context", ["rebuild", "inject"])
def test_fast_loop_runs_twig_like_the_core_loop(tiny_model, monkeypatch, context):
    """The graph-free fast path visits the same boundaries (0 and the end included), rollbacks and injections."""
    from janus_decoding.core.cfg import CFGConfig
    from janus_decoding.core.graph import EagerStepWarning, FastLoop, FastOptions
    from janus_decoding.core.loop import Sampler, run
    from janus_decoding.core.runs import ImageRequest, run_images

    monkeypatch.setattr(TwiG, "thinker", lambda state, ask, **kw: f"the {ask.place} of {ask.prompt}")
    monkeypatch.setattr(TwiG, "scorer", _scores("SCORE: 1", "SCORE: 99"))
    outcomes = []
    for loop in (run, FastLoop(FastOptions(graphs=False))):
        decoder = Decoder.from_spec(f'twig(stages=2, context="{context}")')
        requests = [ImageRequest(p, 3, 0) for p in PROMPTS]
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore", EagerStepWarning)
            result = run_images(tiny_model, decoder, requests, cfg=CFGConfig(), sampler=Sampler(), loop=loop)
        outcomes.append((result.tokens.clone(), result.state.trace.events))
    assert torch.equal(outcomes[0][0], outcomes[1][0])
    assert outcomes[0][1] == outcomes[1][1]
    assert [e["regenerations"] for e in outcomes[0][1]] == [1, 1]


def test_partial_pictures_have_the_right_height_at_janus_pro_size():
    """8, 16 and 24 token rows (3 stages) decode to 128, 256 and 384 px (shapes only: weights on the meta device)."""
    from transformers.models.janus.modeling_janus import JanusVQVAE

    from janus_decoding.models.adapter import JanusAdapter
    from janus_decoding.models.shapes import janus_pro_config
    from janus_decoding.strategies.twig_math import band_rows

    config = janus_pro_config("1b")
    side = config.vq_config.num_patches
    with torch.device("meta"):
        vq = JanusVQVAE(config.vq_config)
    adapter = SimpleNamespace(model=SimpleNamespace(model=SimpleNamespace(vqmodel=vq)), image_grid=(side, side),
                              require_janus=lambda what: None)
    heights = []
    for _, end in band_rows(side, 3):
        ids = torch.zeros(1, end * side, dtype=torch.long, device="meta")
        heights.append(JanusAdapter.decode_image_tokens(adapter, ids, rows=end).shape[2])
    assert heights == [128, 256, 384]


@pytest.mark.parametrize("context", ["rebuild", "inject"])
def test_twig_keeps_the_author_kit_contract(monkeypatch, context):
    """Static checks and short runs of the tiny model (hook calls, output types, cache growth, determinism), with the
    model thinking (a few tokens) and the thinker writing guidance every stage."""
    check_strategy(TwiG, stages=2, think_max_tokens=3, context=context)
    monkeypatch.setattr(TwiG, "thinker", lambda state, ask, **kw: f"the {ask.place}, {ask.prompt}")
    check_strategy(TwiG, stages=4, think_max_tokens=8, context=context, reflect=False)


@pytest.mark.parametrize("spec, culprit", [
    ("twig(threshold=101)", "threshold"), ("twig(threshold=-1)", "threshold"), ("twig(stages=0)", "stages"),
    ("twig(think_max_tokens=0)", "think_max_tokens"), ("twig(max_regenerations=-1)", "max_regenerations"),
    ('twig(on_unparseable="ignore")', "on_unparseable"), ('twig(context="prefix")', "context"),
])
def test_bad_parameters_name_the_parameter(spec, culprit):
    with pytest.raises(StrategyError, match=rf"`twig`: `{culprit}`"):
        Decoder.from_spec(spec)


def test_stages_must_divide_the_grid_rows(tiny_model):
    with pytest.raises(StrategyError, match=r"`twig`: `stages` must divide the grid's 4 rows \(one of \[1, 2, 4\]\), got 3"):
        _generate(tiny_model, "twig(stages=3)", n=1)


def test_text_mode_and_text_only_models_are_refused(tiny_model, tmp_path):
    from janus_decoding import load_model
    from janus_decoding.models.tiny import write_tiny_llama

    decoder = Decoder.from_spec("twig")
    with pytest.raises(StrategyError, match="`twig` does not support text mode"):
        decoder.chat(tiny_model, "hello", max_new_tokens=2)
    llama = load_model(str(write_tiny_llama(tmp_path / "llama")))
    with pytest.raises(StrategyError, match="`twig` needs a Janus model"):
        decoder.generate_images(llama, "a red cube")


def test_cli_writes_the_partial_pictures_and_the_final_one(tiny_model, tmp_path):
    from click.testing import CliRunner

    from janus_decoding.cli import main

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["generate", "a red cube on a blue sphere", "--model", tiny_model.name,
                                       "--decoder", "twig(stages=2)", "--save-intermediates", "--out", str(out)])
    assert result.exit_code == 0, result.output
    stem = "00000_a_red_cube_on_a_blue_sphere"
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == sorted([f"{stem}_0.png", f"{stem}_sheet.png", f"{stem}_0_twig_stage1of2.png",
                            f"{stem}_0_twig_stage2of2.png"])
    record = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    stages = [e for e in record["trace"] if e["strategy"] == "twig"]
    assert [e["stage"] for e in stages] == [1, 2] and all("guidance" in e and "scores" in e for e in stages)
