"""``janus-decode`` (janus_decoding/cli.py) through click's CliRunner, plus subprocesses for ``python -m``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from janus_decoding import cli
from janus_decoding.plugins import registry as registry_module
from janus_decoding.plugins.registry import build_registry
from janus_decoding.strategies import BUILTINS
from plugins_fixtures import spec_plugins

FIXTURES = Path(__file__).resolve().parents[1] / "plugins_fixtures"


def _run(*args: str):
    return CliRunner().invoke(cli.main, [str(a) for a in args], catch_exceptions=False)


def _error_line(result) -> str:
    """The one line that says what went wrong (click prints usage lines before it for usage errors)."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture
def picture(tmp_path) -> Path:
    path = tmp_path / "in.png"
    Image.new("RGB", (48, 32), (10, 200, 30)).save(path)
    return path


# -- strategies -------------------------------------------------------------------------------------------------
def test_strategies_json_lists_builtins_with_distribution_and_schema():
    result = _run("strategies", "--json")
    assert result.exit_code == 0, result.output
    items = json.loads(result.output)
    by_name = {item["name"]: item for item in items}
    assert set(by_name) == {cls.name for cls in BUILTINS}
    for item in items:
        assert item["distribution"] == "janus-decoding" and item["version"]
        assert item["summary"] and item["hooks"] and set(item["modes"]) <= {"image", "text"}
        schema = item["parameters"]
        assert schema["type"] == "object" and isinstance(schema["additionalProperties"], bool)
        assert set(schema["required"]) <= set(schema["properties"])
    for name in ("temperature", "top_k", "top_p", "repetition_penalty"):
        assert by_name[name]["parameters"]["additionalProperties"] is False  # unknown parameters are refused
    top_k = by_name["top_k"]["parameters"]["properties"]["top_k"]
    assert top_k == {"type": "integer", "minimum": 1, "default": 50, "description": "k"}
    assert by_name["top_p"]["parameters"]["properties"]["top_p"]["maximum"] == 1.0
    assert by_name["temperature"]["hooks"] == ["post_cfg"]


def test_strategies_one_name_and_unknown_name():
    result = _run("strategies", "top_p", "--json")
    assert json.loads(result.output)["name"] == "top_p"
    assert "top_p" in _run("strategies", "top_p").output
    line = _error_line(_run("strategies", "top_q"))
    assert "unknown strategy 'top_q'" in line and "did you mean top_p" in line


# -- generate ---------------------------------------------------------------------------------------------------
def test_generate_writes_pngs_contact_sheet_and_manifest(janus_folder, tmp_path):
    out = tmp_path / "out"
    result = _run("generate", "a red cube", "a lighthouse", "--model", janus_folder, "-n", "3", "--micro-batch", "2",
                  "--decoder", "top_k(top_k=100) > temperature(temperature=0.9)", "--cfg", "4", "--seed", "7",
                  "--out", out, "--explain")
    assert result.exit_code == 0, result.output
    assert "wrote 6 images for 2 prompt(s)" in result.output
    assert "decoder: top_k(top_k=100) > temperature(temperature=0.9)" in result.output
    pngs = sorted(out.glob("*.png"))
    images = [p for p in pngs if not p.name.endswith("_sheet.png")]
    sheets = [p for p in pngs if p.name.endswith("_sheet.png")]
    assert len(images) == 6 and len(sheets) == 2
    for path in images:
        with Image.open(path) as im:
            im.load()
            assert im.mode == "RGB" and im.size == (64, 64)
    with Image.open(sheets[0]) as sheet:
        assert sheet.size[0] > 3 * 64 and sheet.size[1] >= 64
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["prompt"] for r in records] == ["a red cube", "a lighthouse"]
    assert [r["seed"] for r in records] == [7, 8]
    for record in records:
        assert record["n"] == 3 and record["cfg"] == 4.0 and record["rng"] == "row"
        assert record["decoder"] == "top_k(top_k=100) > temperature(temperature=0.9)"
        assert len(record["files"]) == 3 and all((out / f).is_file() for f in record["files"])
        assert len(record["token_hashes"]) == 3
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left behind


def test_generate_is_reproducible_and_micro_batch_free(janus_folder, tmp_path):
    def hashes(out, *extra):
        assert _run("generate", "a cat", "--model", janus_folder, "-n", "2", "--out", out, *extra).exit_code == 0
        return json.loads((out / "manifest.jsonl").read_text(encoding="utf-8"))["token_hashes"]

    assert hashes(tmp_path / "a") == hashes(tmp_path / "b", "--micro-batch", "1")


