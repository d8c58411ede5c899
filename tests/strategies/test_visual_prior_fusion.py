"""visual_prior_fusion as a strategy: bank and first tokens, order after DoLa, the author kit's contract, end to end
on the tiny checkpoint with an injected scorer, the aligned and siglip scorers, --explain, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from janus_decoding.models.tokenizer import build_tokenizer
from janus_decoding.plugins.decoder import Decoder
from janus_decoding.plugins.strategy import StrategyError
from janus_decoding.strategies.fusion_math import phrase_prior
from janus_decoding.strategies.visual_prior_fusion import (
    VisualPriorFusion,
    first_tokens,
    parse_bank,
    question_phrases,
)
from janus_decoding.testing import StubState, check_strategy

QUESTION = "What is in the picture?"


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    return Image.new("RGB", (40, 30), (200, 40, 30))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


class _Scores:
    """An injected scorer: fixed scores per phrase name, counting its calls."""

    def __init__(self, scores: dict[str, float]) -> None:
        self.scores, self.calls = scores, 0

    def __call__(self, state, row, phrases):
        self.calls += 1
        return torch.tensor([self.scores[p] for p in phrases])


# -- bank, first tokens, order ----------------------------------------------------------------------------------
def test_bank_from_a_comma_list_a_list_and_a_file(tmp_path) -> None:
    path = tmp_path / "bank.txt"
    path.write_text("dog\n\n  red car \ncat\n")
    assert parse_bank(" cat, dog ,cat", None) == ["cat", "dog"]
    assert parse_bank(["cat", "a dog"], str(path)) == ["cat", "a dog", "dog", "red car"]
    assert VisualPriorFusion(bank_file=str(path)).bank == ["dog", "red car", "cat"]
    assert question_phrases("What is in the picture? Is the cat red?") == ["picture", "cat", "red"]


@pytest.mark.parametrize("params, culprit", [
    ({"bank": ""}, "`bank` is empty"), ({"bank": " , "}, "`bank` is empty"), ({"bank": []}, "`bank` is empty"),
    ({"bank": "cat,,dog"}, "`bank` phrase 2 is empty"), ({}, "`bank` is required"),
    ({"bank_file": "/no/such/file"}, "`bank_file` is not a readable"),
    ({"bank": "cat", "weight": -1.0}, "weight"), ({"bank": "cat", "prior_temperature": 0.0}, "prior_temperature"),
    ({"bank": "cat", "prior": "sigmoid"}, "prior"), ({"bank": "cat", "scorer": "clip"}, "scorer"),
    ({"bank": "cat", "apply_steps": -1}, "apply_steps"),
    ({"bank": "cat", "scorer": "siglip"}, "`scorer_path` must be a local SigLIP/CLIP folder"),
    ({"bank": "cat", "scorer": "siglip", "scorer_path": "/no/such/folder"}, "`scorer_path` must be a local"),
    ({"bank": "cat", "scorer_path": "/tmp"}, "`scorer_path` is only used by scorer 'siglip'"),
])
def test_bad_parameters_name_the_strategy_and_the_parameter(params, culprit) -> None:
    with pytest.raises(StrategyError, match="visual_prior_fusion") as info:
        VisualPriorFusion(**params)
    assert culprit in str(info.value)


def test_empty_bank_file_is_refused(tmp_path) -> None:
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(StrategyError, match="`bank_file` holds no phrase"):
        Decoder.from_spec(f'visual_prior_fusion(bank_file="{tmp_path / "empty.txt"}")')


def test_first_tokens_in_context(tokenizer) -> None:
    first = {t: tokenizer(t, add_special_tokens=False).input_ids[0] for t in ("cat", " cat", "Cat", " Cat")}
    ids, reason = first_tokens(tokenizer, "cat")
    assert reason is None
    assert set(ids) == {first["cat"], first[" cat"], first["Cat"]}  # " Cat" starts with a bare space: dropped
    assert tokenizer.decode([first[" Cat"]]).strip() == ""
    # the tiny tokenizer splits "apple" as "a"+…, " apple" as " a"+…: boosting them would boost the article
    assert first_tokens(tokenizer, "apple") == ([], "every first token is a stop word or whitespace")
    assert first_tokens(tokenizer, "the cat") == ([], "starts with the stop word 'the'")
    assert first_tokens(tokenizer, "A red car")[0] == []


def test_a_phrase_that_tokenises_to_nothing_is_refused() -> None:
    class Nothing:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": []}

    with pytest.raises(StrategyError, match="`bank` phrase 'zzz' tokenises to nothing"):
        first_tokens(Nothing(), "zzz")


def test_order_dola_then_fusion_is_accepted_and_the_reverse_rejected() -> None:
    decoder = Decoder.from_spec('repetition_penalty(penalty=1.2) > dola > visual_prior_fusion(bank="cat,dog")')
    assert [s.name for s in decoder.strategies] == ["repetition_penalty", "dola", "visual_prior_fusion"]
    with pytest.raises(StrategyError, match="`visual_prior_fusion` must run after `dola`"):
        Decoder.from_spec('visual_prior_fusion(bank="cat,dog") > dola')


# -- the author kit ---------------------------------------------------------------------------------------------
class _Letters:
    """A stand-in tokenizer for the kit's stub state (which has no model): one id per character, ids < 12."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(ch) % 12 for ch in text]}

    def decode(self, ids):
        return "".join(f"t{i}" for i in ids)


