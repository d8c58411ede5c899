"""The contract on a real run: a strategy at any hook point, driven through short runs of the tiny Janus.

The state is a real :class:`~janus_decoding.core.state.StepState` set up by ``core.runs`` (``run_images`` for image
generation, ``run_text`` for image understanding) on a tiny random checkpoint written once per process
(:func:`tiny_model`). The strategy instance is instrumented: each hook-point method and each declaration is wrapped
so that every call is counted and its inputs and outputs are checked. Properties (named in :class:`ContractError`):

* **hook points**: every declared hook point is called in some declared mode; declarations (``layer_points``,
  ``hidden_layers``, ``exit_layers``, ``prompt_layers``, ``schedule_points``, ``kv_growth``) stay in range;
* **modes**: a run in each declared mode completes;
* **inputs not mutated**: hook arguments and the loop's views (``prompt_ids``, ``generated``, ``history``,
  ``prompt_positions``, ``attention_mask``) are unchanged by each call;
* per hook point, the **output types**: ``input_embeddings`` gives ``[B, T', H]`` matching the prompt positions and
  mask; ``layer`` gives ``None`` or ``LayerKeep`` with positions ``[B, T']`` sorted per row; ``kv_inject`` gives
  ``KVAppend``/``KVEdit`` of the right shapes within ``kv_growth``; ``schedule`` gives ``None``, ``Rebuild`` (one
  prompt per pair) or ``Rollback`` (within the steps done); logits hooks keep shape, dtype, device, finiteness
  and ``-inf`` masks;
* **deterministic**: two runs with fresh instances and the same seeds give the same tokens and hook outputs;
* **rows independent** (unless the instance declares ``couples_rows``): a two-prompt batch (left-padded) gives each
  prompt the tokens it gets alone;
* **CFG pairs stay paired** (image mode): with cond and uncond rows built from the same text, the two rows of each
  pair stay identical at every hook output and at the logits that reach guidance.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from janus_decoding.core.cfg import LAYOUTS, CFGConfig, split_branches
from janus_decoding.core.loop import Sampler
from janus_decoding.core.protocol import KVAppend, KVEdit, LayerKeep, Rebuild, Rollback
from janus_decoding.core.runs import ImageRequest, run_images, run_text
from janus_decoding.plugins.decoder import Decoder
from janus_decoding.plugins.strategy import Strategy

__all__ = ["MODEL_POINTS", "check_on_model", "tiny_model"]

#: Hook points whose contract needs a real state (the logits points are checked here too, as part of a run).
MODEL_POINTS: tuple[str, ...] = ("schedule", "kv_inject", "input_embeddings", "layer", "hidden_states")
#: Two prompts of different token counts, so a batch needs left padding.
PROMPTS: tuple[str, ...] = ("a red cube on a blue sphere", "a cat")
QUESTIONS: tuple[str, ...] = ("what is in the picture?", "colour?")
SEEDS: tuple[int, ...] = (3, 4)
#: Solid pictures for the understanding runs (RGB).
PICTURE_COLOURS: tuple[tuple[int, int, int], ...] = ((200, 30, 30), (20, 90, 220))
TEXT_STEPS = 12
_VIEWS = ("prompt_ids", "generated", "history", "prompt_positions", "attention_mask")


class _Failure(AssertionError):
    """Raised inside a run; carries the property and detail for :class:`ContractError`."""

    def __init__(self, prop: str, detail: str) -> None:
        super().__init__(detail)
        self.prop, self.detail = prop, detail


@functools.lru_cache(maxsize=1)
def tiny_model():
    """The tiny random Janus (seed 0), written once per process into a temporary folder and loaded (CPU, fp32)."""
    from janus_decoding.models.api import load
    from janus_decoding.models.tiny import write_tiny_checkpoint

    root = Path(tempfile.mkdtemp(prefix="janus-kit-"))
    atexit.register(shutil.rmtree, root, True)
    return load(str(write_tiny_checkpoint(root / "tiny", seed=0)))


# -- one instrumented run ---------------------------------------------------------------------------------------
@dataclass
class _Probe:
    """What one run's instrumented instance saw: calls per hook point and a record of every output."""

    calls: Counter = field(default_factory=Counter)
    records: list[tuple[str, Any]] = field(default_factory=list)
    appended: int = 0
    paired: bool = False  # cond and uncond rows are built from the same text (until a Rebuild changes the prompts)


