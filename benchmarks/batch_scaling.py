"""Issue 12: the same batch job in one process and in two (accelerate, one device each), side by side.

    python -m benchmarks.batch_scaling --shape 1b --prompts 64 -n 4 --micro-batch 16 --device cuda   # 2 × H200
    python -m benchmarks.batch_scaling --shape tiny --prompts 8 -n 2 --micro-batch 4 --device cpu    # smoke test

Writes a random checkpoint of the shape (``make-tiny --shape``), a prompt file whose prompts all have the same token
length (so every packed micro-batch has the same shapes in both runs), runs ``janus-decode batch --deterministic``
once in one process and once under ``accelerate launch --multi_gpu --num_processes 2``, and prints one JSON object:
prompts/s of each (generation time as each process reports it, excluding model loading; the two-process figure uses
the slower rank), the scaling ratio, the wall-clock of each launch, and whether every prompt's token-id hashes in the
merged manifest equal the one-process run's.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .report import emit

SUMMARY = re.compile(r"(\d+) prompt\(s\) done.*?(\d+) images in ([0-9.]+)s")
COLORS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]
THINGS = ["cube", "sphere", "cat", "dog", "car", "tree", "house", "boat", "bird", "chair", "lamp", "horse"]


def _prompts(model_dir: Path, count: int) -> list[str]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    candidates = [f"a {c} {t} on a table" for c in COLORS for t in THINGS] * ((count // 96) + 1)
    lengths = [len(tokenizer(p).input_ids) for p in candidates]
    modal = collections.Counter(lengths).most_common(1)[0][0]
    chosen = [p for p, n in zip(candidates, lengths) if n == modal]
    if len(chosen) < count:
        chosen = (chosen * (count // len(chosen) + 1))
    return [f"{p}" for p in chosen[:count]]


def _run(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:6])}… failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return wall, done.stdout


def _rate(stdout: str) -> tuple[int, float]:
    """Prompts done and the slowest rank's generation seconds, from each process's summary line."""
    found = [(int(p), float(s)) for p, _, s in SUMMARY.findall(stdout)]
    return sum(p for p, _ in found), max(s for _, s in found)


def _hashes(folder: Path) -> dict[int, list[str]]:
    lines = (folder / "manifest.jsonl").read_text().splitlines()
    return {json.loads(line)["index"]: json.loads(line)["token_hashes"] for line in lines}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.batch_scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("tiny", "1b", "7b"), default="tiny")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("-n", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: bf16 on CUDA, float32 on CPU")
    parser.add_argument("--work", default=None, help="folder for the checkpoint and outputs (default: a temp dir)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "float32")
    work = Path(args.work or tempfile.mkdtemp(prefix="batch-scaling-"))
    model = work / f"model-{args.shape}"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("JANUS_DECODING_DISABLE_PLUGIN_AUTOLOAD", None)
    cli = [sys.executable, "-m", "janus_decoding"]
    if not model.exists():
        started = time.perf_counter()
        _run([*cli, "make-tiny", str(model), "--shape", args.shape], env)
        write_s = time.perf_counter() - started
    else:
        write_s = 0.0
    prompts_file = work / "prompts.json"
    prompts_file.write_text(json.dumps(_prompts(model, args.prompts)))
    job = ["batch", str(prompts_file), "--model", str(model), "-n", str(args.n), "--micro-batch",
           str(args.micro_batch), "--device", args.device.split(":")[0], "--dtype", dtype, "--deterministic"]
    one_wall, one_out = _run([*cli, *job, "--out", str(work / "one")], env)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    two_wall, two_out = _run([*launcher, "-m", "janus_decoding", *job, "--out", str(work / "two")], env)
    one_prompts, one_s = _rate(one_out)
    two_prompts, two_s = _rate(two_out)
    one, two = _hashes(work / "one"), _hashes(work / "two")
    import torch

    result = {
        "benchmark": "batch_scaling", "date": time.strftime("%Y-%m-%d"), "shape": args.shape, "dtype": dtype,
        "prompts": args.prompts, "images_per_prompt": args.n, "micro_batch": args.micro_batch,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "gpus": torch.cuda.device_count() if args.device.startswith("cuda") else 0,
        "torch": torch.__version__, "checkpoint_write_s": round(write_s, 1),
        "one_process": {"prompts": one_prompts, "generate_s": one_s, "prompts_per_s": one_prompts / one_s,
                        "wall_s": round(one_wall, 1)},
        "two_processes": {"prompts": two_prompts, "generate_s_slowest_rank": two_s,
                          "prompts_per_s": two_prompts / two_s, "wall_s": round(two_wall, 1)},
        "same_prompts": sorted(one) == sorted(two) == list(range(args.prompts)),
        "identical_token_hashes": one == two,
        "differing_prompts": sorted(i for i in one if one.get(i) != two.get(i))[:10],
    }
    result["scaling"] = result["two_processes"]["prompts_per_s"] / result["one_process"]["prompts_per_s"]
    try:
        import transformers

        result["transformers"] = transformers.__version__
    except ImportError:
        pass
    emit(result, args.out)


if __name__ == "__main__":
    main()
