"""A fast loop's next run of the same signature reuses the last run's step (its graphs on CUDA, its buffers and
cache everywhere): the run gives what a fresh loop gives, and what the last run returned does not change."""

from __future__ import annotations

import warnings

import pytest
import torch

import janus_decoding
from janus_decoding.core.graph import EagerStepWarning, FastLoop, FastOptions
from janus_decoding.core.loop import Sampler, run
from janus_decoding.core.reuse import Slot, detach, snapshot, transplant
from janus_decoding.core.runs import ImageRequest, run_images, run_text
from janus_decoding.plugins.decoder import Decoder

FIRST = [ImageRequest("a red fox in fresh snow", 3, k) for k in range(3)]
SECOND = [ImageRequest("a red cat in fresh snow", 8, k) for k in range(3)]  # the same token count as FIRST
SPECS = ["", "repetition_penalty(penalty=1.3) > top_p(top_p=0.8)", "dola(layers=[0, 2])",
         'top_k(top_k=50) > temperature(temperature=0.9) > cfg(schedule="linear")']


@pytest.fixture(scope="module")
def model(janus_folder):
    return janus_decoding.load_model(str(janus_folder))  # its own instance: the fused step re-points its weights


def _generate(model, decoder, loop, requests, **sampler):
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", EagerStepWarning)
        return run_images(model, decoder, requests, cfg=decoder.cfg, sampler=Sampler(**sampler), loop=loop)


def _copies(result) -> dict[str, torch.Tensor]:
    state = result.state
    return {"tokens": result.tokens.clone(), "lengths": result.lengths.clone(), "flags": result.flags.clone(),
            "history": state.history.clone(), "probs": state.last_probs.clone(), "step_t": state.step_t.clone()}


def _unchanged(result, copies) -> None:
    now = _copies(result)
    for name, value in copies.items():
        assert torch.equal(now[name], value), name


def test_prompts_of_the_test_have_the_same_length(model):
    assert len(model.generation_prompt_ids(FIRST[0].prompt)) == len(model.generation_prompt_ids(SECOND[0].prompt))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("options", [FastOptions(graphs=False), FastOptions(graphs=False, compile="eager")],
                         ids=["plain", "compiled"])
def test_the_next_run_reuses_the_step_and_gives_a_fresh_loops_tokens(model, spec, options):
    decoder = Decoder.from_spec(spec)
    loop = FastLoop(options)
    first = _generate(model, decoder, loop, FIRST)
    assert "reused_step" not in loop.stats
    kept = _copies(first)
    second = _generate(model, decoder, loop, SECOND)
    assert loop.stats["reused_step"] and "not_reused" not in loop.stats
    fresh = _generate(model, decoder, FastLoop(options), SECOND)
    assert torch.equal(second.tokens, fresh.tokens)
    assert torch.equal(second.state.history, fresh.state.history)
    torch.testing.assert_close(second.state.last_probs, fresh.state.last_probs, rtol=1e-5, atol=1e-6)
    assert torch.equal(second.state.cache.valid, fresh.state.cache.valid)
    assert not torch.equal(second.tokens, first.tokens)  # other prompts and seeds: the comparison can fail
    _unchanged(first, kept)  # what the first run returned did not move
    third = _generate(model, decoder, loop, FIRST)  # and back: the first run's tokens again
    assert torch.equal(third.tokens, kept["tokens"])


def test_the_core_loop_agrees_with_a_reused_step(model):
    decoder = Decoder.from_spec(SPECS[1])
    loop = FastLoop(FastOptions(graphs=False))
    _generate(model, decoder, loop, FIRST)
    second = _generate(model, decoder, loop, SECOND)
    assert torch.equal(second.tokens, _generate(model, decoder, run, SECOND).tokens)


def test_another_signature_builds_a_new_step(model):
    loop = FastLoop(FastOptions(graphs=False))
    _generate(model, Decoder.from_spec("top_k(top_k=5)"), loop, FIRST)
    other = Decoder.from_spec("top_k(top_k=7)")  # a parameter the step may have baked in
    result = _generate(model, other, loop, SECOND)
    assert "reused_step" not in loop.stats
    assert torch.equal(result.tokens, _generate(model, other, FastLoop(FastOptions(graphs=False)), SECOND).tokens)


