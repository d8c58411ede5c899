"""Text decoding speed at batch 1, side by side in one process (issue 5's text line): transformers' ``generate`` with
its dynamic cache and with a static cache, this project's eager loop (``run_text``) and its graph loop
(``run_text(..., loop=FastLoop())``), against the weight-read floor.

    python -m benchmarks.text --shape 7b --device cuda --json --out FILE     # H200, bf16
    python -m benchmarks.text --shape tiny --device cpu                      # smoke test, fp32, ~10 s

The model is a random ``LlamaForCausalLM`` of the Janus-Pro language-model shape (``models/shapes.py``; the tiny
LLaMA for ``tiny``) built in memory with the tiny tokenizer; the prompt is ``--prompt-tokens`` random ids, greedy,
EOS disabled, so every path generates exactly ``--new-tokens``. Each path: one warm-up call, ``--runs`` timed calls
(CUDA events on CUDA), median; tok/s = new tokens / seconds (prefill included); a prefill-only call
(``max_new_tokens=1``) is timed after. The floor reads every parameter but the input embeddings plus the mean filled
KV cache once per token at the device-copy bandwidth measured here.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import traceback
from typing import Any, Callable

import torch
from transformers import LlamaForCausalLM

from janus_decoding.core.graph import FastLoop, FastOptions
from janus_decoding.core.loop import Sampler
from janus_decoding.core.protocol import NoHooks
from janus_decoding.core.runs import run_text
from janus_decoding.models.adapter import JanusAdapter
from janus_decoding.models.checkpoint_io import build_on_meta
from janus_decoding.models.shapes import janus_pro_config
from janus_decoding.models.tiny import tiny_llama_config
from janus_decoding.models.tokenizer import build_tokenizer

from .generate import _versions, fill_random, measure_device, time_path
from .report import emit

Tokens = Callable[[int], Callable[[], torch.Tensor]]  # new tokens -> one call returning the [new] generated ids


def build_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> JanusAdapter:
    """A ``JanusAdapter`` (kind ``causal_lm``) over a random LLaMA of the Janus-Pro language model's shape."""
    config = tiny_llama_config() if shape == "tiny" else janus_pro_config(shape).text_config
    tokenizer = build_tokenizer()
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                                     tokenizer.pad_token_id)
    config.dtype = dtype
    model = fill_random(build_on_meta(LlamaForCausalLM, config), device, dtype, seed)
    return JanusAdapter(model, tokenizer, None, name=f"random llama, janus-pro-{shape} language model")


def hf_path(adapter, prompt: list[int], **extra: Any) -> Tokens:
    """transformers' greedy ``generate``, as users call it (no ``inference_mode``). EOS off: in transformers 5 only
    an ``eos_token_id=None`` keyword does it (``GenerationConfig(eos_token_id=None)`` is refilled from the model's
    defaults; ``min_new_tokens`` would mask EOS's logit and change greedy tokens, and hide a failure to disable it)."""
    ids = torch.tensor([prompt], dtype=torch.long, device=adapter.device)
    mask = torch.ones_like(ids)

    def make(new: int) -> Callable[[], torch.Tensor]:
        def go() -> torch.Tensor:
            out = adapter.model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                                         eos_token_id=None, **extra)
            if out.shape[1] - ids.shape[1] != new:
                raise RuntimeError(f"generate gave {out.shape[1] - ids.shape[1]} new tokens, not {new}")
            return out[0, ids.shape[1]:]

        return go

    return make


def ours_path(adapter, prompt: list[int], loop: Callable[..., Any] | None = None) -> Tokens:
    """``run_text`` greedy with no strategies and no EOS, through ``loop`` (the eager core loop when None)."""
    extra = {} if loop is None else {"loop": loop}

    def make(new: int) -> Callable[[], torch.Tensor]:
        def go() -> torch.Tensor:
            with torch.inference_mode():
                result = run_text(adapter, NoHooks(), [prompt], max_new_tokens=new, sampler=Sampler(greedy=True),
                                  seeds=[0], eos_id=None, **extra)
            if int(result.lengths[0]) != new:
                raise RuntimeError(f"run_text gave {int(result.lengths[0])} new tokens, not {new}")
            return result.tokens[0]

        return go

    return make


