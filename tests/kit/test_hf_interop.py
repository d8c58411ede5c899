"""transformers interop both ways, on the tiny LLaMA: ``hf_processor`` (a transformers LogitsProcessor as a strategy)
and ``as_logits_processor`` (a strategy of ours inside ``model.generate``)."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)

import janus_decoding
from janus_decoding.core.loop import Sampler
from janus_decoding.core.runs import run_text
from janus_decoding.models.tiny import write_tiny_llama
from janus_decoding.plugins.decoder import Decoder
from janus_decoding.plugins.strategy import Strategy, StrategyError
from janus_decoding.strategies import RepetitionPenalty, Temperature, TopK
from janus_decoding.strategies.dola import DoLa
from janus_decoding.strategies.hf_interop import HFProcessor, as_logits_processor, resolve_processor
from janus_decoding.testing import check_strategy

PROMPTS = ["once upon a time", "the cat sat on the"]  # different lengths: left padding
STEPS = 10


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return janus_decoding.load_model(str(write_tiny_llama(tmp_path_factory.mktemp("llama") / "m", seed=0)))


class Recorder(Strategy):
    """Keeps the logits that reach sampling (run last)."""

    name = "recorder"
    hooks = ("post_cfg",)

    def post_cfg(self, state, logits):
        state.memory.setdefault(self.name, []).append(logits.clone())
        return logits


def _ours(model, spec: str, *, greedy: bool):
    decoder = Decoder([*Decoder.from_spec(spec).strategies, Recorder()])
    rows = [model.tokenize(p) for p in PROMPTS]
    with torch.inference_mode():
        result = run_text(model, decoder, rows, max_new_tokens=STEPS, sampler=Sampler(greedy=greedy, rng="row"),
                          seeds=[0, 1], eos_id=None)
    return result.tokens, torch.stack(result.state.memory["recorder"], 1)  # [P, steps], [P, steps, V]


def _generate(model, processors):
    """transformers' greedy generate on the same left-padded batch; returns new ids and the processed scores."""
    lm = model.model
    batch = model.tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    out = lm.generate(**batch, max_new_tokens=STEPS, min_new_tokens=0, do_sample=False, num_beams=1,
                      logits_processor=LogitsProcessorList(processors), output_scores=True,
                      return_dict_in_generate=True, pad_token_id=model.pad_id, eos_token_id=None)
    new = out.sequences[:, batch["input_ids"].shape[1]:]
    return new, torch.stack(out.scores, 1)


# -- names -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "expected"), [
    ("TopKLogitsProcessor", TopKLogitsWarper), ("TopKLogitsWarper", TopKLogitsWarper),
    ("TemperatureLogitsProcessor", TemperatureLogitsWarper),
    ("RepetitionPenaltyLogitsProcessor", RepetitionPenaltyLogitsProcessor),
    ("RepetitionPenaltyLogitsWarper", RepetitionPenaltyLogitsProcessor),
])
def test_names_and_aliases_resolve(name, expected):
    assert resolve_processor(name) is expected


@pytest.mark.parametrize(("spec", "match"), [
    ('hf_processor(processor="transformers.generation.TopKLogitsWarper")', "must name a LogitsProcessor class"),
    ('hf_processor(processor="os.system")', "must name a LogitsProcessor class"),
    ('hf_processor(processor="LogitsProcessor")', "must name a LogitsProcessor class"),
    ('hf_processor(processor="LogitsProcessorList")', "must name a LogitsProcessor class"),
    ('hf_processor(processor="ClassifierFreeGuidanceLogitsProcessor", guidance_scale=3.0)', "`cfg` stage"),
    ('hf_processor(processor="TopKLogitsProcessor", top_k=0)', "`top_k`"),
    ('hf_processor(processor="TopKLogitsProcessor", topk=5)', "topk"),
    ('hf_processor(processor="TemperatureLogitsWarper", temperature=-1.0)', "`temperature`"),
    ("hf_processor(top_k=5)", "`processor`"),
])
def test_bad_configurations_are_refused_naming_the_parameter(spec, match):
    with pytest.raises(StrategyError, match=match) as info:
        Decoder.from_spec(spec)
    assert str(info.value).startswith("`hf_processor`")


