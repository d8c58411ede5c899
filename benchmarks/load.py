"""Issue 3's GPU line: write a random full-shape checkpoint folder, then load it onto the GPU in bf16.

    python -m benchmarks.load --shape 7b --format deepseek --folder /tmp/janus-7b [--json] [--out FILE]

The folder is written with ``models.tiny.write_tiny_checkpoint`` (skipped when a finished one is there); the load runs
in a fresh Python process so that its peak resident memory (``ru_maxrss``) is the loader's alone. The goal: peak host
RAM below one fp32 copy of the weights.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import subprocess
import sys
import time
from pathlib import Path

_LOAD = r"""
import json, resource, sys, time
import torch, transformers
import janus_decoding
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
model = janus_decoding.load_model(sys.argv[1], device=sys.argv[2], dtype="bf16")
if sys.argv[2].startswith("cuda"):
    torch.cuda.synchronize()
seconds = time.perf_counter() - start
params = list(model.model.parameters())
print(json.dumps({
    "load_s": seconds,
    "ru_maxrss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
    "ru_maxrss_after_imports_gib": before / 2**30,
    "ru_maxrss_increase_gib": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before) / 2**30,
    "params_b": sum(p.numel() for p in params) / 1e9,
    "dtypes": sorted({str(p.dtype) for p in params}),
    "devices": sorted({str(p.device) for p in params}),
    "cuda_allocated_gib": torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    "torch": torch.__version__, "transformers": transformers.__version__,
    "source_format": model.loaded.source_format,
}))
"""


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("tiny", "1b", "7b"), default="7b")
    parser.add_argument("--format", choices=("hf", "deepseek"), default="deepseek")
    parser.add_argument("--folder", required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--write-only", action="store_true", help="write the folder and stop")
    parser.add_argument("--load-only", action="store_true", help="do not write; load the folder that is there")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from janus_decoding.models.tiny import TINY_MARKER, write_tiny_checkpoint

    folder = Path(args.folder)
    report: dict = {"benchmark": "load", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "shape": args.shape, "format": args.format, "folder": str(folder)}
    if not (folder / TINY_MARKER).is_file() and not args.load_only:
        start = time.perf_counter()
        write_tiny_checkpoint(folder, seed=0, format=args.format, shape=args.shape)
        report["write_s"] = time.perf_counter() - start
        (folder.parent / f"{folder.name}.write_s").write_text(f"{report['write_s']}\n")
    if args.write_only:
        print(json.dumps(report))
        return report
    timing = folder.parent / f"{folder.name}.write_s"
    if "write_s" not in report and timing.is_file():
        report["write_s"] = float(timing.read_text())
    files = [p for p in folder.iterdir() if p.is_file()]
    report["folder_gb"] = sum(p.stat().st_size for p in files) / 1e9
    report["weight_files"] = sorted(p.name for p in files if p.suffix in (".bin", ".safetensors"))
    done = subprocess.run([sys.executable, "-c", _LOAD, str(folder), args.device], capture_output=True, text=True)
    if done.returncode != 0:
        report["error"] = done.stderr[-4000:]
    else:
        report.update(json.loads(done.stdout.strip().splitlines()[-1]))
        fp32_gib = report["params_b"] * 1e9 * 4 / 2**30
        report["fp32_copy_gib"] = fp32_gib
        report["goal_peak_rss_below_fp32_copy"] = report["ru_maxrss_gib"] < fp32_gib
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text if args.json else f"load {args.shape} {args.format}: {report.get('load_s')} s, "
          f"peak RSS {report.get('ru_maxrss_gib')} GiB")
    return report


if __name__ == "__main__":
    main()
