"""Strategy overhead on the tiny model, CPU, measured side by side in one process.

    python -m benchmarks.cpu_overhead [--repeats 7] [--json]

Reports median seconds per batch (2 prompts × 2 images, CFG) for: the empty decoder; five no-op post-CFG strategies
(the issue-5 line: ≤ 2% over none); ``dola`` over every layer (the issue-4 line: its tiny-model overhead on CPU).
Ratios, not absolute times, are the result: absolute CPU figures depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import janus_decoding
from janus_decoding.models.tiny import write_tiny_checkpoint
from janus_decoding.plugins.decoder import Decoder
from janus_decoding.plugins.hookspecs import hookimpl
from janus_decoding.plugins.registry import build_registry
from janus_decoding.plugins.strategy import Strategy


def _noop(index: int) -> type[Strategy]:
    def post_cfg(self, state, logits):
        return logits

    return type(f"NoOp{index}", (Strategy,), {"name": f"noop{index}", "hooks": ("post_cfg",), "post_cfg": post_cfg,
                                             "__doc__": "Returns the logits unchanged (overhead probe)."})


class _NoOpPlugin:
    @hookimpl
    def register_strategies(self, register) -> None:
        for i in range(5):
            register(_noop(i))


def _time(decoder: Decoder, model, repeats: int) -> float:
    prompts = ["a red cube", "a lighthouse at dusk"]
    with torch.inference_mode():
        decoder.generate_images(model, prompts, n=2, seed=0)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            decoder.generate_images(model, prompts, n=2, seed=0)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tiny_checkpoint(Path(tmp) / "tiny", seed=0)
        model = janus_decoding.load_model(str(folder))
        registry = build_registry(extra_plugins=[_NoOpPlugin()])
        layers = list(range(model.num_layers))
        decoders = {
            "none": Decoder(),
            "five_noops": Decoder.from_spec(" > ".join(f"noop{i}" for i in range(5)), registry=registry),
            "dola_all_layers": Decoder.from_spec(f"dola(layers={layers})", registry=registry),
        }
        # interleave the configurations so drift in machine load hits all of them alike
        samples: dict[str, list[float]] = {k: [] for k in decoders}
        for _ in range(3):
            for name, decoder in decoders.items():
                samples[name].append(_time(decoder, model, args.repeats))
    seconds = {k: statistics.median(v) for k, v in samples.items()}
    result = {
        "benchmark": "cpu_overhead", "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "threads": 1, "batch": "2 prompts x 2 images, CFG, tiny model",
        "seconds_per_batch": seconds,
        "ratio_five_noops": seconds["five_noops"] / seconds["none"],
        "ratio_dola_all_layers": seconds["dola_all_layers"] / seconds["none"],
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for k, v in seconds.items():
            print(f"{k:<18} {v * 1000:8.1f} ms/batch  ×{v / seconds['none']:.3f}")


if __name__ == "__main__":
    main()
