"""``visual_prior_fusion``: add a vision-derived prior over candidate phrases' first tokens, ``F_L + λ·r_V``.

Once per run (in ``begin``), for each row (one question with its images): the bank of candidate phrases is built
(``bank``, ``bank_file`` and optionally the question's own words), each phrase's first tokens in context are found
(``first_tokens``: as written, after a space, capitalised; stop words, articles and bare whitespace are never
boosted), a scorer rates every phrase against the row's images, and ``strategies/fusion_math.py`` turns the scores
into a phrase prior ``ρ`` and spreads it onto the vocabulary. Per step (``post_cfg``) the plugin only adds ``λ·r_V``
to the scores left by the strategies before it (``dola > visual_prior_fusion`` fuses on DoLa's contrast, whose
``-inf`` stay ``-inf``). The bank and the per-row prior live in ``strategies/fusion_bank.py``, the scorers in
``strategies/fusion_scorers.py``; this module wires them to the hooks.

Scorers (``Scorer``: ``(state, row, phrases) -> [K]`` scores): ``aligned`` (``AlignedScorer``, the default: the
model's own SigLIP features through its aligner against phrase token embeddings, cosine; an unvalidated heuristic)
and ``siglip`` (``SiglipScorer``: a separate SigLIP/CLIP model with a text tower from a local folder, using its own
logit scale and bias). From Python, ``VisualPriorFusion(scorer_fn=...)`` injects any callable instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from janus_decoding.plugins.strategy import Param, Strategy

from .fusion_bank import NAME, STOP_WORDS, _fail, first_tokens, pack_priors, parse_bank, question_phrases, row_prior
from .fusion_math import fuse, token_prior
from .fusion_scorers import SCORERS, AlignedScorer, Scorer, SiglipScorer

if TYPE_CHECKING:
    from janus_decoding.core.state import StepState

__all__ = ["AlignedScorer", "Scorer", "SiglipScorer", "STOP_WORDS", "VisualPriorFusion", "first_tokens",
           "parse_bank", "question_phrases"]


class VisualPriorFusion(Strategy):
    """Add a vision-derived prior over candidate phrases' first tokens: F_joint = F_L + λ·r_V (image → text)."""

    name = NAME
    params = (
        Param("weight", "float", 0.7, "λ; 0 disables", low=0.0),
        Param("bank", "str|list[str]", None, "candidate phrases: a comma list or a list"),
        Param("bank_file", "str", None, "a text file with one phrase per line"),
        Param("bank_from_question", "bool", False, "add the question's content words to the bank"),
        Param("scorer", "str", "aligned", "how phrases are scored against the image", choices=tuple(SCORERS)),
        Param("scorer_path", "str", None, "a local SigLIP/CLIP folder (scorer 'siglip')"),
        Param("prior", "str", "centered", "ρ = log_softmax(s/τ), centred or not", choices=("centered", "logprob")),
        Param("prior_temperature", "float", 1.0, "τ", low=0.0, low_open=True),
        Param("layers", "list[int]", None, "vision layers to pool (aligned scorer); default: Janus's own features"),
        Param("apply_steps", "int", 0, "fuse only the first n steps; 0 = every step", low=0),
    )
    hooks = ("post_cfg",)
    modes = ("text",)
    needs = ("image", "janus")
    runs_after = ("dola",)

    def __init__(self, scorer_fn: Scorer | None = None, **params: Any) -> None:
        self.scorer: Scorer | None = scorer_fn  # Python-only: replaces the named scorer (not part of the spec)
        super().__init__(**params)

    def check(self) -> None:
        c = self.config
        if c["bank"] is None and c["bank_file"] is None and not c["bank_from_question"]:
            raise _fail("bank", "is required unless `bank_file` or `bank_from_question` is given")
        self.bank = parse_bank(c["bank"], c["bank_file"])
        path = c["scorer_path"]
        if c["scorer"] == "siglip" and self.scorer is None and not (path and Path(path).is_dir()):
            raise _fail("scorer_path", f"must be a local SigLIP/CLIP folder for scorer 'siglip', got {path!r}")
        if c["scorer"] != "siglip" and c["scorer_path"] is not None:
            raise _fail("scorer_path", f"is only used by scorer 'siglip' (scorer is {c['scorer']!r})")
        if c["scorer"] != "aligned" and c["layers"] is not None:
            raise _fail("layers", f"is only used by scorer 'aligned' (scorer is {c['scorer']!r})")

    def check_run(self, state: "StepState") -> None:
        if self.scorer is None:
            self.scorer = SCORERS[self.config["scorer"]](self.config)

    def tokenizer(self, state: "StepState") -> Any:
        """The tokenizer whose first tokens get the prior: the model's."""
        return state.adapter.tokenizer

    def begin(self, state: "StepState") -> None:
        c = self.config
        rows = [row_prior(self.bank, state.prompts[row] if c["bank_from_question"] else None, self.tokenizer(state),
                          lambda phrases, row=row: self.scorer(state, row, phrases), row=row,
                          temperature=c["prior_temperature"], kind=c["prior"]) for row in range(state.num_pairs)]
        for row, (kept, skipped) in enumerate(rows):
            state.trace.write(self.name, row=row, skipped=skipped, phrases=[{
                "phrase": k["phrase"], "prior": round(k["prior"], 4), "first_tokens": k["first_tokens"]} for k in kept])
        self._ids, self._rho = pack_priors([kept for kept, _ in rows], state.adapter.device)  # [P, M] each
        self._tables: dict[int, torch.Tensor] = {}
        self._weight = self.tensor(state, "weight")
        self._steps = self.tensor(state, "apply_steps", torch.long)

    def post_cfg(self, state: "StepState", logits: torch.Tensor) -> torch.Tensor:
        vocab = logits.shape[-1]
        if vocab not in self._tables:  # once per run: the head's width is known only here
            self._tables[vocab] = token_prior(self._rho, self._ids, vocab)  # [P, V]
        weight = self._weight
        if self.config["apply_steps"] > 0:
            weight = weight * (state.step_t < self._steps)
        return fuse(logits, self._tables[vocab], weight)
