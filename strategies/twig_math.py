"""Pure helpers of TwiG, Thinking-while-Generating (Guo et al., arXiv 2511.16671; code ZiyuGuo99/Thinking-while-Generating
@6588308, ``twig.py``): band boundaries, stage place names, prompt and question texts, score parsing, the
reflection decision, nested seeds and the cache growth each context needs.

TwiG splits the image-token grid (R rows × C columns, raster order) into S horizontal bands. Stage k generates grid
rows ``[k·R/S, (k+1)·R/S)``, i.e. tokens ``[k·n, (k+1)·n)`` with ``n = R·C/S``. Before a stage the model thinks (a short
text, the stage's *guidance*); after it, the model scores the partial image 0–100 and a score below the threshold
regenerates the stage. Nothing here touches the model; ``strategies/twig.py`` wires it to the loop.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

from janus_decoding.core.cfg import merge_branches

__all__ = ["band_rows", "stage_boundaries", "place_names", "compose_prompt", "think_question", "score_question",
           "parse_score", "passes", "nested_seed", "rebuild_growth", "inject_growth", "inject_rows", "to_uint8"]

#: Score range of the reflection (TwiG's prompt asks for 0–100).
SCORE_LOW, SCORE_HIGH = 0.0, 100.0
#: Tokens a separator and a tokenizer merge across the join may add per guidance text (a safe upper bound).
JOIN_SLACK_TOKENS = 4
# "SCORE: 87", "score = 87.5", "Score:87/100": TwiG parses the number after "SCORE:".
_SCORE = re.compile(r"score\s*[:=]\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)
_BARE_NUMBER = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*100)?\s*\.?\s*")
# Mixing nested seeds: distinct (seed, image, stage, attempt) give distinct seeds for realistic ranges.
_SEED_PRIMES = (1_000_003, 10_007, 101)


def band_rows(rows: int, stages: int) -> list[tuple[int, int]]:
    """The grid rows ``[start, end)`` of each stage: ``[(k·R/S, (k+1)·R/S) for k in range(S)]``.

    :param rows: R ≥ 1, the grid's rows (24 for Janus-Pro, 4 for the tiny model).
    :param stages: S ≥ 1; must divide R.
    :raises ValueError: naming ``stages``, when S < 1 or S does not divide R.

    Invariants:
    - the bands tile ``[0, R)`` in order, each of height R/S (``test_bands_tile_the_grid``)
    - for R = 24 and S = 2, 3, 4, 6, 8 the first band ends at 12, 8, 6, 4, 3 rows (``test_bands_for_janus_pro``)
    - S not dividing R, or S < 1, raises naming ``stages`` (``test_bands_refuse_bad_stages``)
    """
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise ValueError(f"`twig`: `stages` must be an integer ≥ 1, got {stages!r}")
    if rows % stages:
        divisors = [d for d in range(1, rows + 1) if rows % d == 0]
        raise ValueError(f"`twig`: `stages` must divide the grid's {rows} rows (one of {divisors}), got {stages}")
    height = rows // stages
    return [(k * height, (k + 1) * height) for k in range(stages)]


def stage_boundaries(rows: int, cols: int, stages: int) -> list[int]:
    """Token indices ``[0, n, 2n, …, R·C]`` where stages start and end (``n = R·C/S`` tokens per stage).

    Invariants:
    - S + 1 boundaries from 0 to R·C, equally spaced by ``n = R·C/S`` (``test_boundaries_token_counts``)
    - for R = C = 24: 3 stages → 192 tokens each, boundaries 0, 192, 384, 576 (``test_boundaries_token_counts``)
    """
    return [start * cols for start, _ in band_rows(rows, stages)] + [rows * cols]


def place_names(stages: int) -> list[str]:
    """Where each stage draws, in words: 1 → whole image; 2 → top/bottom; 3 → top/middle/bottom; more → top,
    ``band k of S from the top``…, bottom.

    Invariants:
    - one distinct name per stage; the first names the top and the last the bottom when S ≥ 2 (``test_place_names``)
    """
    if stages == 1:
        return ["whole image"]
    if stages == 3:
        return ["top part", "middle part", "bottom part"]
    middle = [f"band {k + 1} of {stages} from the top" for k in range(1, stages - 1)]
    return ["top part", *middle, "bottom part"]


def compose_prompt(prompt: str, guidance: Sequence[str]) -> str:
    """The rebuilt prompt: the user's prompt followed by the guidance so far (TwiG's cumulative description).

    Invariants:
    - empty guidance gives the prompt itself, unchanged (``test_compose_prompt``)
    """
    extra = [g.strip() for g in guidance if g.strip()]
    return " ".join([prompt, *extra]) if extra else prompt


def think_question(prompt: str, place: str, stage: int, stages: int, earlier: Sequence[str]) -> str:
    """The question the model answers before stage ``stage`` (0-based): what to draw in ``place`` next.

    Invariants:
    - names the prompt and the place; only later stages speak of a picture so far (``test_questions``)
    """
    lines = [f'We are drawing the image "{prompt}" band by band, from top to bottom.']
    if stage > 0:
        lines.append(f"The picture shows the {stage} of {stages} bands drawn so far.")
    if earlier:
        lines.append("Plans so far: " + " ".join(g.strip() for g in earlier if g.strip()))
    lines.append(f"In one or two short sentences, describe what to draw in the {place} of the image.")
    return "\n".join(lines)


def score_question(prompt: str, place: str) -> str:
    """The reflection question: how well the partial picture (ending with ``place``) matches the prompt.

    Invariants:
    - names the prompt, the ``SCORE:`` answer form and the range, so ``parse_score`` can read a compliant reply
      (``test_questions``)
    """
    return (f'The picture is the part drawn so far (down to the {place}) of an image of "{prompt}". '
            f"How well does it match the description? Answer with SCORE: followed by a number from "
            f"{SCORE_LOW:g} to {SCORE_HIGH:g}.")


def parse_score(text: str) -> float | None:
    """The 0–100 score in a reflection reply, or None when there is none (or it is out of range).

    Accepts ``SCORE: 87`` anywhere (case-insensitive, ``:`` or ``=``; the first occurrence) or a reply that is only
    a number (``87``, ``87/100``). TwiG's code counted an unparseable reply as a pass; here the caller decides.

    Invariants:
    - ``SCORE: x`` for x in [0, 100] parses to x, whatever text surrounds it (``test_parse_score_roundtrip``)
    - replies without a number, or with one outside [0, 100], give None (``test_parse_score_rejects``)
    """
    match = _SCORE.search(text) or _BARE_NUMBER.fullmatch(text)
    if match is None:
        return None
    value = float(match.group(1))
    return value if SCORE_LOW <= value <= SCORE_HIGH else None


def passes(scores: Sequence[float | None], threshold: float, on_unparseable: str) -> list[bool]:
    """Whether each image's stage is kept: ``score ≥ threshold``; None follows ``on_unparseable``
    (``"accept"`` keeps, ``"regenerate"`` rejects).

    Invariants:
    - monotone: raising the threshold never turns a rejection into a pass (``test_passes_monotone``)
    - threshold 0 keeps every parsed score; None follows the policy (``test_passes_monotone``)
    """
    if on_unparseable not in ("accept", "regenerate"):
        raise ValueError(f"`twig`: `on_unparseable` must be 'accept' or 'regenerate', got {on_unparseable!r}")
    return [(on_unparseable == "accept") if s is None else s >= threshold for s in scores]


def nested_seed(seed: int, image: int, stage: int, attempt: int) -> int:
    """A seed for a nested (sampled) answer, distinct per image, stage and attempt, and fixed by the run's seed.

    Invariants:
    - distinct for distinct (image, stage, attempt) in realistic ranges, and non-negative (``test_nested_seed_distinct``)
    """
    a, b, c = _SEED_PRIMES
    return (seed * a + image * b + stage * c + attempt) % (2**63 - 1)


def rebuild_growth(stages: int, think_max_tokens: int) -> int:
    """Most extra prompt tokens a rebuilt prompt carries: every stage's guidance (cumulative), each clipped to
    ``think_max_tokens`` tokens, plus the join slack.

    Invariants:
    - a prompt rebuilt with every stage's clipped guidance fits, with the tiny tokenizer (``test_growth_bounds``)
    """
    return stages * (think_max_tokens + JOIN_SLACK_TOKENS)


def inject_growth(stages: int, think_max_tokens: int, images: int) -> int:
    """Most cache slots ``context="inject"`` appends: stage 0's guidance goes into the prompt (a rebuild, there are
    no image tokens yet); each later stage appends one entry block per image (the other rows get masked slots).

    Invariants:
    - grows with the images and the stages; one stage needs only the prompt's share (``test_growth_bounds``)
    """
    return (think_max_tokens + JOIN_SLACK_TOKENS) * (1 + (stages - 1) * images)


def inject_rows(ids: Sequence[int], image: int, images: int, pad_id: int, layout: str,
                device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """One image's guidance as a KV-append block: ids ``[B, K]`` (its cond row holds ``ids``, its uncond row the pad
    id, DeepSeek's rule for uncond text; other rows pad) and the injecting rows ``[B]`` (that image's pair).

    Invariants:
    - exactly the two rows of image ``image`` inject, in either CFG layout; cond row = ids, uncond row = pad
      (``test_inject_rows_pairs``)
    """
    k = len(ids)
    cond = torch.full((images, k), pad_id, dtype=torch.long, device=device)  # [P, K]
    cond[image] = torch.tensor(list(ids), dtype=torch.long, device=device)
    uncond = torch.full_like(cond, pad_id)
    chosen = torch.zeros(images, dtype=torch.bool, device=device)
    chosen[image] = True
    return merge_branches(cond, uncond, layout), merge_branches(chosen, chosen, layout)


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """VQ-decoder pixels ``[P, 3, H, W]`` (nominally [-1, 1]) → ``[P, H, W, 3]`` uint8, clipped as Janus's scripts do.

    Invariants:
    - −1 ↦ 0, 1 ↦ 255, values outside [−1, 1] clip; the input is not modified (``test_to_uint8``)
    """
    scaled = ((pixels.float().clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)
    return scaled.permute(0, 2, 3, 1).contiguous()
