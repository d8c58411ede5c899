"""The batch job: prompt files, outputs, resume, failures, packing, Ctrl-C, two processes under accelerate."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batch_helpers import (SUBPROCESS_ENV, assert_complete, failures, manifest, run_subprocess, temporaries,
                           write_prompts)
from janus_decoding.batch import BatchInputError, PromptItem, groups, read_prompts

PROMPTS = ["a red cube", "a blue ball", "a green tree", "a yellow sun"]


def test_outputs_manifest_and_job_file(cli, tmp_path):
    out = tmp_path / "out"
    result = cli(write_prompts(tmp_path / "p.json", PROMPTS), out, "-n", "2", "--seed", "10")
    assert result.exit_code == 0, result.output
    assert "4 prompt(s) done, 0 already done, 0 failed; 8 images" in result.output
    assert_complete(out, PROMPTS, 2)
    lines = manifest(out)
    assert [r["seed"] for r in lines] == [10, 11, 12, 13]
    assert lines[0]["files"] == ["00000_a_red_cube_0.png", "00000_a_red_cube_1.png"]
    assert {"decoder", "model", "token_hashes", "seconds", "cfg", "rng"} <= set(lines[0])
    job = json.loads((out / "job.json").read_text())
    assert job["n"] == 2 and job["seed"] == 10 and job["micro_batch"] is None and len(job["prompts_sha256"]) == 64


def test_a_prompt_alone_gives_the_same_images(cli, tmp_path):
    """Seed BASE + index, and packing prompts together, change nothing: regenerate prompt 2 alone."""
    full = tmp_path / "full"
    assert cli(write_prompts(tmp_path / "p.json", PROMPTS), full, "-n", "2", "--micro-batch", "8").exit_code == 0
    alone = tmp_path / "alone"
    entry = [{"prompt": PROMPTS[2], "seed": 2}]
    assert cli(write_prompts(tmp_path / "one.json", entry), alone, "-n", "2").exit_code == 0
    assert manifest(alone)[0]["token_hashes"] == manifest(full)[2]["token_hashes"]


def test_jsonl_objects_with_their_own_settings(cli, tmp_path):
    entries = [{"prompt": "a cat", "n": 3, "seed": 99}, {"prompt": "a dog", "negative_prompt": "blurry"},
               {"prompt": "a cow", "decoder": "top_k(top_k=5)"}]
    out = tmp_path / "out"
    assert cli(write_prompts(tmp_path / "p.jsonl", entries, jsonl=True), out).exit_code == 0
    lines = manifest(out)
    assert [len(r["files"]) for r in lines] == [3, 1, 1]
    assert lines[0]["seed"] == 99 and lines[1]["negative_prompt"] == "blurry" and lines[2]["decoder"] == "top_k(top_k=5)"


@pytest.mark.parametrize("spec, words", [
    ('poison(value="nan")', "`poison` (post_cfg) produced NaN"),
    ('poison(value="posinf")', "`poison` (post_cfg) produced +inf"),
    ('poison(value="all_neginf")', "`poison` (post_cfg) produced a row with no finite logit"),
    ("narrow", "`narrow` (post_cfg) returned"),
    ("boom", "boom went the strategy"),
    ("no_such_strategy", "unknown strategy"),
])
def test_a_failing_prompt_is_recorded_and_the_job_goes_on(cli, tmp_path, spec, words):
    entries = ["a cat", {"prompt": "a bad one", "decoder": spec}, "a dog"]
    out = tmp_path / "out"
    result = cli(write_prompts(tmp_path / "p.json", entries), out, "--micro-batch", "4")
    assert result.exit_code == 1
    assert "2 prompt(s) done, 0 already done, 1 failed" in result.output
    assert [r["index"] for r in manifest(out)] == [0, 2]
    [failure] = failures(out)
    assert failure["index"] == 1 and words in failure["reason"], failure
    assert not list(out.glob("00001_*"))


def test_a_failure_in_a_packed_group_names_only_the_guilty_prompt(cli, tmp_path):
    """All prompts share the job's decoder, which poisons a row: every prompt fails alone, all are recorded."""
    out = tmp_path / "out"
    result = cli(write_prompts(tmp_path / "p.json", PROMPTS[:3]), out, "--micro-batch", "3",
                 "--decoder", 'poison(value="nan")')
    assert result.exit_code == 1 and [f["index"] for f in failures(out)] == [0, 1, 2]
    assert manifest(out) == []


