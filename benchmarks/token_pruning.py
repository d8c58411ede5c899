"""Vision-token pruning (issue 8): counted FLOPs, measured prefill time and KV memory, pruned vs unpruned.

    python -m benchmarks.token_pruning --shape tiny                                  # CPU, fp32
    python -m benchmarks.token_pruning --shape 7b --device cuda --dtype bf16         # the H200 line

One understanding prompt: one image (random pixels, the model's image size) and a question of ``--question-tokens``
tokens, in Janus's template. Decoders: none, and ``token_pruning(layer=K, keep_ratio=R)`` (FastV, hard) for
``--layer`` K (default 2) and each R in ``--ratios`` (default 0.25, 0.5, 0.75). Models are random weights built in
memory from ``models/shapes.py`` (``benchmarks.generate.build_model``). Per configuration:

- ``prefill_ms``: the language model's prefill only, from entering decoder layer 0 to leaving the final norm (hooks on
  those modules; CUDA events on the GPU, ``perf_counter`` on the CPU), median of ``--runs`` after ``--warmup``;
  image encoding and sampling are outside it.
- ``kv_bytes``: keys and values the cache holds after the prefill (filled slots of every layer); the static cache's
  allocation (``kv_allocated_bytes``) is sized for the unpruned prompt and does not shrink.
- ``flops`` and ``flops_saved``: FastV's counting model (``strategies/token_pruning_math.py``).
- on CUDA, ``peak_prefill_bytes``: ``max_memory_allocated`` during the run above what was allocated before it.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import statistics
import sys
import time

import torch

from benchmarks.generate import build_model
from janus_decoding.core.loop import Sampler
from janus_decoding.core.runs import run_text
from janus_decoding.plugins.decoder import Decoder
from janus_decoding.strategies.token_pruning_math import flops_saved, keep_count, prefill_flops

from .report import emit

FASTV_REPORTED = "FastV README: about 45% theoretical FLOPs reduction at K=2, R=50% (LLaVA-1.5)"
_WORD = " picture"


def _prompt(adapter, question_tokens: int) -> list[int]:
    """Janus's understanding template around a question of exactly ``question_tokens`` tokens (one image)."""
    question = (_WORD * question_tokens).strip()
    while len(adapter.tokenize(question)) - 1 > question_tokens:  # minus the BOS
        question = question.rsplit(" ", 1)[0]
    return adapter.understanding_prompt_ids(question, 1)


