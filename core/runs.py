"""Setting a run up: prompt rows, the static cache, the state — then handing it to the loop.

``run_images`` builds one micro-batch of image requests (cond and uncond rows in the declared CFG layout);
``run_text`` builds a batch of text prompts, merging image features into their placeholder positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .batch import PromptBatch, image_rows, left_pad, uncond_ids
from .cache import StaticKVCache
from .cfg import CFGConfig, pair_rows
from .loop import RunResult, Sampler, run
from .protocol import HookRunner, ModelAdapter, NoHooks, Rebuild
from .repeatable import attention_kernels
from .state import StepState


@dataclass(frozen=True)
class ImageRequest:
    """One image to generate: its prompt, its prompt's seed and its index within that prompt."""

    prompt: str
    seed: int
    index: int = 0
    negative_prompt: str | None = None


def _new_cache(adapter: ModelAdapter, rows: int, length: int, reduction: dict[int, int] | None = None,
               reuse: Callable[[tuple], StaticKVCache | None] | None = None) -> StaticKVCache:
    """The static cache; ``reduction`` {k: slots} shortens layers ≥ k by the slots a layer hook will drop there.
    ``reuse``: the loop's ``reusable_cache`` — a cache it kept from its last run (with the graphs that read it), if
    that had this geometry (else it lets its kept one go before this one is allocated)."""
    lengths = [length - sum(n for k, n in (reduction or {}).items() if k <= layer) for layer in range(adapter.num_layers)]
    if reuse is not None:
        device = torch.empty(0, device=adapter.device).device  # "cuda" → "cuda:0", as a tensor's device reads
        kept = reuse((adapter.num_layers, rows, length, adapter.num_kv_heads, adapter.head_dim, adapter.dtype, device,
                      tuple(lengths)))
        if kept is not None:
            return kept
    return StaticKVCache(num_layers=adapter.num_layers, batch=rows, max_len=length, num_kv_heads=adapter.num_kv_heads,
                         head_dim=adapter.head_dim, dtype=adapter.dtype, device=adapter.device, layer_lengths=lengths)


def _image_prompt_rows(adapter, prompts: Sequence[str], negatives: Sequence[str | None], layout: str) -> PromptBatch:
    pad = adapter.pad_id
    cond = [adapter.generation_prompt_ids(p) for p in prompts]
    uncond = [adapter.generation_prompt_ids(n) if n else uncond_ids(c, pad) for c, n in zip(cond, negatives)]
    return left_pad(image_rows(cond, uncond, layout), pad, adapter.device)


def run_images(adapter: ModelAdapter, hooks: HookRunner, requests: Sequence[ImageRequest], *, cfg: CFGConfig,
               sampler: Sampler, progress: Callable[[int], None] | None = None,
               loop: Callable[..., RunResult] = run) -> RunResult:
    """Generate the full image-token grid for each request; returns tokens ``[P, rows·cols]``.

    ``loop`` is the outer loop to hand the run to: :func:`core.loop.run` (eager) or one with its signature, such as
    :class:`core.graph.FastLoop` (CUDA graphs).
    """
    adapter.require_janus("image generation")
    rows, cols = adapter.image_grid
    steps = rows * cols
    negatives = [r.negative_prompt or cfg.negative_prompt for r in requests]
    batch = _image_prompt_rows(adapter, [r.prompt for r in requests], negatives, cfg.layout)
    state = _new_state(adapter, hooks, batch, mode="image", layout=cfg.layout, steps=steps,
                       seeds=[r.seed for r in requests], indices=[r.index for r in requests],
                       prompts=[r.prompt for r in requests], cfg=cfg, history_prefix=None,
                       reuse=getattr(loop, "reusable_cache", None))

    def rebuild(st: StepState, action: Rebuild) -> tuple[PromptBatch, torch.Tensor]:
        if len(action.prompts) != st.num_pairs:
            raise ValueError(f"Rebuild needs one prompt per image ({st.num_pairs}), got {len(action.prompts)}")
        text = _image_prompt_rows(adapter, action.prompts, negatives, cfg.layout)
        done = st.generated[:, : st.step]  # [P, t]
        image_ids = pair_rows(done, cfg.layout)  # [B, t]
        embeds = torch.cat([adapter.embed_text(text.ids), adapter.embed_image_tokens(image_ids)], dim=1)
        tail = text.next_positions[:, None] + torch.arange(done.shape[1], device=adapter.device)[None]
        full = PromptBatch(torch.cat([text.ids, image_ids], 1),
                           torch.cat([text.valid, torch.ones_like(image_ids, dtype=torch.bool)], 1),
                           torch.cat([text.positions, tail], 1))
        st.prompt_ids, st.attention_mask, st.prompt_positions = full.ids, full.valid, full.positions
        return full, embeds

    with attention_kernels():
        return loop(state, hooks, batch, adapter.embed_text(batch.ids), sampler, rebuild=rebuild, progress=progress)


