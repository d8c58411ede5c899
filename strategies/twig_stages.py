"""TwiG's host-side bookkeeping for one run: what each stage asks, what it was told, and what it decided.

``StageAsk`` is what the thinker or the scorer is asked for one image; ``think_with_model`` and ``score_with_model``
are the default answerers (the same model, through ``state.answer``). ``StageRun`` keeps a run's guidance, the
reflections of every attempt and the redraw count; it builds the asks, records a reflection and returns the redraw
decision, composes the rebuilt prompts and builds a stage's trace event. ``clip_guidance`` and ``guidance_ids`` keep
guidance within ``think_max_tokens``, the bound the cache was sized for. The texts, seeds and decisions come from
``strategies/twig_math.py``; ``strategies/twig.py`` calls all of this from its hooks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from PIL import Image

from .twig_math import compose_prompt, nested_seed, parse_score, passes, place_names, score_question, think_question, to_uint8

__all__ = ["StageAsk", "StageRun", "clip_guidance", "guidance_ids", "score_with_model", "think_with_model",
           "to_pictures"]


@dataclass(frozen=True)
class StageAsk:
    """What the thinker or the scorer is asked, for one image: the prompt, the stage (0-based) and its place, the
    partial picture (None before the first band), this image's earlier guidance, the attempt (0 = first drawing of
    the band; scorer only) and a seed for sampled answers."""

    prompt: str
    stage: int
    stages: int
    place: str
    picture: Image.Image | None
    earlier: tuple[str, ...]
    attempt: int
    seed: int


def think_with_model(state: Any, ask: StageAsk, *, max_new_tokens: int, greedy: bool) -> str:
    """The default thinker: the same model writes the next band's guidance, looking at the picture so far."""
    question = think_question(ask.prompt, ask.place, ask.stage, ask.stages, ask.earlier)
    pictures = None if ask.picture is None else [ask.picture]
    return state.answer(pictures, question, max_new_tokens=max_new_tokens, greedy=greedy, seed=ask.seed)


def score_with_model(state: Any, ask: StageAsk, *, max_new_tokens: int, greedy: bool) -> str:
    """The default scorer: the same model rates the partial picture against the prompt (a ``SCORE:`` reply)."""
    question = score_question(ask.prompt, ask.place)
    return state.answer([ask.picture], question, max_new_tokens=max_new_tokens, greedy=greedy, seed=ask.seed)


@dataclass
class StageRun:
    """Per-run progress (kept in ``state.memory``; a strategy instance serves many runs)."""

    stages: int
    images: list[int]  # each image's index in the row-RNG keys, read once per run
    guidance: dict[int, list[str]] = field(default_factory=dict)  # stage → one text per image
    done: set[int] = field(default_factory=set)  # stages accepted and reported
    attempts: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # stage → reflections
    rollbacks: int = 0

    def ask(self, prompt: str, seed: int, stage: int, image: int, picture: Image.Image | None,
            attempt: int) -> StageAsk:
        """One image's ask, so the thinker and the scorer see its earlier guidance and a seed fixed by the run."""
        earlier = tuple(self.guidance[j][image] for j in range(stage) if j in self.guidance)
        return StageAsk(prompt, stage, self.stages, place_names(self.stages)[stage], picture, earlier, attempt,
                        nested_seed(seed, self.images[image], stage, attempt))

    def reflect(self, stage: int, replies: list[str], threshold: float, on_unparseable: str,
                max_regenerations: int) -> bool:
        """Record one attempt's replies; True when the band is redrawn: one image rejected it and redraws are left
        (the decision is shared by the micro-batch, hence ``couples_rows``)."""
        attempts = self.attempts.setdefault(stage, [])
        scores = [parse_score(r) for r in replies]
        kept = passes(scores, threshold, on_unparseable)
        attempts.append({"scores": scores, "unparseable": [s is None for s in scores], "replies": replies})
        return not all(kept) and len(attempts) <= max_regenerations

    def rebuilt_prompts(self, prompts: list[str], stage: int) -> list[str]:
        """Each image's prompt followed by its guidance up to ``stage``: what a ``Rebuild`` re-prefills (TwiG's
        cumulative description)."""
        return [compose_prompt(p, [self.guidance[j][i] for j in range(stage + 1)]) for i, p in enumerate(prompts)]

    def event(self, stage: int, rows: tuple[int, int], images: int, context: str) -> dict[str, Any]:
        """An accepted stage's trace event (guidance, every attempt's scores and replies), so ``--explain`` shows
        why a band was redrawn."""
        attempts = self.attempts.get(stage, [])
        return {"stage": stage + 1, "stages": self.stages, "rows": list(rows),
                "guidance": self.guidance.get(stage, [""] * images), "scores": [a["scores"] for a in attempts],
                "unparseable": [a["unparseable"] for a in attempts], "replies": [a["replies"] for a in attempts],
                "regenerations": max(len(attempts) - 1, 0), "context": context}


def to_pictures(pixels: torch.Tensor) -> list[Image.Image]:
    """VQ-decoder pixels ``[P, 3, H, W]`` → one PIL picture per image, the form the thinker and the scorer see."""
    return [Image.fromarray(a.numpy()) for a in to_uint8(pixels).cpu()]


def guidance_ids(tokenizer: Any, text: str, limit: int) -> list[int]:
    """Guidance token ids (no special tokens) with a leading space, so they join the text before them; at most
    ``limit``, so the cache growth declared in ``kv_growth`` holds."""
    text = text.strip()
    ids = tokenizer(" " + text, add_special_tokens=False).input_ids if text else []
    return list(ids)[:limit]


def clip_guidance(tokenizer: Any, decode: Callable[[list[int]], str], text: str, limit: int) -> str:
    """The thinker's text, stripped and cut to ``limit`` tokens (decoded back with ``decode``), so a rebuilt prompt
    stays within the cache growth declared in ``kv_growth``."""
    ids = tokenizer(text.strip(), add_special_tokens=False).input_ids
    return text.strip() if len(ids) <= limit else decode(list(ids)[:limit]).strip()
