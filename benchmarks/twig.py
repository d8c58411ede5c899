"""TwiG's cost per image: ``context="rebuild"`` vs ``"inject"`` vs plain generation, side by side in one process.

    python -m benchmarks.twig --shape tiny [--repeats 3]                                   # CPU, fp32
    python -m benchmarks.twig --shape 1b --device cuda --dtype bf16 [--loop graph]         # H200

Random weights built in memory from ``models/shapes.py`` (``benchmarks.generate.build_model``, the tiny tokenizer,
transformers' Janus image processor at the model's size). So that runs compare, every nested answer has a fixed
length: the thinker and the scorer below run the understanding path (same model, fresh cache, the partial picture
from stage 2 on) for exactly ``--think-tokens`` tokens with no EOS stop, then return a fixed text (the guidance,
clipped by the strategy to ``--think-tokens`` tokens) or ``SCORE: 100`` (never a redraw). Variants:

- ``plain``: the empty decoder;
- ``bands``: ``twig(think=false, reflect=false)`` (band boundaries and partial decodes only);
- ``rebuild`` / ``inject``: thinking before every band, no reflection;
- ``rebuild+reflect``: thinking and a score after every band.

Each: one warm-up, then ``--repeats`` rounds over all variants (CUDA events on CUDA; wall and process CPU seconds on
CPU), medians; seconds per image = median / images.
Prints one JSON object (also written to ``--out`` when given).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from janus_decoding.core.loop import Sampler, run
from janus_decoding.core.protocol import NoHooks
from janus_decoding.core.runs import ImageRequest, run_images, run_text
from janus_decoding.plugins.decoder import Decoder
from janus_decoding.strategies import twig_math
from janus_decoding.strategies.twig import StageAsk, TwiG

from .generate import build_model
from .report import emit

PROMPT = "a red cube on a blue sphere"
FILLER_WORD = " red"  # guidance text: this word repeated, clipped by the strategy to the think length
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _nested(state, ask: StageAsk, question: str, tokens: int) -> None:
    """The understanding path for exactly ``tokens`` tokens (EOS does not stop it), as the thinking would cost."""
    adapter = state.adapter
    if ask.picture is None:
        ids, pixels = adapter.chat_prompt_ids(question), None
    else:
        ids, pixels = adapter.understanding_prompt_ids(question, 1), [adapter.preprocess_images([ask.picture])]
    run_text(adapter, NoHooks(), [ids], max_new_tokens=tokens, sampler=Sampler(greedy=True), seeds=[ask.seed],
             pixel_values=pixels, eos_id=None)


def fixed_thinker(state, ask: StageAsk, *, max_new_tokens: int, greedy: bool) -> str:
    _nested(state, ask, twig_math.think_question(ask.prompt, ask.place, ask.stage, ask.stages, ask.earlier),
            max_new_tokens)
    return FILLER_WORD.strip() + FILLER_WORD * (2 * max_new_tokens)


def fixed_scorer(state, ask: StageAsk, *, max_new_tokens: int, greedy: bool) -> str:
    _nested(state, ask, twig_math.score_question(ask.prompt, ask.place), max_new_tokens)
    return f"SCORE: {twig_math.SCORE_HIGH:g}"


def _timed(fns: dict[str, Any], repeats: int, device: torch.device) -> dict[str, dict[str, Any]]:
    """One warm-up each, then ``repeats`` rounds visiting every variant in turn (so a busy machine slows all alike).

    On CUDA: CUDA-event seconds. On CPU: wall seconds and this process's CPU seconds (less sensitive to other load).
    """
    for fn in fns.values():
        fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for label, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fn()
                end.record()
                end.synchronize()
                wall[label].append(begin.elapsed_time(end) / 1000)
            else:
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                wall[label].append(time.perf_counter() - start)
                cpu[label].append(time.process_time() - start_cpu)
    out = {}
    for label in fns:
        out[label] = {"median_s": statistics.median(wall[label]), "seconds": wall[label]}
        if cpu[label]:
            out[label]["median_cpu_s"] = statistics.median(cpu[label])
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=("tiny", "1b", "7b"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--stages", type=int, default=None, help="default: 3 if it divides the grid's rows, else 2")
    parser.add_argument("--think-tokens", type=int, default=64)
    parser.add_argument("--images", type=int, default=1, help="images per batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop", choices=("eager", "graph"), default="eager")
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads (1 keeps a shared machine quiet)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)

    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

    device = torch.device(args.device)
    adapter = build_model(args.shape, device, DTYPES[args.dtype])
    adapter.image_processor = JanusImageProcessorPil(size={"height": adapter.image_size, "width": adapter.image_size})
    rows, cols = adapter.image_grid
    stages = args.stages or (3 if rows % 3 == 0 else 2)
    loop = run
    if args.loop == "graph":
        from janus_decoding.core.graph import FastLoop

        loop = FastLoop()
    TwiG.thinker, TwiG.scorer = fixed_thinker, fixed_scorer
    common = f"stages={stages}, think_max_tokens={args.think_tokens}"
    variants = {
        "plain": "",
        "bands": f"twig({common}, think=false, reflect=false)",
        "rebuild": f'twig({common}, reflect=false, context="rebuild")',
        "inject": f'twig({common}, reflect=false, context="inject")',
        "rebuild+reflect": f'twig({common}, reflect=true, threshold=50, context="rebuild")',
    }
    requests = [ImageRequest(PROMPT, 0, i) for i in range(args.images)]
    fns = {}
    for label, spec in variants.items():
        decoder = Decoder.from_spec(spec)

        def once(decoder=decoder):
            with torch.inference_mode():
                return run_images(adapter, decoder, requests, cfg=decoder.cfg, sampler=Sampler(), loop=loop)

        fns[label] = once
    results: dict[str, Any] = _timed(fns, args.repeats, device)
    for label, entry in results.items():
        entry["spec"] = variants[label]
        entry["per_image_s"] = entry["median_s"] / args.images
        entry["ratio_to_plain"] = entry["median_s"] / results["plain"]["median_s"]
        if "median_cpu_s" in entry:
            entry["cpu_ratio_to_plain"] = entry["median_cpu_s"] / results["plain"]["median_cpu_s"]
    report = {
        "benchmark": "twig", "shape": args.shape, "device": str(device), "dtype": args.dtype, "loop": args.loop,
        "grid": [rows, cols], "stages": stages, "think_tokens": args.think_tokens, "images": args.images,
        "repeats": args.repeats, "nested_answers_per_image": {"rebuild": stages, "inject": stages,
                                                              "rebuild+reflect": 2 * stages},
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "results": results,
    }
    emit(report, args.out)
    return report


if __name__ == "__main__":
    main()