def test_a_changed_strategy_config_builds_a_new_step(model):
    """A config changed in place (not through the spec) is no reason to replay graphs built with the old one."""
    decoder = Decoder.from_spec("top_k(top_k=5)")
    loop = FastLoop(FastOptions(graphs=False))
    _generate(model, decoder, loop, FIRST)
    decoder.strategies[0].config["top_k"] = 7
    _generate(model, decoder, loop, SECOND)
    assert "reused_step" not in loop.stats


def test_another_batch_size_lets_the_kept_cache_go(model):
    loop = FastLoop(FastOptions(graphs=False))
    first = _generate(model, Decoder(), loop, FIRST)
    bigger = FIRST + [ImageRequest("a cat", 5, 0)]
    result = _generate(model, Decoder(), loop, bigger)
    assert "reused_step" not in loop.stats and result.state.cache is not first.state.cache
    assert result.state.cache.batch == 8
    assert torch.equal(result.tokens, _generate(model, Decoder(), FastLoop(FastOptions(graphs=False)), bigger).tokens)
    loop.release()
    assert loop.reusable_cache(result.state.cache.geometry()) is None


def test_the_same_geometry_gets_the_kept_cache_renewed(model):
    loop = FastLoop(FastOptions(graphs=False))
    first = _generate(model, Decoder(), loop, FIRST)
    cache = first.state.cache
    assert cache.fill[0] > 0 and bool(cache.valid.any())
    assert loop.reusable_cache(cache.geometry()) is None  # made under inference mode: not handed out of it
    first = _generate(model, Decoder(), loop, FIRST)
    cache = first.state.cache
    with torch.inference_mode():
        assert loop.reusable_cache(cache.geometry()) is cache
    assert cache.fill == [0] * cache.num_layers and not bool(cache.valid.any())
    assert all(not bool(k.any()) for k in cache.keys + cache.values)


def test_text_runs_reuse_the_step(model):
    rows = [[model.chat_prompt_ids("Tell me about foxes.")], [model.chat_prompt_ids("Tell me about cats.")]]
    assert len(rows[0][0]) == len(rows[1][0])
    decoder = Decoder.from_spec(SPECS[1])

    def go(loop, ids, seed):
        with torch.inference_mode():
            return run_text(model, decoder, ids, max_new_tokens=12, sampler=Sampler(), seeds=[seed], eos_id=None,
                            loop=loop)

    loop = FastLoop(FastOptions(graphs=False))
    first = go(loop, rows[0], 1)
    kept = first.tokens.clone()
    second = go(loop, rows[1], 2)
    assert loop.stats["reused_step"]
    fresh = go(FastLoop(FastOptions(graphs=False)), rows[1], 2)
    assert torch.equal(second.tokens, fresh.tokens) and torch.equal(second.lengths, fresh.lengths)
    assert torch.equal(first.tokens, kept)
    assert torch.equal(go(run, rows[1], 2).tokens, second.tokens)
    assert not torch.equal(first.tokens, second.tokens)  # other prompt and seed: the comparisons can fail


# -- core.reuse on its own -------------------------------------------------------------------------------------


class _Holder:
    def __init__(self, **tensors):
        self.__dict__.update(tensors)


def test_transplant_moves_values_into_the_kept_tensors_or_changes_nothing():
    kept_a, kept_b = torch.zeros(3), torch.zeros(2, dtype=torch.long)
    holder = _Holder(a=torch.tensor([1.0, 2.0, 3.0]), b=torch.tensor([4, 5]))
    slots = {("a",): Slot(holder, "a", True), ("b",): Slot(holder, "b", True)}
    kept = {("a",): kept_a, ("b",): kept_b}
    assert transplant(kept, slots) is None
    assert holder.a is kept_a and holder.b is kept_b
    assert kept_a.tolist() == [1.0, 2.0, 3.0] and kept_b.tolist() == [4, 5]
    # a shape that differs: nothing is changed, and the reason names the tensor
    other = _Holder(a=torch.ones(4), b=torch.tensor([7, 8]))
    why = transplant(kept, {("a",): Slot(other, "a", True), ("b",): Slot(other, "b", True)})
    assert why is not None and "('a',)" in why
    assert other.b.tolist() == [7, 8] and kept_b.tolist() == [4, 5]
    # other paths
    assert "tensors" in transplant(kept, {("a",): Slot(holder, "a", True)})


