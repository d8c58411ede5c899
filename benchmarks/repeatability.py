"""Does an image run repeat itself bit for bit? The same batch, seeds and sampler run several times in one process.

    python -m benchmarks.repeatability --shape 1b --device cuda --deterministic        # H200
    python -m benchmarks.repeatability --shape tiny --device cpu                       # smoke test

Issue 12 needs the batch job's token hashes to be equal between one and two processes, so each run must first equal
itself. For each loop (graph, eager) this runs the batch ``--repeats`` times and compares every run with the first:
tokens, and the raw per-step logits bitwise, so that a difference is located at its first step even when the tokens
happen to agree. It also runs the same prompts in another order (the two-process job packs other neighbours into each
micro-batch) and compares each prompt's tokens. Prints one JSON object; ``tokens_sha256`` per run lets two launches
of this script be compared with each other.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from typing import Any

from .report import emit

COLORS = ["red", "blue", "green", "yellow", "black", "white", "purple", "orange"]
THINGS = ["cube", "sphere", "cat", "dog", "car", "tree", "house", "boat", "bird", "chair", "lamp", "horse"]


def _same_length_prompts(adapter, count: int) -> list[str]:
    by_length: dict[int, list[str]] = {}
    for color in COLORS:
        for thing in THINGS:
            prompt = f"a {color} {thing} on a table"
            by_length.setdefault(len(adapter.generation_prompt_ids(prompt)), []).append(prompt)
    return max(by_length.values(), key=len)[:count]


def _run(adapter, prompts: list[str], n: int, loop) -> tuple[Any, Any]:
    """Tokens ``[P, S]`` and raw logits ``[S, B, V]`` of one sampled run (row RNG, seeds 0..)."""
    import torch

    from janus_decoding.core.loop import Sampler
    from janus_decoding.core.runs import ImageRequest, run_images
    from janus_decoding.plugins.decoder import Decoder

    from .generate import _RecordLogits

    recorder = _RecordLogits()
    decoder = Decoder([recorder])
    requests = [ImageRequest(p, 1000 + len(p), k) for p in prompts for k in range(n)]
    with torch.inference_mode():
        result = run_images(adapter, decoder, requests, cfg=decoder.cfg, sampler=Sampler(rng="row"), loop=loop)
    return result.tokens.clone(), recorder.raw.clone()


def _compare(first: tuple[Any, Any], other: tuple[Any, Any]) -> dict[str, Any]:
    import torch

    (t0, raw0), (t1, raw1) = first, other
    steps = t0.shape[1]
    token_diff = (t0 != t1).any(0)  # [S]
    logit_diff = (raw0 != raw1).flatten(1).any(1)  # [S]
    first_tokens = int(token_diff.float().argmax()) if bool(token_diff.any()) else None
    first_logits = int(logit_diff.float().argmax()) if bool(logit_diff.any()) else None
    out: dict[str, Any] = {"tokens_equal": bool(torch.equal(t0, t1)),
                           "images_differing": int((t0 != t1).any(1).sum()), "of": t0.shape[0],
                           "first_step_logits_differ": first_logits, "first_step_tokens_differ": first_tokens,
                           "steps": steps}
    if first_logits is not None:
        a, b = raw0[first_logits], raw1[first_logits]
        out["rows_differing_at_that_step"] = int((a != b).any(1).sum())
        out["max_abs_diff_at_that_step"] = float((a - b).abs().max())
    return out


def _sha(tokens) -> str:
    return hashlib.sha256(tokens.cpu().numpy().tobytes()).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.repeatability", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("tiny", "1b", "7b"), default="tiny")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("-n", type=int, default=4, help="images per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loops", default="graph,eager")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: bf16 on CUDA, float32 on CPU")
    parser.add_argument("--deterministic", action="store_true",
                        help="torch.use_deterministic_algorithms(warn_only) and CUBLAS_WORKSPACE_CONFIG=:4096:8")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    from janus_decoding.core.graph import FastLoop
    from janus_decoding.core.loop import run
    from janus_decoding.models.api import parse_dtype

    from .generate import _versions, build_model

    if args.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    device = torch.device(args.device)
    dtype = parse_dtype(args.dtype or ("bf16" if device.type == "cuda" else "float32"))
    adapter = build_model(args.shape, device, dtype)
    prompts = _same_length_prompts(adapter, args.prompts)
    shuffled = prompts[1::2] + prompts[0::2]
    loops = {"graph": FastLoop, "eager": lambda: run}
    result: dict[str, Any] = {"benchmark": "repeatability", "date": time.strftime("%Y-%m-%d"), "shape": args.shape,
                              "dtype": str(dtype), "prompts": prompts, "images_per_prompt": args.n,
                              "deterministic": args.deterministic, "versions": _versions(device), "loops": {}}
    for name in args.loops.split(","):
        runs = [_run(adapter, prompts, args.n, loops[name]()) for _ in range(args.repeats)]
        other_order = _run(adapter, shuffled, args.n, loops[name]())
        index = {p: i for i, p in enumerate(prompts)}
        back = [index[p] * args.n + k for p in shuffled for k in range(args.n)]
        reordered = torch.empty_like(other_order[0])
        reordered[torch.tensor(back, device=reordered.device)] = other_order[0]
        result["loops"][name] = {
            "tokens_sha256": [_sha(t) for t, _ in runs],
            "repeats_vs_first": [_compare(runs[0], r) for r in runs[1:]],
            "other_order_tokens_equal": bool(torch.equal(reordered, runs[0][0])),
            "other_order_images_differing": int((reordered != runs[0][0]).any(1).sum()),
        }
        del runs, other_order
    if len(result["loops"]) == 2:
        graph, eager = (result["loops"][k]["tokens_sha256"][0] for k in ("graph", "eager"))
        result["graph_equals_eager"] = graph == eager
    emit(result, args.out)


if __name__ == "__main__":
    main()
