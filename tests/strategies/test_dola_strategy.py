"""DoLa as a strategy: exact parity with transformers 4.55.4, image mode, cost shape, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from janus_decoding.core.loop import Sampler
from janus_decoding.core.runs import run_text
from janus_decoding.models.adapter import JanusAdapter
from janus_decoding.plugins.decoder import Decoder
from janus_decoding.plugins.strategy import StrategyError

DATA = Path(__file__).resolve().parents[1] / "data" / "dola_parity"
EXPECTED = json.loads((DATA / "expected.json").read_text())


@pytest.fixture(scope="module")
def parity_model() -> JanusAdapter:
    folder = DATA / "model"
    model = LlamaForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    return JanusAdapter(model, AutoTokenizer.from_pretrained(folder, local_files_only=True), name="dola-parity")


def _cases():
    for i, case in enumerate(EXPECTED["dola_cases"]):
        yield pytest.param(case, id=f"{i}-{json.dumps(case['dola_layers'])}-rp{case['repetition_penalty']}")


@pytest.mark.parametrize("case", list(_cases()))
def test_dola_matches_transformers_4_55_4(parity_model, case) -> None:
    """Greedy, distance="official", selection="batch", with and without `dola > repetition_penalty(1.2)`."""
    layers = EXPECTED["resolved_candidate_layers"][json.dumps(case["dola_layers"])]
    spec = f'dola(layers={json.dumps(layers)}, selection="batch", distance="official")'
    if case["repetition_penalty"]:
        spec += f" > repetition_penalty(penalty={case['repetition_penalty']})"
    rows = [[t for t, keep in zip(ids, mask) if keep] for ids, mask in zip(case["input_ids"], case["attention_mask"])]
    steps = len(case["generated_ids"][0])
    with torch.inference_mode():
        result = run_text(parity_model, Decoder.from_spec(spec), rows, max_new_tokens=steps,
                          sampler=Sampler(greedy=True), seeds=[0] * len(rows), eos_id=case["eos_token_id"])
    assert result.tokens.tolist() == case["generated_ids"]
    if len(layers) > 1:  # the recorded premature layer of every step agrees too
        ours = result.state.trace.buffers["dola.premature_layer"][:, 0].tolist()
        theirs = [s["premature_layer"] for s in case["steps"]]
        assert ours[: len(theirs)] == theirs


def test_recorded_premature_layers_vary() -> None:
    """Else the parity test would prove little."""
    varying = [c for c in EXPECTED["dola_cases"] if len({s["premature_layer"] for s in c["steps"]}) > 1]
    assert len(varying) >= 20


def test_out_of_range_layer_list_is_refused(parity_model) -> None:
    with pytest.raises(StrategyError, match="layers"):
        run_text(parity_model, Decoder.from_spec("dola(layers=[1, 3, 12])"), [[0, 5, 6]], max_new_tokens=2,
                 sampler=Sampler(greedy=True), seeds=[0])


@pytest.mark.parametrize("spec, culprit", [
    ("dola(layers=[])", "layers"), ("dola(alpha=1.0)", "alpha"), ("dola(alpha=-0.1)", "alpha"),
    ('dola(distance="jsd")', "distance"), ('dola(selection="pair")', "selection"), ('dola(layers="middle")', "layers"),
])
def test_bad_parameters_name_the_parameter(spec, culprit) -> None:
    with pytest.raises(StrategyError, match=culprit):
        Decoder.from_spec(spec)


def test_candidate_layers_go_through_the_head_with_the_final_rows(tiny_model) -> None:
    calls = []
    head = tiny_model.model.model.generation_head
    handle = head.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    try:
        with torch.inference_mode():
            Decoder.from_spec('dola(layers=[0, 1, 2])').generate_images(tiny_model, ["a cube"], n=2, seed=0)
    finally:
        handle.remove()
    steps, rows = tiny_model.image_grid[0] * tiny_model.image_grid[1], 4  # 2 images with CFG
    # the prefill: the final rows (its two distinct rows: prompt and unconditional), then the three exits of every
    # row in one batched call when DoLa asks for them
    assert calls[:2] == [(2, 64), (3, rows, 64)]
    # every later step: ONE head call over the final rows and the exits' rows (the head's weights read once)
    assert calls[2:] == [(rows * (1 + 3), 64)] * (steps - 1)


def test_image_mode_dola_runs_and_keeps_pairs_per_row(tiny_model) -> None:
    decoder = Decoder.from_spec('repetition_penalty(penalty=1.2) > dola(layers="high", alpha=0.1)')
    with torch.inference_mode():
        together = decoder.generate_images(tiny_model, ["a red cube", "a dog"], n=2, seed=3)
        alone = decoder.generate_images(tiny_model, ["a dog"], n=2, seed=4)
    assert together.tokens.shape[-1] == tiny_model.image_grid[0] * tiny_model.image_grid[1]
    # selection="row" is the image default: a prompt's tokens do not depend on its batch neighbours
    assert torch.equal(together.tokens[1], alone.tokens[0])


def test_cli_runs_dola_in_generate_understand_and_chat(tmp_path, tiny_model) -> None:
    from click.testing import CliRunner

    from janus_decoding.cli import main
    from janus_decoding.models.tiny import write_tiny_llama

    model = tiny_model.name
    spec = 'repetition_penalty(penalty=1.2) > dola(layers="high", alpha=0.1)'
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(main, ["generate", "a red cube", "--model", model, "-n", "2", "--decoder", spec,
                                  "--out", str(out), "--explain"])
    assert result.exit_code == 0, result.output
    assert "premature_layers" in result.output and len(list(out.glob("00000_a_red_cube_[01].png"))) == 2
    picture = next(out.glob("00000_a_red_cube_0.png"))
    result = runner.invoke(main, ["understand", str(picture), "What is in the picture?", "--model", model,
                                  "--decoder", spec, "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
    llama = write_tiny_llama(tmp_path / "llama")
    result = runner.invoke(main, ["chat", "Hello there", "--model", str(llama), "--decoder",
                                  'dola(layers="low") > repetition_penalty(penalty=1.2)', "--max-new-tokens", "6"])
    assert result.exit_code == 0, result.output