def test_detach_gives_the_finished_run_copies():
    holder = _Holder(a=torch.tensor([1.0]), c=torch.tensor([2.0]))
    slots = {("a",): Slot(holder, "a", True), ("c",): Slot(holder, "c", True)}
    kept = snapshot({("a",): slots[("a",)]})
    detach(kept, slots)
    assert holder.a is not kept[("a",)] and torch.equal(holder.a, kept[("a",)])
    kept[("a",)].fill_(9.0)
    assert holder.a.item() == 1.0


# -- CUDA: the graphs themselves ---------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec", SPECS[:3])
@pytest.mark.parametrize("compile", [None, "inductor"])
def test_cuda_the_next_run_replays_the_kept_graphs(janus_folder, spec, compile):
    cuda = janus_decoding.load_model(str(janus_folder), device="cuda", dtype="bf16")
    decoder = Decoder.from_spec(spec)
    options = FastOptions(bucket=8, compile=compile)
    loop = FastLoop(options)
    first = _generate(cuda, decoder, loop, FIRST)
    kept = _copies(first)
    captured = loop.stats["captures"]
    second = _generate(cuda, decoder, loop, SECOND)
    assert loop.stats["reused_step"] and loop.stats["captures"] == 0
    assert loop.stats["reused_graphs"] == captured and loop.stats["replays"] > 0
    assert loop.stats["graph_free_steps"] == 0  # no warm-up step
    assert loop.stats["prompt_replayed"]  # DoLa too: its exits get the replayed forward's hidden states
    fresh = _generate(cuda, decoder, FastLoop(options), SECOND)
    assert torch.equal(second.tokens, fresh.tokens)
    assert torch.equal(second.state.history, fresh.state.history)
    _unchanged(first, kept)
    assert torch.equal(_generate(cuda, decoder, loop, FIRST).tokens, kept["tokens"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_text_runs_replay_the_kept_graphs(janus_folder):
    cuda = janus_decoding.load_model(str(janus_folder), device="cuda", dtype="bf16")
    decoder = Decoder.from_spec(SPECS[1])
    rows = [[cuda.chat_prompt_ids("Tell me about foxes.")], [cuda.chat_prompt_ids("Tell me about cats.")]]

    def go(loop, ids, seed):
        with torch.inference_mode():
            return run_text(cuda, decoder, ids, max_new_tokens=12, sampler=Sampler(), seeds=[seed], eos_id=None,
                            loop=loop)

    loop = FastLoop(FastOptions(bucket=8))
    first = go(loop, rows[0], 1)
    kept = first.tokens.clone()
    second = go(loop, rows[1], 2)
    assert loop.stats["reused_step"] and loop.stats["captures"] == 0 and loop.stats["prompt_replayed"]
    assert torch.equal(second.tokens, go(FastLoop(FastOptions(bucket=8)), rows[1], 2).tokens)
    off = FastLoop(FastOptions(bucket=8, prompt_graph=False))
    go(off, rows[0], 1)
    assert torch.equal(go(off, rows[1], 2).tokens, second.tokens) and not off.stats["prompt_replayed"]
    assert torch.equal(first.tokens, kept)


def test_the_generation_api_keeps_one_fast_loop_per_model(model):
    from janus_decoding import release_fast_path

    options = FastOptions(graphs=False)
    decoder = Decoder()
    first = decoder.generate_images(model, "a red fox in fresh snow", n=2, seed=3, fast=options)
    loop = model._fast_loop
    second = decoder.generate_images(model, "a red cat in fresh snow", n=2, seed=4, fast=options)
    assert model._fast_loop is loop and loop.stats["reused_step"]
    fresh = decoder.generate_images(model, "a red cat in fresh snow", n=2, seed=4, fast=False)
    assert torch.equal(second.tokens, fresh.tokens)
    assert not torch.equal(first.tokens, second.tokens)
    release_fast_path(model)
    assert loop._kept is None
    decoder.generate_images(model, "a red cat in fresh snow", n=2, seed=4, fast=FastOptions(graphs=False, bucket=8))
    assert model._fast_loop is not loop  # other options: another loop
