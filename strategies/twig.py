"""``twig``: Thinking-while-Generating (Guo et al., arXiv 2511.16671), band by band through the ``schedule`` hook.

The grid is cut into ``stages`` horizontal bands (``strategies/twig_math.py``). At each band boundary (schedule
points ``0, n, …, R·C``) the strategy, host side:

1. **reflects** on the band just drawn (``reflect``): the scorer rates the partial picture 0–100; below ``threshold``
   the band is dropped (``Rollback``) and redrawn with the next RNG stream, at most ``max_regenerations`` times; an
   unparseable reply follows ``on_unparseable``. The accepted band's partial picture goes to the trace
   (``--save-intermediates``) with one event per stage (guidance, scores, replies, regenerations);
2. **thinks** (``think``) about the next band: the thinker writes at most ``think_max_tokens`` tokens of guidance,
   seeing the prompt, the band's place and the picture so far;
3. hands the guidance to the model: ``context="rebuild"`` re-prefills ``[prompt + guidance so far ; image tokens so
   far]`` with a fresh cache (``Rebuild``, as TwiG's code); ``"inject"`` appends the guidance to the cache through
   ``kv_inject`` (uncond rows get pad ids). Stage 0's guidance always goes into the prompt (no image token yet).

The thinker and the scorer are injectable: assign a callable ``(state, ask, *, max_new_tokens, greedy) -> str`` to
``TwiG.thinker`` / ``TwiG.scorer`` (class attributes; tests monkeypatch them). The defaults ask the same model through
``state.answer``. With ``reflect`` the stage decision is shared by the micro-batch (a low score redraws every image's
band), so the strategy declares ``couples_rows``. The per-run bookkeeping (asks, reflections, trace events, guidance
clipping) lives in ``strategies/twig_stages.py``; this module wires it to the hooks.
"""

from __future__ import annotations

from typing import Callable, ClassVar

from janus_decoding.core.protocol import KVAppend, Rebuild, Rollback
from janus_decoding.plugins.strategy import Param, Strategy, StrategyError

from . import twig_math as tm
from .twig_stages import (StageAsk, StageRun, clip_guidance, guidance_ids, score_with_model, think_with_model,
                          to_pictures)

__all__ = ["StageAsk", "TwiG", "score_with_model", "think_with_model"]


class TwiG(Strategy):
    """Think before each horizontal band, reflect after it (TwiG); rebuild the prompt or inject the thoughts."""

    name = "twig"
    params = (
        Param("stages", "int", 3, "horizontal bands; must divide the grid's rows", low=1),
        Param("think", "bool", True, "write guidance before each band"),
        Param("think_max_tokens", "int", 64, "most tokens of each guidance and score reply", low=1),
        Param("think_greedy", "bool", True, "greedy thinking and scoring (else sampled, seeded by the run)"),
        Param("reflect", "bool", True, "score each band and redraw it below the threshold"),
        Param("threshold", "float", 90.0, "redraw a band scored below this", low=0.0, high=100.0),
        Param("max_regenerations", "int", 1, "redraws per band at most", low=0),
        Param("on_unparseable", "str", "accept", "a reply without a score", choices=("accept", "regenerate")),
        Param("context", "str", "rebuild", "how guidance reaches the model", choices=("rebuild", "inject")),
    )
    hooks = ("schedule", "kv_inject")
    modes = ("image",)
    needs = ("janus",)
    thinker: ClassVar[Callable[..., str]] = think_with_model
    scorer: ClassVar[Callable[..., str]] = score_with_model

    def check(self) -> None:
        self.couples_rows = self.config["reflect"]

    def check_run(self, state) -> None:
        rows, cols = state.image_grid
        try:
            self._bounds = tm.stage_boundaries(rows, cols, self.config["stages"])
        except ValueError as exc:
            raise StrategyError(str(exc)) from None
        self._bands = tm.band_rows(rows, self.config["stages"])

    def begin(self, state) -> None:
        state.memory[self.name] = StageRun(self.config["stages"], state.rng_keys[:, 1].tolist())  # host, once per run

    def kv_growth(self, state) -> int:
        c = self.config
        if not c["think"]:
            return 0
        if c["context"] == "rebuild":
            return tm.rebuild_growth(c["stages"], c["think_max_tokens"])
        return tm.inject_growth(c["stages"], c["think_max_tokens"], state.num_pairs)

    def schedule_points(self, state) -> list[int]:
        return list(self._bounds)

    def schedule(self, state) -> Rebuild | Rollback | None:
        run: StageRun = state.memory[self.name]
        c, k = self.config, self._bounds.index(state.step)
        pictures = [None] * state.num_pairs
        if k > 0 and k - 1 not in run.done:
            pixels = state.decode_partial(state.generated[:, : state.step])  # [P, 3, rows·16, W]
            pictures = to_pictures(pixels)
            if c["reflect"]:
                attempt = len(run.attempts.get(k - 1, []))
                replies = self._ask_all(state, type(self).scorer, run, k - 1, pictures, attempt)
                if run.reflect(k - 1, replies, c["threshold"], c["on_unparseable"], c["max_regenerations"]):
                    run.rollbacks += 1
                    return Rollback(self._bounds[k] - self._bounds[k - 1], run.rollbacks)
            run.done.add(k - 1)
            state.trace.add_image(self.name, f"stage{k}of{c['stages']}", pixels)
            state.trace.write(self.name, **run.event(k - 1, self._bands[k - 1], state.num_pairs, c["context"]))
        if k == c["stages"] or k in run.guidance or not c["think"]:
            return None  # the end, a band being redrawn (its guidance is in place), or nothing to say
        texts = self._ask_all(state, type(self).thinker, run, k, pictures, 0)
        run.guidance[k] = [clip_guidance(state.adapter.tokenizer, state.adapter.decode_text, text,
                                         c["think_max_tokens"]) for text in texts]
        if (c["context"] == "inject" and k > 0) or (k == 0 and not any(run.guidance[0])):
            return None  # kv_inject appends it / the prompt needs no rebuild
        return Rebuild(run.rebuilt_prompts(state.prompts, k))

    def kv_inject(self, state) -> list[KVAppend]:
        run: StageRun | None = state.memory.get(self.name)
        if self.config["context"] != "inject" or run is None or state.step not in self._bounds[1:-1]:
            return []
        appends = []
        for i, text in enumerate(run.guidance.get(self._bounds.index(state.step), [])):
            ids = guidance_ids(state.adapter.tokenizer, text, self.config["think_max_tokens"])
            if ids:
                rows_ids, rows = tm.inject_rows(ids, i, state.num_pairs, state.adapter.pad_id, state.layout,
                                                state.adapter.device)
                appends.append(KVAppend(ids=rows_ids, rows=rows))
        return appends

    def _ask_all(self, state, answer: Callable[..., str], run: StageRun, stage: int, pictures: list,
                 attempt: int) -> list[str]:
        """The thinker's or the scorer's reply for every image at ``stage`` (host side; nested model answers)."""
        return [answer(state, run.ask(state.prompts[i], state.seeds[i], stage, i, pictures[i], attempt),
                       max_new_tokens=self.config["think_max_tokens"], greedy=self.config["think_greedy"])
                for i in range(state.num_pairs)]
