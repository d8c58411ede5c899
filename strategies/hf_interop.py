"""transformers interop, both ways: ``hf_processor`` runs a transformers ``LogitsProcessor`` as a strategy, and
:func:`as_logits_processor` exports a logits-only strategy as a ``LogitsProcessor`` for ``model.generate``.

``hf_processor(processor="TopKLogitsProcessor", top_k=5)``: the class is looked up BY NAME among the
``LogitsProcessor`` subclasses defined in ``transformers.generation.logits_process`` — never an import path, never
pickled code. Sampling-only transforms are named ``*LogitsWarper`` there (``TopKLogitsWarper``,
``TopPLogitsWarper``, ``TemperatureLogitsWarper``, …); ``*LogitsProcessor`` and ``*LogitsWarper`` spellings are
aliases of each other. Every other parameter is forwarded to the processor's own constructor, which validates it
(its error names the parameter). At ``post_cfg`` the processor is called as transformers' sampling loop calls it:
``processor(input_ids, scores)`` with ``input_ids`` the state's history up to this step (text mode: prompt, left
padding included, plus the generated ids; image mode: the image tokens generated so far) and ``scores`` the guided
logits ``[P, V]``. The history grows by one column per step, so the stage is not graph-safe.
"""

from __future__ import annotations

import functools
import inspect
from types import SimpleNamespace
from typing import Any

import torch
from transformers.generation import logits_process
from transformers.generation.logits_process import LogitsProcessor

from janus_decoding.core.protocol import Trace
from janus_decoding.plugins.strategy import Param, Strategy, StrategyError

__all__ = ["HFProcessor", "StrategyLogitsProcessor", "as_logits_processor", "resolve_processor"]

_SUFFIXES = ("LogitsProcessor", "LogitsWarper")
#: Processors that do the loop's own job (guidance needs the doubled batch the core owns): refused by name.
_REFUSED = {
    "ClassifierFreeGuidanceLogitsProcessor": "guidance is the decoder's `cfg` stage",
    "UnbatchedClassifierFreeGuidanceLogitsProcessor": "guidance is the decoder's `cfg` stage",
    "DiaClassifierFreeGuidanceLogitsProcessor": "guidance is the decoder's `cfg` stage",
}
#: Hook points a strategy may use to be exported as a LogitsProcessor (text mode has no guidance between them).
_EXPORTABLE = ("pre_logits", "post_cfg")


@functools.lru_cache(maxsize=1)
def _processor_classes() -> dict[str, type[LogitsProcessor]]:
    """Name → class of every concrete LogitsProcessor defined in ``transformers.generation.logits_process``."""
    return {name: obj for name, obj in vars(logits_process).items()
            if inspect.isclass(obj) and issubclass(obj, LogitsProcessor) and obj is not LogitsProcessor
            and obj.__module__ == logits_process.__name__}


def resolve_processor(name: str) -> type[LogitsProcessor]:
    """The transformers LogitsProcessor class called ``name`` (``*LogitsProcessor`` ↔ ``*LogitsWarper`` aliases)."""
    known = _processor_classes()
    candidates = [name]
    for this, other in (_SUFFIXES, _SUFFIXES[::-1]):
        if name.endswith(this):
            candidates.append(name[: -len(this)] + other)
    for candidate in candidates:
        if candidate in _REFUSED:
            raise StrategyError(f"`hf_processor`: `processor` {name!r} is refused: {_REFUSED[candidate]}")
        if candidate in known:
            return known[candidate]
    raise StrategyError(f"`hf_processor`: `processor` must name a LogitsProcessor class of transformers, got "
                        f"{name!r}; known: {', '.join(sorted(n for n in known if n not in _REFUSED))}")


class HFProcessor(Strategy):
    """Run a transformers LogitsProcessor (chosen by class name) on the guided logits, with the history as input_ids."""

    name = "hf_processor"
    params = (Param("processor", "str", doc="LogitsProcessor class name in transformers (e.g. TopKLogitsProcessor); "
                                            "other parameters go to its constructor"),)
    hooks = ("post_cfg",)
    graph_safe = False  # input_ids grow by one column per step

    def __init__(self, **kwargs: Any) -> None:
        self._forwarded = {k: v for k, v in kwargs.items() if k != "processor"}
        super().__init__(**{k: v for k, v in kwargs.items() if k == "processor"})
        self.config.update(self._forwarded)
        self.explicit = dict(kwargs)

    def check(self) -> None:
        self._class = resolve_processor(self.config["processor"])
        self._new_processor()  # the processor's own constructor validates the forwarded parameters

    def _new_processor(self) -> LogitsProcessor:
        try:
            return self._class(**self._forwarded)
        except (TypeError, ValueError) as exc:
            raise StrategyError(f"`hf_processor`: {self._class.__name__}: {exc}") from None

    def begin(self, state) -> None:
        self._processor = self._new_processor()  # fresh per run: some processors keep state

    def post_cfg(self, state, logits: torch.Tensor) -> torch.Tensor:
        input_ids = state.history[:, : state.history_offset + state.step]  # [P, T0 + t] (text) or [P, t] (image)
        return self._processor(input_ids, logits.clone()).to(logits.dtype)  # clone: some processors write in place

    @classmethod
    def describe(cls) -> dict[str, Any]:
        info = super().describe()
        info["parameters"]["additionalProperties"] = True  # forwarded to the processor's constructor
        return info


