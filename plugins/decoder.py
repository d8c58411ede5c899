"""The ``Decoder``: an ordered, validated list of configured strategies plus a CFG setting.

It is the loop's ``HookRunner``: at each hook point it calls the strategies that declared that point, in the
spec's order, and checks each boundary (shape kept; device-side flags for NaN, +inf and rows with no finite logit,
read once per run so the failure names the strategy without a host sync per token).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from janus_decoding.core.cfg import CFGConfig
from janus_decoding.core.protocol import KVAppend, KVEdit, LayerKeep, Rebuild, Rollback
from janus_decoding.core.state import StepState

from .hookspecs import HOOK_POINTS
from .registry import StrategyRegistry, default_registry
from .spec import SpecError, Stage, format_stage, parse_spec, parse_toml
from .strategy import Strategy, StrategyError

CFG_STAGE = "cfg"
_CFG_FIELDS = {f.name for f in dataclasses.fields(CFGConfig)}


class StrategyOutputError(RuntimeError):
    """A strategy returned something the loop cannot use (wrong shape, NaN, +inf, a row with no finite logit)."""


@dataclass
class Decoder:
    strategies: list[Strategy] = field(default_factory=list)
    cfg: CFGConfig = field(default_factory=CFGConfig)
    cfg_explicit: dict[str, Any] = field(default_factory=dict)

    # -- building ---------------------------------------------------------------------------------------------
    @classmethod
    def from_stages(cls, stages: Sequence[Stage], cfg: dict[str, Any] | None = None,
                    registry: StrategyRegistry | None = None) -> "Decoder":
        registry = registry or default_registry()
        strategies: list[Strategy] = []
        cfg_args: dict[str, Any] = dict(cfg or {})
        for stage in stages:
            if stage.name == CFG_STAGE:
                cfg_args.update(stage.args)
                continue
            strategies.append(registry.get(stage.name)(**stage.args))
        unknown = sorted(set(cfg_args) - _CFG_FIELDS)
        if unknown:
            raise StrategyError(f"`cfg`: unknown parameter `{unknown[0]}`; parameters: {', '.join(sorted(_CFG_FIELDS))}")
        decoder = cls(strategies, CFGConfig(**cfg_args), cfg_args)
        decoder.validate_order()
        return decoder

    @classmethod
    def from_spec(cls, text: str, registry: StrategyRegistry | None = None) -> "Decoder":
        """Parse ``"repetition_penalty(penalty=1.2) > dola(layers=\\"high\\")"``; ``""`` is the empty decoder."""
        if text.strip() == "":
            return cls()
        return cls.from_stages(parse_spec(text), None, registry)

    @classmethod
    def from_toml(cls, path: str | Path, registry: StrategyRegistry | None = None) -> "Decoder":
        stages, cfg = parse_toml(path)
        return cls.from_stages(stages, cfg, registry)

    def to_spec(self) -> str:
        parts = [s.to_spec() for s in self.strategies]
        if self.cfg_explicit:
            parts.append(format_stage(CFG_STAGE, self.cfg_explicit))
        return " > ".join(parts)

    def with_strategy(self, strategy: Strategy) -> "Decoder":
        """A copy with ``strategy`` appended (e.g. the CLI's ``--temperature``), validated again."""
        decoder = Decoder([*self.strategies, strategy], self.cfg, dict(self.cfg_explicit))
        decoder.validate_order()
        return decoder

    def with_cfg(self, **changes: Any) -> "Decoder":
        explicit = {**self.cfg_explicit, **{k: v for k, v in changes.items() if v is not None}}
        return Decoder(list(self.strategies), CFGConfig(**explicit), explicit)

    def validate_order(self) -> None:
        """``runs_after`` constraints: at a shared hook point the spec's order must satisfy them; across different
        hook points the loop's order (``HOOK_POINTS``) must."""
        names = [s.name for s in self.strategies]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise StrategyError(f"strategy `{sorted(dupes)[0]}` appears twice in the decoder")
        for i, later in enumerate(self.strategies):
            for j, earlier in enumerate(self.strategies):
                if earlier.name not in later.runs_after:
                    continue
                shared = set(later.hooks) & set(earlier.hooks)
                if shared:
                    ok = j < i
                else:
                    ok = _first_point(earlier) <= _first_point(later)
                if not ok:
                    raise StrategyError(f"order: `{later.name}` must run after `{earlier.name}`; "
                                        f"write `{earlier.name} > {later.name}`")

    def check_mode(self, mode: str, adapter: Any, *, has_image: bool) -> None:
        for s in self.strategies:
            if mode not in s.modes:
                raise StrategyError(f"`{s.name}` does not support {mode} mode (modes: {', '.join(s.modes)})")
            if "janus" in s.needs and adapter.kind != "janus":
                raise StrategyError(f"`{s.name}` needs a Janus model; {adapter.name} is a plain causal language model")
            if "image" in s.needs and not has_image:
                raise StrategyError(f"`{s.name}` needs an input image")

    @property
    def couples_rows(self) -> bool:
        return any(s.couples_rows for s in self.strategies)

    # -- HookRunner -------------------------------------------------------------------------------------------
    def _at(self, point: str) -> list[Strategy]:
        cached = self.__dict__.setdefault("_by_point", {})
        if point not in cached:  # the strategy list is fixed once the decoder is built
            cached[point] = [s for s in self.strategies if point in s.hooks]
        return cached[point]

    def begin(self, state: StepState) -> None:
        self._by_point = {}  # rebuilt per run: `strategies` may have been edited since the last one
        state.memory["_boundary_flags"] = {}
        for s in self.strategies:
            s.check_run(state)
            s.begin(state)

    def end(self, state: StepState) -> None:
        for s in self.strategies:
            s.end(state)

    def kv_growth(self, state: StepState) -> int:
        return sum(int(s.kv_growth(state)) for s in self.strategies)

    def input_embeddings(self, state: StepState, embeds: torch.Tensor) -> torch.Tensor:
        for s in self._at("input_embeddings"):
            out = s.input_embeddings(state, embeds)
            if out.dim() != 3 or out.shape[0] != embeds.shape[0] or out.shape[2] != embeds.shape[2] \
                    or state.prompt_positions.shape != out.shape[:2] or state.attention_mask.shape != out.shape[:2]:
                raise StrategyOutputError(f"`{s.name}` (input_embeddings) returned shape {tuple(out.shape)} that does "
                                          "not match the prompt positions/mask")
            embeds = out
        return embeds

    def kv_layer_reduction(self, state: StepState) -> dict[int, int]:
        total: dict[int, int] = {}
        for s in self._at("layer"):
            for k, n in s.kv_layer_reduction(state).items():
                total[k] = total.get(k, 0) + int(n)
        return total

    def layer_points(self, state: StepState) -> list[int]:
        return sorted({k for s in self._at("layer") for k in s.layer_points(state)})

    def layer(self, state: StepState, layer: int, hidden: torch.Tensor) -> LayerKeep | None:
        result = None
        for s in self._at("layer"):
            if layer in s.layer_points(state):
                keep = s.layer(state, layer, hidden)
                if keep is not None:
                    if keep.positions.dim() != 2 or keep.positions.shape[0] != hidden.shape[0]:
                        raise StrategyOutputError(f"`{s.name}` (layer) returned positions of shape "
                                                  f"{tuple(keep.positions.shape)}, expected [B, T']")
                    result = keep
        return result

    def hidden_layers(self, state: StepState) -> list[int]:
        """The layers whose last-position hidden states the loop keeps: for ``hidden_states`` and the exits."""
        kept = {k for s in self._at("hidden_states") for k in s.hidden_layers(state)}
        return sorted(kept | {k for k, _ in self.exit_layers(state)})

    def exit_layers(self, state: StepState) -> list[tuple[int, bool]]:
        return sorted({(int(k), bool(norm)) for s in self.strategies for k, norm in s.exit_layers(state)})

    def prompt_layers(self, state: StepState) -> list[int]:
        return sorted({k for s in self.strategies for k in s.prompt_layers(state)})

    def hidden_states(self, state: StepState, hidden: dict[int, torch.Tensor]) -> None:
        for s in self._at("hidden_states"):
            s.hidden_states(state, {k: hidden[k] for k in s.hidden_layers(state)})

    def pre_logits(self, state: StepState, logits: torch.Tensor) -> torch.Tensor:
        return self._logits_point("pre_logits", state, logits)

    def post_cfg(self, state: StepState, logits: torch.Tensor) -> torch.Tensor:
        return self._logits_point("post_cfg", state, logits)

    def _logits_point(self, point: str, state: StepState, logits: torch.Tensor) -> torch.Tensor:
        flags = state.memory["_boundary_flags"]
        for s in self._at(point):
            out = getattr(s, point)(state, logits)
            if out is logits:  # handed back unchanged (strategies never write their input): nothing new to check
                continue
            if not isinstance(out, torch.Tensor) or out.shape != logits.shape:
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise StrategyOutputError(f"`{s.name}` ({point}) returned {shape}, expected {tuple(logits.shape)}")
            # Two kernels per boundary: a row's max is NaN if it holds a NaN, +inf if it holds +inf and -inf if it
            # has no finite logit, and the running sum of those maxima keeps any such value (read once, after the run).
            key = (s.name, point)
            seen = flags.get(key)
            if seen is None:
                flags[key] = out.amax(-1).float()  # [R]
            else:
                seen.add_(out.amax(-1).float())
            logits = out
        return logits

    def after_sample(self, state: StepState, tokens: torch.Tensor, probs: torch.Tensor) -> None:
        for s in self.strategies:
            s.after_sample(state, tokens, probs)
        stream = state.memory.get("_stream")
        if stream is not None:
            stream(tokens)

    def kv_inject(self, state: StepState) -> list[KVAppend | KVEdit]:
        actions: list[KVAppend | KVEdit] = []
        for s in self._at("kv_inject"):
            actions += list(s.kv_inject(state) or [])
        return actions

    def schedule_points(self, state: StepState) -> list[int]:
        return sorted({k for s in self._at("schedule") for k in s.schedule_points(state)})

    def schedule(self, state: StepState) -> Rebuild | Rollback | None:
        for s in self._at("schedule"):
            if state.step in s.schedule_points(state):
                action = s.schedule(state)
                if isinstance(action, Rollback) and not 1 <= action.steps <= state.step:
                    # the loop can only return to a boundary it has passed (else: a bare KeyError from the loop)
                    raise StrategyOutputError(f"`{s.name}` (schedule) returned Rollback(steps={action.steps!r}) at "
                                              f"step {state.step}; `steps` must be in [1, {state.step}]")
                if action is not None:
                    return action
        return None

    def raise_on_bad_boundaries(self, state: StepState) -> None:
        """Read the boundary flags once (one host sync per run) and name the first strategy that misbehaved."""
        for (name, point), seen in state.memory.get("_boundary_flags", {}).items():
            for what, hit in (("NaN", torch.isnan(seen)), ("+inf", torch.isposinf(seen)),
                              ("a row with no finite logit", torch.isneginf(seen))):
                if bool(hit.any()):
                    raise StrategyOutputError(f"`{name}` ({point}) produced {what} "
                                              f"(rows {hit.nonzero().flatten().tolist()})")

    # -- the Python API (plugins/generation.py) ---------------------------------------------------------------
    def generate_images(self, model: Any, prompts: str | Sequence[str], **kwargs: Any):
        """Images for each prompt: see :func:`janus_decoding.plugins.generation.generate_images`."""
        from .generation import generate_images

        return generate_images(self, model, prompts, **kwargs)

    def answer(self, model: Any, images: Sequence[Any], question: str, **kwargs: Any):
        """Answer a question about images: see :func:`janus_decoding.plugins.generation.answer`."""
        from .generation import answer

        return answer(self, model, images, question, **kwargs)

    def chat(self, model: Any, prompt: str | Sequence[str], **kwargs: Any):
        """Text in, text out: see :func:`janus_decoding.plugins.generation.chat`."""
        from .generation import chat

        return chat(self, model, prompt, **kwargs)

    def describe(self) -> list[dict[str, Any]]:
        return [{"name": s.name, "config": dict(s.config), "hooks": list(s.hooks)} for s in self.strategies]


def _first_point(strategy: Strategy) -> int:
    return min((HOOK_POINTS.index(h) for h in strategy.hooks), default=len(HOOK_POINTS))


__all__ = ["Decoder", "StrategyOutputError", "SpecError", "StrategyError"]
