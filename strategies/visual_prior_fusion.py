"""``visual_prior_fusion``: add a vision-derived prior over candidate phrases' first tokens, ``F_L + λ·r_V``.

Once per run (in ``begin``), for each row (one question with its images): the bank of candidate phrases is built
(``bank``, ``bank_file`` and optionally the question's own words), each phrase's first tokens in context are found
(``first_tokens``: as written, after a space, capitalised; stop words, articles and bare whitespace are never
boosted), a scorer rates every phrase against the row's images, and ``strategies/fusion_math.py`` turns the scores
into a phrase prior ``ρ`` and spreads it onto the vocabulary. Per step (``post_cfg``) the plugin only adds ``λ·r_V``
to the scores left by the strategies before it (``dola > visual_prior_fusion`` fuses on DoLa's contrast, whose
``-inf`` stay ``-inf``).

Scorers (``Scorer``: ``(state, row, phrases) -> [K]`` scores): ``aligned`` (``AlignedScorer``, the default: the
model's own SigLIP features through its aligner against phrase token embeddings, cosine; an unvalidated heuristic)
and ``siglip`` (``SiglipScorer``: a separate SigLIP/CLIP model with a text tower from a local folder, using its own
logit scale and bias). From Python, ``VisualPriorFusion(scorer_fn=...)`` injects any callable instead.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from janus_decoding.plugins.strategy import Param, Strategy, StrategyError

from .fusion_math import cosine_scores, fuse, phrase_prior, token_prior

if TYPE_CHECKING:
    from janus_decoding.core.state import StepState

__all__ = ["AlignedScorer", "Scorer", "SiglipScorer", "STOP_WORDS", "VisualPriorFusion", "first_tokens",
           "parse_bank", "question_phrases"]

NAME = "visual_prior_fusion"
#: ``(state, row, phrases) -> [K]`` finite scores of the K phrases against row ``row``'s images (higher = likelier).
Scorer = Callable[["StepState", int, Sequence[str]], torch.Tensor]
#: English articles, pronouns, prepositions, conjunctions and auxiliaries: a first token that is one of these would
#: bias the answer's grammar, not its content (shared/reference/strategies.md §2.3 item 3).
STOP_WORDS = frozenset("""
a an the this that these those there here it its it's i you he she we they me him her us them my your his our their
is are was were be been being am do does did has have had will would can could shall should may might must
of in on at to for from by with without about as into onto over under above below between through of off up down
and or but nor so yet if then than because while although not no yes
what which who whom whose where when why how
""".split())
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


def _fail(parameter: str, message: str) -> StrategyError:
    return StrategyError(f"`{NAME}`: `{parameter}` {message}")


def parse_bank(bank: str | Sequence[str] | None, bank_file: str | None) -> list[str]:
    """The phrases of ``bank`` (a comma list or a list) and of ``bank_file`` (one per line, blank lines skipped),
    stripped and de-duplicated in order. Raises :class:`StrategyError` on an empty phrase, bank or file."""
    phrases: list[str] = []
    if bank is not None:
        items = bank.split(",") if isinstance(bank, str) else list(bank)
        if not any(item.strip() for item in items):
            raise _fail("bank", f"is empty, got {bank!r}")
        for i, item in enumerate(items):
            if not item.strip():
                raise _fail("bank", f"phrase {i + 1} is empty, got {bank!r}")
            phrases.append(item.strip())
    if bank_file is not None:
        try:
            lines = Path(bank_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise _fail("bank_file", f"is not a readable text file: {exc}") from None
        from_file = [line.strip() for line in lines if line.strip()]
        if not from_file:
            raise _fail("bank_file", f"holds no phrase: {bank_file}")
        phrases += from_file
    return list(dict.fromkeys(phrases))


def question_phrases(question: str) -> list[str]:
    """The question's content words (letters only, stop words dropped), lower-cased, in order, de-duplicated."""
    words = [w.lower() for w in _WORD.findall(question)]
    return list(dict.fromkeys(w for w in words if w not in STOP_WORDS))


