"""Where a step's GPU time goes: one call under ``torch.profiler``, kernels grouped into GEMM, attention and the rest.

The groups answer the question the fast path keeps asking (what bounds the step: weight-reading GEMMs, KV-reading
attention, or the many small kernels between them). Kernels replayed from CUDA graphs are counted too (CUPTI traces
graph nodes). Used by ``benchmarks.generate --profile``.
"""

from __future__ import annotations

import re
from typing import Any, Callable

import torch

GROUPS = {  # first match wins; names of cuBLAS (nvjet, sm90_xmma, cutlass gemm), SDPA and flash kernels
    "gemm": re.compile(r"nvjet|gemm|xmma|cublas|splitk", re.I),
    "attention": re.compile(r"fmha|flash|attention|efficient_attention", re.I),
}


def _group(name: str) -> str:
    for label, pattern in GROUPS.items():
        if pattern.search(name):
            return label
    return "other"


# Idle stretches of the GPU by length: between the kernels of a graph replay (launch latency), short waits, and
# the host keeping the GPU waiting (prefill launches, captures, the eager warm-up step, the run's setup).
IDLE_CLASSES = (("under_5us", 5.0), ("5us_to_100us", 100.0), ("over_100us", float("inf")))


def idle_time(spans: list[tuple[float, float, str]], top: int = 12) -> dict[str, Any]:
    """From kernels' (start, end in µs, name): the busy span and the idle time inside it, by the length of each idle
    stretch (``IDLE_CLASSES``) — what separates GPU time from the wall time of a call — and which kernels the idle
    stretches of 5 µs or more lie between (``between``: "before → after", count, µs)."""
    if not spans:
        return {}
    spans = sorted(spans)
    classes = {name: {"us": 0.0, "count": 0} for name, _ in IDLE_CLASSES}
    busy_until, last = spans[0][1], spans[0][2]
    largest: list[tuple[float, float]] = []  # (gap, where it starts, µs after the first kernel)
    between: dict[str, list[float]] = {}
    for start, end, name in spans[1:]:
        gap = start - busy_until
        if gap > 0:
            largest = sorted(largest + [(gap, busy_until - spans[0][0])], reverse=True)[:8]
            if gap >= IDLE_CLASSES[0][1]:
                entry = between.setdefault(f"{last[:50]} → {name[:50]}", [0, 0.0])
                entry[0] += 1
                entry[1] += gap
            for label, bound in IDLE_CLASSES:
                if gap < bound:
                    classes[label]["us"] += gap
                    classes[label]["count"] += 1
                    break
        if end >= busy_until:
            busy_until, last = end, name
    span = busy_until - spans[0][0]
    ranked = sorted(between.items(), key=lambda item: -item[1][1])[:top]
    return {"span_us": round(span, 1), "largest": [{"us": round(g, 1), "at_us": round(a, 1)} for g, a in largest],
            "classes": {k: {"us": round(v["us"], 1), "count": v["count"]} for k, v in classes.items()},
            "between": [{"kernels": k, "count": c, "us": round(us, 1)} for k, (c, us) in ranked]}


def one_step(spans: list[tuple[float, float, str]], steps: int) -> list[dict[str, Any]]:
    """The kernels of one step in the middle of a run, in order, with their µs and the idle µs before each: the
    step is cut at a kernel that runs once a step (the first name seen ``steps - 1`` or ``steps`` times)."""
    spans = sorted(spans)
    counts: dict[str, int] = {}
    for _, _, name in spans:
        counts[name] = counts.get(name, 0) + 1
    marker = next((name for _, _, name in spans if counts[name] in (steps - 1, steps)), None)
    if marker is None:
        return []
    at = [i for i, (_, _, name) in enumerate(spans) if name == marker]
    first, last = at[len(at) // 2], at[len(at) // 2 + 1]
    return [{"name": name[:90], "us": round(end - start, 2), "idle_before_us": round(start - spans[i - 1][1], 2)}
            for i, (start, end, name) in enumerate(spans[first + 1:last + 1], start=first + 1)]


def kernel_breakdown(fn: Callable[[], Any], steps: int, top: int = 40) -> dict[str, Any]:
    """Run ``fn`` once under the profiler; GPU microseconds per step by group, kernel launches per step, top kernels."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    spans: list[tuple[float, float]] = []
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time > 0:
            kernels.setdefault(event.name, []).append(event.device_time)  # microseconds
            spans.append((event.time_range.start, event.time_range.end, event.name))
    groups: dict[str, dict[str, float]] = {}
    for name, times in kernels.items():
        entry = groups.setdefault(_group(name), {"us_per_step": 0.0, "kernels_per_step": 0.0})
        entry["us_per_step"] += sum(times) / steps
        entry["kernels_per_step"] += len(times) / steps
    ranked = sorted(kernels.items(), key=lambda item: -sum(item[1]))[:top]
    return {
        "steps": steps,
        "groups": {k: {m: round(v, 1) for m, v in e.items()} for k, e in sorted(groups.items())},
        "total_us_per_step": round(sum(e["us_per_step"] for e in groups.values()), 1),
        "idle": idle_time(spans),
        "one_step": one_step(spans, steps),
        "top": [{"name": name[:120], "group": _group(name), "us_per_step": round(sum(t) / steps, 1),
                 "calls_per_step": round(len(t) / steps, 2)} for name, t in ranked],
    }
