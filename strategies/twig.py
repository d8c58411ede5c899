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
band), so the strategy declares ``couples_rows``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from PIL import Image

from janus_decoding.core.protocol import KVAppend, Rebuild, Rollback
from janus_decoding.plugins.strategy import Param, Strategy, StrategyError

from . import twig_math as tm


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


def think_with_model(state, ask: StageAsk, *, max_new_tokens: int, greedy: bool) -> str:
    question = tm.think_question(ask.prompt, ask.place, ask.stage, ask.stages, ask.earlier)
    pictures = None if ask.picture is None else [ask.picture]
    return state.answer(pictures, question, max_new_tokens=max_new_tokens, greedy=greedy, seed=ask.seed)


def score_with_model(state, ask: StageAsk, *, max_new_tokens: int, greedy: bool) -> str:
    question = tm.score_question(ask.prompt, ask.place)
    return state.answer([ask.picture], question, max_new_tokens=max_new_tokens, greedy=greedy, seed=ask.seed)


@dataclass
class _Run:
    """Per-run progress (kept in ``state.memory``; a strategy instance serves many runs)."""

    guidance: dict[int, list[str]] = field(default_factory=dict)  # stage → one text per image
    done: set[int] = field(default_factory=set)  # stages accepted and reported
    attempts: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # stage → reflections
    rollbacks: int = 0


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
        state.memory[self.name] = _Run()
        self._images = state.rng_keys[:, 1].tolist()  # host side, once per run

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
        run: _Run = state.memory[self.name]
        k = self._bounds.index(state.step)
        pixels = None
        if k > 0 and k - 1 not in run.done:
            pixels = state.decode_partial(state.generated[:, : state.step])  # [P, 3, rows·16, W]
            pictures = [Image.fromarray(a.numpy()) for a in tm.to_uint8(pixels).cpu()]
            if self.config["reflect"] and self._reflect(state, run, k - 1, pictures):
                run.rollbacks += 1
                return Rollback(self._bounds[k] - self._bounds[k - 1], run.rollbacks)
            self._report(state, run, k - 1, pixels)
        if k == self.config["stages"] or k in run.guidance or not self.config["think"]:
            return None  # the end, a band being redrawn (its guidance is in place), or nothing to say
        pictures = [None] * state.num_pairs if pixels is None else pictures
        run.guidance[k] = [self._clip(state, type(self).thinker(
            state, self._ask(state, run, k, i, pictures[i], 0), max_new_tokens=self.config["think_max_tokens"],
            greedy=self.config["think_greedy"])) for i in range(state.num_pairs)]
        if (self.config["context"] == "inject" and k > 0) or (k == 0 and not any(run.guidance[0])):
            return None  # kv_inject appends it / the prompt needs no rebuild
        return Rebuild([tm.compose_prompt(p, [run.guidance[j][i] for j in range(k + 1)])
                        for i, p in enumerate(state.prompts)])

    def kv_inject(self, state) -> list[KVAppend]:
        run: _Run | None = state.memory.get(self.name)
        if self.config["context"] != "inject" or run is None or state.step not in self._bounds[1:-1]:
            return []
        appends = []
        for i, text in enumerate(run.guidance.get(self._bounds.index(state.step), [])):
            ids = self._ids(state, text)
            if ids:
                rows_ids, rows = tm.inject_rows(ids, i, state.num_pairs, state.adapter.pad_id, state.layout,
                                                state.adapter.device)
                appends.append(KVAppend(ids=rows_ids, rows=rows))
        return appends

    # -- helpers (host side) -----------------------------------------------------------------------------------
    def _ask(self, state, run: _Run, stage: int, image: int, picture, attempt: int) -> StageAsk:
        earlier = tuple(run.guidance[j][image] for j in range(stage) if j in run.guidance)
        seed = tm.nested_seed(state.seeds[image], self._images[image], stage, attempt)
        return StageAsk(state.prompts[image], stage, self.config["stages"], tm.place_names(self.config["stages"])[stage],
                        picture, earlier, attempt, seed)

    def _reflect(self, state, run: _Run, stage: int, pictures) -> bool:
        """Score the band; True when it should be redrawn (a rejection and redraws left)."""
        attempts = run.attempts.setdefault(stage, [])
        replies = [type(self).scorer(state, self._ask(state, run, stage, i, pictures[i], len(attempts)),
                                     max_new_tokens=self.config["think_max_tokens"],
                                     greedy=self.config["think_greedy"]) for i in range(state.num_pairs)]
        scores = [tm.parse_score(r) for r in replies]
        kept = tm.passes(scores, self.config["threshold"], self.config["on_unparseable"])
        attempts.append({"scores": scores, "unparseable": [s is None for s in scores], "replies": replies})
        return not all(kept) and len(attempts) <= self.config["max_regenerations"]

    def _report(self, state, run: _Run, stage: int, pixels) -> None:
        run.done.add(stage)
        label = f"stage{stage + 1}of{self.config['stages']}"
        state.trace.add_image(self.name, label, pixels)
        attempts = run.attempts.get(stage, [])
        state.trace.write(self.name, stage=stage + 1, stages=self.config["stages"], rows=list(self._bands[stage]),
                          guidance=run.guidance.get(stage, [""] * state.num_pairs),
                          scores=[a["scores"] for a in attempts], unparseable=[a["unparseable"] for a in attempts],
                          replies=[a["replies"] for a in attempts], regenerations=max(len(attempts) - 1, 0),
                          context=self.config["context"])

    def _ids(self, state, text: str) -> list[int]:
        """Guidance token ids (no special tokens), at most ``think_max_tokens``, with a leading space to join."""
        text = text.strip()
        ids = state.adapter.tokenizer(" " + text, add_special_tokens=False).input_ids if text else []
        return list(ids)[: self.config["think_max_tokens"]]

    def _clip(self, state, text: str) -> str:
        ids = state.adapter.tokenizer(text.strip(), add_special_tokens=False).input_ids
        return text.strip() if len(ids) <= self.config["think_max_tokens"] else \
            state.adapter.decode_text(list(ids)[: self.config["think_max_tokens"]]).strip()
