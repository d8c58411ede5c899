"""The cost of one KV injection (``latent_control``'s append), timed directly rather than inside whole runs.

    python -m benchmarks.kv_inject_micro --shape tiny                               # CPU, fp32
    python -m benchmarks.kv_inject_micro --shape 1b --device cuda --dtype bf16      # H200

Whole eager runs vary by seconds on a shared host, which buries a few milliseconds per injection; here one state is
prefilled and filled to mid-image, then the loop's own ``inject`` (a ``KVAppend`` of ``--control-tokens`` embeddings
for every row) and one ``decode_step`` are timed alternately, CUDA events on CUDA, median of ``--runs``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from janus_decoding.core.cfg import CFGConfig
from janus_decoding.core.loop import decode_step, embed_next, inject, prefill
from janus_decoding.core.protocol import KVAppend, NoHooks
from janus_decoding.core.runs import _image_prompt_rows, _new_state

from .generate import build_model
from .report import emit

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROMPT = "a red cube on a blue sphere, studio light"


class _Room(NoHooks):
    """No strategies, but room in the static cache for the injections timed here."""

    def __init__(self, growth: int) -> None:
        self.growth = growth

    def kv_growth(self, state) -> int:
        return self.growth


def _timer(device: torch.device):
    if device.type == "cuda":
        def timed(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000
    else:
        def timed(fn):
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
    return timed


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kv_inject_micro", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("tiny", "1b", "7b"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--parallel", type=int, default=16, help="images (2 CFG rows each)")
    parser.add_argument("--control-tokens", type=int, default=4)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    model = build_model(args.shape, device, DTYPES[args.dtype])
    steps = model.image_grid[0] * model.image_grid[1]
    hooks = _Room((args.control_tokens + 1) * (args.runs + 2))  # each round: one injection and one decode step
    prompts = [PROMPT] * args.parallel
    batch = _image_prompt_rows(model, prompts, [None] * args.parallel, "interleaved")
    timed = _timer(device)
    with torch.inference_mode():
        state = _new_state(model, hooks, batch, mode="image", layout="interleaved", steps=steps,
                           seeds=[0] * args.parallel, indices=list(range(args.parallel)), prompts=prompts,
                           cfg=CFGConfig(), history_prefix=None)
        state.memory["_prompt_layers"] = set()
        logits = prefill(state, hooks, batch, model.embed_text(batch.ids))
        tokens = logits[0::2].argmax(-1)
        for _ in range(steps // 2):  # fill the cache to mid-image, as an injection would find it
            logits = decode_step(state, hooks, embed_next(state, tokens))
            tokens = logits[0::2].argmax(-1)
        embeds = model.embed_text(batch.ids[:, -args.control_tokens:])  # [B, K, H]: any embeddings cost the same
        append = [KVAppend(embeds=embeds)]
        injections, steps_s = [], []
        for _ in range(args.runs):
            injections.append(timed(lambda: inject(state, hooks, append)))
            steps_s.append(timed(lambda: decode_step(state, hooks, embed_next(state, tokens))))
    result = {
        "benchmark": "kv_inject_micro", "shape": args.shape, "dtype": args.dtype, "parallel_images": args.parallel,
        "rows": 2 * args.parallel, "control_tokens": args.control_tokens, "runs": args.runs,
        "cache_slots_at_first_injection": int(batch.ids.shape[1] + steps // 2),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (1 thread)",
        "torch": torch.__version__,
        "ms_per_injection": statistics.median(injections) * 1000,
        "ms_per_eager_decode_step": statistics.median(steps_s) * 1000,
    }
    result["injection_over_step"] = result["ms_per_injection"] / result["ms_per_eager_decode_step"]
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