class _KitFusion(VisualPriorFusion):
    """visual_prior_fusion with its tokenizer replaced; the scorer is injected through ``scorer_fn``."""

    def tokenizer(self, state):
        return _Letters()


def test_passes_the_author_kits_check_strategy() -> None:
    check_strategy(_KitFusion, bank="bee,cow,elk", weight=3.0, prior_temperature=0.5,
                   scorer_fn=_Scores({"bee": 2.0, "cow": -1.0, "elk": 0.5}))
    check_strategy(_KitFusion, bank="bee,cow", prior="logprob", apply_steps=2,
                   scorer_fn=_Scores({"bee": 1.0, "cow": 0.0}))


def test_apply_steps_fuses_only_the_first_steps() -> None:
    strategy = _KitFusion(bank="bee,cow", weight=1.0, apply_steps=1, scorer_fn=_Scores({"bee": 1.0, "cow": 0.0}))
    state = StubState(mode="text", layout="interleaved", num_pairs=1, history=torch.zeros(1, 0, dtype=torch.long),
                      history_valid=torch.zeros(1, 0, dtype=torch.bool))
    strategy.check_run(state)
    strategy.begin(state)
    logits = torch.zeros(1, 12)
    assert not torch.equal(strategy.post_cfg(state, logits), logits)
    state.step_t.fill_(1)
    assert torch.equal(strategy.post_cfg(state, logits), logits)


# -- end to end on the tiny checkpoint --------------------------------------------------------------------------
def _disjoint_bank(tokenizer, size: int = 3) -> dict[str, list[int]]:
    """Phrases whose first-token sets do not overlap."""
    bank, seen = {}, set()
    for phrase in ("dog", "sky", "horse", "boat", "tree", "moon", "lake", "fox", "pizza"):
        ids, _ = first_tokens(tokenizer, phrase)
        if ids and not seen & set(ids):
            bank[phrase], seen = ids, seen | set(ids)
        if len(bank) == size:
            return bank
    raise AssertionError(f"only {bank} have disjoint first tokens")


def test_large_weight_starts_the_answer_with_the_top_phrase_and_zero_weight_is_plain(tiny_model, picture,
                                                                                     tokenizer) -> None:
    bank = _disjoint_bank(tokenizer)
    names = list(bank)
    plain = Decoder().answer(tiny_model, [picture], QUESTION, max_new_tokens=4, greedy=True)
    for top in names:
        scorer = _Scores({p: (3.0 if p == top else 0.0) for p in names})
        fused = Decoder([VisualPriorFusion(scorer_fn=scorer, bank=names, weight=50.0)])
        result = fused.answer(tiny_model, [picture], QUESTION, max_new_tokens=4, greedy=True)
        assert result.tokens[0][0] in bank[top], (top, result.tokens[0])
        assert scorer.calls == 1  # the prior is computed once per image, not per step
    off = Decoder([VisualPriorFusion(scorer_fn=_Scores({p: float(i) for i, p in enumerate(names)}), bank=names,
                                     weight=0.0)])
    assert off.answer(tiny_model, [picture], QUESTION, max_new_tokens=4, greedy=True).tokens == plain.tokens


def test_trace_lists_phrases_priors_and_first_tokens(tiny_model, picture, tokenizer) -> None:
    scores = {"cat": 1.0, "dog": -0.5, "the car": 3.0, "red car": 0.2}
    decoder = Decoder.from_spec('dola > visual_prior_fusion(bank="cat,dog,the car,red car", prior_temperature=0.5)')
    decoder.strategies[-1].scorer = _Scores(scores)
    result = decoder.answer(tiny_model, [picture], QUESTION, max_new_tokens=3, greedy=True)
    (event,) = [e for e in result.trace if e["strategy"] == "visual_prior_fusion"]
    assert [p["phrase"] for p in event["phrases"]] == ["cat", "dog", "red car"]
    assert event["skipped"] == [{"phrase": "the car", "reason": "starts with the stop word 'the'"}]
    expected = phrase_prior(torch.tensor([1.0, -0.5, 0.2]), temperature=0.5)
    assert [p["prior"] for p in event["phrases"]] == [round(v, 4) for v in expected.tolist()]
    assert math.isclose(sum(p["prior"] for p in event["phrases"]), 0.0, abs_tol=1e-3)  # centred over the bank
    assert event["phrases"][0]["first_tokens"] == [tokenizer.decode([i]) for i in first_tokens(tokenizer, "cat")[0]]


