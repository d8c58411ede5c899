"""latent_control as a strategy (issue 11): injections through the KV cache, the trigger in the loop, the learned
parts' file, the author kit's contract, the CLI on both checkpoint formats, bad input."""

from __future__ import annotations

import json
import math
import unittest

import pytest
import torch

from janus_decoding.core.cfg import CFGConfig, split_branches
from janus_decoding.core.loop import Sampler
from janus_decoding.core.protocol import KVAppend
from janus_decoding.core.runs import ImageRequest, run_images
from janus_decoding.core.sampling import entropy_nats
from janus_decoding.plugins.decoder import Decoder
from janus_decoding.plugins.strategy import StrategyError
from janus_decoding.strategies import latent_control_modules
from janus_decoding.strategies.latent_control import LatentControl
from janus_decoding.strategies.latent_control_modules import LatentControlModules, load_modules, save_modules
from janus_decoding.testing import check_strategy

# Thresholds that fire whenever cooldown and maximum allow (u > 0 nats and s < 1 hold on a random model).
ALWAYS = dict(tau_entropy=0.0, tau_sim=1.0)
NEVER = dict(tau_entropy=100.0, tau_drop=10.0, tau_sim=-1.0)
PROMPTS = ["a red cube on a blue sphere", "a dog"]


class Recording(LatentControl):
    """Records, at each kv_inject call, the cache fill, the next positions and the actions; and each sampled
    distribution, to check u_t against it."""

    def begin(self, state) -> None:
        super().begin(state)
        self.calls, self.sampled = [], {}

    def kv_inject(self, state):
        fill, positions = list(state.cache.fill), state.next_positions.clone()
        actions = super().kv_inject(state)
        self.calls.append((state.step, fill, positions, actions))
        return actions

    def after_sample(self, state, tokens, probs) -> None:
        assert probs is state.last_probs  # the distribution the loop sampled from
        self.sampled[state.step] = probs.clone()
        super().after_sample(state, tokens, probs)


class MaskedInPlace(LatentControl):
    """The same machinery, but every appended entry is masked from attention and positions do not advance."""

    def _append(self, state, embeds, rows):
        return KVAppend(embeds=embeds, rows=torch.zeros_like(rows), advance=False)


def _run(model, strategies, prompts=PROMPTS, n=2, seed=0, layout="interleaved", rng="row"):
    decoder = Decoder(list(strategies), CFGConfig(layout=layout))
    requests = [ImageRequest(p, seed + i, k) for i, p in enumerate(prompts) for k in range(n)]
    generator = torch.Generator().manual_seed(seed) if rng == "torch" else None
    with torch.inference_mode():
        return run_images(model, decoder, requests, cfg=decoder.cfg, sampler=Sampler(rng=rng, generator=generator))


def _events(trace, key="s_t"):
    return [e for e in trace if e["strategy"] == "latent_control" and key in e]


@pytest.mark.parametrize("layout", ["interleaved", "halves"])
def test_injection_grows_every_layer_by_control_tokens_and_keeps_pairs(tiny_model, layout):
    k = 3
    strategy = Recording(control_tokens=k, cooldown=2, max_injections=2, **ALWAYS)
    result = _run(tiny_model, [strategy], layout=layout)
    steps_with_actions = [step for step, _, _, actions in strategy.calls if actions]
    assert steps_with_actions == [2, 5]  # first watched step 1 fires; cooldown 2 → steps 2, 3 quiet, 4 fires
    ends = strategy.calls[1:] + [(None, list(result.state.cache.fill), result.state.next_positions, None)]
    for (step, fill, pos, actions), (_, fill_next, pos_next, _) in zip(strategy.calls, ends):
        grown = k if actions else 0
        assert [b - a for a, b in zip(fill, fill_next)] == [1 + grown] * tiny_model.num_layers, step
        rows = actions[0].rows if actions else torch.zeros_like(pos, dtype=torch.bool)
        assert torch.equal(pos_next - pos, 1 + k * rows.long()), step  # next position id: +K for injecting rows
        if actions:
            slots = result.state.cache.valid[:, :, fill[0]: fill[0] + k]  # [N, B, K]
            assert torch.equal(slots, rows[None, :, None].expand_as(slots))
            assert actions[0].embeds.shape == (result.state.rows, k, tiny_model.hidden_size)
    cond, uncond = split_branches(result.state.next_positions, layout)
    assert torch.equal(cond, uncond)  # rows="both": CFG rows stay paired


def test_cond_only_injection_moves_only_the_conditional_rows(tiny_model):
    k = 2
    strategy = Recording(control_tokens=k, cooldown=0, max_injections=1, rows="cond", **ALWAYS)
    result = _run(tiny_model, [strategy])
    plain = _run(tiny_model, [])
    cond, uncond = split_branches(result.state.next_positions - plain.state.next_positions, "interleaved")
    assert bool((cond == k).all()) and bool((uncond == 0).all())
    fill = next(f for _, f, _, actions in strategy.calls if actions)[0]
    _, masked = split_branches(result.state.cache.valid[:, :, fill: fill + k].transpose(0, 1), "interleaved")
    assert not masked.any()


