"""The fast step's decode attention alone: SDPA over a bucketed read (what the graph step runs by default) against
the Triton split-KV kernels (``core/decode_attention.py``) in several launch configurations, side by side.

    python -m benchmarks.attention --device cuda --json --out results/attention-h200.json

Each case is one model shape's attention for every layer of a step (a distinct cache per layer, as in the model, so
the KV is read from HBM and not from L2), captured as one CUDA graph and replayed; timed with CUDA events at several
fill lengths (median of replays each) and averaged over them, so the figure is a whole run's mean step. Both sides
include writing the new key and value (SDPA: two ``index_copy_``; Triton: inside the kernel) and SDPA its mask.
Every configuration is checked against ``decode_attention_reference`` first.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import itertools
import json
import statistics
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F

from janus_decoding.core.decode_attention import Launch, decode_attention, decode_attention_reference

from .graph_timing import time_graph

CASES = {  # name: rows, heads, head dim, layers, cache slots, fill lengths a run passes through
    "7b-image": (32, 32, 128, 30, 616, [60, 180, 300, 420, 540, 615]),
    "1b-image": (32, 16, 128, 24, 616, [60, 180, 300, 420, 540, 615]),
    "7b-text": (1, 32, 128, 30, 896, [650, 720, 790, 860, 895]),
}
CONFIGS = [Launch(chunk=c, block=64, num_warps=4, num_stages=2, dot=False) for c in (64, 128, 256)] + [
    Launch(chunk=c, block=b, num_warps=w, num_stages=s, dot=True)
    for c, b, w, s in itertools.product((64, 128, 256, 512), (32, 64, 128), (4, 8), (2, 3)) if b <= c]


def run_case(name: str, configs: list[Launch], replays: int, device: torch.device) -> dict[str, Any]:
    rows, heads, d, layers, slots, fills = CASES[name]
    dtype = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    keys = [torch.randn(rows, heads, slots, d, device=device, dtype=dtype, generator=g) for _ in range(layers)]
    values = [torch.randn(rows, heads, slots, d, device=device, dtype=dtype, generator=g) for _ in range(layers)]
    qkv = torch.randn(rows, 3 * heads, d, device=device, dtype=dtype, generator=g)
    q, k, v = qkv[:, :heads], qkv[:, heads: 2 * heads], qkv[:, 2 * heads:]
    valid = torch.ones(rows, slots, dtype=torch.bool, device=device)
    slot = torch.zeros(1, dtype=torch.long, device=device)
    slot_ids = torch.arange(slots, device=device)
    scale = d ** -0.5

    def sdpa_layers(read: int) -> Callable[[], None]:
        def fn() -> None:
            visible = valid[:, :read] & (slot_ids[:read] <= slot)
            mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))
            for kk, vv in zip(keys, values):
                kk.index_copy_(2, slot, k[:, :, None])
                vv.index_copy_(2, slot, v[:, :, None])
                F.scaled_dot_product_attention(q[:, :, None], kk[:, :, :read], vv[:, :, :read],
                                               attn_mask=mask[:, None, None], scale=scale)
        return fn

    def triton_layers(config: Launch) -> Callable[[], None]:
        def fn() -> None:
            for kk, vv in zip(keys, values):
                decode_attention(q, k, v, kk, vv, valid, slot, scale, config)
        return fn

    def kv_bytes(fill: int) -> int:  # what attention must read: the filled slots of every layer
        return 2 * layers * rows * heads * (fill + 1) * d * dtype.itemsize

    result: dict[str, Any] = {"rows": rows, "heads": heads, "head_dim": d, "layers": layers, "slots": slots,
                              "fills": fills, "configs": []}
    sdpa = []
    for fill in fills:
        slot.fill_(fill)
        read = min(slots, -(-(fill + 1) // 64) * 64)
        sdpa.append(time_graph(sdpa_layers(read), replays))
    result["sdpa_bucket64_ms"] = statistics.mean(sdpa)
    result["kv_gb_per_step"] = statistics.mean(kv_bytes(f) for f in fills) / 1e9
    for config in configs:
        slot.fill_(fills[len(fills) // 2])
        kk, vv = keys[0].clone(), values[0].clone()
        expected = decode_attention_reference(q, k, v, keys[0].clone(), values[0].clone(), valid, slot, scale)
        try:
            got = decode_attention(q, k, v, kk, vv, valid, slot, scale, config)
            error = (got.float() - expected.float()).abs().max().item()
            times = []
            for fill in fills:
                slot.fill_(fill)
                times.append(time_graph(triton_layers(config), replays))
            entry = {**dataclasses.asdict(config), "ms": statistics.mean(times), "max_abs_err": error}
            entry["vs_sdpa"] = entry["ms"] / result["sdpa_bucket64_ms"]
            entry["tb_s"] = result["kv_gb_per_step"] / entry["ms"]
        except Exception as exc:  # noqa: BLE001 - a configuration that does not compile is recorded, others run
            entry = {**dataclasses.asdict(config), "error": f"{type(exc).__name__}: {exc}"[:300]}
        result["configs"].append(entry)
        print(f"[attention] {name} {entry}", file=sys.stderr, flush=True)
    timed = [c for c in result["configs"] if "ms" in c]
    result["best"] = min(timed, key=lambda c: c["ms"]) if timed else None
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attention", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--replays", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="three configurations only")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda":
        raise SystemExit("benchmarks.attention times CUDA graphs: it needs --device cuda")
    import transformers
    import triton

    configs = CONFIGS[:3] if args.quick else CONFIGS
    result: dict[str, Any] = {
        "benchmark": "attention", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m benchmarks.attention " + " ".join(argv if argv is not None else sys.argv[1:]),
        "versions": {"torch": torch.__version__, "triton": triton.__version__,
                     "transformers": transformers.__version__, "gpu": torch.cuda.get_device_name(device)},
        "cases": {},
    }
    for name in args.cases.split(","):
        with torch.inference_mode():
            result["cases"][name] = run_case(name, configs, args.replays, device)
        torch.cuda.empty_cache()
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
    if args.json:
        print(json.dumps(result, indent=1))
    for name, case in result["cases"].items():
        best = case["best"]
        print(f"{name}: sdpa {case['sdpa_bucket64_ms']:.3f} ms/step; best triton "
              f"{best and {k: best[k] for k in ('chunk', 'block', 'num_warps', 'num_stages', 'dot', 'ms', 'vs_sdpa', 'tb_s')}}",
              file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
