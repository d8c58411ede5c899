"""The fast path in text mode against the core loop: same tokens, lengths, history and step, with EOS and padding.

On CPU (fp32) the graph-free fast step must equal the eager loop for Janus and a plain causal LM, for rows that
finish at different steps (EOS) and prompts of different lengths (left padding). On CUDA the captured graphs must
give the graph-free path's tokens.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import janus_decoding
from janus_decoding.core.decode_attention import decode_attention_unavailable
from janus_decoding.core.graph import EagerStepWarning, FastLoop, FastOptions
from janus_decoding.core.loop import Sampler, run
from janus_decoding.core.runs import run_text
from janus_decoding.models.tiny import write_tiny_checkpoint, write_tiny_llama
from janus_decoding.plugins.decoder import Decoder

PROMPTS = ["Tell me about foxes in the snow.", "Hi", "What is the capital of a small made-up country?"]
NEW_TOKENS = 24

# The Triton kernels on the CPU model: through the interpreter where CUDA is absent (tests/conftest.py), else skipped.
NO_CPU_TRITON = pytest.mark.skipif(decode_attention_unavailable(torch.device("cpu"), 64) is not None,
                                   reason="Triton's interpreter is off (a CUDA host runs the kernels in the CUDA tests)")


@pytest.fixture(scope="module")
def janus(tmp_path_factory):
    return janus_decoding.load_model(str(write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=0)))


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return janus_decoding.load_model(str(write_tiny_llama(tmp_path_factory.mktemp("llama") / "tiny-llama", seed=0)))


def _text(model, decoder, loop, *, eos_id, **sampler):
    if sampler.get("rng") == "torch":
        sampler["generator"] = torch.Generator(device=model.device).manual_seed(11)
    rows = [model.chat_prompt_ids(p) for p in PROMPTS]
    with torch.inference_mode():
        return run_text(model, decoder, rows, max_new_tokens=NEW_TOKENS, sampler=Sampler(**sampler),
                        seeds=[3, 4, 5], eos_id=eos_id, loop=loop)


def _same(a, b) -> None:
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.lengths, b.lengths)
    assert torch.equal(a.state.history, b.state.history)
    assert torch.equal(a.state.history_valid, b.state.history_valid)
    assert a.state.cache.fill == b.state.cache.fill
    assert int(a.state.step_t) == int(b.state.step_t) and a.state.step == b.state.step


def _common_token(model, decoder, **sampler) -> int:
    """A token the first row samples early on: used as EOS so that rows finish at different steps."""
    free = _text(model, decoder, run, eos_id=None, **sampler)
    return int(free.tokens[0, 2])


SPECS = ["", "repetition_penalty(penalty=1.3) > top_p(top_p=0.8)", "dola(layers=[0, 2])"]


@pytest.mark.parametrize("which", ["janus", "llama"])
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("sampler", [{}, {"greedy": True}, {"rng": "torch"}], ids=["row", "greedy", "torch"])
@pytest.mark.parametrize("options", [FastOptions(graphs=False), FastOptions(graphs=False, bucket=4),
                                     FastOptions(graphs=False, layers="transformers", bucket=0)],
                         ids=["fused-b64", "fused-b4", "modules-whole"])
def test_graph_free_text_equals_core_loop(request, which, spec, sampler, options):
    model = request.getfixturevalue(which)
    decoder = Decoder.from_spec(spec)
    eos = _common_token(model, decoder, **sampler)
    eager = _text(model, decoder, run, eos_id=eos, **sampler)
    loop = FastLoop(options)
    fast = _text(model, decoder, loop, eos_id=eos, **sampler)
    _same(eager, fast)
    assert int(eager.lengths[0]) == 3  # row 0 stopped at its EOS: the finished-row logic was exercised
    assert "eager_run" not in loop.stats and loop.stats["graph_free_steps"] > 0


def test_rows_that_never_finish_run_every_step(janus):
    decoder = Decoder()
    loop = FastLoop(FastOptions(graphs=False))
    fast = _text(janus, decoder, loop, eos_id=None)
    assert fast.lengths.tolist() == [NEW_TOKENS] * len(PROMPTS)
    assert loop.stats["graph_free_steps"] == NEW_TOKENS - 1  # token 0 comes from the prefill
    _same(_text(janus, decoder, run, eos_id=None), fast)


def test_early_stop_when_every_row_has_finished(janus):
    """Three copies of one prompt, greedy: every row emits the same token at step 2; with it as EOS all rows finish
    there, and the run stops at the next EOS check (step 8) instead of running all steps."""
    rows = [janus.chat_prompt_ids(PROMPTS[0])] * 3

    def go(loop, eos_id):
        with torch.inference_mode():
            return run_text(janus, Decoder(), rows, max_new_tokens=NEW_TOKENS, sampler=Sampler(greedy=True),
                            seeds=[0, 1, 2], eos_id=eos_id, loop=loop)

    eos = int(go(run, None).tokens[0, 2])
    loop = FastLoop(FastOptions(graphs=False))
    fast = go(loop, eos)
    _same(go(run, eos), fast)
    assert fast.lengths.tolist() == [3, 3, 3]
    assert loop.stats["graph_free_steps"] == 7  # steps 1..7 (step 0 from the prefill); the check after step 7 stops


@pytest.mark.parametrize("which", ["janus", "llama"])
@pytest.mark.parametrize("sampler", [{}, {"greedy": True}], ids=["row", "greedy"])
def test_one_row_compiled_step_equals_core_loop(request, which, sampler, monkeypatch):
    """One row with compiled pieces: the layer GEMVs run as multiply-reduces (``matvec``) and the argmax compiled;
    dynamo traces them (``compile="eager"``) and the tokens equal the core loop's (fp32)."""
    from janus_decoding.core import fused, graph

    model = request.getfixturevalue(which)
    row = [model.chat_prompt_ids(PROMPTS[0])]

    def go(loop):
        with torch.inference_mode():
            return run_text(model, Decoder(), row, max_new_tokens=NEW_TOKENS, sampler=Sampler(**sampler), seeds=[3],
                            eos_id=None, loop=loop)

    eager = go(run)
    _same(eager, go(FastLoop(FastOptions(graphs=False, compile="eager"))))
    # the same run with the pieces left plain, to see which GEMV form they were asked for
    calls = []
    original = fused._linear
    monkeypatch.setattr(fused, "_linear", lambda x, w, gemm="cublas", parts=False, programs=128: calls.append(
        (gemm, x.shape[0])) or original(x, w, gemm, parts, programs))
    monkeypatch.setattr(graph, "_layer_pieces", lambda backend, gemm, writes_cache, **_: fused._layer_pieces(
        None, gemm, writes_cache))
    _same(eager, go(FastLoop(FastOptions(graphs=False, compile="eager"))))
    step = [gemm for gemm, rows in calls if rows == 1]  # (the prompt's forward has a row per prompt token)
    assert step and all(c == "matvec" for c in step)  # every layer GEMV of the one-row step: the multiply-reduce


