"""The CLI runs on tiny checkpoints in DeepSeek's original format, and both formats give the same images."""

from __future__ import annotations

from click.testing import CliRunner
from PIL import Image

from janus_decoding.cli import main


def test_generate_understand_chat_on_deepseek_format(tmp_path) -> None:
    runner = CliRunner()
    folders = {}
    for fmt in ("hf", "deepseek"):
        folders[fmt] = tmp_path / fmt
        result = runner.invoke(main, ["make-tiny", str(folders[fmt]), "--seed", "3", "--format", fmt])
        assert result.exit_code == 0, result.output
    outs = {}
    for fmt, folder in folders.items():
        outs[fmt] = tmp_path / f"out-{fmt}"
        result = runner.invoke(main, ["generate", "a red cube", "--model", str(folder), "-n", "2", "--seed", "1",
                                      "--decoder", "top_k(top_k=100)", "--out", str(outs[fmt])])
        assert result.exit_code == 0, result.output
    for k in range(2):
        a = Image.open(outs["hf"] / f"00000_a_red_cube_{k}.png")
        b = Image.open(outs["deepseek"] / f"00000_a_red_cube_{k}.png")
        assert a.tobytes() == b.tobytes()  # same weights, same seed: identical pictures
    picture = str(outs["deepseek"] / "00000_a_red_cube_0.png")
    result = runner.invoke(main, ["understand", picture, "What is this?", "--model", str(folders["deepseek"]),
                                  "--max-new-tokens", "5", "--greedy"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["chat", "Hello", "--model", str(folders["deepseek"]), "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
