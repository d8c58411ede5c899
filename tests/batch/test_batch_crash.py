"""Crash test: a job over 20 prompts killed with SIGKILL at random points, resumed each time, loses nothing."""

from __future__ import annotations

import json
import random
import time

from batch_helpers import assert_complete, decodes, manifest, run_subprocess, temporaries, write_prompts

PROMPTS = [f"crash prompt {i}: a {c} house" for i, c in enumerate(["red", "blue", "green", "white"] * 5)]
KILLS = 5
N = 2


def _manifest_lines_are_backed_by_images(out) -> int:
    """Every intact manifest line names images that exist and decode (only a torn last line may be unreadable)."""
    path = out / "manifest.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    intact = 0
    for number, line in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            assert number == len(lines) - 1, "only the last line may be torn"
            continue
        assert all(decodes(out / name) for name in record["files"]), record
        intact += 1
    return intact


def _lines(out) -> list[str]:
    path = out / "manifest.jsonl"
    return path.read_text(encoding="utf-8").splitlines() if path.exists() else []


def test_sigkill_at_random_points_then_resume(tiny_folder, cli, tmp_path):
    rng = random.Random(6)
    prompts = write_prompts(tmp_path / "prompts.json", PROMPTS)
    out = tmp_path / "out"
    args = ("-n", str(N), "--micro-batch", "4", "--decoder", "snail(seconds=0.004)", "--resume")
    progress = []
    for _ in range(KILLS):
        before = _manifest_lines_are_backed_by_images(out)
        target = before + rng.randint(0, 3)  # 0: die while loading or inside the first prompt
        proc = run_subprocess(tiny_folder, prompts, out, *args)
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and len(_lines(out)) < target:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.15))  # land somewhere in generating, writing or appending
        proc.kill()
        proc.communicate(timeout=60)
        progress.append(_manifest_lines_are_backed_by_images(out))
    print("manifest lines after each kill:", progress)
    assert 0 < progress[-1] < len(PROMPTS), "the kills must land in the middle of the job"
    result = cli(prompts, out, *args)
    assert result.exit_code == 0, result.output
    assert_complete(out, PROMPTS, N)
    assert temporaries(out) == []
    assert sorted(p.name for p in out.glob("*.png")) == sorted(
        [f for r in manifest(out) for f in r["files"]] + [r["sheet"] for r in manifest(out)])
