"""A failed run leaves nothing behind; degenerate images are refused by name."""

from __future__ import annotations

from click.testing import CliRunner
from PIL import Image

from janus_decoding.cli import main


def test_bad_model_leaves_no_output_folder(tmp_path) -> None:
    out = tmp_path / "never" / "created"
    result = CliRunner().invoke(main, ["generate", "a cube", "--model", str(tmp_path / "missing"), "--out", str(out)])
    assert result.exit_code != 0 and "missing" in result.output
    assert not (tmp_path / "never").exists()


def test_output_path_that_is_a_file_is_refused(tmp_path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("x")
    result = CliRunner().invoke(main, ["generate", "a cube", "--out", str(target)])
    assert result.exit_code != 0 and "is a file" in result.output
    assert target.read_text() == "x"


def test_one_pixel_image_is_refused(tmp_path, janus_folder) -> None:
    picture = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (255, 0, 0)).save(picture)
    result = CliRunner().invoke(main, ["understand", str(picture), "What is it?", "--model", str(janus_folder)])
    assert result.exit_code != 0
    assert "1×1" in result.output and "image 1" in result.output
