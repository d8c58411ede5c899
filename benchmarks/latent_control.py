"""Cost of ``latent_control``: the per-step watch (trigger) and each injection, side by side in one process.

    python -m benchmarks.latent_control --shape tiny                                   # CPU, fp32
    python -m benchmarks.latent_control --shape 1b --device cuda --dtype bf16          # H200

Random weights built in memory from ``models/shapes.py`` (``benchmarks.generate.build_model``). One batch of
``--parallel`` images of one prompt (CFG pairs) per run, eager loop; each configuration gets a warm-up run, then
``--runs`` timed runs (CUDA events on CUDA, ``perf_counter`` on CPU), median reported:

- ``none``: the empty decoder;
- ``watch``: ``latent_control`` with thresholds that never fire (condenser, similarity, variance, entropy and trigger
  every step, plus the one host read of the fire flag);
- ``inject``: thresholds that always fire, ``--injections`` injections per image at evenly spaced steps (every image
  fires together, so each injection is one append of ``control_tokens`` entries for the whole batch);
- ``inject_learned``: the same with learned modules from a weights file written here with untrained weights (their
  values do not matter for cost; the think forward runs at each injection).

Derived: ``watch_ms_per_step = (watch − none) / steps``; ``ms_per_injection = (inject − watch) / injections`` (the
append forward plus the longer cache every later step reads); likewise for the learned form. One JSON object.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from janus_decoding.core.cfg import CFGConfig
from janus_decoding.core.loop import Sampler
from janus_decoding.core.runs import ImageRequest, run_images
from janus_decoding.plugins.decoder import Decoder
from janus_decoding.strategies.latent_control import LatentControl
from janus_decoding.strategies.latent_control_modules import LatentControlModules, save_modules

from .generate import build_model
from .report import emit

PROMPT = "A close-up photo of a red fox sitting in fresh snow, golden hour light"
NEVER = dict(tau_entropy=1e9, tau_drop=1e9, tau_sim=-1.0)
ALWAYS = dict(tau_entropy=0.0, tau_sim=1.0)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LEARNED_WIDTH = 256  # bottleneck of the untrained modules written for the learned-form timing


def _time_run(model, decoder: Decoder, parallel: int, device: torch.device) -> float:
    requests = [ImageRequest(PROMPT, 0, k) for k in range(parallel)]
    cfg = CFGConfig()
    with torch.inference_mode():
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run_images(model, decoder, requests, cfg=cfg, sampler=Sampler())
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
        t0 = time.perf_counter()
        run_images(model, decoder, requests, cfg=cfg, sampler=Sampler())
        return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=["tiny", "1b", "7b"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--parallel", type=int, default=None, help="images per batch (default 2 tiny, 16 otherwise)")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--injections", type=int, default=4)
    parser.add_argument("--control-tokens", type=int, default=4)
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    parallel = args.parallel or (2 if args.shape == "tiny" else 16)
    if device.type == "cpu":
        torch.set_num_threads(1)
    model = build_model(args.shape, device, dtype)
    steps = model.image_grid[0] * model.image_grid[1]
    k, inj = args.control_tokens, args.injections
    cooldown = max((steps - 2) // max(inj, 1) - 1, 0)  # evenly spaced injections over the image
    with tempfile.TemporaryDirectory() as tmp:
        weights = save_modules(LatentControlModules(model.hidden_size, 8, k, LEARNED_WIDTH), Path(tmp) / "lc.safetensors")
        firing = dict(control_tokens=k, max_injections=inj, cooldown=cooldown, **ALWAYS)
        decoders = {
            "none": Decoder(),
            "watch": Decoder([LatentControl(control_tokens=k, max_injections=inj, **NEVER)]),
            "inject": Decoder([LatentControl(**firing)]),
            "inject_learned": Decoder([LatentControl(weights=str(weights), **firing)]),
        }
        samples: dict[str, list[float]] = {name: [] for name in decoders}
        for name, decoder in decoders.items():
            _time_run(model, decoder, parallel, device)  # warm-up
        for _ in range(args.runs):  # interleaved, so drift in machine load hits every configuration alike
            for name, decoder in decoders.items():
                samples[name].append(_time_run(model, decoder, parallel, device))
    seconds = {name: statistics.median(v) for name, v in samples.items()}
    result = {
        "benchmark": "latent_control", "date": _dt.date.today().isoformat(), "shape": args.shape,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine()),
        "dtype": args.dtype, "torch": torch.__version__, "parallel_images": parallel, "steps": steps,
        "control_tokens": k, "injections_per_image": inj, "cooldown": cooldown, "runs": args.runs,
        "timer": "cuda events" if device.type == "cuda" else "perf_counter, 1 thread",
        "seconds_per_batch": seconds,
        "watch_ms_per_step": (seconds["watch"] - seconds["none"]) / steps * 1000,
        "ms_per_injection": (seconds["inject"] - seconds["watch"]) / max(inj, 1) * 1000,
        "ms_per_injection_learned": (seconds["inject_learned"] - seconds["watch"]) / max(inj, 1) * 1000,
        "ratio_watch": seconds["watch"] / seconds["none"],
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
