"""Smoke test of ``benchmarks/text.py`` on the tiny shape (CPU): every path runs and the loops agree."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

from janus_decoding.core.runs import run_text

ROOT = Path(__file__).resolve().parents[2]


def test_text_benchmark_runs_on_the_tiny_shape(tmp_path: Path) -> None:
    out = tmp_path / "text.json"
    subprocess.run([sys.executable, "-m", "benchmarks.text", "--shape", "tiny", "--device", "cpu", "--runs", "1",
                    "--new-tokens", "12", "--prompt-tokens", "40", "--out", str(out)], cwd=ROOT, check=True,
                   capture_output=True)
    result = json.loads(out.read_text())
    assert result["benchmark"] == "text" and result["errors"] == []
    assert (result["prompt_tokens"], result["new_tokens"]) == (40, 12)
    ran = {name: entry for name, entry in result["paths"].items() if "skipped" not in entry}
    assert {"ours-eager", "hf-dynamic", "hf-static"} <= ran.keys()
    assert all(entry["tok_s"] > 0 and entry["prefill_s"] > 0 for entry in ran.values())
    assert result["floor"] == {}  # no device-copy bandwidth measured on CPU
    if "loop" in inspect.signature(run_text).parameters:
        last_run = result["paths"]["ours-graph-free"]["last_run"]
        assert "eager_run" not in last_run and last_run["graph_free_steps"] > 0  # the fast step ran text mode
        assert result["tokens"]["ours-eager vs ours-graph-free"]["equal"]
    # fp32 on CPU: transformers' greedy tokens are this project's too
    assert result["tokens"]["ours-eager vs hf-static"]["equal"]
    assert result["tokens"]["hf-dynamic vs hf-static"]["equal"]
