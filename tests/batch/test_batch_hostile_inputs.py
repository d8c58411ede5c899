"""Hostile input, table-driven: each bad input ends in one clear error naming the culprit and nothing half-written.

Covers spec strings, parameters, prompt files, images for ``understand``, checkpoints and output paths; plus the
prompt-file parser fuzzed with hypothesis (the spec parser's own fuzz test lives in tests/plugins/test_spec.py).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path
from typing import Callable

import pytest
import torch
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file, save_file

from batch_helpers import write_prompts
from janus_decoding.batch import MAX_PROMPT_CHARS, BatchInputError, read_prompts
from janus_decoding.cli import main

GOOD = ["a red cube"]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb(path: Path) -> Path:
    """A 30000×30000 PNG header with no pixels: far beyond Pillow's decompression-bomb limit."""
    header = struct.pack(">IIBBBBB", 30000, 30000, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IEND", b""))
    return path


def _truncated(path: Path) -> Path:
    Image.new("RGB", (64, 64), (200, 10, 10)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _checkpoint(tmp: Path, tiny: Path, kind: str) -> Path:
    folder = tmp / f"ckpt-{kind}"
    shutil.copytree(tiny, folder)
    weights = folder / "model.safetensors"
    if kind == "missing_shard":
        names = list(load_file(weights))
        weights.unlink()
        index = {"metadata": {}, "weight_map": {n: ("model-00001-of-00002.safetensors" if i % 2 else
                                                    "model-00002-of-00002.safetensors") for i, n in enumerate(names)}}
        save_file({n: t for i, (n, t) in enumerate(load_file(tiny / "model.safetensors").items()) if i % 2},
                  folder / "model-00001-of-00002.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    elif kind == "wrong_shape":
        tensors = load_file(weights)
        name = next(n for n, t in tensors.items() if t.dim() == 2)
        tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])
        save_file(tensors, weights)
    elif kind == "outside":
        names = list(load_file(weights))
        shutil.copy(weights, tmp / "elsewhere.safetensors")
        weights.unlink()
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {n: "../elsewhere.safetensors" for n in names}}))
    elif kind == "pickle":
        weights.unlink()
        torch.save({"x": _RunsCode(tmp / "pwned")}, folder / "pytorch_model.bin")
    elif kind == "no_config":
        (folder / "config.json").unlink()
    return folder


# Each case: (id, build(tmp, tiny_folder) -> argv after the command, words the error must contain).
Case = tuple[str, Callable[[Path, Path], list[str]], str]


def _batch(entries=GOOD, *extra: str, raw: str | bytes | None = None, name: str = "p.json"):
    def build(tmp: Path, tiny: Path) -> list[str]:
        path = tmp / name
        if raw is None:
            write_prompts(path, list(entries))
        elif isinstance(raw, bytes):
            path.write_bytes(raw)
        else:
            path.write_text(raw, encoding="utf-8")
        return ["batch", str(path), "--out", str(tmp / "out"), "--model", str(tiny), *extra]

    return build


def _model(kind: str):
    def build(tmp: Path, tiny: Path) -> list[str]:
        path = write_prompts(tmp / "p.json", GOOD)
        return ["batch", str(path), "--out", str(tmp / "out"), "--model", str(_checkpoint(tmp, tiny, kind))]

    return build


def _understand(make: Callable[[Path], Path]):
    def build(tmp: Path, tiny: Path) -> list[str]:
        return ["understand", "--model", str(tiny), str(make(tmp / "image.png")), "what is this?"]

    return build


def _out(make: Callable[[Path], Path]):
    def build(tmp: Path, tiny: Path) -> list[str]:
        return ["batch", str(write_prompts(tmp / "p.json", GOOD)), "--out", str(make(tmp)), "--model", str(tiny)]

    return build


def _file(tmp: Path) -> Path:
    (tmp / "taken").write_text("x")
    return tmp / "taken"


