"""The image step's GEMMs alone: cuBLAS (``F.linear``) against ``core.skinny_gemm``'s Triton kernel, side by side.

    python -m benchmarks.gemm --device cuda --out results/gemm-h200.json

For each projection of a decoder layer at the 1B and 7B shapes with 32 rows (16 images with CFG): a distinct weight
per layer (as many layers as the model has, at least 256 MB of weights, so they stream from HBM and not from L2),
one GEMM per layer captured as one CUDA graph and replayed; CUDA events, median of replays, divided by the layers.
Every launch configuration is checked against ``F.linear`` first (a wrong one is reported, not timed). Reports
µs per GEMM, the weight bytes over that time (TB/s) and the best configurations per shape; and for the launch the
step uses (``launch_for``): through the tensor-memory accelerator (``tma``), for the output and down projections split
in 1, 2 or 4 without the sum kernel (``parts``: the compiled step sums them in the next norm kernel), and for
gate/up the SiLU·mul epilogue (a few launches) against cuBLAS + the two ops. ``--sweep no`` times only those.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import itertools
import json
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F

from janus_decoding.core.skinny_gemm import GemmLaunch, launch_for, skinny_gemm

from .graph_timing import time_graph

SHAPES = {  # name: (N, K, layers)
    "7b-qkv": (12288, 4096, 30), "7b-o": (4096, 4096, 30), "7b-gate_up": (22016, 4096, 30),
    "7b-down": (4096, 11008, 30), "1b-qkv": (6144, 2048, 24), "1b-o": (2048, 2048, 24),
    "1b-gate_up": (11264, 2048, 24), "1b-down": (2048, 5632, 24),
}
CONFIGS = [GemmLaunch(bn=bn, bk=bk, splits=s, num_warps=w, num_stages=st)
           for bn, bk, s, w, st in itertools.product((16, 32, 64, 128), (64, 128, 256), (1, 2, 4), (4,), (3, 4, 6))
           if bn * bk <= 16384]


GLU_LAUNCHES = [GemmLaunch(bn=bn, bk=bk, num_stages=st, tma=tma)
               for bn, bk, st, tma in itertools.product((64, 128), (64, 128), (3, 4), (False, True))
               if bn * bk <= 8192]


def run_shape(name: str, rows: int, configs: list[GemmLaunch], replays: int, device: torch.device) -> dict[str, Any]:
    n, k, layers = SHAPES[name]
    layers = max(layers, -(-(256 << 20) // (n * k * 2)))
    gen = torch.Generator(device=device).manual_seed(0)
    weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=gen) / k ** 0.5 for _ in range(layers)]
    x = torch.randn(rows, k, device=device, dtype=torch.bfloat16, generator=gen)
    bytes_per_gemm = n * k * 2
    reference = F.linear(x, weights[0]).float()
    scale = reference.abs().max().item()

    def per_gemm_us(fn: Callable[[torch.Tensor], torch.Tensor]) -> float:
        return time_graph(lambda: [fn(w) for w in weights], replays) * 1000 / layers

    cublas_us = per_gemm_us(lambda w: F.linear(x, w))
    results = []
    for launch in configs:
        entry: dict[str, Any] = {"launch": launch.__dict__}
        try:
            err = (skinny_gemm(x, weights[0], launch).float() - reference).abs().max().item() / scale
            entry["max_rel_err"] = err
            if err > 2 ** -6:
                entry["error"] = "wrong result"
            else:
                entry["us"] = per_gemm_us(lambda w, launch=launch: skinny_gemm(x, w, launch))
                entry["tb_s"] = bytes_per_gemm / entry["us"] / 1e6
                entry["vs_cublas"] = entry["us"] / cublas_us
        except Exception as e:  # noqa: BLE001 - a launch that cannot compile (shared memory) is reported
            entry["error"] = f"{type(e).__name__}: {str(e)[:200]}"
        results.append(entry)
    timed = sorted((r for r in results if "us" in r), key=lambda r: r["us"])
    default = launch_for(n, k)
    tma = dataclasses.replace(default, tma=True)
    step = {"launch": default.__dict__, "us": per_gemm_us(lambda w: skinny_gemm(x, w, default)),
            "us_tma": per_gemm_us(lambda w: skinny_gemm(x, w, tma))}
    step["tma_equal"] = torch.equal(skinny_gemm(x, weights[0], tma), skinny_gemm(x, weights[0], default))
    if k >= n:  # compiled, the step hands split parts to the next norm kernel: time the GEMM without its sum kernel
        step["parts"] = []
        for splits, stages in itertools.product((1, 2, 4), (4, 6)):
            launch = dataclasses.replace(default, splits=splits, num_stages=stages)
            args = (launch.bn, launch.bk, splits, launch.num_warps, stages, launch.tma, False, True)
            us = per_gemm_us(lambda w, args=args: torch.ops.janus_decoding.skinny_gemm(x, w, *args))
            step["parts"].append({"splits": splits, "num_stages": stages, "us": us})
    if name.endswith("gate_up"):
        inner = n // 2

        def unfused(w: torch.Tensor) -> torch.Tensor:
            gate_up = F.linear(x, w)
            return F.silu(gate_up[:, :inner]) * gate_up[:, inner:]

        step["cublas_silu_mul_us"] = per_gemm_us(unfused)
        glu_err = (skinny_gemm(x, weights[0], launch_for(n, k, glu=True), glu=True).float()
                   - unfused(weights[0]).float()).abs().max()
        step["glu_max_abs_err"] = glu_err.item()
        glu = launch_for(n, k, glu=True)
        step["glu_launch"] = glu.__dict__
        step["glu_us"] = per_gemm_us(lambda w: skinny_gemm(x, w, glu, glu=True))
        step["glu_us_tma"] = per_gemm_us(lambda w: skinny_gemm(x, w, dataclasses.replace(glu, tma=True), glu=True))
        step["glu_launches"] = []
        for launch in GLU_LAUNCHES:  # a gate and an up tile of bn/2 rows each a program
            us = per_gemm_us(lambda w, launch=launch: skinny_gemm(x, w, launch, glu=True))
            step["glu_launches"].append({"launch": launch.__dict__, "us": us})
    print(f"[gemm] {name}: the step's launch {step}", file=sys.stderr)
    print(f"[gemm] {name}: cuBLAS {cublas_us:.2f} us ({bytes_per_gemm / cublas_us / 1e6:.2f} TB/s), best "
          + (f"{timed[0]['us']:.2f} us {timed[0]['launch']}" if timed else "none"), file=sys.stderr)
    return {"n": n, "k": k, "rows": rows, "layers": layers, "weight_mb": bytes_per_gemm / 1e6,
            "cublas_us": cublas_us, "cublas_tb_s": bytes_per_gemm / cublas_us / 1e6, "step_launch": step,
            "best": timed[:8],
            "failed": [r for r in results if "error" in r][:5], "configs": len(results)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--replays", type=int, default=15)
    parser.add_argument("--sweep", choices=("yes", "no"), default="yes", help="time every launch configuration")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise SystemExit("benchmarks.gemm: needs a CUDA device")
    report = {
        "benchmark": "gemm", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.gemm " + " ".join(argv if argv is not None else sys.argv[1:]),
        "versions": {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(device)},
        "shapes": {name: run_shape(name, args.rows, CONFIGS if args.sweep == "yes" else [],
                                            args.replays, device) for name in args.shapes.split(",")},
    }
    text = json.dumps(report, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
