"""The phrase bank of ``visual_prior_fusion``, host side and once per run: phrases → first tokens → per-row prior.

``parse_bank`` reads the configured phrases, ``question_phrases`` adds a question's content words, ``first_tokens``
finds the ids a phrase can start an answer with (``T(c)``), ``row_prior`` scores one row's phrases and turns the
scores into ``ρ`` (``fusion_math.phrase_prior``), and ``pack_priors`` lays every row's ``(id, ρ)`` pairs out as the
``[P, M]`` tensors ``fusion_math.token_prior`` spreads onto the vocabulary. Tokenizers, files and scorers are host
work, so this is not pure tensor math; ``strategies/visual_prior_fusion.py`` calls it from ``begin``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch

from janus_decoding.plugins.strategy import StrategyError

from .fusion_math import phrase_prior

__all__ = ["STOP_WORDS", "first_tokens", "pack_priors", "parse_bank", "question_phrases", "row_prior"]

NAME = "visual_prior_fusion"
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
    """An error naming the strategy and the parameter, so a bad bank is traced to its setting."""
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


def row_prior(bank: Sequence[str], question: str | None, tokenizer: Any,
              score: Callable[[list[str]], torch.Tensor], *, row: int, temperature: float,
              kind: Literal["centered", "logprob"]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One row's ``(phrases with their ids and prior, skipped phrases)``: computed once so a step only adds a table.

    ``bank`` gains ``question``'s content words when a question is given; ``score`` rates the usable phrases against
    the row's images (``[K]`` finite scores); ``temperature`` and ``kind`` go to ``phrase_prior``. Raises
    :class:`StrategyError` when no phrase is usable or the scores have the wrong shape or are not finite.
    """
    if question is not None:
        bank = list(dict.fromkeys(list(bank) + question_phrases(question)))
    kept: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for phrase in bank:
        ids, reason = first_tokens(tokenizer, phrase)
        if ids:
            kept.append({"phrase": phrase, "ids": ids})
        else:
            skipped.append({"phrase": phrase, "reason": reason})
    if not kept:
        raise _fail("bank", f"has no usable phrase for row {row}: {skipped}")
    scores = torch.as_tensor(score([k["phrase"] for k in kept])).float()  # [K]
    if scores.shape != (len(kept),) or not bool(torch.isfinite(scores).all()):
        raise StrategyError(f"`{NAME}`: the scorer returned {tuple(scores.shape)} scores (finite: "
                            f"{bool(torch.isfinite(scores).all())}), expected {len(kept)} finite ones")
    rho = phrase_prior(scores, temperature=temperature, kind=kind)
    for entry, r in zip(kept, rho.tolist()):
        entry["prior"] = r
        entry["first_tokens"] = [tokenizer.decode([i]) for i in entry["ids"]]
    return kept, skipped


def pack_priors(rows: Sequence[Sequence[dict[str, Any]]],
                device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row phrases → first-token ids ``[P, M]`` (padded with -1, which ``token_prior`` ignores) and the matching
    phrase priors ``[P, M]`` (one entry per first-token variant): fixed-width tensors, so a step never loops rows."""
    flat = [[(i, k["prior"]) for k in kept for i in k["ids"]] for kept in rows]
    width = max(len(f) for f in flat)
    ids = torch.full((len(rows), width), -1, dtype=torch.long)
    rho = torch.zeros(len(rows), width)
    for row, pairs in enumerate(flat):
        ids[row, : len(pairs)] = torch.tensor([i for i, _ in pairs])
        rho[row, : len(pairs)] = torch.tensor([r for _, r in pairs])
    return ids.to(device), rho.to(device)