CASES: list[Case] = [
    # decoder specs
    ("spec-unclosed", _batch(GOOD, "--decoder", "top_k(top_k=5"), "decoder spec at column"),
    ("spec-garbage", _batch(GOOD, "--decoder", "top_k(top_k=5) >> $"), "decoder spec at column"),
    ("spec-unknown", _batch(GOOD, "--decoder", "topk(top_k=5)"), "unknown strategy 'topk'"),
    ("spec-bad-value", _batch(GOOD, "--decoder", "top_k(top_k=-3)"), "`top_k`: `top_k`"),
    ("spec-bad-type", _batch(GOOD, "--decoder", 'top_p(top_p="x")'), "`top_p`: `top_p`"),
    ("spec-unknown-param", _batch(GOOD, "--decoder", "top_k(k=3)"), "top_k"),
    ("spec-twice", _batch(GOOD, "--decoder", "top_k(top_k=3) > top_k(top_k=4)"), "appears twice"),
    ("spec-and-file", _batch(GOOD, "--decoder", "top_k(top_k=3)", "--decoder-file", "x.toml"), "not both"),
    ("decoder-file-missing", _batch(GOOD, "--decoder-file", "/nonexistent/d.toml"), "does not exist"),
    ("cfg-unknown-param", _batch(GOOD, "--decoder", "cfg(wieght=2)"), "`cfg`: unknown parameter `wieght`"),
    # parameters
    ("n-zero", _batch(GOOD, "-n", "0"), "-n"),
    ("micro-batch-zero", _batch(GOOD, "--micro-batch", "0"), "--micro-batch"),
    ("seed-negative", _batch(GOOD, "--seed", "-1"), "--seed"),
    ("rng-unknown", _batch(GOOD, "--rng", "numpy"), "--rng"),
    ("dtype-unknown", _batch(GOOD, "--dtype", "int8"), "--dtype"),
    ("temperature-zero", _batch(GOOD, "--temperature", "0"), "`temperature`"),
    ("temperature-twice", _batch(GOOD, "--temperature", "0.5", "--decoder", "temperature(temperature=0.7)"),
     "temperature"),
    ("negative-prompt-empty", _batch(GOOD, "--negative-prompt", " "), "--negative-prompt"),
    # prompt files
    ("file-missing", lambda tmp, tiny: ["batch", str(tmp / "nope.json"), "--out", str(tmp / "out"),
                                        "--model", str(tiny)], "nope.json: no such file"),
    ("file-invalid-json", _batch(raw='["a", "b",]'), "invalid JSON"),
    ("file-invalid-jsonl", _batch(raw='"a"\n{"prompt": "b"\n', name="p.jsonl"), "line 2 is not valid JSON"),
    ("file-empty", _batch(raw=""), "empty file"),
    ("file-empty-list", _batch([]), "no prompts"),
    ("file-jsonl-number", _batch(raw='"a"\n42\n', name="p.jsonl"), "line 2: expected a string or an object, got a number"),
    ("file-not-utf8", _batch(raw=b'["caf\xe9"]'), "not UTF-8"),
    ("item-number", _batch(["a", 3]), "item 2: expected a string or an object, got a number"),
    ("item-list", _batch([["a"]]), "item 1: expected a string or an object, got a list"),
    ("prompt-empty", _batch(["a", "   "]), "item 2: `prompt` is empty"),
    ("prompt-missing", _batch([{"n": 2}]), "item 1: `prompt` must be a string, got null"),
    ("prompt-not-string", _batch([{"prompt": 5}]), "`prompt` must be a string, got a number"),
    ("prompt-1mb", _batch(["x" * (1 << 20)]), f"at most {MAX_PROMPT_CHARS:,}"),
    ("item-n-string", _batch([{"prompt": "a", "n": "2"}]), "`n` must be an integer ≥ 1, got '2'"),
    ("item-n-zero", _batch([{"prompt": "a", "n": 0}]), "`n` must be an integer ≥ 1, got 0"),
    ("item-seed-bool", _batch([{"prompt": "a", "seed": True}]), "`seed` must be an integer ≥ 0, got True"),
    ("item-seed-float", _batch([{"prompt": "a", "seed": 1.5}]), "`seed` must be an integer ≥ 0, got 1.5"),
    ("item-unknown-key", _batch([{"prompt": "a", "negative": "b"}]), "unknown key `negative`"),
    ("item-decoder-number", _batch([{"prompt": "a", "decoder": 1}]), "`decoder` must be a string"),
    ("item-deep-nesting", _batch(raw="[" * 100_000 + "]" * 100_000), "prompt file"),
    # images for understand
    ("image-truncated", _understand(_truncated), "image.png: not a readable image"),
    ("image-not-an-image", _understand(lambda p: (p.write_text("hello"), p)[1]), "image.png: not a readable image"),
    ("image-bomb", _understand(_bomb), "decompression bomb"),
    ("image-1x1", _understand(lambda p: (Image.new("RGB", (1, 1)).save(p), p)[1]), "image 1 is 1×1 pixels"),
    ("image-missing", _understand(lambda p: p), "image.png: no such file"),
    # checkpoints
    ("ckpt-missing-shard", _model("missing_shard"), "model-00002-of-00002.safetensors"),
    ("ckpt-wrong-shape", _model("wrong_shape"), "shape"),
    ("ckpt-outside", _model("outside"), "outside"),
    ("ckpt-pickle", _model("pickle"), "refused"),
    ("ckpt-no-config", _model("no_config"), "missing config.json"),
    ("ckpt-no-folder", lambda tmp, tiny: ["batch", str(write_prompts(tmp / "p.json", GOOD)), "--out",
                                          str(tmp / "out"), "--model", str(tmp / "nothing")], "not found"),
    # output paths
    ("out-is-a-file", _out(_file), "taken' is a file"),
    # /proc refuses new folders even to root (a chmod'ed folder would not stop root)
    ("out-not-writable", _out(lambda tmp: Path("/proc/self/janus-out")), "is not writable"),
    ("out-under-a-file", _out(lambda tmp: _file(tmp) / "sub"), "taken"),
]


