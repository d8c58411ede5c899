"""Seconds per image batch, side by side in one process: DeepSeek's published loop, this project's eager loop and
its graph loop (``core/graph.py``), with peak GPU memory, the memory-bandwidth floor and a greedy correctness check.

    python -m benchmarks.generate --shape {tiny,1b,7b} --parallel 16 --decoder SPEC --json [--runs 3] [--check]
    python -m benchmarks.generate --shape 7b --paths graph --variants graph --compare-decoder 'dola(layers="high")' \
        --profile --json        # a strategy's cost on the graph step, side by side; where the step's GPU time goes

Models are random weights built in memory from ``models/shapes.py`` (bf16 on CUDA, fp32 on CPU) with the tiny
tokenizer. Paths:

- ``reference``: written here from the recipe in DeepSeek's ``generation_inference.py`` (shared/reference/janus.md §5):
  interleaved cond/uncond rows (uncond rows padded except the first and last token), transformers' dynamic cache
  through ``model.model.language_model(inputs_embeds=…, past_key_values=…, use_cache=True)``, ``gen_head``,
  ``u + w(c − u)``, softmax, ``torch.multinomial``, re-embedding. It knows no strategy: it is plain CFG sampling.
- ``eager``: ``core.runs.run_images`` with the core loop and the ``--decoder`` strategies.
- ``graph*``: the same with ``loop=FastLoop(options)``, one entry per variant of ``core.graph.FastOptions``. Without
  CUDA the graph variants are skipped and ``graph-free`` (the fast step without capture) is timed instead.

Each path: one warm-up batch, then ``--runs`` timed batches (CUDA events), median reported; peak memory is
``torch.cuda.max_memory_allocated`` over the warm-up and timed batches (weights included). The floor reads every
weight the step uses plus each row's filled KV once per step at the measured device-copy bandwidth
(shared/reference/performance.md §3). ``--check`` runs the eager loop and the default graph variant greedily with the
logits of every step recorded and compares them while their inputs agree.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from janus_decoding.core.graph import EagerStepWarning, FastLoop, FastOptions
from janus_decoding.core.loop import Sampler, run
from janus_decoding.core.runs import ImageRequest, run_images
from janus_decoding.plugins.decoder import Decoder
from janus_decoding.plugins.strategy import Strategy

PROMPT = "A close-up photo of a red fox sitting in fresh snow, golden hour light"
VARIANTS: dict[str, FastOptions] = {  # the first is the one --check compares; flash last (a private aten entry)
    "graph": FastOptions(),  # fused layers, sdpa over 32-slot buckets, GEMMs per gemm="auto" (Triton at 32 rows)
    "graph-full": FastOptions(bucket=0),  # fused layers, sdpa over the whole cache (one graph)
    "graph-modules": FastOptions(layers="transformers"),  # transformers' layer modules, sdpa buckets
    "graph-compiled": FastOptions(compile="inductor"),  # fused layers with Inductor-compiled layer pieces
    "graph-compiled-cublas": FastOptions(compile="inductor", gemm="cublas"),  # the same with cuBLAS's GEMMs
    "graph-compiled-b64": FastOptions(compile="inductor", bucket=64),  # reads more, captures half the graphs
    # read less, capture more graphs (in the first run of a loop only: later runs replay them)
    "graph-compiled-b16": FastOptions(compile="inductor", bucket=16),
    "graph-compiled-b8": FastOptions(compile="inductor", bucket=8),
    # the output and down projections split into 4 K parts (256 programs) instead of 2
    "graph-compiled-split256": FastOptions(compile="inductor", split_programs=256),
    # Inductor's small kernels of the layer pieces (the norms with the split sums, the rotary and cache store):
    # launch settings timed at compile; reductions split across blocks; persistent vs looped reductions timed
    "graph-compiled-tuned": FastOptions(compile="inductor", inductor=(("max_autotune_pointwise", True),
                                                                      ("coordinate_descent_tuning", True))),
    "graph-compiled-coop": FastOptions(compile="inductor", inductor=(("triton.cooperative_reductions", True),)),
    "graph-compiled-multi": FastOptions(compile="inductor", inductor=(("triton.multi_kernel", 1),)),
    # without each of session 8's changes (the rotary and k/v store in the q/k/v GEMM, image embeddings by table,
    # the prompt's forward replayed), and without all three
    "graph-compiled-rotary-apart": FastOptions(compile="inductor", rotary_in_gemm=False),
    "graph-compiled-no-table": FastOptions(compile="inductor", image_table=False),
    "graph-compiled-no-prompt-graph": FastOptions(compile="inductor", prompt_graph=False),
    "graph-compiled-before": FastOptions(compile="inductor", rotary_in_gemm=False, image_table=False,
                                         prompt_graph=False),
    "graph-cublas": FastOptions(gemm="cublas"),
    "graph-autotuned": FastOptions(compile="max-autotune"),  # the same, GEMMs timed against Triton templates
    # the project's split-KV decode attention instead of SDPA ("auto" picks SDPA at 16 images with CFG)
    "graph-triton": FastOptions(attention="triton"),
    "graph-compiled-triton": FastOptions(compile="inductor", attention="triton"),
    "graph-flash": FastOptions(attention="flash"),  # fused layers, flash reading exactly the filled length
}


def _log(message: str) -> None:
    print(f"[generate] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# The model: random weights in memory
# ----------------------------------------------------------------------------------------------------------------


def _janus_config(shape: str):
    if shape == "tiny":
        from janus_decoding.models.tiny import tiny_janus_config

        return tiny_janus_config()
    from janus_decoding.models.shapes import janus_pro_config

    return janus_pro_config(shape)


def build_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A ``JanusAdapter`` over a random Janus of ``shape``: N(0, 1/fan_in) matrices, norms 1 + 0.1·N, biases 0.02·N."""
    from transformers import JanusForConditionalGeneration

    from janus_decoding.models.adapter import JanusAdapter
    from janus_decoding.models.checkpoint_io import build_on_meta
    from janus_decoding.models.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    config = _janus_config(shape)
    for cfg in (config, config.text_config):
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                                tokenizer.pad_token_id)
    config.dtype = dtype
    config.text_config.dtype = dtype
    model = fill_random(build_on_meta(JanusForConditionalGeneration, config), device, dtype, seed)
    return JanusAdapter(model, tokenizer, None, name=f"random janus-pro-{shape}")