def test_chat_takes_fast(janus):
    decoder = Decoder()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EagerStepWarning)
        plain = decoder.chat(janus, "Hello there", max_new_tokens=8, greedy=True, fast=False)
        fast = decoder.chat(janus, "Hello there", max_new_tokens=8, greedy=True, fast=True)
    assert plain.tokens == fast.tokens and len(plain.tokens[0]) > 0


@NO_CPU_TRITON
@pytest.mark.parametrize("which", ["janus", "llama"])
def test_triton_attention_text_equals_core_loop(request, which):
    """Text mode through the Triton decode kernels (CPU: Triton's interpreter): left padding, rows finishing at
    different steps, GQA heads on the plain LLaMA."""
    model = request.getfixturevalue(which)
    decoder = Decoder.from_spec("repetition_penalty(penalty=1.3) > top_p(top_p=0.8)")
    eos = _common_token(model, decoder)
    loop = FastLoop(FastOptions(graphs=False, attention="triton", split=32))
    _same(_text(model, decoder, run, eos_id=eos), _text(model, decoder, loop, eos_id=eos))
    assert loop.stats["attention"] == "triton"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec", ["", "repetition_penalty(penalty=1.3) > top_p(top_p=0.8)"])
@pytest.mark.parametrize("sampler", [{}, {"rng": "torch"}], ids=["row", "torch"])
@pytest.mark.parametrize("attention", ["sdpa", "triton"])
def test_cuda_graphs_replay_the_graph_free_text_step(tmp_path, spec, sampler, attention):
    cuda = janus_decoding.load_model(str(write_tiny_checkpoint(tmp_path / "tiny", seed=0)), device="cuda",
                                     dtype="bf16")
    decoder = Decoder.from_spec(spec)
    loop = FastLoop(FastOptions(bucket=8, attention=attention))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EagerStepWarning)
        graphed = _text(cuda, decoder, loop, eos_id=None, **sampler)
        plain = _text(cuda, decoder, FastLoop(FastOptions(graphs=False, bucket=8, check_syncs=True,
                                                          attention=attention)), eos_id=None, **sampler)
    assert loop.stats["replays"] > 0 and loop.stats["attention"] == attention
    _same(graphed, plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("which", ["janus", "llama"])
def test_cuda_graphs_replay_the_one_row_compiled_step(tmp_path, which):
    """One row, Inductor-compiled pieces (the GEMVs as timed reductions, the Triton attention): the replay gives
    the graph-free compiled step's tokens, sampled and greedy."""
    folder = write_tiny_checkpoint(tmp_path / "tiny", seed=0) if which == "janus" else \
        write_tiny_llama(tmp_path / "tiny-llama", seed=0)
    cuda = janus_decoding.load_model(str(folder), device="cuda", dtype="bf16")
    row = [cuda.chat_prompt_ids(PROMPTS[0])]
    for sampler in (Sampler(), Sampler(greedy=True)):
        def go(loop):
            with torch.inference_mode():
                return run_text(cuda, Decoder(), row, max_new_tokens=NEW_TOKENS, sampler=sampler, seeds=[3],
                                eos_id=None, loop=loop)

        loop = FastLoop(FastOptions(compile="inductor"))
        graphed = go(loop)
        assert loop.stats["replays"] > 0
        _same(graphed, go(FastLoop(FastOptions(graphs=False, compile="inductor"))))


@pytest.mark.parametrize("spec", [
    'repetition_penalty(penalty=1.2) > dola > visual_prior_fusion(bank="cat,dog")',
    "token_pruning(layer=2, keep_ratio=0.5)",
    'token_pruning(layer=1, keep_ratio=0.25, mode="soft") > top_k(top_k=20)',
])
def test_understanding_strategies_on_the_fast_step(janus, spec):
    """Image understanding with the text-mode strategies: the fast step (graph-free) answers as the eager loop."""
    from PIL import Image

    picture = Image.new("RGB", (40, 28), (200, 40, 90))
    decoder = Decoder.from_spec(spec)
    kwargs = {"max_new_tokens": 12, "seed": 5}
    with warnings.catch_warnings():
        warnings.simplefilter("error", EagerStepWarning)  # nothing falls back to the eager loop
        fast = decoder.answer(janus, [picture], "What is this?", fast=FastOptions(graphs=False), **kwargs)
    eager = decoder.answer(janus, [picture], "What is this?", fast=False, **kwargs)
    assert fast.tokens == eager.tokens and len(fast.tokens[0]) > 0