def first_tokens(tokenizer: Any, phrase: str) -> tuple[list[int], str | None]:
    """``T(c)``: the ids a phrase can start with in an answer — its first token as written, after a space, and
    capitalised (after a space or not). Variants whose first token is a stop word or bare whitespace are dropped.

    :returns: ``(ids, reason)``: the distinct ids (empty if none is usable) and why the phrase is skipped, if it is.
    :raises StrategyError: when the phrase tokenises to nothing.
    """
    if phrase.split()[0].lower() in STOP_WORDS:
        return [], f"starts with the stop word {phrase.split()[0]!r}"
    capital = phrase[:1].upper() + phrase[1:]
    ids: list[int] = []
    for text in dict.fromkeys((phrase, " " + phrase, capital, " " + capital)):
        encoded = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if not encoded:
            raise _fail("bank", f"phrase {phrase!r} tokenises to nothing")
        piece = tokenizer.decode([encoded[0]]).strip().lower()
        if piece and piece not in STOP_WORDS and encoded[0] not in ids:
            ids.append(encoded[0])
    return ids, None if ids else "every first token is a stop word or whitespace"


def _row_pixels(state: "StepState", row: int) -> torch.Tensor:
    pixels = state.pixel_values[row] if state.pixel_values is not None and row < len(state.pixel_values) else None
    if pixels is None:
        raise StrategyError(f"`{NAME}` needs an input image (row {row} has none)")
    return pixels  # [n, 3, S, S]


class AlignedScorer:
    """Cosine between the row's image features (SigLIP through Janus's aligner, pooled over ``layers`` and tokens)
    and each phrase's mean token embedding. Needs nothing but the Janus model; not validated as a detector."""

    def __init__(self, layers: Sequence[int] | None = None) -> None:
        self.layers = None if layers is None else list(layers)

    def __call__(self, state: "StepState", row: int, phrases: Sequence[str]) -> torch.Tensor:
        try:
            features = state.encode_image(_row_pixels(state, row), self.layers)  # [n, T, H]
        except ValueError as exc:
            raise _fail("layers", str(exc)) from None
        device = state.adapter.device
        embeds = [state.adapter.embed_text(torch.tensor([state.adapter.tokenizer(p, add_special_tokens=False)[
            "input_ids"]], device=device))[0] for p in phrases]  # K × [L_k, H]
        tokens = torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True)  # [K, L, H]
        lengths = torch.tensor([e.shape[0] for e in embeds], device=device)
        mask = torch.arange(tokens.shape[1], device=device)[None] < lengths[:, None]  # [K, L]
        return cosine_scores(features.reshape(-1, features.shape[-1]).float(), tokens.float(), mask)