def test_compile_reaches_the_fast_path(janus_folder, tmp_path, monkeypatch):
    """``--compile`` hands generate_images a FastOptions with Inductor, and a batch job records it in job.json."""
    from janus_decoding.core.graph import FastOptions
    from janus_decoding.plugins.decoder import Decoder

    seen = []
    original = Decoder.generate_images

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("fast"))
        return original(self, *args, **{**kwargs, "fast": False})  # no Inductor build in CI: the eager loop

    monkeypatch.setattr(Decoder, "generate_images", spy)
    assert _run("generate", "a cat", "--model", janus_folder, "--out", tmp_path / "g", "--compile").exit_code == 0
    assert _run("generate", "a cat", "--model", janus_folder, "--out", tmp_path / "h").exit_code == 0
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(["a dog"]))
    job = _run("batch", prompts, "--model", janus_folder, "--out", tmp_path / "b", "--compile")
    assert job.exit_code == 0, job.output
    assert seen == [FastOptions(compile="inductor"), None, FastOptions(compile="inductor")]
    assert json.loads((tmp_path / "b" / "job.json").read_text())["compile"] is True


def test_generate_decoder_file(janus_folder, tmp_path):
    toml = tmp_path / "d.toml"
    toml.write_text('[[strategy]]\nname = "top_k"\ntop_k = 20\n\n[cfg]\nweight = 2.0\n', encoding="utf-8")
    out = tmp_path / "out"
    result = _run("generate", "a cat", "--model", janus_folder, "--decoder-file", toml, "--out", out)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "manifest.jsonl").read_text(encoding="utf-8"))
    assert record["decoder"] == "top_k(top_k=20) > cfg(weight=2.0)" and record["cfg"] == 2.0


# -- understand and chat ----------------------------------------------------------------------------------------
def test_understand_answers(janus_folder, picture):
    result = _run("understand", picture, "what colour is it?", "--model", janus_folder, "--max-new-tokens", "5",
                  "--greedy")
    assert result.exit_code == 0, result.output
    assert result.output.endswith("\n")


def test_understand_stream(janus_folder, picture):
    result = _run("understand", picture, "what is it?", "--model", janus_folder, "--max-new-tokens", "4", "--stream")
    assert result.exit_code == 0, result.output


def test_chat_on_a_plain_llama(llama_folder):
    result = _run("chat", "hello there", "--model", llama_folder, "--max-new-tokens", "6", "--greedy")
    assert result.exit_code == 0, result.output
    again = _run("chat", "hello there", "--model", llama_folder, "--max-new-tokens", "6", "--greedy")
    assert again.output == result.output


def test_chat_with_a_decoder_on_janus(janus_folder):
    result = _run("chat", "hi", "--model", janus_folder, "--max-new-tokens", "4", "--temperature", "0.5",
                  "--decoder", "repetition_penalty(penalty=1.3)", "--explain")
    assert result.exit_code == 0, result.output
    assert "decoder: repetition_penalty(penalty=1.3) > temperature(temperature=0.5)" in result.output


# -- bad input: one line naming the culprit, non-zero exit, nothing written -------------------------------------
BAD_GENERATE = [
    (["--decoder", "topk(top_k=5)"], ["unknown strategy 'topk'", "did you mean top_k"]),
    (["--decoder", "top_k(top_k=0)"], ["`top_k`", "`top_k` must be in [1, inf)", "got 0"]),
    (["--decoder", 'top_k(top_k="many")'], ["`top_k`", "must be int", "'many'"]),
    (["--decoder", "top_k(top_k=5"], ["at column 14"]),
    (["--decoder", "temperature > repetition_penalty"], ["`temperature` must run after `repetition_penalty`"]),
    (["--temperature", "0.5", "--decoder", "temperature(temperature=0.7)"], ["--temperature", "temperature(...)"]),
    (["--cfg", "-2"], ["`cfg`", "`weight`", "-2"]),
    (["--negative-prompt", ""], ["`cfg`", "`negative_prompt` must not be empty"]),
    (["-n", "0"], ["-n", "0"]),
    (["--micro-batch", "0"], ["--micro-batch", "0"]),
    (["--decoder-file", "MISSING"], ["does not exist"]),
]


@pytest.mark.parametrize("extra,words", BAD_GENERATE, ids=[" ".join(e) for e, _ in BAD_GENERATE])
def test_generate_bad_input(janus_folder, tmp_path, extra, words):
    out = tmp_path / "out"
    extra = [str(tmp_path / "missing.toml") if e == "MISSING" else e for e in extra]
    line = _error_line(_run("generate", "a cat", "--model", janus_folder, "--out", out, *extra))
    for word in words:
        assert word in line, line
    assert not out.exists()  # refused before the output folder is even made


def test_generate_empty_prompt(janus_folder, tmp_path):
    out = tmp_path / "out"
    line = _error_line(_run("generate", "a cat", "  ", "--model", janus_folder, "--out", out))
    assert "prompt 2 is empty" in line
    assert _files(out) == []


