"""Helpers for the batch job's tests: prompt files, the CLI as a subprocess, reading a job folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from PIL import Image

DRIVER = Path(__file__).with_name("batch_driver.py")
# One intra-op thread: the tiny model gains nothing from more, and two xdist workers share two cores.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "JANUS_DECODING_DISABLE_PLUGIN_AUTOLOAD": "1",
                  "PYTHONUNBUFFERED": "1"}


def write_prompts(path: Path, entries: list[Any], jsonl: bool = False) -> Path:
    text = "\n".join(json.dumps(e) for e in entries) if jsonl else json.dumps(entries)
    path.write_text(text, encoding="utf-8")
    return path


def run_subprocess(model: Path, prompts: Path, out: Path, *args: str, **kwargs: Any) -> subprocess.Popen:
    argv = [sys.executable, str(DRIVER), "batch", str(prompts), "--out", str(out), "--model", str(model), *args]
    return subprocess.Popen(argv, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kwargs)


def manifest(out: Path) -> list[dict[str, Any]]:
    path = out / "manifest.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def failures(out: Path) -> list[dict[str, Any]]:
    path = out / "failures.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []


def temporaries(out: Path) -> list[Path]:
    return sorted(out.glob(".*.tmp"))


def decodes(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except OSError:
        return False


def assert_complete(out: Path, prompts: list[str], n: int) -> None:
    """Every prompt has exactly its ``n`` decodable images, one manifest line each, no temporaries."""
    lines = manifest(out)
    assert [r["index"] for r in lines] == list(range(len(prompts)))
    assert [r["prompt"] for r in lines] == prompts
    for record in lines:
        assert len(record["files"]) == n and len(record["token_hashes"]) == n
        stem = record["files"][0].rsplit("_", 1)[0]
        assert sorted(p.name for p in out.glob(f"{stem}_[0-9]*.png")) == sorted(record["files"])
        assert all(decodes(out / f) for f in record["files"] + [record["sheet"]])
    assert temporaries(out) == []
    assert not list(out.glob("manifest.rank-*")) and not list(out.glob("failures.rank-*"))