def _snapshot(state, tensors: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    views = {f"state.{name}": getattr(state, name) for name in _VIEWS}
    return [(name, t, t.clone()) for name, t in {**tensors, **views}.items() if isinstance(t, torch.Tensor)]


def _check_unchanged(snapshot) -> None:
    for name, tensor, copy in snapshot:
        if not torch.equal(tensor, copy):
            raise _Failure("inputs not mutated", f"modified `{name}` in place")


#: Identical rows at different batch positions may take different kernel paths (multi-threaded CPU GEMM).
PAIR_RTOL = PAIR_ATOL = 1e-4


def _same_pair(state, rows: torch.Tensor) -> bool:
    cond, uncond = split_branches(rows, state.layout)
    if rows.is_floating_point():
        return bool(torch.isclose(cond.float(), uncond.float(), rtol=PAIR_RTOL, atol=PAIR_ATOL, equal_nan=True).all())
    return torch.equal(cond, uncond)


def _require_pairs(probe: _Probe, state, rows: torch.Tensor, what: str) -> None:
    if state.mode == "image" and probe.paired and not _same_pair(state, rows):
        raise _Failure("CFG pairs stay paired", f"{what} differs between the cond and uncond rows of a pair whose "
                                                "two prompts are identical")


def _check_rows_mask(state, rows: torch.Tensor | None, what: str) -> None:
    if rows is None:
        return
    if rows.dtype != torch.bool or tuple(rows.shape) != (state.rows,):
        raise _Failure("output types", f"{what}: `rows` must be a bool tensor [{state.rows}], got "
                                       f"{rows.dtype} {tuple(rows.shape)}")
    if state.mode == "image" and not _same_pair(state, rows):
        raise _Failure("CFG pairs stay paired", f"{what}: `rows` selects one row of a CFG pair without the other")


def _check_input_embeddings(probe, state, args, out) -> None:
    embeds = args[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 3:
        raise _Failure("output types", f"input_embeddings returned {type(out).__name__}, expected [B, T', H]")
    b, t, h = embeds.shape
    if out.shape[0] != b or out.shape[2] != h or not 1 <= out.shape[1] <= t:
        raise _Failure("shape", f"input_embeddings returned {tuple(out.shape)} from {tuple(embeds.shape)}")
    if out.dtype != embeds.dtype or out.device != embeds.device:
        raise _Failure("dtype", f"input_embeddings returned {out.dtype} on {out.device}, expected {embeds.dtype} on "
                                f"{embeds.device}")
    if state.prompt_positions.shape != out.shape[:2] or state.attention_mask.shape != out.shape[:2]:
        raise _Failure("shape", f"input_embeddings returned {tuple(out.shape)} but state.prompt_positions is "
                                f"{tuple(state.prompt_positions.shape)} and state.attention_mask "
                                f"{tuple(state.attention_mask.shape)}")
    if not bool(out.isfinite().all()):
        raise _Failure("no NaN", "input_embeddings returned non-finite embeddings")
    _require_pairs(probe, state, out, "the returned embeddings")


def _check_layer(probe, state, args, out) -> None:
    index, hidden = args
    if out is None:
        return
    if not isinstance(out, LayerKeep):
        raise _Failure("output types", f"layer returned {type(out).__name__}, expected LayerKeep or None")
    kept, (b, t) = out.positions, hidden.shape[:2]
    if not isinstance(kept, torch.Tensor) or kept.dtype != torch.long or kept.dim() != 2 or kept.shape[0] != b \
            or not 1 <= kept.shape[1] <= t or kept.device != hidden.device:
        what = (kept.dtype, tuple(kept.shape)) if isinstance(kept, torch.Tensor) else type(kept).__name__
        raise _Failure("shape", f"layer {index}: LayerKeep.positions must be long [B={b}, T'≤{t}] on "
                                f"{hidden.device}, got {what}")
    if bool((kept < 0).any() | (kept >= t).any()):
        raise _Failure("output types", f"layer {index}: LayerKeep.positions outside [0, {t})")
    if kept.shape[1] > 1 and not bool((kept[:, 1:] > kept[:, :-1]).all()):
        raise _Failure("output types", f"layer {index}: LayerKeep.positions must be strictly increasing per row")
    _require_pairs(probe, state, kept, f"layer {index}: LayerKeep.positions")


def _check_hidden_states(probe, state, args, out) -> None:
    if out is not None:
        raise _Failure("output types", f"hidden_states returned {type(out).__name__}; it is read-only (None)")


def _check_kv_inject(probe, state, args, out) -> None:
    if out is None:
        return
    if not isinstance(out, (list, tuple)):
        raise _Failure("output types", f"kv_inject returned {type(out).__name__}, expected a list")
    adapter = state.adapter
    for action in out:
        if isinstance(action, KVAppend):
            given = [x for x in (action.embeds, action.ids) if x is not None]
            if len(given) != 1:
                raise _Failure("output types", "KVAppend needs exactly one of `embeds` and `ids`")
            x = given[0]
            if action.embeds is not None:
                ok = x.dim() == 3 and x.shape[0] == state.rows and x.shape[2] == adapter.hidden_size \
                    and x.dtype == adapter.dtype
                want = f"[{state.rows}, K, {adapter.hidden_size}] {adapter.dtype}"
            else:
                ok = x.dim() == 2 and x.shape[0] == state.rows and x.dtype == torch.long
                want = f"long [{state.rows}, K]"
            if not ok or x.shape[1] < 1 or x.device != adapter.device:
                raise _Failure("shape", f"KVAppend: expected {want} on {adapter.device}, got {x.dtype} "
                                        f"{tuple(x.shape)} on {x.device}")
            _check_rows_mask(state, action.rows, "KVAppend")
            _require_pairs(probe, state, x, "KVAppend's entries")
            probe.appended += x.shape[1]
        elif isinstance(action, KVEdit):
            if not (isinstance(action.layer, int) and 0 <= action.layer < adapter.num_layers):
                raise _Failure("output types", f"KVEdit.layer {action.layer!r} outside [0, {adapter.num_layers})")
            written = state.cache.written(action.layer)
            if not (isinstance(action.slot, int) and 0 <= action.slot < written):
                raise _Failure("output types", f"KVEdit.slot {action.slot!r} outside the {written} written slots")
            target = (state.rows, adapter.num_kv_heads, adapter.head_dim)
            for name in ("d_key", "d_value"):
                d = getattr(action, name)
                try:
                    ok = d is None or torch.broadcast_shapes(d.shape, target) == target
                except RuntimeError:
                    ok = False
                if not ok:
                    raise _Failure("shape", f"KVEdit.{name} of shape {tuple(d.shape)} does not broadcast to "
                                            f"{list(target)}")
            _check_rows_mask(state, action.rows, "KVEdit")
        else:
            raise _Failure("output types", f"kv_inject returned a {type(action).__name__}; expected KVAppend/KVEdit")


def _check_schedule(probe, state, args, out) -> None:
    if out is None:
        return
    if isinstance(out, Rollback):
        if not (isinstance(out.steps, int) and 1 <= out.steps <= state.step):
            raise _Failure("output types", f"Rollback.steps {out.steps!r} outside [1, {state.step}] at step "
                                           f"{state.step}")
        if not (isinstance(out.stream, int) and out.stream >= 0):
            raise _Failure("output types", f"Rollback.stream must be an int ≥ 0, got {out.stream!r}")
    elif isinstance(out, Rebuild):
        if state.step >= state.total_steps:
            raise _Failure("output types", "Rebuild after the last token (only Rollback or None may end a run)")
        prompts = out.prompts
        if not isinstance(prompts, list) or len(prompts) != state.num_pairs \
                or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise _Failure("output types", f"Rebuild.prompts must be {state.num_pairs} non-empty strings (one per "
                                           f"pair), got {prompts!r}")
    else:
        raise _Failure("output types", f"schedule returned {type(out).__name__}; expected None, Rebuild, Rollback")


def _check_logits(probe, state, args, out, point: str) -> None:
    x = args[0]
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise _Failure("shape", f"{point} returned {got}, expected {tuple(x.shape)}")
    if out.dtype != x.dtype or out.device != x.device:
        raise _Failure("dtype", f"{point} returned {out.dtype} on {out.device}, expected {x.dtype} on {x.device}")
    if bool(out.isnan().any()):
        raise _Failure("no NaN", f"{point} produced NaN")
    if bool(out.isposinf().any()):
        raise _Failure("no +inf", f"{point} produced +inf")
    if not bool(out.isfinite().any(-1).all()):
        raise _Failure("a finite logit in every row", f"{point} left a row with no finite logit")
    if bool((x.isneginf() & ~out.isneginf()).any()):
        raise _Failure("-inf never reopened", f"{point} turned a -inf logit finite")
    if point == "pre_logits":
        _require_pairs(probe, state, out, "the pre_logits output")


_CHECKS: dict[str, Callable[..., None]] = {
    "input_embeddings": _check_input_embeddings, "layer": _check_layer, "hidden_states": _check_hidden_states,
    "kv_inject": _check_kv_inject, "schedule": _check_schedule,
    "pre_logits": functools.partial(_check_logits, point="pre_logits"),
    "post_cfg": functools.partial(_check_logits, point="post_cfg"),
}

# declaration → (low, high inclusive; None = unbounded) from the state
_RANGES: dict[str, Callable[[Any], tuple[int, int | None]]] = {
    "layer_points": lambda s: (0, s.num_layers - 1),
    "hidden_layers": lambda s: (0, s.num_layers),
    "prompt_layers": lambda s: (0, s.num_layers),
    # 0 = after the prefill, total_steps = after the last token; a point past that just never fires
    "schedule_points": lambda s: (0, None),
}


def _record(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return [_record(v) for v in value]
    if isinstance(value, dict):
        return {k: _record(v) for k, v in value.items()}
    if isinstance(value, (LayerKeep, KVAppend, KVEdit, Rebuild, Rollback)):
        return (type(value).__name__, _record(vars(value)))
    return value


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _instrument(strategy: Strategy, probe: _Probe) -> None:
    for point in strategy.hooks:
        original = getattr(strategy, point)

        def hook(state, *args, _point=point, _original=original):
            tensors = {f"argument {i}": a for i, a in enumerate(args) if isinstance(a, torch.Tensor)}
            if _point == "hidden_states":
                tensors = {f"hidden[{k}]": v for k, v in args[0].items()}
            before = _snapshot(state, tensors)
            out = _original(state, *args)
            probe.calls[_point] += 1
            _check_unchanged(before)
            _CHECKS[_point](probe, state, args, out)
            probe.records.append((_point, _record(out)))
            if isinstance(out, Rebuild):  # the core rebuilds uncond rows from the original negative prompts
                probe.paired = False
            return out

        setattr(strategy, point, hook)
    for name, bounds in _RANGES.items():
        original = getattr(strategy, name)

        def declared(state, _name=name, _original=original, _bounds=bounds):
            values = _original(state)
            low, high = _bounds(state)
            bad = [v for v in values if not (isinstance(v, int) and low <= v and (high is None or v <= high))]
            if bad:
                raise _Failure("hook points", f"`{_name}` returned {bad[0]!r}, outside [{low}, "
                                              f"{'∞' if high is None else high}]")
            return values

        setattr(strategy, name, declared)
    exits = strategy.exit_layers

    def declared_exits(state, _original=exits):
        values = _original(state)
        bad = [v for v in values if not (isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], int)
                                         and 0 <= v[0] <= state.num_layers and isinstance(v[1], bool))]
        if bad:
            raise _Failure("hook points", f"`exit_layers` returned {bad[0]!r}, not a (layer in [0, "
                                          f"{state.num_layers}], final_norm bool) pair")
        return values

    strategy.exit_layers = declared_exits


class _Watch:
    """The decoder as the loop sees it, keeping the logits that reach guidance (after the pre-logits hooks)."""

    def __init__(self, decoder: Decoder, probe: _Probe) -> None:
        self._decoder, self._probe = decoder, probe
        self.branch_logits: list[torch.Tensor] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._decoder, name)

    def pre_logits(self, state, logits: torch.Tensor) -> torch.Tensor:
        out = self._decoder.pre_logits(state, logits)
        if self._probe.paired:
            self.branch_logits.append(out.clone())
        return out


