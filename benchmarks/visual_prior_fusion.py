"""Cost of ``visual_prior_fusion`` in image understanding: the once-per-image prior and the per-token fusion.

    python -m benchmarks.visual_prior_fusion --shape tiny                                   # CPU, fp32
    python -m benchmarks.visual_prior_fusion --shape 7b --device cuda --dtype bf16          # H200

Random weights built in memory from ``models/shapes.py`` (``benchmarks.generate.build_model``; the tiny shape from
``models/tiny.py``), the tiny tokenizer, one random picture. Each configuration answers one question greedily with a
fixed number of new tokens (no EOS stop), once with 1 and once with ``--steps`` tokens, so that

- ``prior_ms`` = (fusion, 1 token) − (no strategy, 1 token): scoring the bank against the image once (aligned scorer:
  one vision forward over the chosen layers plus the phrase embeddings), building ρ and its first tokens;
- ``per_token_ms`` = the time per later token; ``per_token_overhead_ms`` its excess over the same decoder without
  fusion (one ``[1, V]`` add per token: the token table is built on the first step).

Timings: one warm-up, then ``--runs`` rounds over all configurations (interleaved), median per configuration; CUDA
events on the GPU, ``perf_counter`` on the CPU (one thread). One JSON object is printed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Callable

import torch

from janus_decoding.core.loop import Sampler
from janus_decoding.core.runs import run_text
from janus_decoding.plugins.decoder import Decoder
from janus_decoding.strategies.visual_prior_fusion import VisualPriorFusion

from .generate import build_model

QUESTION = "What is in the picture?"
#: A bank of everyday object nouns; the first ``--bank`` of them are used.
WORDS = ("cat dog car tree house boat horse bird cup chair table lamp book phone clock bicycle train plane bus "
         "flower apple banana pizza bottle window door street river mountain beach cloud sky moon sun field road "
         "bridge tower fence bench kite ball shoe hat shirt bag umbrella laptop keyboard mouse sofa bed sink oven "
         "cake bowl spoon knife fork plate glass candle mirror painting statue fountain garden forest lake").split()
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _baseline(name: str) -> str:
    """The configuration a fusion configuration is compared with: the same without ``visual_prior_fusion``."""
    return "dola" if name.startswith("dola") else "none"


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def measure(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(stop) / 1000.0
        begin = time.perf_counter()
        fn()
        return time.perf_counter() - begin

    return measure


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("tiny", "1b", "7b"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--bank", type=int, nargs="+", default=[3, 64], help="bank sizes to measure")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # steadier on a shared machine; ratios, not absolute CPU times, are the result
    torch.manual_seed(0)
    adapter = build_model(args.shape, device, DTYPES[args.dtype])
    ids = adapter.understanding_prompt_ids(QUESTION, 1)
    pixels = (torch.rand(1, 3, adapter.image_size, adapter.image_size, device=device) * 2 - 1).to(adapter.dtype)
    measure = _timer(device)

    def once(decoder: Decoder, steps: int) -> Callable[[], object]:
        return lambda: run_text(adapter, decoder, [ids], max_new_tokens=steps, sampler=Sampler(greedy=True),
                                seeds=[0], pixel_values=[pixels], prompts=[QUESTION], eos_id=None)

    decoders = {"none": Decoder()}
    for size in args.bank:
        decoders[f"fusion_bank{size}"] = Decoder([VisualPriorFusion(bank=WORDS[:size], weight=0.7)])
    decoders["dola"] = Decoder.from_spec("dola")
    decoders["dola_fusion_bank3"] = Decoder.from_spec(f'dola > visual_prior_fusion(bank={json.dumps(WORDS[:3])})')
    lengths = (1, args.steps)
    samples: dict[str, dict[int, list[float]]] = {name: {n: [] for n in lengths} for name in decoders}
    with torch.inference_mode():
        for name, decoder in decoders.items():  # warm-up
            once(decoder, 1)()
        for _ in range(args.runs):  # interleaved, so drift in machine load hits every configuration alike
            for name, decoder in decoders.items():
                for n in lengths:
                    samples[name][n].append(measure(once(decoder, n)))
    times = {name: {str(n): statistics.median(v) for n, v in per.items()} for name, per in samples.items()}
    per_token = {name: (t[str(args.steps)] - t["1"]) / (args.steps - 1) for name, t in times.items()}
    result = {
        "benchmark": "visual_prior_fusion", "date": time.strftime("%Y-%m-%d"), "shape": args.shape,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        "dtype": args.dtype, "torch": torch.__version__, "threads": torch.get_num_threads(), "runs": args.runs,
        "steps": args.steps, "bank_sizes": args.bank, "seconds_per_answer": times,
        "prior_ms": {name: 1000 * (t["1"] - times[_baseline(name)]["1"])
                     for name, t in times.items() if "fusion" in name},
        "per_token_ms": {name: 1000 * v for name, v in per_token.items()},
        "per_token_overhead_ms": {name: 1000 * (per_token[name] - per_token[_baseline(name)])
                                  for name in per_token if "fusion" in name},
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