def run_text(adapter: ModelAdapter, hooks: HookRunner, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
             sampler: Sampler, seeds: Sequence[int], pixel_values: Sequence[torch.Tensor | None] | None = None,
             prompts: Sequence[str] = (), progress: Callable[[int], None] | None = None,
             eos_id: int | None = -1, loop: Callable[..., RunResult] = run) -> RunResult:
    """Generate up to ``max_new_tokens`` per prompt (stopping at EOS: the tokenizer's unless ``eos_id`` is given,
    ``None`` = never stop early); image features fill placeholder slots. ``loop``: as in :func:`run_images`."""
    batch = left_pad(prompt_ids, adapter.pad_id, adapter.device)
    embeds = adapter.embed_text(batch.ids)
    with attention_kernels():  # the vision tower's attention too
        embeds, image_mask = _place_image_features(adapter, batch, embeds, pixel_values)
    state = _new_state(adapter, hooks, batch, mode="text", layout="interleaved", steps=max_new_tokens, seeds=seeds,
                       indices=[0] * len(prompt_ids), prompts=list(prompts), cfg=None, history_prefix=batch,
                       image_token_mask=image_mask, reuse=getattr(loop, "reusable_cache", None))
    state.pixel_values = list(pixel_values) if pixel_values is not None else None
    with attention_kernels():
        return loop(state, hooks, batch, embeds, sampler, eos_id=adapter.eos_id if eos_id == -1 else eos_id,
                    pad_id=adapter.pad_id, progress=progress)


def _place_image_features(adapter: ModelAdapter, batch: PromptBatch, embeds: torch.Tensor,
                          pixel_values: Sequence[torch.Tensor | None] | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Image features written into each prompt's placeholder slots; the placeholder mask (None without images)."""
    image_mask = None
    if pixel_values is not None and any(p is not None for p in pixel_values):
        tag = adapter.special_id("<image_placeholder>")
        image_mask = batch.ids == tag  # [B, T0]
        embeds = embeds.clone()
        for row, pv in enumerate(pixel_values):
            if pv is None:
                continue
            feats = adapter.encode_images(pv).reshape(-1, embeds.shape[-1]).to(embeds.dtype)
            slots = image_mask[row].nonzero().squeeze(-1)  # host-side setup, once per prompt
            if slots.numel() != feats.shape[0]:
                raise ValueError(f"prompt {row}: {slots.numel()} image slots but {feats.shape[0]} image features")
            embeds[row, slots] = feats
    return embeds, image_mask


def answer_text(adapter: ModelAdapter, images: Sequence[Any] | None, question: str, *, max_new_tokens: int = 64,
                greedy: bool = True, seed: int = 0, hooks: HookRunner | None = None) -> str:
    """One understanding answer with no strategies (the nested-answer service and the plain `understand`)."""
    images = list(images or [])
    ids = adapter.understanding_prompt_ids(question, len(images)) if images else adapter.chat_prompt_ids(question)
    pixels = [adapter.preprocess_images(images)] if images else None
    result = run_text(adapter, hooks or NoHooks(), [ids], max_new_tokens=max_new_tokens,
                      sampler=Sampler(greedy=greedy), seeds=[seed], pixel_values=pixels, prompts=[question])
    n = int(result.lengths[0])
    return adapter.decode_text(result.tokens[0, :n].tolist())


def _new_state(adapter, hooks, batch: PromptBatch, *, mode, layout, steps, seeds, indices, prompts, cfg,
               history_prefix: PromptBatch | None, image_token_mask: torch.Tensor | None = None,
               reuse: Callable[[tuple], StaticKVCache | None] | None = None) -> StepState:
    pairs = len(seeds)
    device = adapter.device
    probe = StepState(adapter=adapter, mode=mode, layout=layout, num_pairs=pairs, total_steps=steps,
                      prompt_ids=batch.ids, attention_mask=batch.valid, prompt_positions=batch.positions,
                      next_positions=batch.next_positions, cache=None, generated=None, history=None,
                      history_valid=None, history_offset=0, rng_keys=None, cfg_weight=None,
                      cfg_schedule="constant", prompts=list(prompts), seeds=list(seeds),
                      image_token_mask=image_token_mask)
    growth = int(hooks.kv_growth(probe))
    reduction = getattr(hooks, "kv_layer_reduction", lambda state: {})(probe)
    probe.cache = _new_cache(adapter, batch.ids.shape[0], batch.ids.shape[1] + steps + growth, reduction, reuse)
    probe.generated = torch.zeros(pairs, steps, dtype=torch.long, device=device)
    if history_prefix is not None:  # text: transformers' semantics, the prompt counts as history
        probe.history = torch.cat([history_prefix.ids, probe.generated], 1)
        # transformers' RepetitionPenaltyLogitsProcessor sees every input id, left padding included
        probe.history_valid = torch.cat([torch.ones_like(history_prefix.valid),
                                         torch.zeros_like(probe.generated, dtype=torch.bool)], 1)
        probe.history_offset = history_prefix.ids.shape[1]
    else:  # image: the pair's generated image tokens only
        probe.history = torch.zeros_like(probe.generated)
        probe.history_valid = torch.zeros_like(probe.generated, dtype=torch.bool)
    probe.rng_keys = torch.tensor([[s, i, 0] for s, i in zip(seeds, indices)], dtype=torch.long, device=device)
    probe.cfg_weight = torch.tensor(cfg.weight if cfg else 1.0, dtype=torch.float32, device=device)
    probe.cfg_schedule = cfg.schedule if cfg else "constant"
    probe.step_t = torch.zeros((), dtype=torch.long, device=device)
    probe._answer = lambda images, question, **kw: answer_text(adapter, images, question, **kw)
    return probe
