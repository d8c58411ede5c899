"""The scorers of ``visual_prior_fusion``: how well each candidate phrase matches a row's images.

A scorer is a callable ``(state, row, phrases) -> [K]`` scores (``Scorer``); ``SCORERS`` maps the ``scorer``
parameter's names to factories taking the strategy's config. ``aligned`` (``AlignedScorer``, the default) compares
the model's own SigLIP features through its aligner with phrase token embeddings (``fusion_math.cosine_scores``; an
unvalidated heuristic); ``siglip`` (``SiglipScorer``) runs a separate SigLIP/CLIP model with a text tower from a
local folder. Both run host side, once per row, from ``strategies/visual_prior_fusion.py``'s ``begin``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from janus_decoding.plugins.strategy import StrategyError

from .fusion_bank import NAME, _fail
from .fusion_math import cosine_scores

if TYPE_CHECKING:
    from janus_decoding.core.state import StepState

__all__ = ["AlignedScorer", "SCORERS", "Scorer", "SiglipScorer"]

#: ``(state, row, phrases) -> [K]`` finite scores of the K phrases against row ``row``'s images (higher = likelier).
Scorer = Callable[["StepState", int, Sequence[str]], torch.Tensor]


def _row_pixels(state: "StepState", row: int) -> torch.Tensor:
    """Row ``row``'s input images ``[n, 3, S, S]``; a row without one is refused, since nothing could be scored."""
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


#: The ``scorer`` parameter's choices, each a factory taking the strategy's config.
SCORERS: dict[str, Callable[[dict[str, Any]], Scorer]] = {
    "aligned": lambda config: AlignedScorer(config["layers"]),
    "siglip": lambda config: SiglipScorer(config["scorer_path"]),
}
