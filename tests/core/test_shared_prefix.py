"""Decode attention with the prompt's slots read once per distinct prompt (core/shared_prefix.py): the cascade of
the generated slots and the shared prompt, merged by log-sum-exps, is the attention over all slots; the fast step
with ``shared_prefix`` gives the core loop's tokens."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import janus_decoding
from janus_decoding.core.graph import EagerStepWarning, FastLoop, FastOptions
from janus_decoding.core.loop import Sampler, run
from janus_decoding.core.runs import ImageRequest, run_images, run_text
from janus_decoding.core.shared_prefix import (PrefixRows, prefix_attention_merge,
                                               prefix_attention_merge_reference, suffix_attention)
from janus_decoding.core.triton_support import triton_cannot_run
from janus_decoding.models.tiny import write_tiny_checkpoint
from janus_decoding.plugins.decoder import Decoder


def _cache(rows=6, nkv=2, length=40, d=16, prefix=11, seed=0, dtype=torch.float32, written=30):
    """A cache whose rows 0–2 share one prompt and 3–5 another (the second left-padded by 3 slots)."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(rows, nkv, length, d, generator=g, dtype=dtype)
    values = torch.randn(rows, nkv, length, d, generator=g, dtype=dtype)
    rows_of = PrefixRows.build([0, 3], [0, 0, 0, 1, 1, 1], torch.device("cpu"))
    representative = rows_of.representative
    keys[:, :, :prefix] = keys[representative, :, :prefix]
    values[:, :, :prefix] = values[representative, :, :prefix]
    valid = torch.ones(rows, length, dtype=torch.bool)
    valid[3:, :3] = False  # left padding of the second prompt
    valid[:, written:] = False  # not written yet
    valid[1, 20] = False  # a masked slot in the generated part
    return keys, values, valid, rows_of


@pytest.mark.parametrize("group", [1, 2])
@pytest.mark.parametrize("kernel", [False, True], ids=["reference", "triton"])
def test_prompt_and_generated_parts_merge_into_one_attention(group, kernel):
    if kernel and triton_cannot_run(torch.device("cpu")) is not None:
        pytest.skip("Triton's interpreter is off")
    keys, values, valid, representative = _cache()
    rows, nkv, length, d = keys.shape
    nq, prefix, read = nkv * group, 11, 32
    q = torch.randn(rows, nq, d, generator=torch.Generator().manual_seed(1))
    scale = d ** -0.5
    query = q.reshape(rows, nkv, group, d)
    bias = torch.zeros(rows, 1, 1, read - prefix).masked_fill_(~valid[:, None, None, prefix:read], float("-inf"))
    out2, lse2 = suffix_attention(query, keys[:, :, prefix:read], values[:, :, prefix:read], bias, scale)
    merge = prefix_attention_merge if kernel else prefix_attention_merge_reference
    merged = merge(q, keys, values, valid, representative, prefix, out2, lse2, scale)
    full_mask = valid[:, None, None, :read]
    full = F.scaled_dot_product_attention(query, keys[:, :, :read], values[:, :, :read], attn_mask=full_mask,
                                          scale=scale).reshape(rows, nq * d)
    torch.testing.assert_close(merged, full, rtol=1e-5, atol=1e-5)
    # the prompt part really comes from the representative rows: spoil another row's copy, nothing changes
    keys[1, :, :prefix] += 100.0
    again = merge(q, keys, values, valid, representative, prefix, out2, lse2, scale)
    torch.testing.assert_close(again, merged)


def test_the_suffix_log_sum_exp_is_the_scores_one():
    keys, values, valid, _ = _cache()
    q = torch.randn(6, 2, 1, 16)
    bias = torch.zeros(6, 1, 1, 21)
    out, lse = suffix_attention(q, keys[:, :, 11:32], values[:, :, 11:32], bias, 0.25)
    scores = (q @ keys[:, :, 11:32].transpose(-1, -2)) * 0.25
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, keys[:, :, 11:32], values[:, :, 11:32],
                                                                   scale=0.25))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-janus", seed=0)


@pytest.fixture(scope="module")
def model(folder):
    return janus_decoding.load_model(str(folder))


def _generate(model, decoder, loop, requests):
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", EagerStepWarning)
        return run_images(model, decoder, requests, cfg=decoder.cfg, sampler=Sampler(), loop=loop)


ONE_PROMPT = [ImageRequest("a red fox in fresh snow", 3, k) for k in range(3)]
TWO_PROMPTS = ONE_PROMPT[:2] + [ImageRequest("a cat", 5, k) for k in range(2)]  # left padding in the rows