@pytest.mark.parametrize("rng", ["row", "torch"])
def test_masked_unadvanced_injections_reproduce_the_plain_loop(tiny_model, rng):
    """CPU fp32, same seed: entries masked from attention, positions kept → the plain loop's tokens exactly."""
    plain = _run(tiny_model, [], rng=rng, seed=5)
    masked = _run(tiny_model, [MaskedInPlace(cooldown=1, max_injections=3, **ALWAYS)], rng=rng, seed=5)
    assert torch.equal(masked.tokens, plain.tokens)
    grown = masked.state.cache.fill[0] - plain.state.cache.fill[0]
    assert grown == 3 * 4  # three injections of 4 entries each really happened (all rows fire together)
    assert torch.equal(masked.state.next_positions, plain.state.next_positions)
    steered = _run(tiny_model, [LatentControl(cooldown=1, max_injections=3, **ALWAYS)], rng=rng, seed=5)
    assert not torch.equal(steered.tokens, plain.tokens)  # the same injections, visible, do change the image


def test_no_fire_no_append(tiny_model):
    """The design choice: kv_inject returns nothing when no image fires, so the cache never grows for nothing."""
    strategy = Recording(**NEVER)
    result = _run(tiny_model, [strategy])
    plain = _run(tiny_model, [])
    steps = tiny_model.image_grid[0] * tiny_model.image_grid[1]
    assert [step for step, *_ in strategy.calls] == list(range(1, steps))  # asked every step, before each token
    assert all(not actions for *_, actions in strategy.calls)
    assert result.state.cache.fill == plain.state.cache.fill and torch.equal(result.tokens, plain.tokens)


def test_trigger_in_the_loop_uses_the_sampled_entropy_and_respects_limits(tiny_model):
    strategy = Recording(cooldown=3, max_injections=2, **ALWAYS)
    temperature = Decoder.from_spec("temperature(temperature=0.5)").strategies[0]
    result = _run(tiny_model, [temperature, strategy])
    events = _events(result.state.trace.events)
    per_row: dict[int, list[int]] = {}
    for e in events:
        u = entropy_nats(strategy.sampled[e["step"]])[e["row"]]
        assert math.isclose(e["u_t"], float(u), rel_tol=1e-6)  # nats, of the distribution after temperature
        assert -1 <= e["s_t"] <= 1 and e["injected_before_step"] == e["step"] + 1
        per_row.setdefault(e["row"], []).append(e["step"])
    assert sorted(per_row) == list(range(len(PROMPTS) * 2))
    for fired in per_row.values():
        assert fired == [1, 5]  # at most 2, and 3 quiet steps between
    summary = [e for e in result.state.trace.events if "injections" in e][-1]
    assert summary["injections"] == [2] * 4 and summary["form"] == "training-free"


def test_pairs_independent_of_batch_neighbours(tiny_model):
    spec = dict(cooldown=2, max_injections=3, tau_entropy=1.0, tau_sim=0.7)
    together = _run(tiny_model, [LatentControl(**spec)], prompts=PROMPTS, n=1, seed=3)
    alone = _run(tiny_model, [LatentControl(**spec)], prompts=PROMPTS[1:], n=1, seed=4)
    assert torch.equal(together.tokens[1], alone.tokens[0])


def test_passes_the_author_kits_contract():
    """check_strategy passes: the static checks (hooks, modes, spec round-trip, every parameter's range) and, where
    the kit has them, its checks on real tiny-model runs (an older kit skips kv_inject strategies after the static
    checks, and says so). rows="cond" is left out on purpose: it steers the conditional row alone, so the pair's rows
    differ by design."""
    for params in ({}, {"window": 4, "memory_tokens": 2, "cooldown": 1, **ALWAYS}):
        try:
            check_strategy(LatentControl, **params)
        except unittest.SkipTest as skip:
            assert "kv_inject" in str(skip)


@pytest.mark.parametrize("spec, culprit", [
    ("latent_control(tau_drop=-0.1)", "tau_drop"), ("latent_control(tau_var=-1e-3)", "tau_var"),
    ("latent_control(tau_entropy=-1)", "tau_entropy"), ("latent_control(tau_sim=1.5)", "tau_sim"),
    ("latent_control(window=1)", "window"), ("latent_control(control_tokens=0)", "control_tokens"),
    ("latent_control(memory_tokens=0)", "memory_tokens"), ("latent_control(cooldown=-1)", "cooldown"),
    ("latent_control(max_injections=-1)", "max_injections"), ("latent_control(max_scale=0)", "max_scale"),
    ('latent_control(rows="uncond")', "rows"), ("latent_control(layer=0)", "layer"),
    ("latent_control(window=4, memory_tokens=8)", "memory_tokens"),
    ('latent_control(weights="/nonexistent/lc.safetensors")', "weights"),
])
def test_bad_parameters_name_the_parameter(spec, culprit):
    with pytest.raises(StrategyError, match=culprit):
        Decoder.from_spec(spec)


