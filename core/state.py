"""The state a hook receives: read-only views of the run, and the services strategies use instead of the model.

Strategies never reach into the raw model: early-exit heads, attention scores, prompt hidden states, a language-model
forward, image encoding, text embedding, partial VQ decoding and nested answers all go through here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from .cache import StaticKVCache
from .cfg import guidance_weight, guide_rows
from .compiling import compiled
from .exits import exit_logits
from .fused import final_rms_norm, rms_norm
from .protocol import ModelAdapter, Mode, Trace

if TYPE_CHECKING:
    from PIL import Image


@dataclass
class StepState:
    """One run's state. Tensors are views: hooks read them and must not write them (the loop owns them).

    Shapes: ``B`` = batch rows (2 per image in image mode), ``P`` = images (image mode) or sequences (text mode),
    ``V`` = the head's vocabulary, ``H`` = hidden size.
    """

    adapter: ModelAdapter
    mode: Mode
    layout: str  # CFG row layout: "interleaved" or "halves" (image mode)
    num_pairs: int  # P
    total_steps: int  # image tokens to generate, or max new tokens
    prompt_ids: torch.Tensor  # [B, T0] left-padded prompt ids (as the prefill saw them)
    attention_mask: torch.Tensor  # [B, T0] bool: False on left padding
    prompt_positions: torch.Tensor  # [B, T0]
    next_positions: torch.Tensor  # [B] position id of the next token fed
    cache: StaticKVCache
    generated: torch.Tensor  # [P, total_steps] tokens so far (valid up to `step`)
    history: torch.Tensor  # [P, L] ids a repetition penalty looks at (text: prompt + generated; image: generated)
    history_valid: torch.Tensor  # [P, L] bool
    history_offset: int  # column of generated token 0 in `history`
    rng_keys: torch.Tensor  # [P, 3] (seed, image index, stream) for rng="row"
    cfg_weight: torch.Tensor  # 0-d device tensor
    cfg_schedule: str
    step: int = 0  # host copy of the step; inside a captured step use `step_t`
    step_t: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))
    last_probs: torch.Tensor | None = None  # [P, V] fp32 distribution sampled at the last step
    image_token_mask: torch.Tensor | None = None  # [B, T0] bool: prompt positions holding image features
    pixel_values: list[torch.Tensor] | None = None  # per row, understanding mode
    prompts: list[str] = field(default_factory=list)  # one per pair/sequence
    seeds: list[int] = field(default_factory=list)
    trace: Trace = field(default_factory=Trace)
    memory: dict[str, Any] = field(default_factory=dict)  # per-run scratch space, keyed by strategy name
    _prompt_hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    _layer_inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # prefill: last-position input per layer
    _answer: Callable[..., list[str]] | None = None
    compile_backend: str | None = None  # set by a loop that compiles (FastOptions.compile); read by `compiled`
    exits: Any = None  # this forward's early exits (core/exits.py `Exits`), set by the loop; read via exit_logits

    # -- views -----------------------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    @property
    def image_grid(self) -> tuple[int, int] | None:
        return self.adapter.image_grid

    def current_cfg_weight(self) -> torch.Tensor:
        return guidance_weight(self.cfg_weight, self.cfg_schedule, self.step_t, self.total_steps)

    # -- services --------------------------------------------------------------------------------------------
    def compiled(self, fn: Callable) -> Callable:
        """``fn`` through ``torch.compile`` when the loop compiles (the graph loop with ``FastOptions.compile``),
        else ``fn`` itself: a strategy opts its pure per-step math in, the loop decides. One compiled wrapper per
        function and backend for the process (``fullgraph=True``, static shapes)."""
        return fn if self.compile_backend is None else compiled(fn, self.compile_backend)

    def heads(self, hidden: torch.Tensor, *, final_norm: bool) -> torch.Tensor:
        """Run this mode's head (``gen_head`` or ``lm_head``) over ``[J, B, H]`` hidden states in ONE batched call.

        In a compiling loop a LLaMA final norm runs as the fast step's fused rms norm (one kernel instead of the
        module's seven), as the fast step's own final norm does."""
        h = self._final_norm(hidden) if final_norm else hidden
        return self.adapter.head(h, self.mode)  # [J, B, V]

    def exit_logits(self, layers: Sequence[int], *, final_norm: bool) -> torch.Tensor:
        """The head's logits ``[J, B, V]`` at the last position of ``layers`` (declared, with this ``final_norm``,
        by the strategy's ``exit_layers``) in the forward whose logits the hooks see now. In the one-token step the
        loop ran them through the head together with the final rows (one read of the head's weights)."""
        return exit_logits(self, layers, final_norm)

    def _final_norm(self, hidden: torch.Tensor) -> torch.Tensor:
        rms = final_rms_norm(self.adapter) if self.compile_backend is not None else None
        return self.adapter.final_norm(hidden) if rms is None else self.compiled(rms_norm)(hidden, *rms)

    def guide(self, rows: torch.Tensor) -> torch.Tensor:
        """Guide any ``[B, …]`` pair of logits exactly as the core guides the final ones → ``[P, …]``."""
        return self.compiled(guide_rows)(rows, self.layout, self.current_cfg_weight())

    def attention_scores(self, layer: int, position: int = -1) -> torch.Tensor:
        """Softmax attention ``[B, heads, L]`` that ``position`` of the prefill pays the cached keys of ``layer``.

        Computed from that position's query and the cached keys (no full attention map is materialised); the
        loop keeps the prefill input of each layer that a layer hook may ask about.
        """
        if layer not in self._layer_inputs:
            raise ValueError(f"attention_scores: layer {layer} was not kept (only layers before a layer hook are)")
        h = self._layer_inputs[layer][:, position]  # [B, H]
        pos = self.prompt_positions[:, position:][:, :1]  # [B, 1]
        q = self.adapter.query(layer, h[:, None], pos)  # [B, heads, 1, D]
        scaling = self.adapter.layers[layer].self_attn.scaling
        written = self.cache.written(layer)
        keys = self.cache.keys[layer][:, :, :written]  # [B, nkv, L, D]
        keys = keys.repeat_interleave(q.shape[1] // keys.shape[1], dim=1)
        scores = (q @ keys.transpose(-1, -2)).squeeze(2) * scaling  # [B, nh, L]
        valid = self.cache.valid[layer, :, :written]
        scores = scores.float().masked_fill(~valid[:, None], float("-inf"))
        return torch.softmax(scores, dim=-1)

    def prompt_hidden(self, layer: int) -> torch.Tensor:
        """Hidden states ``[B, T0, H]`` of the prompt entering ``layer`` (declared through ``prompt_layers``)."""
        if layer not in self._prompt_hidden:
            raise ValueError(f"prompt_hidden: layer {layer} was not requested by any strategy's prompt_layers")
        return self._prompt_hidden[layer]

    def lm_forward(self, embeds: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """A causal language-model forward over ``[B, T, H]`` embeddings (no cache) → final-normed ``[B, T, H]``."""
        b, t, _ = embeds.shape
        valid = torch.ones(b, t, dtype=torch.bool, device=embeds.device) if valid is None else valid
        positions = (valid.long().cumsum(-1) - 1).clamp_min(0)
        causal = torch.ones(t, t, dtype=torch.bool, device=embeds.device).tril()
        mask = causal[None, None] & valid[:, None, None, :]
        cos_sin = self.adapter.rotary(embeds, positions)
        h = embeds
        for layer in self.adapter.layers:
            h = layer(h, mask, positions, None, False, cos_sin)
        return self.adapter.final_norm(h)

    def encode_image(self, pixel_values: torch.Tensor, layers: Sequence[int] | None = None) -> torch.Tensor:
        """SigLIP features through Janus's aligner ``[n, tokens, H]``; ``layers`` in the core's index convention."""
        return self.adapter.encode_images(pixel_values, layers)

    def embed_text(self, text: str) -> torch.Tensor:
        """Token embeddings ``[T, H]`` of ``text`` (tokenised as the model's tokenizer does, BOS included)."""
        ids = torch.tensor(self.adapter.tokenize(text), device=self.adapter.device)
        return self.adapter.embed_text(ids[None])[0]

    def decode_partial(self, tokens: torch.Tensor) -> torch.Tensor:
        """Decode the first ``k`` full grid rows of image tokens ``[P, k·cols]`` to pixels ``[P, 3, k·16, W]``."""
        return self.adapter.decode_image_tokens(tokens, rows=tokens.shape[1] // self.adapter.image_grid[1])

    def answer(self, images: Sequence["Image.Image"] | None, question: str, **kwargs: Any) -> str:
        """A nested text answer from the same model (fresh cache, no strategies), e.g. TwiG's thinking."""
        if self._answer is None:
            raise RuntimeError("answer: this run has no nested-answer service")
        return self._answer(images, question, **kwargs)

    def step_buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A preallocated per-step trace buffer ``[total_steps, *shape]`` (write with ``index_copy_`` at ``step_t``)."""
        if name not in self.trace.buffers:
            self.trace.buffers[name] = torch.zeros((self.total_steps, *shape), dtype=dtype, device=self.adapter.device)
        return self.trace.buffers[name]