@dataclass(frozen=True)
class _Case:
    mode: str
    rows: tuple[int, ...]  # which of PROMPTS/QUESTIONS (and SEEDS) to run together
    layout: str = LAYOUTS[0]
    paired: bool = False


def _run(cls: type[Strategy], params: dict[str, Any], case: _Case) -> tuple[torch.Tensor, _Probe]:
    model = tiny_model()
    strategy = cls(**params)
    probe = _Probe(paired=case.paired)
    _instrument(strategy, probe)
    decoder = Decoder([strategy])
    watch = _Watch(decoder, probe)
    sampler = Sampler(rng="row")
    with torch.inference_mode():
        if case.mode == "image":
            requests = [ImageRequest(PROMPTS[i], SEEDS[i], 0, PROMPTS[i] if case.paired else None)
                        for i in case.rows]
            result = run_images(model, watch, requests, cfg=CFGConfig(layout=case.layout), sampler=sampler)
        else:
            rows = [model.understanding_prompt_ids(QUESTIONS[i], 1) for i in case.rows]
            pixels = [model.preprocess_images([_picture(model, PICTURE_COLOURS[i])]) for i in case.rows]
            result = run_text(model, watch, rows, max_new_tokens=TEXT_STEPS, sampler=sampler,
                              seeds=[SEEDS[i] for i in case.rows], pixel_values=pixels,
                              prompts=[QUESTIONS[i] for i in case.rows], eos_id=None)
    growth = int(strategy.kv_growth(result.state))
    if probe.appended > growth:
        raise _Failure("output types", f"appended {probe.appended} KV entries in one run but `kv_growth` declared "
                                       f"{growth}")
    if case.paired:
        for step, logits in enumerate(watch.branch_logits):
            if not _same_pair(result.state, logits):
                raise _Failure("CFG pairs stay paired", f"at step {step} the cond and uncond logits of a pair whose "
                                                        "two prompts are identical differ before guidance")
    return result.tokens.clone(), probe