def fill_random(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """Give a model built on meta random parameters drawn in place on ``device`` (each allocated once)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in list(model.named_parameters()):
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        value = torch.empty(param.shape, dtype=dtype, device=device)
        if value.dim() == 1:
            scale, offset = (0.1, 1.0) if "norm" in module_name.rsplit(".", 1)[-1] or "norm" in leaf else (0.02, 0.0)
        else:
            scale, offset = 1.0 / math.sqrt(math.prod(value.shape[1:])), 0.0
        value.normal_(0.0, 1.0, generator=generator).mul_(scale).add_(offset)
        module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------------------------
# The reference loop (DeepSeek's recipe)
# ----------------------------------------------------------------------------------------------------------------


@torch.inference_mode()
def reference_generate(adapter, prompt_ids: list[int], parallel: int, *, cfg_weight: float, steps: int,
                       temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Image tokens ``[parallel, steps]`` by the published loop (dynamic cache, one token per forward)."""
    model = adapter.model
    language_model = model.model.language_model
    tokens = torch.tensor(prompt_ids, dtype=torch.int32, device=adapter.device).repeat(2 * parallel, 1)  # [2P, T]
    tokens[1::2, 1:-1] = adapter.pad_id  # odd rows unconditional: BOS and the final begin-of-image token kept
    inputs_embeds = language_model.get_input_embeddings()(tokens)
    generated = torch.zeros(parallel, steps, dtype=torch.int64, device=adapter.device)
    past_key_values = None
    for i in range(steps):
        outputs = language_model(inputs_embeds=inputs_embeds, use_cache=True, past_key_values=past_key_values)
        past_key_values = outputs.past_key_values
        logits = model.model.generation_head(outputs.last_hidden_state[:, -1, :])  # [2P, V]
        logit_cond, logit_uncond = logits[0::2, :], logits[1::2, :]
        logits = logit_uncond + cfg_weight * (logit_cond - logit_uncond)
        probs = torch.softmax(logits / temperature, dim=-1)
        next_token = torch.multinomial(probs, num_samples=1, generator=generator)  # [P, 1]
        generated[:, i] = next_token.squeeze(dim=-1)
        next_token = torch.cat([next_token, next_token], dim=1).view(-1)  # [2P]: (cond, uncond) per image
        inputs_embeds = model.prepare_embeddings_for_image_generation(next_token).unsqueeze(dim=1)
    return generated


# ----------------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clean(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def time_path(fn: Callable[[], Any], runs: int, device: torch.device) -> dict[str, Any]:
    """One warm-up call, then ``runs`` timed calls; seconds per call and peak memory."""
    _clean(device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    warmup = time.perf_counter() - start
    seconds = []
    for _ in range(runs):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            seconds.append(begin.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - t0)
    out: dict[str, Any] = {"median_s": statistics.median(seconds), "seconds": seconds, "warmup_s": warmup}
    if cuda:
        out["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    return out


def step_times(run: Callable[[Callable[[int], None]], Any], device: torch.device) -> dict[str, Any]:
    """One more batch with a CUDA event recorded as each token is chosen (the loop's progress callback): where the
    batch's time goes — up to the first token (the host's setup, the prompt's forward, the first choice), the
    steps (median, fastest, slowest), after the last — and how far ahead of the GPU the host was."""
    events: list[torch.cuda.Event] = []
    host: list[float] = []

    def tick(_count: int) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        events.append(event)
        host.append(time.perf_counter())

    _clean(device)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start = time.perf_counter()
    begin.record()
    run(tick)
    end.record()
    host_end = time.perf_counter()
    end.synchronize()
    steps = [a.elapsed_time(b) for a, b in zip(events, events[1:])]
    return {
        "total_ms": begin.elapsed_time(end), "to_first_token_ms": begin.elapsed_time(events[0]),
        "host_to_first_token_ms": (host[0] - start) * 1e3, "steps_ms": events[0].elapsed_time(events[-1]),
        "after_last_ms": events[-1].elapsed_time(end), "step_ms_median": statistics.median(steps),
        "step_ms_min": min(steps), "step_ms_max": max(steps), "tokens": len(events),
        "host_done_before_gpu_ms": (host_end - start) * 1e3,
    }


def measure_device(device: torch.device) -> dict[str, float]:
    """Device-to-device copy bandwidth (bytes read + written) and a bf16 GEMM rate, as the floor's ceilings."""
    if device.type != "cuda":
        return {}
    x = torch.empty(1 << 30, dtype=torch.bfloat16, device=device).normal_()
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(10):
        y.copy_(x)
    end.record()
    end.synchronize()
    copy_tb_s = 2 * x.numel() * x.element_size() * 10 / (begin.elapsed_time(end) / 1000) / 1e12
    del x, y
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        a @ b
    begin.record()
    for _ in range(10):
        a @ b
    end.record()
    end.synchronize()
    tflops = 2 * 8192**3 * 10 / (begin.elapsed_time(end) / 1000) / 1e12
    del a, b
    _clean(device)
    return {"copy_tb_s": copy_tb_s, "gemm_bf16_tflops": tflops}


def floor(adapter, rows: int, prompt_len: int, steps: int, max_len: int, ceilings: dict[str, float]) -> dict[str, Any]:
    """Seconds per batch if each step read its weights and each row's filled KV once (performance.md §3)."""
    if not ceilings:
        return {}
    bandwidth = ceilings["copy_tb_s"] * 1e12
    janus = adapter.model.model
    modules = [adapter.lm.layers, adapter.lm.norm, janus.generation_head, janus.generation_aligner]
    weight_bytes = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    slot_bytes = 2 * adapter.num_layers * adapter.num_kv_heads * adapter.head_dim * adapter.dtype.itemsize * rows
    filled = [prompt_len + t for t in range(1, steps)]  # slots read by decode step t (its own included)
    decode = sum(weight_bytes + slot_bytes * f for f in filled) / bandwidth
    decode_b64 = sum(weight_bytes + slot_bytes * min(max_len, -(-f // 64) * 64) for f in filled) / bandwidth
    decode_full = (steps - 1) * (weight_bytes + slot_bytes * max_len) / bandwidth
    layer_params = sum(p.numel() for p in adapter.lm.layers.parameters())
    prefill = max(weight_bytes / bandwidth, 2 * layer_params * rows * prompt_len / (ceilings["gemm_bf16_tflops"] * 1e12))
    return {
        "weight_gb_per_step": weight_bytes / 1e9,
        "kv_gb_per_step_mean": slot_bytes * statistics.mean(filled) / 1e9,
        "decode_s": decode,
        "prefill_s": prefill,
        "total_s": decode + prefill,
        "total_if_reading_64_slot_buckets_s": decode_b64 + prefill,
        "total_if_reading_whole_cache_s": decode_full + prefill,
    }


# ----------------------------------------------------------------------------------------------------------------
# Greedy correctness: eager vs graph logits while their inputs agree
# ----------------------------------------------------------------------------------------------------------------


class _RecordLogits(Strategy):
    """Keeps every step's raw ``[B, V]`` and guided ``[P, V]`` logits in per-step device buffers (graph-safe)."""

    name = "bench_record_logits"
    hooks = ("pre_logits", "post_cfg")

    def begin(self, state) -> None:
        vocab = state.adapter.image_vocab_size
        self.raw = state.step_buffer("bench.raw", (state.rows, vocab))
        self.guided = state.step_buffer("bench.guided", (state.num_pairs, vocab))

    def pre_logits(self, state, logits):
        self.raw.index_copy_(0, state.step_t.view(1), logits[None].float())
        return logits

    def post_cfg(self, state, logits):
        self.guided.index_copy_(0, state.step_t.view(1), logits[None].float())
        return logits


def _greedy_logits(adapter, requests, loop):
    recorder = _RecordLogits()
    decoder = Decoder([recorder])
    with torch.inference_mode():
        result = run_images(adapter, decoder, requests, cfg=decoder.cfg, sampler=Sampler(greedy=True), loop=loop)
    return result.tokens.clone(), recorder.raw, recorder.guided


def _against(reference, other) -> dict[str, Any]:
    """Relative error of ``other``'s guided logits against ``reference``'s while their inputs agree."""
    (tr, _, gr), (to, _, go) = reference, other
    steps = tr.shape[1]
    differs = tr != to
    first = torch.where(differs.any(1), differs.float().argmax(1), torch.full_like(differs[:, 0], steps, dtype=torch.long))
    same = torch.arange(steps, device=tr.device)[None, :] <= first[:, None]  # [P, S]
    a, b = gr.transpose(0, 1), go.transpose(0, 1)  # [P, S, V]
    rel = (a - b).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-30)
    return {"rel_err_max": float(rel[same].max()), "rel_err_median": float(rel[same].median()),
            "first_divergence_min": int(first.min())}


def check_greedy(adapter, requests: list[ImageRequest], options: FastOptions, fp32: bool = False) -> dict[str, Any]:
    """Greedy tokens and per-step logits of the eager loop and the graph loop, compared step by step.

    With ``fp32``, both are also compared with the eager loop on an fp32 copy of the model: the graph's error should
    be of the size of the eager loop's own bf16 error.
    """
    runs = {"eager": _greedy_logits(adapter, requests, run), "graph": _greedy_logits(adapter, requests,
                                                                                     FastLoop(options))}
    extra: dict[str, Any] = {}
    if fp32:
        import copy

        from janus_decoding.models.adapter import JanusAdapter

        wide = JanusAdapter(copy.deepcopy(adapter.model).to(torch.float32), adapter.tokenizer, None, name="fp32 copy")
        truth = _greedy_logits(wide, requests, run)
        del wide
        extra = {"eager_bf16_vs_eager_fp32": _against(truth, runs["eager"]),
                 "graph_bf16_vs_eager_fp32": _against(truth, runs["graph"])}
        # The meaningful bf16 tolerance: the graph is no further from fp32 than the eager loop itself (+10%).
        extra["graph_as_accurate_as_eager_vs_fp32"] = (extra["graph_bf16_vs_eager_fp32"]["rel_err_max"]
                                                       <= max(1.1 * extra["eager_bf16_vs_eager_fp32"]["rel_err_max"], 1e-5))
    (te, raw_e, guided_e), (tg, raw_g, guided_g) = runs["eager"], runs["graph"]
    steps = te.shape[1]
    differs = te != tg  # [P, S]
    first_diff = torch.where(differs.any(1), differs.float().argmax(1), torch.full_like(differs[:, 0], steps,
                                                                                        dtype=torch.long))  # [P]
    step_ids = torch.arange(steps, device=te.device)
    same_inputs = step_ids[None, :] <= first_diff[:, None]  # [P, S]: inputs agree up to and including first_diff
    same_inputs &= step_ids[None, :] < steps
    ge, gg = guided_e.transpose(0, 1), guided_g.transpose(0, 1)  # [P, S, V]
    abs_err = (ge - gg).abs().amax(-1)  # [P, S]
    rel_err = (ge - gg).norm(dim=-1) / ge.norm(dim=-1).clamp_min(1e-30)  # [P, S]
    raw_rel = (raw_e - raw_g).norm(dim=-1) / raw_e.norm(dim=-1).clamp_min(1e-30)  # [S, B]
    pairs_same = same_inputs.repeat_interleave(2, 0).transpose(0, 1)  # [S, B] (interleaved rows)
    top2 = ge.topk(2, dim=-1).values
    gap = top2[..., 0] - top2[..., 1]  # [P, S]
    tol = float(abs_err[same_inputs].max())
    tie = gap < tol
    first_tie = torch.where(tie.any(1), tie.float().argmax(1), torch.full_like(first_diff, steps))
    ok = bool((first_diff >= first_tie).all())
    return {
        "steps": steps,
        "images": te.shape[0],
        "tokens_equal": int((~differs).sum()),
        "tokens_total": differs.numel(),
        "first_divergence_per_image": first_diff.tolist(),
        "guided_logits_max_abs_err_same_inputs": tol,
        "guided_logits_rel_err_max": float(rel_err[same_inputs].max()),
        "guided_logits_rel_err_median": float(rel_err[same_inputs].median()),
        "raw_logits_rel_err_max": float(raw_rel[pairs_same].max()),
        "first_near_tie_per_image (top-2 gap < max abs err)": first_tie.tolist(),
        "divergence_only_at_or_after_a_near_tie": ok,
        "within_bf16_tolerance (rel err <= 1e-2)": float(rel_err[same_inputs].max()) <= 1e-2,
        **extra,
    }


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------


def _describe(options: FastOptions) -> dict[str, Any]:
    return {k: getattr(options, k) for k in ("graphs", "layers", "attention", "bucket", "split", "compile")}


def _versions(device: torch.device) -> dict[str, Any]:
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    return info


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("tiny", "1b", "7b"), default="tiny")
    parser.add_argument("--parallel", type=int, default=16, help="images per batch (2 rows each with CFG)")
    parser.add_argument("--decoder", default="", help="decoder spec for the eager and graph paths ('' = plain CFG)")
    parser.add_argument("--compare-decoder", default=None, metavar="SPEC",
                        help="also time the first graph variant with this decoder, right after it (ratio reported)")
    parser.add_argument("--profile", action="store_true",
                        help="one more batch of the first graph variant under torch.profiler: GPU time per step by "
                             "kernel group (benchmarks/kernels.py)")
    parser.add_argument("--phases", action="store_true",
                        help="one more batch of the first graph variant with an event per token: the time up to the "
                             "first token, per step, after the last")
    parser.add_argument("--runs", type=int, default=3, help="timed batches per path (after one warm-up)")
    parser.add_argument("--rng", choices=("row", "torch"), default="row", help="sampler of the eager and graph paths")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"graph variants: {', '.join(VARIANTS)}")
    parser.add_argument("--paths", default="reference,eager,graph", help="which of reference, eager, graph to time")
    parser.add_argument("--check", action="store_true", help="greedy eager vs graph logits comparison")
    parser.add_argument("--check-fp32", action="store_true",
                        help="in --check, also compare both against the eager loop on an fp32 copy of the model")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--json", action="store_true", help="print one JSON object (default: a short table)")
    parser.add_argument("--out", default=None, help="also write the JSON here (rewritten after each section)")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    paths = set(args.paths.split(","))
    report: dict[str, Any] = {
        "benchmark": "generate", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.generate " + " ".join(argv if argv is not None else sys.argv[1:]),
        "shape": args.shape, "parallel": args.parallel, "decoder": args.decoder, "rng": args.rng,
        "dtype": str(dtype).replace("torch.", ""), "versions": _versions(device), "paths": {}, "errors": [],
    }

    def save() -> None:
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")

    def attempt(label: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - a failing section is reported, the others still run
            _log(f"{label} failed: {type(exc).__name__}: {exc}")
            report["errors"].append({"section": label, "error": f"{type(exc).__name__}: {exc}",
                                     "traceback": traceback.format_exc(limit=6)})
            return None
        finally:
            save()

    warnings.simplefilter("default", EagerStepWarning)
    report["ceilings"] = attempt("ceilings", lambda: measure_device(device)) or {}
    start = time.perf_counter()
    adapter = build_model(args.shape, device, dtype)
    _sync(device)
    report["build_s"] = time.perf_counter() - start
    report["params_b"] = sum(p.numel() for p in adapter.model.parameters()) / 1e9
    prompt_ids = adapter.generation_prompt_ids(PROMPT)
    steps = adapter.image_grid[0] * adapter.image_grid[1]
    rows = 2 * args.parallel
    report.update(prompt_tokens=len(prompt_ids), steps=steps, rows=rows)
    report["floor"] = floor(adapter, rows, len(prompt_ids), steps, len(prompt_ids) + steps, report["ceilings"])
    decoder = Decoder.from_spec(args.decoder)
    requests = [ImageRequest(PROMPT, 0, k) for k in range(args.parallel)]

    def sampler() -> Sampler:
        generator = torch.Generator(device=device).manual_seed(0) if args.rng == "torch" else None
        return Sampler(rng=args.rng, generator=generator)

    def ours(loop, strategies: Decoder = decoder, progress=None) -> Callable[[], torch.Tensor]:
        def go() -> torch.Tensor:
            with torch.inference_mode():
                result = run_images(adapter, strategies, requests, cfg=strategies.cfg, sampler=sampler(), loop=loop,
                                    progress=progress)
            strategies.raise_on_bad_boundaries(result.state)
            return result.tokens

        return go

    if "graph" in paths:
        names = [v for v in args.variants.split(",") if v]
        if device.type != "cuda":
            for name in names:
                report["paths"][name] = {"skipped": "no CUDA device"}
            names, extra = [], {"graph-free": FastOptions(graphs=False)}
        else:
            extra = {}
        for index, (name, options) in enumerate([(n, VARIANTS[n]) for n in names] + list(extra.items())):
            _log(name)
            loop = FastLoop(options)
            entry = attempt(name, lambda: time_path(ours(loop), args.runs, device))
            if entry is not None:
                entry["options"] = _describe(options)
                entry["last_run"] = loop.stats
            report["paths"][name] = entry
            save()
            if index == 0 and args.phases and device.type == "cuda":
                _log("phases")
                report["phases"] = attempt("phases", lambda: step_times(lambda tick: ours(loop, progress=tick)(),
                                                                        device))
            profile = index == 0 and args.profile and device.type == "cuda"
            if profile:  # a run of the timed loop: it replays the graphs kept from the last timed run
                from .kernels import kernel_breakdown

                _log("profile")
                report["profile"] = attempt("profile", lambda: kernel_breakdown(ours(loop), steps))
            loop.release()  # its kept cache and graphs would count in the next path's peak memory
            if index == 0 and entry is not None and args.compare_decoder is not None:
                name_b = f"{name}+{args.compare_decoder}"
                _log(name_b)
                other, loop_b = Decoder.from_spec(args.compare_decoder), FastLoop(options)
                entry_b = attempt(name_b, lambda: time_path(ours(loop_b, other), args.runs, device))
                if entry_b is not None:
                    entry_b["options"], entry_b["last_run"] = _describe(options), loop_b.stats
                    report["compare_decoder"] = {"spec": args.compare_decoder, "base": name,
                                                 "ratio": entry_b["median_s"] / entry["median_s"]}
                report["paths"][name_b] = entry_b
                if profile:  # where the strategy's extra time goes
                    report["profile_compare_decoder"] = attempt("profile", lambda: kernel_breakdown(
                        ours(loop_b, other), steps))
                loop_b.release()
            if index == 0 and args.check:  # before the other variants, so a failing one cannot spoil it
                _log("check")
                report["check"] = attempt("check", lambda: check_greedy(adapter, requests, options, args.check_fp32))
                report["check_variant"] = _describe(options)
    if "eager" in paths:
        _log("eager")
        report["paths"]["eager"] = attempt("eager", lambda: time_path(ours(run), args.runs, device))
        save()
    if "reference" in paths:  # last: its growing dynamic cache inflates the allocator's reserve
        generator = torch.Generator(device=device).manual_seed(0)
        _log("reference")
        report["paths"]["reference"] = attempt("reference", lambda: time_path(
            lambda: reference_generate(adapter, prompt_ids, args.parallel, cfg_weight=decoder.cfg.weight, steps=steps,
                                       generator=generator), args.runs, device))
        save()
    ref = (report["paths"].get("reference") or {}).get("median_s")
    flo = report["floor"].get("total_s")
    report["ratios"] = {}
    for name, entry in report["paths"].items():
        if entry and "median_s" in entry:
            report["ratios"][name] = {
                "vs_reference": entry["median_s"] / ref if ref else None,
                "vs_floor": entry["median_s"] / flo if flo else None,
                "peak_vs_reference": (entry["peak_gib"] / report["paths"]["reference"]["peak_gib"]
                                      if ref and "peak_gib" in entry else None),
            }
    save()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.shape}, {args.parallel} images with CFG, {steps} tokens, prompt {len(prompt_ids)} tokens, "
              f"{report['versions'].get('gpu', device)}")
        for name, entry in report["paths"].items():
            if entry and "median_s" in entry:
                peak = f"{entry['peak_gib']:.1f} GiB" if "peak_gib" in entry else ""
                print(f"  {name:14s} {entry['median_s']:8.3f} s  {peak}")
            else:
                print(f"  {name:14s} {entry}")
        if flo:
            print(f"  {'floor':14s} {flo:8.3f} s")
    return report


if __name__ == "__main__":
    main()