# -- the reverse: our strategy inside transformers' generate ----------------------------------------------------
class _ProcessorState:
    """The slice of a StepState a logits-only strategy reads, rebuilt from transformers' ``input_ids`` each call.

    Text mode, no guidance: ``history`` is ``input_ids`` ``[B, T]`` (all valid), ``history_offset`` the prompt
    length, ``step`` the number of ids generated so far.
    """

    mode, layout = "text", "interleaved"
    cfg_schedule = "constant"

    def __init__(self, input_ids: torch.Tensor, scores: torch.Tensor, max_new_tokens: int | None) -> None:
        self.adapter = SimpleNamespace(device=scores.device, dtype=scores.dtype, kind="causal_lm", name="transformers")
        self.num_pairs = input_ids.shape[0]
        self.history_offset = input_ids.shape[1]
        self.prompt_ids = input_ids
        self.total_steps = max_new_tokens
        self.cfg_weight = torch.ones((), device=scores.device)
        self.memory: dict[str, Any] = {}
        self.trace = Trace()
        self.last_probs: torch.Tensor | None = None
        self.step_t = torch.zeros((), dtype=torch.long, device=scores.device)
        self.update(input_ids)

    @property
    def rows(self) -> int:
        return self.num_pairs

    def update(self, input_ids: torch.Tensor) -> None:
        self.history = input_ids  # [B, T]
        self.history_valid = torch.ones_like(input_ids, dtype=torch.bool)
        self.generated = input_ids[:, self.history_offset:]
        self.step = input_ids.shape[1] - self.history_offset
        self.step_t.fill_(self.step)

    def current_cfg_weight(self) -> torch.Tensor:
        return self.cfg_weight

    def step_buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.total_steps is None:
            raise StrategyError("as_logits_processor: this strategy keeps per-step buffers; pass `max_new_tokens`")
        if name not in self.trace.buffers:
            self.trace.buffers[name] = torch.zeros((self.total_steps, *shape), dtype=dtype, device=self.adapter.device)
        return self.trace.buffers[name]


class StrategyLogitsProcessor(LogitsProcessor):
    """A logits-only strategy of ours as a transformers ``LogitsProcessor`` (text generation).

    A new generation is recognised when ``input_ids`` are not the last call's ids plus one column; the strategy's
    ``check_run`` and ``begin`` then run again on a fresh state.
    """

    def __init__(self, strategy: Strategy, *, max_new_tokens: int | None = None) -> None:
        if not isinstance(strategy, Strategy):
            raise TypeError(f"as_logits_processor: expected a configured Strategy, got {type(strategy).__name__}")
        other = [h for h in strategy.hooks if h not in _EXPORTABLE]
        if other or not strategy.hooks:
            raise StrategyError(f"`{strategy.name}`: only logits-only strategies ({', '.join(_EXPORTABLE)}) export "
                                f"as a LogitsProcessor; it uses {', '.join(other) or 'no hook point'}")
        if "text" not in strategy.modes or strategy.needs:
            raise StrategyError(f"`{strategy.name}`: needs {list(strategy.needs)} / modes {list(strategy.modes)}; a "
                                "LogitsProcessor runs in plain text generation")
        if type(strategy).exit_layers is not Strategy.exit_layers:
            raise StrategyError(f"`{strategy.name}`: reads early exits' logits (exit_layers), which a "
                                "LogitsProcessor never sees")
        if type(strategy).after_sample is not Strategy.after_sample:
            raise StrategyError(f"`{strategy.name}`: reads the sampled tokens (after_sample), which a "
                                "LogitsProcessor never sees")
        self.strategy = strategy
        self.max_new_tokens = max_new_tokens
        self._state: _ProcessorState | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        state = self._state
        if state is None or input_ids.shape[0] != state.num_pairs \
                or input_ids.shape[1] != state.history.shape[1] + 1 or not torch.equal(input_ids[:, :-1], state.history):
            state = self._state = _ProcessorState(input_ids, scores, self.max_new_tokens)
            self.strategy.check_run(state)
            self.strategy.begin(state)
        else:
            state.update(input_ids)
        for point in _EXPORTABLE:
            if point in self.strategy.hooks:
                scores = getattr(self.strategy, point)(state, scores)
        return scores


def as_logits_processor(strategy: Strategy, *, max_new_tokens: int | None = None) -> StrategyLogitsProcessor:
    """Export ``strategy`` (configured, logits-only) for ``model.generate(logits_processor=LogitsProcessorList([…]))``.

    :param max_new_tokens: needed only by strategies that keep per-step buffers (``state.step_buffer``).
    """
    return StrategyLogitsProcessor(strategy, max_new_tokens=max_new_tokens)
