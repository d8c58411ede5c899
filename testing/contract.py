"""``check_strategy``: the contract every strategy must keep, on hypothesis tensors and on short runs of a tiny model.

The checks, each named in the failure message (:class:`ContractError`):

* **hook points** — each declared hook has a method of the subclass's own, and no hook-point method goes undeclared;
  **modes** — the declared modes are known and not empty;
* **spec round-trip** — ``Decoder.from_spec(instance.to_spec())`` rebuilds an equal configuration;
* **parameter range** — for each ``Param`` with ``low``/``high``/``choices`` a value outside is refused with a
  ``StrategyError`` naming the parameter;

and, at the ``pre_logits`` and ``post_cfg`` hook points, in every declared mode and both CFG layouts:

* **shape**, **dtype**, **device** kept; **inputs not mutated** (logits and history);
* **no NaN**, **no +inf**, **a finite logit in every row**; **-inf never reopened**;
* **rows independent** (unless the class declares ``couples_rows``): a pair's output does not change when the other
  pairs' logits and histories do;
* **CFG pairs stay paired** (``pre_logits``, image mode): identical cond and uncond rows give identical outputs;
* **deterministic**: a fresh instance on a fresh state gives the same output.

Strategies at other hook points (``hidden_states``, ``layer``, ``kv_inject``, ``schedule``, ``input_embeddings``), and
those that declare early exits (``exit_layers``), cannot run on loose tensors; for them the per-hook checks run inside
short real runs of the tiny model instead. Every strategy then goes through those runs
(:mod:`janus_decoding.testing.model_contract`): declared hook points actually called, each declared mode works,
outputs of the declared types, determinism, rows independent on a padded two-prompt batch, CFG pairs kept paired.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any, Iterator

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from janus_decoding.core.cfg import LAYOUTS, guidance_weight, guide_rows, merge_branches, split_branches
from janus_decoding.core.protocol import Trace
from janus_decoding.plugins.decoder import Decoder
from janus_decoding.plugins.hookspecs import HOOK_POINTS
from janus_decoding.plugins.registry import StrategyRegistry
from janus_decoding.plugins.strategy import MODES, Param, Strategy, StrategyError

from .model_contract import check_on_model
from .strategies import dtypes, histories, logits

__all__ = ["ContractError", "StubState", "check_strategy", "run_contract"]

#: Hook points whose contract is also checked on hypothesis tensors (when a strategy uses no other hook point).
LOGITS_POINTS: tuple[str, ...] = ("pre_logits", "post_cfg")


class ContractError(AssertionError):
    """A strategy broke its contract; the message starts with the strategy and the broken property."""


class StubState:
    """A light stand-in for :class:`~janus_decoding.core.state.StepState` with what logits hooks may read.

    ``history``/``history_valid`` ``[P, L]``, ``generated`` ``[P, total_steps]``, ``step``/``step_t``, ``mode``,
    ``layout``, ``num_pairs``, ``adapter.device``, ``memory``, ``trace`` (``write()``), ``step_buffer()``,
    ``current_cfg_weight()`` and ``guide()``. Model services (heads, attention, nested answers) are absent on purpose.
    """

    def __init__(self, *, mode: str, layout: str, num_pairs: int, history: torch.Tensor,
                 history_valid: torch.Tensor, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 total_steps: int = 8, step: int = 0, cfg_weight: float = 5.0) -> None:
        device = torch.device(device)
        self.adapter = SimpleNamespace(device=device, dtype=dtype, kind="janus", name="stub", num_layers=2,
                                       image_grid=(2, total_steps // 2) if mode == "image" else None)
        self.mode = mode
        self.layout = layout
        self.num_pairs = num_pairs
        self.total_steps = total_steps
        self.history = history.to(device)  # [P, L]
        self.history_valid = history_valid.to(device)  # [P, L]
        self.history_offset = 0
        self.generated = torch.zeros((num_pairs, total_steps), dtype=torch.long, device=device)
        self.step = step
        self.step_t = torch.tensor(step, dtype=torch.long, device=device)
        self.cfg_weight = torch.tensor(cfg_weight, device=device)
        self.cfg_schedule = "constant"
        self.last_probs: torch.Tensor | None = None
        self.memory: dict[str, Any] = {}
        self.trace = Trace()

    @property
    def rows(self) -> int:
        return 2 * self.num_pairs if self.mode == "image" else self.num_pairs

    def current_cfg_weight(self) -> torch.Tensor:
        return guidance_weight(self.cfg_weight, self.cfg_schedule, self.step_t, self.total_steps)

    def guide(self, rows: torch.Tensor) -> torch.Tensor:
        return guide_rows(rows, self.layout, self.current_cfg_weight())

    def step_buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if name not in self.trace.buffers:
            self.trace.buffers[name] = torch.zeros((self.total_steps, *shape), dtype=dtype,
                                                   device=self.adapter.device)
        return self.trace.buffers[name]


def check_strategy(cls: type[Strategy], /, **params: Any) -> None:
    """Check the contract of strategy class ``cls`` configured with ``params``; raise :class:`ContractError`.

    :param cls: a :class:`~janus_decoding.plugins.strategy.Strategy` subclass.
    :param params: its parameters (as in a spec); the defaults where left out.
    :raises ContractError: naming the strategy and the first broken property.
    """
    run_contract(cls, params)


def run_contract(cls: type[Strategy], params: dict[str, Any], *, max_examples: int = 40,
                 device: torch.device | str = "cpu", on_model: bool = True, cfg_pairs: bool = True) -> None:
    """:func:`check_strategy` with its options spelled out.

    :param max_examples: hypothesis examples per logits hook point and mode.
    :param device: where the hypothesis tensors live (the tiny-model runs are on CPU).
    :param on_model: run the model-backed part (:func:`~janus_decoding.testing.model_contract.check_on_model`).
    :param cfg_pairs: require identical cond/uncond rows to stay identical in image mode.
    """
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise ContractError(f"check_strategy: {cls!r} is not a Strategy subclass")
    label = cls.name or cls.__name__
    _check_hooks_and_modes(cls, label)
    instance = _build(cls, params, label)
    _check_spec_round_trip(cls, instance, label)
    _check_parameter_ranges(cls, params, label)
    # Loose tensors serve strategies that read only logits and history; one that needs an input image, a Janus
    # model (services such as image features) or early exits' logits is checked on the model runs alone.
    if all(h in LOGITS_POINTS for h in cls.hooks) and not cls.needs and not _own_method(cls, "exit_layers"):
        for point in cls.hooks:
            for mode in cls.modes:
                _check_logits_point(cls, params, label, point, mode, max_examples, torch.device(device))
    if on_model:
        check_on_model(cls, params, label, _fail, cfg_pairs=cfg_pairs)


def _fail(label: str, prop: str, detail: str) -> ContractError:
    return ContractError(f"`{label}` broke `{prop}`: {detail}")


# -- static checks --------------------------------------------------------------------------------------------
def _own_method(cls: type, name: str) -> bool:
    return any(name in k.__dict__ for k in cls.__mro__ if k is not Strategy and issubclass(k, Strategy))


def _check_hooks_and_modes(cls: type[Strategy], label: str) -> None:
    if not cls.hooks:
        raise _fail(label, "hook points", "declares no hook points (`hooks = ()`), so the loop never calls it")
    for h in cls.hooks:
        if h not in HOOK_POINTS or not _own_method(cls, h):
            raise _fail(label, "hook points", f"declares `{h}` but defines no `{h}` method of its own")
    undeclared = [h for h in HOOK_POINTS if h not in cls.hooks and _own_method(cls, h)]
    if undeclared:
        raise _fail(label, "hook points", f"defines `{undeclared[0]}` but does not declare it in `hooks`, so the "
                                          "loop never calls it")
    if not cls.modes or any(m not in MODES for m in cls.modes):
        raise _fail(label, "modes", f"declares modes {cls.modes!r}; expected a non-empty subset of {MODES}")


def _build(cls: type[Strategy], params: dict[str, Any], label: str) -> Strategy:
    try:
        return cls(**params)
    except StrategyError as exc:
        raise _fail(label, "construction", f"refused the parameters under test {params!r}: {exc}") from exc


def _check_spec_round_trip(cls: type[Strategy], instance: Strategy, label: str) -> None:
    registry = StrategyRegistry()
    registry.register(cls, distribution="check_strategy")
    spec = instance.to_spec()
    try:
        decoder = Decoder.from_spec(spec, registry=registry)
    except Exception as exc:  # any failure to parse back is the finding
        raise _fail(label, "spec round-trip", f"Decoder.from_spec({spec!r}) raised {type(exc).__name__}: {exc}") \
            from exc
    rebuilt = decoder.strategies[0] if len(decoder.strategies) == 1 else None
    if rebuilt is None or type(rebuilt) is not cls or rebuilt.config != instance.config:
        got = None if rebuilt is None else rebuilt.config
        raise _fail(label, "spec round-trip", f"{spec!r} rebuilt config {got!r}, expected {instance.config!r}")


def _outside_values(p: Param) -> Iterator[tuple[Any, str]]:
    kinds = p.kind.split("|")
    numeric = [k for k in kinds if k in ("int", "float", "list[int]")]
    if numeric:
        is_int = numeric[0] in ("int", "list[int]")
        wrap = (lambda v: [v]) if numeric[0].startswith("list[") else (lambda v: v)
        if p.low is not None:
            if is_int:
                bad = math.floor(p.low) if p.low_open else math.ceil(p.low) - 1
            else:
                bad = float(p.low) if p.low_open else float(p.low) - 1.0
            yield wrap(bad), "below `low`"
        if p.high is not None:
            if is_int:
                bad = math.ceil(p.high) if p.high_open else math.floor(p.high) + 1
            else:
                bad = float(p.high) if p.high_open else float(p.high) + 1.0
            yield wrap(bad), "above `high`"
    if p.choices is not None and "str" in kinds:
        bad = "not-a-choice"
        while bad in p.choices:
            bad += "!"
        yield bad, "not in `choices`"


def _check_parameter_ranges(cls: type[Strategy], params: dict[str, Any], label: str) -> None:
    for p in cls.params:
        for bad, why in _outside_values(p):
            try:
                cls(**{**params, p.name: bad})
            except StrategyError as exc:
                if p.name not in str(exc):
                    raise _fail(label, "parameter range", f"`{p.name}`={bad!r} ({why}) was refused, but the "
                                                          f"message does not name `{p.name}`: {exc}") from exc
                continue
            raise _fail(label, "parameter range", f"`{p.name}`={bad!r} ({why}, range {p.describe_range()}) was "
                                                  "accepted; it must raise StrategyError naming the parameter")


# -- tensor checks --------------------------------------------------------------------------------------------
def _pair_rows(mode: str, point: str, layout: str, num_pairs: int, j: int) -> list[int]:
    """The logits rows that belong to pair ``j`` at this hook point."""
    if mode == "image" and point == "pre_logits":
        return [2 * j, 2 * j + 1] if layout == "interleaved" else [j, num_pairs + j]
    return [j]


@st.composite
def _cases(draw, mode: str, point: str) -> dict[str, Any]:
    p = draw(st.integers(1, 3))
    v = draw(st.integers(2, 12))
    dt = draw(dtypes())
    layout = draw(st.sampled_from(LAYOUTS))
    rows = 2 * p if mode == "image" and point == "pre_logits" else p
    length = draw(st.integers(0, 8))
    case = {"p": p, "v": v, "layout": layout, "dtype": dt,
            "logits": draw(logits(rows, v, dtype=dt)), "history": draw(histories(p, length, v)),
            "other_logits": draw(logits(rows, v, dtype=dt)), "other_history": draw(histories(p, length, v)),
            "j": draw(st.integers(0, p - 1))}
    if mode == "image" and point == "pre_logits":
        cond = draw(logits(p, v, dtype=dt))
        case["paired"] = merge_branches(cond, cond, layout)
    return case


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        torch.testing.assert_close(a, b, equal_nan=True)
    except AssertionError:
        return False
    return True


def _check_logits_point(cls: type[Strategy], params: dict[str, Any], label: str, point: str, mode: str,
                        max_examples: int, device: torch.device) -> None:
    where = f"{point}, {mode} mode"

    def call(x: torch.Tensor, hist: tuple[torch.Tensor, torch.Tensor], case: dict[str, Any]) -> torch.Tensor:
        strategy = cls(**params)
        state = StubState(mode=mode, layout=case["layout"], num_pairs=case["p"], history=hist[0],
                          history_valid=hist[1], device=device, dtype=case["dtype"])
        strategy.check_run(state)
        strategy.begin(state)
        return getattr(strategy, point)(state, x)

    @settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(_cases(mode, point))
    def run(case: dict[str, Any]) -> None:
        x = case["logits"].to(device)
        hist = tuple(t.to(device) for t in case["history"])
        x0, h0 = x.clone(), tuple(t.clone() for t in hist)
        out = call(x, hist, case)
        ctx = f"({where}, layout {case['layout']}, dtype {case['dtype']}, logits {x0.tolist()})"
        if not isinstance(out, torch.Tensor):
            raise _fail(label, "shape", f"returned {type(out).__name__}, not a tensor {ctx}")
        if not _same(x, x0):
            raise _fail(label, "inputs not mutated", f"modified its `logits` argument in place {ctx}")
        if not all(_same(a, b) for a, b in zip(hist, h0)):
            raise _fail(label, "inputs not mutated", f"modified `state.history` in place {ctx}")
        if out.shape != x.shape:
            raise _fail(label, "shape", f"returned {tuple(out.shape)}, expected {tuple(x.shape)} {ctx}")
        if out.dtype != x.dtype:
            raise _fail(label, "dtype", f"returned {out.dtype}, expected {x.dtype} {ctx}")
        if out.device != x.device:
            raise _fail(label, "device", f"returned a tensor on {out.device}, expected {x.device} {ctx}")
        if out.isnan().any():
            raise _fail(label, "no NaN", f"produced NaN from NaN-free input: {out.tolist()} {ctx}")
        if out.isposinf().any():
            raise _fail(label, "no +inf", f"produced +inf: {out.tolist()} {ctx}")
        if not out.isfinite().any(-1).all():
            raise _fail(label, "a finite logit in every row", f"left a row with no finite logit: {out.tolist()} {ctx}")
        reopened = x0.isneginf() & ~out.isneginf()
        if reopened.any():
            raise _fail(label, "-inf never reopened", f"turned -inf at {reopened.nonzero().tolist()} into "
                                                      f"{out[reopened].tolist()} {ctx}")
        again = call(x0.clone(), tuple(t.clone() for t in h0), case)
        if not _same(out, again):
            raise _fail(label, "deterministic", f"two runs on the same input differ: {out.tolist()} vs "
                                                f"{again.tolist()} {ctx}")
        if not cls.couples_rows and case["p"] > 1:
            j = case["j"]
            rows = _pair_rows(mode, point, case["layout"], case["p"], j)
            mixed = case["other_logits"].to(device).clone()
            mixed[rows] = x0[rows]
            other_hist = tuple(t.to(device).clone() for t in case["other_history"])
            for t, own in zip(other_hist, h0):
                t[j] = own[j]
            out_mixed = call(mixed, other_hist, case)
            if not _close(out_mixed[rows], out[rows]):
                raise _fail(label, "rows independent", f"the output of pair {j} (rows {rows}) changed when only "
                                                       f"the other rows changed: {out[rows].tolist()} vs "
                                                       f"{out_mixed[rows].tolist()}; declare `couples_rows = True` "
                                                       f"if this is intended {ctx}")
        if "paired" in case:
            paired = call(case["paired"].to(device), hist, case)
            cond, uncond = split_branches(paired, case["layout"])
            if not _same(cond, uncond):
                raise _fail(label, "CFG pairs stay paired", f"identical cond and uncond rows gave different outputs "
                                                            f"{cond.tolist()} vs {uncond.tolist()} {ctx}")

    run()