def measure(make: Tokens, new: int, runs: int, device: torch.device,
            after: Callable[[dict[str, Any]], None] = lambda entry: None) -> tuple[dict[str, Any], list[int]]:
    """Timed generation (warm-up, ``runs`` calls, median), ``after`` it, a prefill-only call; the last tokens."""
    last: list[torch.Tensor] = []
    call = make(new)
    entry = time_path(lambda: last.append(call()), runs, device)
    entry["tok_s"] = new / entry["median_s"]
    after(entry)  # before the prefill-only call overwrites what the last run left (loop stats, compile state)
    entry["prefill_s"] = time_path(make(1), 1, device)["median_s"]
    if new > 1 and entry["median_s"] > entry["prefill_s"]:
        entry["decode_tok_s"] = (new - 1) / (entry["median_s"] - entry["prefill_s"])
    return entry, last[-1].tolist()


def text_floor(adapter, prompt: int, new: int, ceilings: dict[str, float]) -> dict[str, Any]:
    """Tokens/s if each token read every parameter but the input embeddings, and the filled KV, once."""
    if not ceilings:
        return {}
    bandwidth = ceilings["copy_tb_s"] * 1e12
    embed = adapter.lm.embed_tokens.weight
    weight_bytes = sum(p.numel() * p.element_size() for p in adapter.model.parameters() if p is not embed)
    slot_bytes = 2 * adapter.num_layers * adapter.num_kv_heads * adapter.head_dim * adapter.dtype.itemsize
    kv_bytes = slot_bytes * (prompt + new / 2)  # the step after token t reads prompt + t + 1 slots; mean over t
    seconds = (weight_bytes + kv_bytes) / bandwidth
    layer_params = sum(p.numel() for p in adapter.layers.parameters())
    prefill = max(weight_bytes / bandwidth, 2 * layer_params * prompt / (ceilings["gemm_bf16_tflops"] * 1e12))
    return {"weight_gb_per_token": weight_bytes / 1e9, "kv_gb_per_token_mean": kv_bytes / 1e9,
            "s_per_token": seconds, "tok_s": 1 / seconds, "prefill_s": prefill,
            "tok_s_with_prefill": new / (prefill + (new - 1) * seconds), "ceilings": ceilings}


def agreement(a: list[int], b: list[int]) -> dict[str, Any]:
    same = [x == y for x, y in zip(a, b)]
    return {"equal": a == b, "agree": sum(same), "of": len(a), "first_diff": None if all(same) else same.index(False)}