def test_layer_beyond_the_model_is_refused(tiny_model):
    with pytest.raises(StrategyError, match="layer"):
        _run(tiny_model, [LatentControl(layer=tiny_model.num_layers + 1)])


def _weights(tmp_path, hidden, memory=8, control=4, width=16, name="lc.safetensors"):
    torch.manual_seed(0)
    return save_modules(LatentControlModules(hidden, memory, control, width), tmp_path / name)


def test_weights_round_trip(tmp_path):
    torch.manual_seed(1)
    modules = LatentControlModules(12, 3, 2, 5)
    path = save_modules(modules, tmp_path / "lc.safetensors")
    loaded = load_modules(path, hidden_size=12, memory_tokens=3, control_tokens=2)
    assert modules.state_dict().keys() == loaded.state_dict().keys()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in modules.state_dict().items())
    window, filled = torch.randn(2, 6, 12), torch.arange(6)[None].expand(2, -1) >= 2
    with torch.no_grad():
        assert torch.equal(modules.condenser(window, filled), loaded.condenser(window, filled))
        z, m, p = torch.randn(3, 2, 12)
        c = modules.translator(z, m, p, 0.5)
        assert torch.equal(c, loaded.translator(z, m, p, 0.5)) and bool((c.norm(dim=-1) <= 0.5 + 1e-6).all())
        assert modules.shaper(c, p).shape == (2, 2, 12)


@pytest.mark.parametrize("sizes, tensor", [
    (dict(hidden=32), "condenser.key.weight"),  # another model's hidden size
    (dict(hidden=64, control=2), "shaper.net.2.weight"),  # control_tokens of the file ≠ the strategy's
    (dict(hidden=64, memory=5), "condenser.queries"),
])
def test_weights_that_do_not_fit_name_the_tensor(tiny_model, tmp_path, sizes, tensor):
    path = _weights(tmp_path, **sizes)
    with pytest.raises(StrategyError, match=tensor.replace(".", r"\.")):
        _run(tiny_model, [LatentControl(weights=str(path))])


def test_weights_file_missing_a_tensor_or_unreadable(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    path = _weights(tmp_path, hidden=tiny_model.hidden_size)
    tensors = load_file(str(path))
    del tensors["translator.gate.bias"]
    save_file(tensors, str(tmp_path / "partial.safetensors"))
    with pytest.raises(StrategyError, match=r"translator\.gate\.bias.*missing"):
        _run(tiny_model, [LatentControl(weights=str(tmp_path / "partial.safetensors"))])
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(StrategyError, match="weights"):
        _run(tiny_model, [LatentControl(weights=str(tmp_path / "junk.safetensors"))])


def test_learned_parts_run_from_the_file_and_only_from_it(tiny_model, tmp_path, monkeypatch):
    path = _weights(tmp_path, hidden=tiny_model.hidden_size)
    learned = _run(tiny_model, [LatentControl(weights=str(path), cooldown=4, max_injections=2, **ALWAYS)])
    summary = [e for e in learned.state.trace.events if "form" in e][-1]
    assert summary["form"] == "learned" and summary["injections"] == [2] * 4

    def refuse(*args, **kwargs):
        raise AssertionError("untrained modules built without a weights file")

    monkeypatch.setattr(latent_control_modules.LatentControlModules, "__init__", refuse)
    free = _run(tiny_model, [LatentControl(cooldown=4, max_injections=2, **ALWAYS)])
    assert [e for e in free.state.trace.events if "form" in e][-1]["form"] == "training-free"
    assert not torch.equal(free.tokens, learned.tokens)


@pytest.mark.parametrize("fmt", ["hf", "deepseek"])
def test_cli_generate_on_tiny_checkpoints_of_both_formats(tmp_path_factory, fmt):
    from click.testing import CliRunner

    from janus_decoding.cli import main
    from janus_decoding.models.tiny import write_tiny_checkpoint

    folder = write_tiny_checkpoint(tmp_path_factory.mktemp(f"lc-{fmt}") / "model", seed=0, format=fmt)
    runner = CliRunner()
    out = tmp_path_factory.mktemp(f"lc-out-{fmt}")
    result = runner.invoke(main, ["generate", "a red cube", "--model", str(folder), "-n", "2", "--out", str(out),
                                  "--decoder", "latent_control(max_injections=4)"])
    assert result.exit_code == 0, result.output
    firing = "latent_control(max_injections=4, cooldown=3, tau_entropy=0.0, tau_sim=1.0)"
    result = runner.invoke(main, ["generate", "a red cube", "--model", str(folder), "-n", "2", "--out", str(out),
                                  "--decoder", firing, "--explain"])
    assert result.exit_code == 0, result.output
    explained = [json.loads(line.split("trace ", 1)[1]) for line in result.output.splitlines() if "  trace " in line]
    listed = [(e["step"], e["row"]) for e in explained if "s_t" in e and "u_t" in e]
    assert listed == [(step, row) for step in (1, 5, 9, 13) for row in (0, 1)]
    lines = (out / "manifest.jsonl").read_text().splitlines()
    manifest = json.loads(lines[-1])
    assert [(e["step"], e["row"]) for e in manifest["trace"] if "s_t" in e] == listed