def test_spec_round_trip_keeps_forwarded_parameters():
    spec = 'hf_processor(processor="TopKLogitsProcessor", top_k=5, min_tokens_to_keep=2)'
    assert Decoder.from_spec(spec).to_spec() == spec
    schema = HFProcessor.describe()["parameters"]
    assert schema["required"] == ["processor"] and schema["additionalProperties"] is True


@pytest.mark.parametrize("params", [{"processor": "TopKLogitsProcessor", "top_k": 5},
                                    {"processor": "RepetitionPenaltyLogitsProcessor", "penalty": 1.3},
                                    {"processor": "TemperatureLogitsWarper", "temperature": 0.7}],
                         ids=lambda p: p["processor"])
def test_hf_processor_passes_the_contract(params):
    check_strategy(HFProcessor, **params)


# -- parity: transformers' processors inside our loop ----------------------------------------------------------
def test_hf_top_k_equals_our_top_k_when_sampling(tiny_llama):
    """Same tokens (row RNG, sampled) and the same logits at sampling as the built-in `top_k`."""
    ours_tokens, ours_scores = _ours(tiny_llama, "top_k(top_k=5)", greedy=False)
    hf_tokens, hf_scores = _ours(tiny_llama, 'hf_processor(processor="TopKLogitsProcessor", top_k=5)', greedy=False)
    assert torch.equal(ours_tokens, hf_tokens)
    assert torch.equal(ours_scores, hf_scores)
    assert (hf_scores.isfinite().sum(-1) == 5).all()


@pytest.mark.parametrize(("spec", "processor"), [
    ('hf_processor(processor="TopKLogitsProcessor", top_k=5)', lambda: TopKLogitsWarper(5)),
    ('hf_processor(processor="RepetitionPenaltyLogitsProcessor", penalty=3.0)',
     lambda: RepetitionPenaltyLogitsProcessor(3.0)),
], ids=["top_k", "repetition_penalty"])
def test_hf_processor_in_our_loop_matches_transformers_generate(tiny_llama, spec, processor):
    """Greedy, left-padded batch: our loop with `hf_processor` gives transformers' tokens and processed scores."""
    ours_tokens, ours_scores = _ours(tiny_llama, spec, greedy=True)
    with torch.inference_mode():
        hf_tokens, hf_scores = _generate(tiny_llama, [processor()])
    assert torch.equal(ours_tokens, hf_tokens)
    assert torch.equal(ours_scores.isneginf(), hf_scores.isneginf())
    torch.testing.assert_close(ours_scores, hf_scores, rtol=1e-4, atol=1e-4)


def test_repetition_penalty_changes_the_greedy_text(tiny_llama):
    """Else the parity above would prove little for input_ids."""
    plain, _ = _ours(tiny_llama, "", greedy=True)
    penalised, _ = _ours(tiny_llama, 'hf_processor(processor="RepetitionPenaltyLogitsProcessor", penalty=3.0)',
                         greedy=True)
    assert not torch.equal(plain, penalised)


# -- parity: our strategies inside transformers' generate ------------------------------------------------------
@pytest.mark.parametrize(("ours", "theirs"), [
    (lambda: TopK(top_k=5), lambda: TopKLogitsWarper(5)),
    (lambda: RepetitionPenalty(penalty=3.0), lambda: RepetitionPenaltyLogitsProcessor(3.0)),
    (lambda: Temperature(temperature=0.7), lambda: TemperatureLogitsWarper(0.7)),
], ids=["top_k", "repetition_penalty", "temperature"])
def test_exported_strategy_matches_the_transformers_processor(tiny_llama, ours, theirs):
    with torch.inference_mode():
        mine_tokens, mine_scores = _generate(tiny_llama, [as_logits_processor(ours())])
        ref_tokens, ref_scores = _generate(tiny_llama, [theirs()])
    assert torch.equal(mine_tokens, ref_tokens)
    assert torch.equal(mine_scores, ref_scores)


def test_exported_processor_restarts_for_a_new_generation(tiny_llama):
    """One exported instance used for two generate calls gives the same result twice (fresh state per call)."""
    processor = as_logits_processor(RepetitionPenalty(penalty=3.0))
    with torch.inference_mode():
        first = _generate(tiny_llama, [processor])
        second = _generate(tiny_llama, [processor])
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_only_logits_strategies_export():
    with pytest.raises(StrategyError, match="exit_layers"):
        as_logits_processor(DoLa())
    with pytest.raises(TypeError, match="configured Strategy"):
        as_logits_processor(TopK)
