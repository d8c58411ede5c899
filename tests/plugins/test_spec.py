"""The decoder spec (plugins/spec.py) and its Decoder (plugins/decoder.py): grammar, TOML, order, built-ins."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from janus_decoding import Decoder
from janus_decoding.core.cfg import CFGConfig
from janus_decoding.plugins.registry import build_registry
from janus_decoding.plugins.spec import SpecError, Stage, format_stage, parse_spec, parse_toml
from janus_decoding.plugins.strategy import StrategyError
from janus_decoding.strategies.sampling import Temperature
from plugins_fixtures import spec_plugins


@pytest.fixture(scope="module")
def registry():
    return build_registry(extra_plugins=[spec_plugins])


# -- grammar ------------------------------------------------------------------------------------------------------
def test_parse_examples():
    assert parse_spec("top_k") == [Stage("top_k", {}, 1)]
    assert parse_spec("top_k()") == [Stage("top_k", {}, 1)]
    stages = parse_spec(' repetition_penalty(penalty=1.2) >dola(layers="high", alpha=-1, on=true, xs=[1, -2.5e3, "a"])')
    assert [s.name for s in stages] == ["repetition_penalty", "dola"]
    assert stages[0].column == 2 and stages[1].column == 35
    assert stages[1].args == {"layers": "high", "alpha": -1, "on": True, "xs": [1, -2500.0, "a"]}
    assert parse_spec("a(s='it\\'s \\\\ \\n')")[0].args == {"s": "it's \\ \n"}
    assert parse_spec("a(x=.5, y=5., z=1e3, w=+3, l=[])")[0].args == {"x": 0.5, "y": 5.0, "z": 1000.0, "w": 3, "l": []}
    assert type(parse_spec("a(z=1e3)")[0].args["z"]) is float and type(parse_spec("a(w=+3)")[0].args["w"]) is int


@pytest.mark.parametrize("text,column,words", [
    ("", 1, "empty spec"),
    ("   ", 1, "empty spec"),
    ("top_k(top_k=5", 14, "',' or ')'"),
    ("top_k(5)", 7, "keyword arguments only"),
    ("top_k > > temperature", 9, "a strategy name"),
    ("top_k temperature", 7, "'>' between stages"),
    ("top_k(k=1, k=2)", 12, "given twice"),
    ("top_k(k=)", 9, "expected a value"),
    ("top_k(k=[1, 2)", 14, "',' or ']'"),
    ("top_k @ temperature", 7, "unexpected character '@'"),
    ("a(s=\"open)", 5, "unexpected character"),
    ("a(s='\\q')", 6, "unknown escape"),
    ("a(k=yes)", 5, "expected a value, found 'yes'"),
    ("a(k=1) >", 9, "spec ended"),
])
def test_errors_show_the_column(text, column, words):
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    assert info.value.column == column, str(info.value)
    assert words in str(info.value)
    assert f"at column {column}" in str(info.value)


def test_spec_must_be_a_string():
    with pytest.raises(SpecError, match="must be a string"):
        parse_spec(["top_k"])


# Text built from the grammar's own alphabet hits deep parser states far more often than arbitrary unicode.
_GRAMMAR_PIECES = st.sampled_from(["top_k", "(", ")", "=", ",", ">", "[", "]", '"', "'", "\\", "1", "-", "+", ".",
                                   "e", "5", "true", "x", " ", "9" * 400, "é", "\n", "#", "1e999", "0x1"])


@given(st.one_of(st.text(max_size=60), st.lists(_GRAMMAR_PIECES, max_size=25).map("".join)))
def test_parser_fuzz_parses_or_raises_spec_error(text):
    try:
        stages = parse_spec(text)
    except SpecError as exc:
        assert exc.column >= 0
        assert str(exc).startswith("decoder spec")
        return
    assert stages and all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", s.name) for s in stages)


@given(st.one_of(st.text(max_size=60), st.lists(_GRAMMAR_PIECES, max_size=25).map("".join)))
def test_decoder_from_spec_raises_only_value_errors(text):
    """Whatever the text, building a decoder fails with SpecError / StrategyError / RegistryError (ValueErrors)."""
    try:
        Decoder.from_spec(text)
    except ValueError:
        pass


# -- round trip ---------------------------------------------------------------------------------------------------
_IDENT = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True).filter(lambda s: s not in ("true", "false"))
_SCALAR = st.one_of(st.integers(-10**12, 10**12), st.floats(allow_nan=False, allow_infinity=False), st.booleans(),
                    st.text(max_size=12))
_VALUE = st.recursive(_SCALAR, lambda inner: st.lists(inner, max_size=3), max_leaves=6)


@given(st.lists(st.tuples(_IDENT, st.dictionaries(_IDENT, _VALUE, max_size=3)), min_size=1, max_size=4))
def test_format_then_parse_round_trips(stages):
    text = " > ".join(format_stage(name, args) for name, args in stages)
    parsed = parse_spec(text)
    assert [(s.name, s.args) for s in parsed] == [(n, a) for n, a in stages]


_ALL_KINDS_ARGS = st.fixed_dictionaries({}, optional={
    "count": st.integers(-1000, 1000),
    "ratio": st.floats(-1e6, 1e6, allow_nan=False),
    "label": st.text(max_size=10),
    "flag": st.booleans(),
    "layers": st.lists(st.integers(0, 40), max_size=4),
    "words": st.lists(st.text(max_size=5), max_size=3),
    "either": st.one_of(st.text(max_size=5), st.lists(st.integers(0, 9), max_size=3)),
    "mode": st.sampled_from(["a", "b"]),
    "bounded": st.integers(1, 10),
})
_BUILTIN_STAGES = st.sampled_from([
    "repetition_penalty", "repetition_penalty(penalty=1.5)", "top_k(top_k=7, min_tokens_to_keep=2)",
    "top_p(top_p=0.25)", "temperature(temperature=0.3)", "top_k",
])
_CFG = st.fixed_dictionaries({}, optional={
    "weight": st.floats(0, 20), "schedule": st.sampled_from(["constant", "linear", "cosine"]),
    "layout": st.sampled_from(["interleaved", "halves"]),
    "negative_prompt": st.text(min_size=1, max_size=8).filter(str.strip),
})


def _same(a: Decoder, b: Decoder) -> bool:
    return ([(s.name, s.config) for s in a.strategies] == [(s.name, s.config) for s in b.strategies]
            and a.cfg == b.cfg)


@given(_ALL_KINDS_ARGS, st.lists(_BUILTIN_STAGES, max_size=3, unique_by=lambda s: s.split("(")[0]), _CFG)
def test_to_spec_of_a_parsed_decoder_reparses_to_the_same_decoder(registry, kinds, builtins, cfg):
    first = "all_kinds" + ("" if not kinds else "(" + ", ".join(f"{k}={_fmt(v)}" for k, v in kinds.items()) + ")")
    # the penalty is a transform; the warpers run after it (canonical order)
    stages = [first, *sorted(builtins, key=lambda b: not b.startswith("repetition_penalty"))]
    if cfg:
        stages.append(format_stage("cfg", cfg))
    decoder = Decoder.from_spec(" > ".join(stages), registry=registry)
    again = Decoder.from_spec(decoder.to_spec(), registry=registry)
    assert _same(decoder, again)
    assert again.to_spec() == decoder.to_spec()


def _fmt(value):
    from janus_decoding.plugins.spec import format_value

    return format_value(value)


def test_empty_decoder_round_trips():
    assert Decoder.from_spec("").to_spec() == ""
    assert Decoder.from_spec("  ").strategies == []


def test_to_spec_keeps_only_explicit_parameters():
    decoder = Decoder.from_spec("top_k(top_k=5) > temperature > cfg(weight=2.0)")
    assert decoder.to_spec() == "top_k(top_k=5) > temperature > cfg(weight=2.0)"
    assert decoder.strategies[1].config == {"temperature": 1.0}


# -- TOML ---------------------------------------------------------------------------------------------------------
def test_toml_form_with_cfg(tmp_path, registry):
    path = tmp_path / "decoder.toml"
    path.write_text(
        '[[strategy]]\nname = "repetition_penalty"\npenalty = 1.3\n\n'
        '[[strategy]]\nname = "top_k"\ntop_k = 40\n\n'
        '[[strategy]]\nname = "all_kinds"\nlayers = [1, 2]\nwords = ["x", "y"]\nflag = true\n\n'
        '[cfg]\nweight = 3.0\nschedule = "cosine"\nlayout = "halves"\n', encoding="utf-8")
    decoder = Decoder.from_toml(path, registry=registry)
    assert [s.name for s in decoder.strategies] == ["repetition_penalty", "top_k", "all_kinds"]
    assert decoder.strategies[2].config["layers"] == [1, 2] and decoder.strategies[2].config["flag"] is True
    assert decoder.cfg == CFGConfig(weight=3.0, schedule="cosine", layout="halves")
    spec = decoder.to_spec()
    assert _same(Decoder.from_spec(spec, registry=registry), decoder)


@pytest.mark.parametrize("body,words", [
    ('[[strategy]]\npenalty = 1\n', "needs a `name`"),
    ('[decoder]\nx = 1\n', "unknown table `decoder`"),
    ('cfg = 3\n', "`cfg` must be a table"),
    ('[[strategy]\nname = "x"', "not valid TOML"),
])
def test_bad_toml_is_a_spec_error(tmp_path, body, words):
    path = tmp_path / "bad.toml"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(SpecError, match=re.escape(words)):
        Decoder.from_toml(path)


def test_missing_toml_file(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        Decoder.from_toml(tmp_path / "nope.toml")


def test_toml_parameters_are_validated(tmp_path):
    path = tmp_path / "d.toml"
    path.write_text('[[strategy]]\nname = "top_k"\ntop_k = 0\n', encoding="utf-8")
    with pytest.raises(StrategyError, match=r"`top_k`: `top_k` must be in \[1, inf\), got 0"):
        Decoder.from_toml(path)
    assert parse_toml(path)[1] is None


# -- validation and order -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,match", [
    ("top_k(top_k=0)", r"`top_k`: `top_k` must be in \[1, inf\), got 0"),
    ("top_k(top_k=2.5)", r"`top_k`: `top_k` must be int, got 2.5"),
    ("top_p(top_p=1.5)", r"`top_p`: `top_p` must be in \[0, 1\], got 1.5"),
    ("temperature(temperature=0)", r"`temperature`: `temperature` must be in \(0, inf\), got 0"),
    ("temperature(temperature=\"hot\")", r"`temperature`: `temperature` must be float, got 'hot'"),
    ("temperature(t=1.0)", r"`temperature`: unknown parameter `t`; parameters: temperature"),
    ("repetition_penalty(penalty=true)", r"`repetition_penalty`: `penalty` must be float, got True"),
    ("cfg(weight=-1)", r"`cfg`: `weight` must be a finite number ≥ 0, got -1"),
    ("cfg(scale=2)", r"`cfg`: unknown parameter `scale`"),
    ("top_k > top_k", r"strategy `top_k` appears twice"),
])
def test_bad_parameters_name_strategy_and_parameter(spec, match):
    with pytest.raises(ValueError, match=match):  # StrategyError, or CFGConfig's ValueError
        Decoder.from_spec(spec)


def test_order_violation_names_both_strategies():
    with pytest.raises(StrategyError) as info:
        Decoder.from_spec("temperature > repetition_penalty")
    assert str(info.value) == ("order: `temperature` must run after `repetition_penalty`; "
                               "write `repetition_penalty > temperature`")
    Decoder.from_spec("repetition_penalty > top_k > temperature")  # the canonical order builds


def test_a_spec_may_choose_another_order_where_no_constraint_forbids_it():
    assert [s.name for s in Decoder.from_spec("temperature > top_k").strategies] == ["temperature", "top_k"]
    assert [s.name for s in Decoder.from_spec("top_p > top_k").strategies] == ["top_p", "top_k"]


def test_constraints_across_hook_points(registry):
    # post-CFG after pre-logits: the loop's order satisfies it whatever the spec's order
    Decoder.from_spec("late_transform > branch_transform", registry=registry)
    Decoder.from_spec("branch_transform > late_transform", registry=registry)
    # pre-logits after post-CFG: impossible in the loop, rejected when the spec is built
    with pytest.raises(StrategyError, match="`early_transform` must run after `late_transform`"):
        Decoder.from_spec("late_transform > early_transform", registry=registry)


def test_with_strategy_validates_again():
    decoder = Decoder.from_spec("repetition_penalty")
    assert decoder.with_strategy(Temperature(temperature=0.5)).to_spec() == \
        "repetition_penalty > temperature(temperature=0.5)"
    with pytest.raises(StrategyError, match="order"):
        Decoder.from_spec("temperature").with_strategy(
            build_registry().get("repetition_penalty")(penalty=1.1))


def test_unknown_strategy_in_spec_gets_did_you_mean():
    with pytest.raises(ValueError, match="did you mean top_k"):
        Decoder.from_spec("topk(top_k=3)")


def test_strategy_in_unsupported_mode_is_refused(janus, registry):
    with pytest.raises(StrategyError, match="`image_only` does not support text mode"):
        Decoder.from_spec("image_only", registry=registry).chat(janus, "hello", max_new_tokens=2)


def test_transforms_may_take_the_papers_order():
    names = build_registry().names()
    if "dola" not in names:
        pytest.skip("dola is not a built-in in this checkout")
    for spec in ("repetition_penalty > dola > top_k", "dola > repetition_penalty > top_k"):
        assert [s.name for s in Decoder.from_spec(spec).strategies] == spec.split(" > ")
    with pytest.raises(StrategyError, match="`top_k` must run after `dola`"):
        Decoder.from_spec("top_k > dola")


# -- built-ins equal transformers' processors of the same name ---------------------------------------------------
@pytest.mark.parametrize("stage,reference", [
    ("temperature(temperature=0.7)", lambda: TemperatureLogitsWarper(0.7)),
    ("top_k(top_k=5)", lambda: TopKLogitsWarper(5)),
    ("top_k(top_k=3, min_tokens_to_keep=4)", lambda: TopKLogitsWarper(3, min_tokens_to_keep=4)),
    ("top_p(top_p=0.6)", lambda: TopPLogitsWarper(0.6)),
    ("top_p(top_p=0.05, min_tokens_to_keep=3)", lambda: TopPLogitsWarper(0.05, min_tokens_to_keep=3)),
    ("repetition_penalty(penalty=1.7)", lambda: RepetitionPenaltyLogitsProcessor(1.7)),
])
def test_builtin_equals_transformers_on_a_text_models_logits(llama, registry, stage, reference):
    decoder = Decoder.from_spec(f"tap_before > {stage} > tap_after", registry=registry)
    result = decoder.chat(llama, "the quick brown fox jumps over", max_new_tokens=6, seed=3)
    events = {e["strategy"]: e["seen"] for e in result.trace}
    processor = reference()
    assert len(events["tap_before"]) == 6
    for (history, valid, before), (_, _, after) in zip(events["tap_before"], events["tap_after"]):
        assert valid.all()  # one prompt: no padding
        expected = processor(history, before.clone())
        assert torch.equal(after, expected), stage
        if "repetition" in stage:
            assert not torch.equal(after, before)  # the prompt's tokens were penalised


def test_repetition_penalty_in_image_mode_sees_the_pairs_generated_tokens(janus, registry):
    decoder = Decoder.from_spec("tap_before > repetition_penalty(penalty=2.0) > tap_after", registry=registry)
    result = decoder.generate_images(janus, ["a cat", "a lighthouse at dusk"], seed=0)
    events = {e["strategy"]: e["seen"] for e in result.trace}
    for step, ((history, valid, before), (_, _, after)) in enumerate(zip(events["tap_before"], events["tap_after"])):
        assert history.shape == (2, step) and valid.all()
        torch.testing.assert_close(after, RepetitionPenaltyLogitsProcessor(2.0)(history, before.clone()))
        if step == 0:
            assert torch.equal(after, before)  # no image tokens yet: the text prompt is not image history