@pytest.mark.parametrize("spec", ["", "repetition_penalty(penalty=1.3) > top_p(top_p=0.8)", "dola(layers=[0, 2])"])
@pytest.mark.parametrize("requests", [ONE_PROMPT, TWO_PROMPTS], ids=["one-prompt", "two-prompts"])
def test_the_step_with_a_shared_prefix_gives_the_core_loops_tokens(model, spec, requests, bucket=4):
    decoder = Decoder.from_spec(spec)
    loop = FastLoop(FastOptions(graphs=False, shared_prefix=True, bucket=bucket))
    fast = _generate(model, decoder, loop, requests)
    eager = _generate(model, decoder, run, requests)
    assert torch.equal(fast.tokens, eager.tokens)
    torch.testing.assert_close(fast.state.last_probs, eager.state.last_probs, rtol=1e-5, atol=1e-6)


def test_the_shared_prefix_is_used_and_reads_buckets_after_the_prompt(model, monkeypatch):
    from janus_decoding.core import graph

    calls = []
    original = graph.prefix_attention_merge
    monkeypatch.setattr(graph, "prefix_attention_merge", lambda *a: calls.append(a[5]) or original(*a))
    lengths = []
    suffix = graph.suffix_attention
    monkeypatch.setattr(graph, "suffix_attention", lambda q, k, v, b, s: lengths.append(k.shape[2]) or suffix(
        q, k, v, b, s))
    _generate(model, Decoder(), FastLoop(FastOptions(graphs=False, shared_prefix=True, bucket=8)), ONE_PROMPT)
    prompt = len(model.generation_prompt_ids(ONE_PROMPT[0].prompt))
    assert calls and set(calls) == {prompt}
    assert lengths and all(n % 8 == 0 for n in lengths)  # whole buckets after the prompt's end


def test_no_shared_prefix_without_repeated_prompts_or_with_injecting_strategies(model):
    loop = FastLoop(FastOptions(graphs=False, shared_prefix=True))
    with pytest.warns(EagerStepWarning, match="shared_prefix is off"):
        with torch.inference_mode():
            run_images(model, Decoder(), [ImageRequest("a lone wolf at night", 1, 0)], cfg=Decoder().cfg,
                       sampler=Sampler(), loop=loop)


def test_text_rows_with_one_prompt_share_it(model):
    ids = [model.chat_prompt_ids("Tell me about foxes.")] * 3

    def go(loop):
        with torch.inference_mode():
            return run_text(model, Decoder(), ids, max_new_tokens=10, sampler=Sampler(), seeds=[1, 2, 3],
                            eos_id=None, loop=loop)

    fast = go(FastLoop(FastOptions(graphs=False, shared_prefix=True, bucket=4)))
    assert torch.equal(fast.tokens, go(run).tokens)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_suffix_attention_and_merge_match_one_attention():
    keys, values, valid, rows_of = _cache(nkv=4, d=128, length=96, prefix=46, dtype=torch.bfloat16, written=90)
    keys, values, valid = keys.cuda(), values.cuda(), valid.cuda()
    representative = PrefixRows.build([0, 3], [0, 0, 0, 1, 1, 1], torch.device("cuda"))
    rows, nkv, _, d = keys.shape
    q = torch.randn(rows, nkv, d, device="cuda", dtype=torch.bfloat16)
    query = q.reshape(rows, nkv, 1, d)
    prefix, read = 46, 46 + 32
    visible = valid[:, prefix:read] & True
    bias = torch.zeros(rows, 1, 1, read - prefix, device="cuda", dtype=torch.bfloat16)
    bias.masked_fill_(~visible[:, None, None], float("-inf"))
    out2, lse2 = suffix_attention(query, keys[:, :, prefix:read], values[:, :, prefix:read], bias, d ** -0.5)
    reference_out, reference_lse = suffix_attention(query.cpu(), keys[:, :, prefix:read].cpu(),
                                                    values[:, :, prefix:read].cpu(), bias.cpu(), d ** -0.5)
    torch.testing.assert_close(lse2.cpu(), reference_lse, rtol=1e-2, atol=1e-2)
    merged = prefix_attention_merge(q, keys, values, valid, representative, prefix, out2, lse2, d ** -0.5)
    full = F.scaled_dot_product_attention(query.float(), keys[:, :, :read].float(), values[:, :, :read].float(),
                                          attn_mask=valid[:, None, None, :read], scale=d ** -0.5)
    torch.testing.assert_close(merged.float(), full.reshape(rows, nkv * d), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [None, "inductor"])
def test_cuda_graphs_with_a_shared_prefix_replay_the_graph_free_step(folder, compile):
    cuda = janus_decoding.load_model(str(folder), device="cuda", dtype="bf16")
    decoder = Decoder.from_spec("dola(layers=[0, 2])")
    loop = FastLoop(FastOptions(bucket=8, compile=compile, shared_prefix=True))
    graphed = _generate(cuda, decoder, loop, ONE_PROMPT)
    plain = _generate(cuda, decoder, FastLoop(FastOptions(graphs=False, bucket=8, compile=compile,
                                                          shared_prefix=True)), ONE_PROMPT)
    assert loop.stats["replays"] > 0
    assert torch.equal(graphed.tokens, plain.tokens)
    again = _generate(cuda, decoder, loop, ONE_PROMPT)  # the kept graphs
    assert loop.stats["reused_step"] and torch.equal(again.tokens, graphed.tokens)