@pytest.mark.parametrize("build, words", [pytest.param(b, w, id=i) for i, b, w in CASES])
def test_bad_input_is_one_clear_error_and_nothing_is_written(tiny_folder, tmp_path, build, words):
    argv = build(tmp_path, tiny_folder)
    result = CliRunner().invoke(main, argv, catch_exceptions=False)
    assert result.exit_code not in (0, None), result.output
    message = result.output.strip().splitlines()[-1]
    assert message.startswith("Error:") and "Traceback" not in result.output, result.output
    assert words in message, message
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())
    assert not (tmp_path / "pwned").exists()


def test_the_table_is_large_enough():
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)


def test_prompt_text_cannot_escape_the_output_folder(tiny_folder, tmp_path):
    hostile = ["../../escape", "/etc/passwd", "..", "a/../../b", "C:\\windows\\x", "\u202e\u0000nul", "名前"]
    path = write_prompts(tmp_path / "p.json", hostile)
    out = tmp_path / "deep" / "out"
    result = CliRunner().invoke(main, ["batch", str(path), "--out", str(out), "--model", str(tiny_folder)])
    assert result.exit_code == 0, result.output
    written = {p.name for p in tmp_path.rglob("*.png")}
    assert {p.name for p in out.glob("*.png")} == written and len(written) == 2 * len(hostile)
    for name in written:
        assert "/" not in name and "\\" not in name and ".." not in name


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                         st.sampled_from(["prompt", "n", "seed", "decoder", "negative_prompt", "x"]), inner,
                         max_size=4), max_leaves=12)


@given(st.one_of(st.text(max_size=80), _JSON.map(json.dumps),
                 st.lists(_JSON, max_size=4).map(lambda xs: "\n".join(json.dumps(x) for x in xs))))
def test_prompt_file_fuzz_parses_or_raises_batch_input_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("fuzz") / "p.json"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        items, _ = read_prompts(path, n=1, base_seed=0)
    except BatchInputError:
        return
    assert items and all(i.prompt.strip() and i.n >= 1 and i.seed >= 0 for i in items)
