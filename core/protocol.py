"""What the loop needs from a model and from a decoder: two small protocols, so ``core`` imports neither.

``models.adapter.JanusAdapter`` implements :class:`ModelAdapter` over transformers' Janus classes (or a plain causal
LM); ``plugins.decoder.Decoder`` implements :class:`HookRunner` by calling its strategies in the spec's order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Protocol, Sequence

import torch
from torch import nn

if TYPE_CHECKING:
    from .state import StepState

Mode = Literal["image", "text"]

# a stand-in for layer `index`'s module in a forward: (index, h [B, T, H], mask [B, 1, T, L], (cos, sin), cache) -> h
LayerFn = Callable[[int, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor], Any], torch.Tensor]
# the prompt's device work (core.loop.prompt_logits): (state, hooks, embeds, positions, valid, rows, layer_fn) ->
# (logits [B, V], next positions [B])
PromptForward = Callable[..., tuple[torch.Tensor, torch.Tensor]]


class ModelAdapter(Protocol):
    kind: Literal["janus", "causal_lm"]
    layers: Sequence[nn.Module]  # transformers decoder layers, called as layer(h, mask, pos, cache, True, (cos, sin))
    num_layers: int
    hidden_size: int
    intermediate_size: int  # the MLP's inner width
    num_heads: int  # query heads
    num_kv_heads: int
    head_dim: int
    device: torch.device
    dtype: torch.dtype
    image_grid: tuple[int, int] | None  # (rows, cols) of the image-token grid
    tokenizer: Any

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor: ...  # [B, T] -> [B, T, H]
    def embed_image_tokens(self, ids: torch.Tensor) -> torch.Tensor: ...  # [B] -> [B, H]
    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def final_norm(self, hidden: torch.Tensor) -> torch.Tensor: ...
    def head(self, hidden: torch.Tensor, mode: Mode) -> torch.Tensor: ...  # gen_head (image) or lm_head (text)
    def encode_images(self, pixel_values: torch.Tensor, layers: Sequence[int] | None = None) -> torch.Tensor: ...
    def decode_image_tokens(self, ids: torch.Tensor, rows: int | None = None) -> torch.Tensor: ...
    def special_id(self, name: str) -> int: ...
    def tokenize(self, text: str) -> list[int]: ...
    def decode_text(self, ids: Sequence[int]) -> str: ...


@dataclass
class KVAppend:
    """Append ``embeds`` ``[B, K, H]`` (or token ``ids`` ``[B, K]``) to the cache of every layer.

    ``rows`` ``[B]`` bool: rows that inject (the others get masked slots and keep their positions); ``advance``:
    whether the injecting rows' positions move on by K (default) or the next token reuses the old positions.
    """

    embeds: torch.Tensor | None = None
    ids: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    advance: bool = True


@dataclass
class KVEdit:
    """Add ``d_key``/``d_value`` (broadcast to ``[B, H_kv, D]``) to the cached slot ``slot`` of ``layer`` in place."""

    layer: int
    slot: int
    d_key: torch.Tensor | None = None
    d_value: torch.Tensor | None = None
    rows: torch.Tensor | None = None


@dataclass
class Rebuild:
    """Schedule action: restart from new prompt texts (one per pair), keeping the image tokens generated so far.

    The loop re-runs a prefill with a fresh cache: [new prompt ; embeddings of the generated tokens]. Uncond rows
    are built from the same text by DeepSeek's rule (interior tokens padded).
    """

    prompts: list[str]


@dataclass
class Rollback:
    """Schedule action: drop the last ``steps`` generated tokens and regenerate them with RNG stream ``stream``."""

    steps: int
    stream: int


@dataclass
class LayerKeep:
    """Layer-hook result: keep these positions ``[B, T']`` (sorted per row) from layer k on."""

    positions: torch.Tensor
    soft: bool = False  # True: multiply the dropped positions' hidden states by 0 instead of removing them


class HookRunner(Protocol):
    """The loop's view of a decoder: each method is one hook point (see ``plugins/hookspecs.py`` for the contract)."""

    def begin(self, state: "StepState") -> None: ...
    def kv_growth(self, state: "StepState") -> int: ...
    def kv_layer_reduction(self, state: "StepState") -> dict[int, int]: ...
    def input_embeddings(self, state: "StepState", embeds: torch.Tensor) -> torch.Tensor: ...
    def layer_points(self, state: "StepState") -> list[int]: ...
    def layer(self, state: "StepState", layer: int, hidden: torch.Tensor) -> LayerKeep | None: ...
    def hidden_layers(self, state: "StepState") -> list[int]: ...
    def exit_layers(self, state: "StepState") -> list[tuple[int, bool]]: ...
    def prompt_layers(self, state: "StepState") -> list[int]: ...
    def hidden_states(self, state: "StepState", hidden: dict[int, torch.Tensor]) -> None: ...
    def pre_logits(self, state: "StepState", logits: torch.Tensor) -> torch.Tensor: ...
    def post_cfg(self, state: "StepState", logits: torch.Tensor) -> torch.Tensor: ...
    def after_sample(self, state: "StepState", tokens: torch.Tensor, probs: torch.Tensor) -> None: ...
    def kv_inject(self, state: "StepState") -> list[KVAppend | KVEdit]: ...
    def schedule_points(self, state: "StepState") -> list[int]: ...
    def schedule(self, state: "StepState") -> Rebuild | Rollback | None: ...
    def end(self, state: "StepState") -> None: ...


class NoHooks:
    """A decoder with no strategies: every hook point is the identity."""

    def begin(self, state): pass
    def kv_growth(self, state): return 0
    def kv_layer_reduction(self, state): return {}
    def input_embeddings(self, state, embeds): return embeds
    def layer_points(self, state): return []
    def layer(self, state, layer, hidden): return None
    def hidden_layers(self, state): return []
    def exit_layers(self, state): return []
    def prompt_layers(self, state): return []
    def hidden_states(self, state, hidden): pass
    def pre_logits(self, state, logits): return logits
    def post_cfg(self, state, logits): return logits
    def after_sample(self, state, tokens, probs): pass
    def kv_inject(self, state): return []
    def schedule_points(self, state): return []
    def schedule(self, state): return None
    def end(self, state): pass


@dataclass
class Trace:
    """What strategies report: host-side events and per-step device buffers, gathered into manifests/--explain."""

    events: list[dict[str, Any]] = field(default_factory=list)
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    images: list[dict[str, Any]] = field(default_factory=list)  # intermediate images (e.g. TwiG stages)

    def write(self, strategy: str, **data: Any) -> None:
        self.events.append({"strategy": strategy, **data})

    def add_image(self, strategy: str, label: str, pixels: torch.Tensor) -> None:
        self.images.append({"strategy": strategy, "label": label, "pixels": pixels.detach().cpu()})