def compare(tokens: dict[str, list[int]], graph_name: str) -> dict[str, Any]:
    """Greedy tokens: eager vs graph loop (should be equal), every path vs hf-static (bf16 may part at near ties)."""
    out = {}
    if "ours-eager" in tokens and graph_name in tokens:
        out[f"ours-eager vs {graph_name}"] = agreement(tokens["ours-eager"], tokens[graph_name])
    for name in [n for n in tokens if n != "hf-static" and "hf-static" in tokens]:
        out[f"{name} vs hf-static"] = agreement(tokens[name], tokens["hf-static"])
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.text", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("tiny", "1b", "7b"), default="tiny")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--runs", type=int, default=3, help="timed calls per path (after one warm-up)")
    parser.add_argument("--prompt-tokens", type=int, default=640)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--paths", default="ours-eager,ours-graph,ours-graph-compiled,ours-graph-compiled-sdpa,"
                        "hf-dynamic,hf-static",
                        help="ours-graph-compiled: the graph loop with Inductor-compiled layer pieces; ours-graph-autotuned: "
                             "the same with Inductor's GEMM autotuning (compile='max-autotune'); "
                             "ours-graph-sdpa, ours-graph-compiled-sdpa: with SDPA instead of the Triton decode "
                             "attention that 'auto' picks at batch 1 (these three CUDA only)")
    parser.add_argument("--profile", default=None, metavar="PATH",
                        help="CUDA: one more call of each of these paths (comma-separated) under torch.profiler: GPU "
                             "time per token by kernel group (benchmarks/kernels.py), e.g. ours-graph-compiled")
    parser.add_argument("--json", action="store_true", help="print the JSON object (default: a short table)")
    parser.add_argument("--out", default=None, help="also write the JSON here (rewritten after each path)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype, new, cuda = torch.bfloat16 if device.type == "cuda" else torch.float32, args.new_tokens, device.type == "cuda"
    if not cuda:  # the tiny model gains nothing from intra-op threads; on a busy host they spin against each other
        torch.set_num_threads(1)
    result: dict[str, Any] = {
        "benchmark": "text", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.text " + " ".join(argv if argv is not None else sys.argv[1:]),
        "shape": args.shape, "dtype": str(dtype).replace("torch.", ""), "batch": 1, "prompt_tokens": args.prompt_tokens,
        "new_tokens": new, "versions": {**_versions(device), "cpu_threads": torch.get_num_threads()}, "paths": {},
        "errors": [],
    }

    def attempt(label: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - a failing path is recorded, the others still run
            print(f"[text] {label} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            result["errors"].append({"section": label, "error": f"{type(exc).__name__}: {exc}",
                                     "traceback": traceback.format_exc(limit=6)})
            return None

    ceilings = attempt("ceilings", lambda: measure_device(device)) or {}
    adapter = build_model(args.shape, device, dtype)
    result["params_b"] = sum(p.numel() for p in adapter.model.parameters()) / 1e9
    high = min(adapter.vocab_size, len(adapter.tokenizer))
    prompt = torch.randint(10, high, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    graph_name = "ours-graph" if cuda else "ours-graph-free"
    loops = {graph_name: FastLoop(FastOptions(graphs=cuda))}  # attention "auto": Triton at batch 1 on CUDA
    if cuda:
        loops["ours-graph-compiled"] = FastLoop(FastOptions(compile="inductor"))
        loops["ours-graph-autotuned"] = FastLoop(FastOptions(compile="max-autotune"))
        loops["ours-graph-sdpa"] = FastLoop(FastOptions(attention="sdpa"))
        loops["ours-graph-compiled-sdpa"] = FastLoop(FastOptions(compile="inductor", attention="sdpa"))
    paths: dict[str, Tokens] = {
        "ours-eager": ours_path(adapter, prompt),
        **{name: ours_path(adapter, prompt, loop) for name, loop in loops.items()},
        "hf-dynamic": hf_path(adapter, prompt),
        "hf-static": hf_path(adapter, prompt, cache_implementation="static"),  # last: compile and its graph pools
    }

    profiled = args.profile.split(",") if args.profile else []
    if profiled and (not cuda or any(name not in paths for name in profiled)):
        raise SystemExit(f"--profile needs CUDA and paths among {', '.join(paths)}; got {args.profile!r}")

    def describe(name: str, entry: dict[str, Any]) -> None:
        if name in loops:
            entry["last_run"] = json.loads(json.dumps(loops[name].stats, default=str))
        if name == "hf-static":
            config = getattr(adapter.model, "_last_compile_config", None)  # set by transformers' auto-compile
            entry["torch_compile"] = (json.loads(json.dumps(config.to_dict(), default=str)) if config is not None
                                      else "none (transformers auto-compiles decoding only on CUDA-like devices)")

    wanted = set(args.paths.replace("ours-graph-free", "ours-graph").split(","))
    tokens: dict[str, list[int]] = {}
    for name, make in paths.items():
        if name.removesuffix("-free") not in wanted:
            continue
        print(f"[text] {name}", file=sys.stderr, flush=True)
        measured = attempt(name, lambda: measure(make, new, args.runs, device, lambda e: describe(name, e)))
        if measured is None:
            result["paths"][name] = {"error": result["errors"][-1]["error"]}
        else:
            result["paths"][name], tokens[name] = measured
        if args.out:
            emit(result, args.out, show=False)
    if profiled:
        from .kernels import kernel_breakdown

        for name in profiled:
            print(f"[text] profile {name}", file=sys.stderr, flush=True)
            key = "profile" if name == profiled[0] else f"profile_{name}"
            result[key] = attempt("profile", lambda: {"path": name, **kernel_breakdown(paths[name](new), new)})
    result["floor"] = floor = text_floor(adapter, args.prompt_tokens, new, ceilings)
    static = result["paths"].get("hf-static", {}).get("tok_s")
    result["ratios"] = {name: {"vs_hf_static": e["tok_s"] / static if static else None,
                               "vs_floor": e["tok_s"] / floor["tok_s"] if floor else None}
                        for name, e in result["paths"].items() if "tok_s" in e}
    result["tokens"] = compare(tokens, graph_name)
    emit(result, args.out, show=args.json)
    if not args.json:
        table(result)
    return result


def table(result: dict[str, Any]) -> None:
    for name, entry in result["paths"].items():
        print(f"  {name:16s} " + (f"{entry['tok_s']:9.1f} tok/s  {entry['median_s']:.3f} s  prefill "
                                  f"{entry['prefill_s']:.3f} s" if "tok_s" in entry else str(entry)))
    if result["floor"]:
        print(f"  {'floor':16s} {result['floor']['tok_s']:9.1f} tok/s")
    for pair, agree in result["tokens"].items():
        print(f"  {pair}: {agree['agree']}/{agree['of']} tokens agree, first difference {agree['first_diff']}")


if __name__ == "__main__":
    main()