def test_minus_inf_masks_are_never_flagged(cli, tmp_path):
    out = tmp_path / "out"
    result = cli(write_prompts(tmp_path / "p.json", PROMPTS[:2]), out, "--decoder",
                 'poison(value="one_neginf") > top_k(top_k=1)')
    assert result.exit_code == 0, result.output
    assert failures(out) == []


def test_resume_skips_finished_prompts_and_redoes_half_done_ones(cli, tmp_path):
    prompts = write_prompts(tmp_path / "p.json", PROMPTS)
    out = tmp_path / "out"
    assert cli(prompts, out, "-n", "2").exit_code == 0
    hashes = [r["token_hashes"] for r in manifest(out)]
    # Break it: prompt 1 lost an image, prompt 2 has a corrupt one, prompt 3's manifest line is torn.
    (out / "00001_a_blue_ball_1.png").unlink()
    (out / "00002_a_green_tree_0.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    text = (out / "manifest.jsonl").read_text()
    (out / "manifest.jsonl").write_text(text[: text.rindex("{") + 20])
    (out / ".00000_a_red_cube_0.png.abc.tmp").write_bytes(b"half")
    result = cli(prompts, out, "-n", "2", "--resume")
    assert result.exit_code == 0, result.output
    assert "3 prompt(s) done, 1 already done, 0 failed" in result.output
    assert_complete(out, PROMPTS, 2)
    assert [r["token_hashes"] for r in manifest(out)] == hashes
    again = cli(prompts, out, "-n", "2", "--resume")
    assert "0 prompt(s) done, 4 already done" in again.output


def test_resume_retries_failed_prompts(cli, tmp_path):
    out = tmp_path / "out"
    bad = write_prompts(tmp_path / "p.json", ["a cat", {"prompt": "a dog", "decoder": "boom"}])
    assert cli(bad, out).exit_code == 1 and len(failures(out)) == 1
    again = cli(bad, out, "--resume")
    assert again.exit_code == 1 and "0 prompt(s) done, 1 already done, 1 failed" in again.output
    assert [f["index"] for f in failures(out)] == [1]


@pytest.mark.parametrize("change, words", [
    (["-n", "2"], "n: job has 1, this run 2"),
    (["--seed", "5"], "seed: job has 0, this run 5"),
    (["--cfg", "3"], "cfg: job has None, this run 3.0"),
    (["--temperature", "0.5"], "temperature"),
    (["--rng", "torch"], "rng"),
    (["--micro-batch", "2"], "micro_batch"),
    (["--negative-prompt", "ugly"], "negative_prompt"),
    (["--decoder", "top_k(top_k=3)"], "decoder"),
])
def test_resume_refuses_other_settings(cli, tmp_path, change, words):
    prompts = write_prompts(tmp_path / "p.json", PROMPTS[:1])
    out = tmp_path / "out"
    assert cli(prompts, out).exit_code == 0
    result = cli(prompts, out, "--resume", *change)
    assert result.exit_code != 0 and words in result.output and "--resume" in result.output


def test_resume_refuses_a_changed_prompt_file(cli, tmp_path):
    out = tmp_path / "out"
    assert cli(write_prompts(tmp_path / "p.json", PROMPTS[:1]), out).exit_code == 0
    result = cli(write_prompts(tmp_path / "p.json", PROMPTS[:2]), out, "--resume")
    assert result.exit_code != 0 and "prompts_sha256" in result.output


def test_a_second_run_without_resume_is_refused(cli, tmp_path):
    prompts = write_prompts(tmp_path / "p.json", PROMPTS[:1])
    assert cli(prompts, tmp_path / "out").exit_code == 0
    result = cli(prompts, tmp_path / "out")
    assert result.exit_code != 0 and "already holds a batch job" in result.output


def test_packing_groups_by_decoder_and_micro_batch():
    items = [PromptItem(i, f"p{i}", 2, i, "top_k(top_k=2)" if i == 3 else None) for i in range(6)]
    assert [[x.index for x in g] for g in groups(items, micro_batch=4, pack=True)] == [[0, 1], [2], [3], [4, 5]]
    assert [len(g) for g in groups(items, micro_batch=4, pack=False)] == [1] * 6
    assert [len(g) for g in groups(items, micro_batch=None, pack=True)] == [1] * 6


def test_a_decoder_that_couples_rows_is_run_one_prompt_at_a_time(cli, tmp_path, monkeypatch):
    from janus_decoding.plugins.decoder import Decoder

    calls = []
    original = Decoder.generate_images
    monkeypatch.setattr(Decoder, "generate_images", lambda self, model, prompts, **kw: (
        calls.append(len(prompts)), original(self, model, prompts, **kw))[1])
    out = tmp_path / "out"
    assert cli(write_prompts(tmp_path / "p.json", PROMPTS), out, "--micro-batch", "4", "--decoder", "coupler").exit_code == 0
    assert calls == [1, 1, 1, 1]
    calls.clear()
    assert cli(write_prompts(tmp_path / "p.json", PROMPTS), tmp_path / "o2", "--micro-batch", "4").exit_code == 0
    assert calls == [4]


def test_prompt_file_items(tmp_path):
    items, digest = read_prompts(write_prompts(tmp_path / "p.json", ["a", {"prompt": "b", "n": 4}]), n=2, base_seed=7)
    assert [(i.index, i.prompt, i.n, i.seed) for i in items] == [(0, "a", 2, 7), (1, "b", 4, 8)]
    assert items[1].files() == [f"00001_b_{k}.png" for k in range(4)]
    with pytest.raises(BatchInputError, match=r"item 2: `prompt` is empty"):
        read_prompts(write_prompts(tmp_path / "q.json", ["a", " "]), n=1, base_seed=0)


def test_ctrl_c_stops_after_the_current_prompt_with_a_clean_manifest(tiny_folder, cli, tmp_path):
    prompts = [f"prompt number {i}" for i in range(8)]
    path = write_prompts(tmp_path / "p.json", prompts)
    out = tmp_path / "out"
    args = ("--decoder", "snail(seconds=0.01)")
    proc = run_subprocess(tiny_folder, path, out, *args)
    deadline = time.monotonic() + 60
    while not manifest(out) and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stdout and "stopping after the current prompt" in stderr
    done = manifest(out)
    assert 0 < len(done) < len(prompts) and temporaries(out) == []
    assert_complete(out, prompts[: len(done)], 1)
    assert cli(path, out, *args, "--resume").exit_code == 0
    assert_complete(out, prompts, 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate(tiny_folder: Path, prompts: Path, out: Path, processes: int, *args: str) -> subprocess.CompletedProcess:
    # On CPU, accelerate's torchrun launcher is the one behind --multi_gpu; the job asks PartialState for gloo.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port())]
    argv = [*launcher, "-m", "janus_decoding", "batch", str(prompts), "--out", str(out), "--model", str(tiny_folder),
            "--device", "cpu", *args]
    return subprocess.run(argv, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=180)


def test_two_processes_under_accelerate_then_resume_with_one(tiny_folder, cli, tmp_path):
    prompts = [f"scene {i}" for i in range(6)]
    path = write_prompts(tmp_path / "p.json", prompts)
    reference = tmp_path / "ref"
    assert cli(path, reference, "-n", "2").exit_code == 0
    out = tmp_path / "out"
    done = _accelerate(tiny_folder, path, out, 2, "-n", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "process 0/2" in done.stdout and "process 1/2" in done.stdout
    assert_complete(out, prompts, 2)
    assert {r["rank"] for r in manifest(out)} == {0, 1}
    assert [r["token_hashes"] for r in manifest(out)] == [r["token_hashes"] for r in manifest(reference)]
    # Lose two prompts' lines, keep a stale shard from a 3-process run: one process resumes from every shard.
    lines = (out / "manifest.jsonl").read_text().splitlines()
    (out / "manifest.jsonl").write_text("\n".join(lines[:3]) + "\n")
    (out / "manifest.rank-2-of-3.jsonl").write_text(lines[5] + "\n")
    again = cli(path, out, "-n", "2", "--device", "cpu", "--resume")
    assert again.exit_code == 0, again.output
    assert "2 prompt(s) done, 4 already done" in again.output
    assert_complete(out, prompts, 2)