def _picture(model, colour: tuple[int, int, int]):
    from PIL import Image

    return Image.new("RGB", (model.image_size, model.image_size), colour)


def check_on_model(cls: type[Strategy], params: dict[str, Any], label: str,
                   fail: Callable[[str, str, str], Exception], *, cfg_pairs: bool = True) -> None:
    """Run the model-backed contract for ``cls(**params)``; raise ``fail(label, property, detail)``.

    :param cfg_pairs: check that identical cond/uncond rows stay identical (off for a strategy that must treat the
        two branches differently, e.g. one that steers the cond rows only).
    """
    calls: Counter = Counter()
    couples = cls(**params).couples_rows
    both = tuple(range(len(PROMPTS)))
    for mode in cls.modes:
        if mode == "image" and "image" in cls.needs:
            continue  # image generation has no input image: this mode cannot be exercised here
        layouts = LAYOUTS if mode == "image" else LAYOUTS[:1]
        for layout in layouts:
            where = f"{mode} mode" + (f", layout {layout}" if mode == "image" else "")

            def attempt(case: _Case) -> tuple[torch.Tensor, _Probe]:
                try:
                    tokens, probe = _run(cls, params, case)
                except _Failure as exc:
                    raise fail(label, exc.prop, f"{exc.detail} ({where})") from None
                except Exception as exc:  # a crash in a declared mode is the finding
                    raise fail(label, "modes", f"a run on the tiny model raised {type(exc).__name__}: {exc} "
                                               f"({where})") from exc
                calls.update(probe.calls)
                return tokens, probe

            tokens, first = attempt(_Case(mode, both, layout))
            again, second = attempt(_Case(mode, both, layout))
            if not torch.equal(tokens, again) or not _equal(first.records, second.records):
                raise fail(label, "deterministic", f"two runs with fresh instances and the same seeds differ ({where})")
            if mode == "image" and cfg_pairs:
                attempt(_Case(mode, both, layout, paired=True))
            if not couples:
                for i in both:
                    alone, _ = attempt(_Case(mode, (i,), layout))
                    if not torch.equal(alone[0], tokens[i]):
                        raise fail(label, "rows independent", f"prompt {i} gives other tokens in a two-prompt batch "
                                                              f"than alone: {tokens[i].tolist()} vs "
                                                              f"{alone[0].tolist()}; declare `couples_rows = True` "
                                                              f"if this is intended ({where})")
    missing = [h for h in cls.hooks if calls[h] == 0]
    if missing:
        raise fail(label, "hook points", f"declares `{missing[0]}` but it was never called in short runs of the "
                                         f"tiny model in its modes ({', '.join(cls.modes)}); check its declarations "
                                         f"(`layer_points`, `schedule_points`, ...)")