class SiglipScorer:
    """A SigLIP (or CLIP) model with a text tower, from a local folder: its ``logits_per_image`` (its own logit
    scale and bias), averaged over the row's images. The images are the row's Janus pixels, mapped back to [0, 1]
    and prepared by the folder's own image processor."""

    def __init__(self, path: str) -> None:
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        try:
            self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise _fail("scorer_path", f"is not a usable SigLIP/CLIP folder ({path}): {exc}") from None
        if not callable(getattr(self.model, "get_text_features", None)) or not hasattr(self.model, "logit_scale"):
            raise _fail("scorer_path", f"holds a {type(self.model).__name__}, not an image-text model with a text "
                                       f"tower and a logit scale ({path})")
        self.max_length = self.model.config.text_config.max_position_embeddings

    def __call__(self, state: "StepState", row: int, phrases: Sequence[str]) -> torch.Tensor:
        janus = state.adapter.image_processor
        mean = torch.tensor(janus.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(janus.image_std).view(1, 3, 1, 1)
        images = (_row_pixels(state, row).float().cpu() * std + mean).clamp(0, 1)  # [n, 3, S, S] in [0, 1]
        pixels = self.processor(images=list(images), do_rescale=False, return_tensors="pt")["pixel_values"]
        text = self.tokenizer(list(phrases), padding="max_length", max_length=self.max_length, truncation=True,
                              return_tensors="pt")
        device = state.adapter.device
        self.model.to(device)
        out = self.model(**text.to(device), pixel_values=pixels.to(device))
        return out.logits_per_image.float().mean(0)  # [K]


_SCORERS: dict[str, Callable[[dict[str, Any]], Scorer]] = {
    "aligned": lambda config: AlignedScorer(config["layers"]),
    "siglip": lambda config: SiglipScorer(config["scorer_path"]),
}


def _row_prior(strategy: "VisualPriorFusion", state: "StepState", row: int) -> tuple[list[dict[str, Any]], list]:
    """Host side, once per row: bank → first tokens → scores → ``(phrases with their prior, skipped)``."""
    bank = list(strategy.bank)
    if strategy.config["bank_from_question"]:
        bank = list(dict.fromkeys(bank + question_phrases(state.prompts[row])))
    tokenizer = strategy.tokenizer(state)
    kept, skipped = [], []
    for phrase in bank:
        ids, reason = first_tokens(tokenizer, phrase)
        if ids:
            kept.append({"phrase": phrase, "ids": ids})
        else:
            skipped.append({"phrase": phrase, "reason": reason})
    if not kept:
        raise _fail("bank", f"has no usable phrase for row {row}: {skipped}")
    scores = torch.as_tensor(strategy.scorer(state, row, [k["phrase"] for k in kept])).float()  # [K]
    if scores.shape != (len(kept),) or not bool(torch.isfinite(scores).all()):
        raise StrategyError(f"`{NAME}`: the scorer returned {tuple(scores.shape)} scores (finite: "
                            f"{bool(torch.isfinite(scores).all())}), expected {len(kept)} finite ones")
    rho = phrase_prior(scores, temperature=strategy.config["prior_temperature"], kind=strategy.config["prior"])
    for entry, r in zip(kept, rho.tolist()):
        entry["prior"] = r
        entry["first_tokens"] = [tokenizer.decode([i]) for i in entry["ids"]]
    return kept, skipped


def _pack(rows: list[list[dict[str, Any]]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row phrases → first-token ids ``[P, M]`` (padded with -1, which ``token_prior`` ignores) and the matching
    phrase priors ``[P, M]`` (one entry per first-token variant)."""
    flat = [[(i, k["prior"]) for k in kept for i in k["ids"]] for kept in rows]
    width = max(len(f) for f in flat)
    ids = torch.full((len(rows), width), -1, dtype=torch.long)
    rho = torch.zeros(len(rows), width)
    for row, pairs in enumerate(flat):
        ids[row, : len(pairs)] = torch.tensor([i for i, _ in pairs])
        rho[row, : len(pairs)] = torch.tensor([r for _, r in pairs])
    return ids.to(device), rho.to(device)


class VisualPriorFusion(Strategy):
    """Add a vision-derived prior over candidate phrases' first tokens: F_joint = F_L + λ·r_V (image → text)."""

    name = NAME
    params = (
        Param("weight", "float", 0.7, "λ; 0 disables", low=0.0),
        Param("bank", "str|list[str]", None, "candidate phrases: a comma list or a list"),
        Param("bank_file", "str", None, "a text file with one phrase per line"),
        Param("bank_from_question", "bool", False, "add the question's content words to the bank"),
        Param("scorer", "str", "aligned", "how phrases are scored against the image", choices=tuple(_SCORERS)),
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
            self.scorer = _SCORERS[self.config["scorer"]](self.config)

    def tokenizer(self, state: "StepState") -> Any:
        """The tokenizer whose first tokens get the prior: the model's."""
        return state.adapter.tokenizer

    def begin(self, state: "StepState") -> None:
        rows = [_row_prior(self, state, row) for row in range(state.num_pairs)]
        for row, (kept, skipped) in enumerate(rows):
            state.trace.write(self.name, row=row, skipped=skipped, phrases=[{
                "phrase": k["phrase"], "prior": round(k["prior"], 4), "first_tokens": k["first_tokens"]} for k in kept])
        self._ids, self._rho = _pack([kept for kept, _ in rows], state.adapter.device)  # [P, M] each
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