def test_missing_model_folder(tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "no-such-model"
    line = _error_line(_run("generate", "a cat", "--model", missing, "--out", out))
    assert str(missing) in line and "not found" in line
    assert _files(out) == []


@pytest.mark.parametrize("content", ["{not json", '{"model_type": "janus"}'])
def test_malformed_model_folder(tmp_path, content):
    folder = tmp_path / "broken-model"
    folder.mkdir()
    (folder / "config.json").write_text(content, encoding="utf-8")
    out = tmp_path / "out"
    line = _error_line(_run("generate", "a cat", "--model", folder, "--out", out))
    assert str(folder) in line or "config.json" in line
    assert _files(out) == []


def test_model_folder_without_config(tmp_path):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    line = _error_line(_run("chat", "hi", "--model", folder))
    assert "config.json" in line


def test_output_path_is_an_existing_file(janus_folder, tmp_path):
    target = tmp_path / "taken"
    target.write_text("keep me", encoding="utf-8")
    line = _error_line(_run("generate", "a cat", "--model", janus_folder, "--out", target))
    assert str(target) in line
    assert target.read_text(encoding="utf-8") == "keep me"


def test_output_folder_not_writable(janus_folder, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("", encoding="utf-8")
    out = blocker / "out"  # a folder cannot be made under a file (also as root, where modes do not bite)
    line = _error_line(_run("generate", "a cat", "--model", janus_folder, "--out", out))
    assert str(out) in line and "not writable" in line


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory modes")
def test_output_folder_without_write_permission(janus_folder, tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o500)
    try:
        line = _error_line(_run("generate", "a cat", "--model", janus_folder, "--out", out))
        assert "not writable" in line
    finally:
        out.chmod(0o700)


def test_unreadable_image(janus_folder, tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("this is not a picture", encoding="utf-8")
    line = _error_line(_run("understand", fake, "what is it?", "--model", janus_folder))
    assert str(fake) in line and "not a readable image" in line
    line = _error_line(_run("understand", tmp_path / "absent.png", "what?", "--model", janus_folder))
    assert "no such file" in line


def test_understand_empty_question(janus_folder, picture):
    assert "question is empty" in _error_line(_run("understand", picture, " ", "--model", janus_folder))


def test_chat_empty_prompt(llama_folder):
    assert "prompt is empty" in _error_line(_run("chat", "   ", "--model", llama_folder))


def test_strategy_in_an_unsupported_mode(janus_folder, monkeypatch):
    monkeypatch.setattr(registry_module, "_default", build_registry(extra_plugins=[spec_plugins]))
    line = _error_line(_run("chat", "hi", "--model", janus_folder, "--decoder", "image_only"))
    assert "`image_only` does not support text mode" in line


def test_image_generation_on_a_plain_llama(llama_folder, tmp_path):
    out = tmp_path / "out"
    line = _error_line(_run("generate", "a cat", "--model", llama_folder, "--out", out))
    assert "image generation needs a Janus model" in line
    assert _files(out) == []


# -- subprocesses ---------------------------------------------------------------------------------------------------
def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JANUS_DECODING_")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def test_python_dash_m_help():
    done = subprocess.run([sys.executable, "-m", "janus_decoding", "--help"], capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    for command in ("strategies", "make-tiny", "generate", "understand", "chat"):
        assert command in done.stdout


def _fake_distribution(site: Path) -> None:
    """An installed distribution with two entry points in our group: a working plugin and a broken one."""
    info = site / "janus_fixture_plugins-1.2.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: janus-fixture-plugins\nVersion: 1.2.3\n",
                                   encoding="utf-8")
    (info / "entry_points.txt").write_text(
        "[janus_decoding.strategies]\nshout = plugins_fixtures.good_plugin\n"
        "broken = janus_fixture_missing_module\n", encoding="utf-8")


def test_entry_point_plugins_are_discovered_in_a_fresh_process(tmp_path):
    """With autoload on, `strategies --json` shows an installed plugin's strategy and reports the broken one."""
    site = tmp_path / "site"
    _fake_distribution(site)
    env = _env(PYTHONPATH=os.pathsep.join([str(site), str(FIXTURES.parent), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "janus_decoding", "strategies", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    items = {item["name"]: item for item in json.loads(done.stdout)}
    assert items["shout"]["distribution"] == "janus-fixture-plugins" and items["shout"]["version"] == "1.2.3"
    assert {cls.name for cls in BUILTINS} <= set(items)
    assert "plugin broken (janus-fixture-plugins) skipped" in done.stderr
    assert "janus_fixture_missing_module" in done.stderr
    # the environment switches, in a fresh process each
    for extra, present in (({"JANUS_DECODING_DISABLE_PLUGIN_AUTOLOAD": "1"}, False),
                           ({"JANUS_DECODING_BLOCK_PLUGINS": "shout,broken"}, False),
                           ({"JANUS_DECODING_PLUGINS": "shout"}, True)):
        done = subprocess.run(command, capture_output=True, text=True, env={**env, **extra}, timeout=120)
        assert done.returncode == 0, done.stderr
        assert ("shout" in {item["name"] for item in json.loads(done.stdout)}) is present, extra
        assert "skipped" not in done.stderr, extra