def test_aligned_scorer_runs_on_chosen_vision_layers(tiny_model, picture) -> None:
    for layers in ({}, {"layers": [0, 2]}):
        decoder = Decoder([VisualPriorFusion(bank="cat,dog,car", **layers)])
        result = decoder.answer(tiny_model, [picture], QUESTION, max_new_tokens=2, greedy=True)
        priors = [p["prior"] for p in result.trace[0]["phrases"]]
        assert len(priors) == 3 and all(math.isfinite(p) for p in priors)
    with pytest.raises(StrategyError, match="`layers` vision layer 7 is outside"):
        Decoder([VisualPriorFusion(bank="cat", layers=[7])]).answer(tiny_model, [picture], QUESTION,
                                                                     max_new_tokens=2)


def test_bank_from_the_question(tiny_model, picture) -> None:
    decoder = Decoder([VisualPriorFusion(bank_from_question=True, bank="dog")])
    result = decoder.answer(tiny_model, [picture], "Is there a cat or a horse?", max_new_tokens=2, greedy=True)
    assert [p["phrase"] for p in result.trace[0]["phrases"]] == ["dog", "cat", "horse"]


def test_fusion_in_image_mode_or_without_an_image_is_refused(tiny_model) -> None:
    decoder = Decoder.from_spec('visual_prior_fusion(bank="cat,dog")')
    with pytest.raises(StrategyError, match="`visual_prior_fusion` does not support image mode"):
        decoder.generate_images(tiny_model, ["a cat"], n=1)
    with pytest.raises(StrategyError, match="`visual_prior_fusion` needs an input image"):
        decoder.chat(tiny_model, "Hello there", max_new_tokens=2)


def test_cli_understand_explains_the_prior(tmp_path, tiny_model, picture) -> None:
    from click.testing import CliRunner

    from janus_decoding.cli import main

    path = tmp_path / "picture.png"
    picture.save(path)
    spec = 'repetition_penalty(penalty=1.2) > dola > visual_prior_fusion(weight=0.7, bank="cat,dog,car")'
    result = CliRunner().invoke(main, ["understand", str(path), QUESTION, "--model", tiny_model.name, "--decoder",
                                       spec, "--explain", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    (line,) = [ln for ln in result.output.splitlines() if '"visual_prior_fusion"' in ln and "trace" in ln]
    event = json.loads(line.split("trace ", 1)[1])
    assert [p["phrase"] for p in event["phrases"]] == ["cat", "dog", "car"]
    assert all(p["first_tokens"] and isinstance(p["prior"], float) for p in event["phrases"])


# -- the siglip scorer ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def siglip_folder(tmp_path_factory, tokenizer):
    """A tiny random SigLIP (text and vision towers) with a non-trivial logit scale and bias, saved as a folder."""
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    config = SiglipConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 16, "pad_token_id": tokenizer.pad_token_id,
                     "bos_token_id": None, "eos_token_id": None},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 16})
    torch.manual_seed(0)
    model = SiglipModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(math.log(20.0))
        model.logit_bias.fill_(-3.0)
    folder = tmp_path_factory.mktemp("siglip")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_siglip_scorer_uses_the_models_logits(tiny_model, picture, siglip_folder) -> None:
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    phrases = ["cat", "dog", "car"]
    decoder = Decoder.from_spec(f'visual_prior_fusion(bank="cat,dog,car", scorer="siglip", '
                                f'scorer_path="{siglip_folder}", prior="logprob")')
    result = decoder.answer(tiny_model, [picture], QUESTION, max_new_tokens=2, greedy=True)
    model = AutoModel.from_pretrained(siglip_folder, local_files_only=True).eval()
    text = AutoTokenizer.from_pretrained(siglip_folder, local_files_only=True)(
        phrases, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    pixels = tiny_model.preprocess_images([picture]).float() * 0.5 + 0.5  # the tiny Janus normalises with 0.5/0.5
    image = AutoImageProcessor.from_pretrained(siglip_folder, local_files_only=True)(
        images=list(pixels), do_rescale=False, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model(**text, pixel_values=image).logits_per_image[0]  # scale 20, bias -3 included
    want = phrase_prior(expected, kind="logprob")
    assert [p["prior"] for p in result.trace[0]["phrases"]] == [round(v, 4) for v in want.tolist()]


def test_siglip_without_a_usable_folder_is_refused(tiny_model, picture, tmp_path, siglip_folder) -> None:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    empty = tmp_path / "empty"
    empty.mkdir()
    vision_only = tmp_path / "vision_only"
    config = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=32, patch_size=16)
    SiglipVisionModel(config).save_pretrained(vision_only)
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        (vision_only / name).write_bytes((siglip_folder / name).read_bytes())
    for folder, message in ((empty, "is not a usable SigLIP/CLIP folder"),
                            (vision_only, "not an image-text model with a text tower")):
        decoder = Decoder.from_spec(f'visual_prior_fusion(bank="cat", scorer="siglip", scorer_path="{folder}")')
        with pytest.raises(StrategyError, match=f"`visual_prior_fusion`: `scorer_path` .*{message}"):
            decoder.answer(tiny_model, [picture], QUESTION, max_new_tokens=2)