class _PrefillTimer:
    """Times the language model's first forward of a run: entering layer 0 → leaving the final norm."""

    def __init__(self, adapter, cuda: bool) -> None:
        self.cuda, self.samples, self._armed = cuda, [], False
        self._start = self._end = None
        self._handles = [adapter.layers[0].register_forward_pre_hook(self._begin),
                         adapter.lm.norm.register_forward_hook(self._stop)]

    def arm(self) -> None:
        self._armed, self._started = True, False

    def _begin(self, module, args) -> None:
        if self._armed and not self._started:
            self._started = True
            if self.cuda:
                self._start = torch.cuda.Event(enable_timing=True)
                self._start.record()
            else:
                self._start = time.perf_counter()

    def _stop(self, module, args, out) -> None:
        if self._armed and self._started:
            self._armed = False
            if self.cuda:
                self._end = torch.cuda.Event(enable_timing=True)
                self._end.record()
            else:
                self._end = time.perf_counter()

    def read_ms(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return self._start.elapsed_time(self._end)
        return (self._end - self._start) * 1e3

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def _run_once(adapter, decoder: Decoder, ids: list[int], pixels: torch.Tensor, timer: _PrefillTimer, cuda: bool):
    """One run (prefill + one token) → (prefill ms, peak bytes above the start or None, the run's state)."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    timer.arm()
    with torch.inference_mode():
        result = run_text(adapter, decoder, [ids], max_new_tokens=1, sampler=Sampler(greedy=True), seeds=[0],
                          pixel_values=[pixels], eos_id=None)
    ms = timer.read_ms()
    peak = torch.cuda.max_memory_allocated() - before if cuda else None
    return ms, peak, result.state


def _summary(times: list[float], peak: int | None, state) -> dict:
    cache = state.cache
    _, kv_heads, _, head_dim = cache.keys[0].shape
    per_slot = 2 * cache.batch * kv_heads * head_dim * cache.keys[0].element_size()  # keys and values
    out = {"prefill_ms": statistics.median(times), "prefill_ms_all": times,
           "kv_bytes": sum(cache.fill) * per_slot, "kv_allocated_bytes": cache.nbytes(),
           "kv_slots_per_layer": list(cache.fill)}
    events = [e for e in state.trace.events if e["strategy"] == "token_pruning"]
    if events:
        out.update({k: events[0][k] for k in ("kept_image_tokens", "kept_tokens")})
    if peak is not None:
        out["peak_prefill_bytes"] = peak
    return out


def _counted(shape: str, prompt_tokens: int, image_tokens: int, layer: int, ratios: list[float]) -> dict:
    """FastV-counted prefill FLOPs saved at a full Janus-Pro shape, for the same template with its image tokens."""
    from janus_decoding.models.shapes import janus_pro_config

    config = janus_pro_config(shape)
    text, n_image = config.text_config, config.vision_config.num_image_tokens
    n = prompt_tokens - image_tokens + n_image
    d, m, depth = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    saved = {f"keep_{r:g}": flops_saved(n, d, m, depth, layer, n - n_image + keep_count(n_image, r)) for r in ratios}
    return {"prompt_tokens": n, "image_tokens": n_image, "hidden": d, "intermediate": m, "num_layers": depth,
            "flops": prefill_flops(n, d, m, depth), "flops_saved": saved}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.token_pruning", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("tiny", "1b", "7b"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--question-tokens", type=int, default=60)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (CPU runs only)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if cuda else "fp32")]
    torch.manual_seed(0)
    if not cuda:
        torch.set_num_threads(args.threads)
    adapter = build_model(args.shape, device, dtype)
    ids = _prompt(adapter, args.question_tokens)
    size = adapter.image_size
    pixels = (torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1).to(device, dtype)
    timer = _PrefillTimer(adapter, cuda)
    specs = {"none": ""} | {f"keep_{r:g}": f"token_pruning(layer={args.layer}, keep_ratio={r})" for r in args.ratios}
    decoders = {name: Decoder.from_spec(spec) for name, spec in specs.items()}
    for name, decoder in decoders.items():
        print(f"[token_pruning] warm-up {name}: {specs[name] or '(no pruning)'}", file=sys.stderr, flush=True)
        for _ in range(args.warmup):
            _run_once(adapter, decoder, ids, pixels, timer, cuda)
    # interleave the configurations so drift in machine load hits all of them alike
    times: dict[str, list[float]] = {name: [] for name in specs}
    peaks: dict[str, int | None] = {}
    states = {}
    for _ in range(args.runs):
        for name, decoder in decoders.items():
            ms, peak, states[name] = _run_once(adapter, decoder, ids, pixels, timer, cuda)
            times[name].append(ms)
            peaks[name] = peak if peak is None else max(peak, peaks.get(name) or 0)
    configs = {name: {"decoder": specs[name], **_summary(times[name], peaks[name], states[name])} for name in specs}
    timer.close()
    n, d, m, depth = len(ids), adapter.hidden_size, adapter.intermediate_size, adapter.num_layers
    full = prefill_flops(n, d, m, depth)
    base = configs["none"]
    for name, item in configs.items():
        kept = item.get("kept_tokens", n)
        item["flops"] = prefill_flops(n, d, m, depth, args.layer, kept) if name != "none" else full
        item["flops_saved"] = 1.0 - item["flops"] / full
        item["prefill_time_saved"] = 1.0 - item["prefill_ms"] / base["prefill_ms"]
        item["kv_saved"] = 1.0 - item["kv_bytes"] / base["kv_bytes"]
    result = {
        "benchmark": "token_pruning", "date": _dt.date.today().isoformat(), "shape": args.shape,
        "device": torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine()),
        "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "layer": args.layer, "prompt_tokens": n, "image_tokens": adapter.tokens_per_image,
        "question_tokens": args.question_tokens, "hidden": d, "intermediate": m, "num_layers": depth,
        "runs": args.runs, "warmup": args.warmup, "fastv_reported": FASTV_REPORTED, "configs": configs,
        "counted_at_full_shapes": {s: _counted(s, n, adapter.tokens_per_image, args.layer, args.ratios)
                                   for s in ("1b", "7b")},
    }
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
