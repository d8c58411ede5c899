"""The Python API behind ``Decoder.generate_images / answer / chat``: split work into micro-batches, run the core
loop with the decoder as its hooks, turn tokens into pictures or text, and gather the trace.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from janus_decoding.core.cfg import CFGConfig
from janus_decoding.core.loop import Sampler
from janus_decoding.core.runs import ImageRequest, run_images, run_text
from janus_decoding.core.sampling import RNGS

if TYPE_CHECKING:
    from .decoder import Decoder


@dataclass
class ImageResult:
    prompts: list[str]
    seeds: list[int]
    tokens: torch.Tensor  # [num_prompts, n, rows·cols] image-token ids
    images: list[list[Image.Image]]  # [num_prompts][n]
    trace: list[dict[str, Any]] = field(default_factory=list)  # host events from strategies
    intermediates: list[dict[str, Any]] = field(default_factory=list)  # {prompt, image, strategy, label, image: PIL}
    seconds: float = 0.0


@dataclass
class TextResult:
    texts: list[str]
    tokens: list[list[int]]
    trace: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """VQ decoder output ``[B, 3, H, W]`` (nominally [-1, 1]) → uint8 RGB pictures, as Janus's scripts clip them."""
    array = ((pixels.float().clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8)
    array = array.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a), mode="RGB") for a in array]


def _check_int(name: str, value: Any, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"`{name}` must be an integer ≥ {low}, got {value!r}")
    return value


def _seeds(seed: int | Sequence[int], count: int) -> list[int]:
    if isinstance(seed, int) and not isinstance(seed, bool):
        return [seed + i for i in range(count)]
    seeds = list(seed)
    if len(seeds) != count or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"`seed` must be an integer or one integer per prompt ({count}), got {seed!r}")
    return seeds


def _prompts(prompts: str | Sequence[str]) -> list[str]:
    items = [prompts] if isinstance(prompts, str) else list(prompts)
    if not items:
        raise ValueError("no prompt given")
    for i, p in enumerate(items):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt {i + 1} is empty")
    return items


def _sampler(greedy: bool, rng: str, seed: int, device: torch.device) -> Sampler:
    if rng not in RNGS:
        raise ValueError(f"`rng` must be one of {', '.join(RNGS)}, got {rng!r}")
    generator = None
    if rng == "torch" and not greedy:
        generator = torch.Generator(device=device).manual_seed(seed)
    return Sampler(greedy=greedy, rng=rng, generator=generator)


def generate_images(decoder: "Decoder", model: Any, prompts: str | Sequence[str], *, n: int = 1,
                    cfg: float | None = None, seed: int | Sequence[int] = 0, micro_batch: int | None = None,
                    greedy: bool = False, rng: str = "row", negative_prompt: str | None = None,
                    progress: Callable[[int], None] | None = None, fast: Any = None) -> ImageResult:
    """Generate ``n`` images per prompt. ``seed``: a base (prompt i gets ``seed + i``) or one seed per prompt.

    ``micro_batch`` (images per forward batch) bounds memory; with ``rng="row"`` and a decoder that does not
    couple rows, results are identical to one big batch. ``fast`` (default: on for CUDA models) runs the one-token
    steps as replayed CUDA graphs (``core/graph.py``); steps a strategy cannot capture run eagerly. Pass a
    ``FastOptions`` to choose how (``FastOptions(compile="inductor")`` was the fastest measured on an H200).
    """
    texts = _prompts(prompts)
    n = _check_int("n", n, 1)
    micro = _check_int("micro_batch", micro_batch, 1) if micro_batch is not None else n * len(texts)
    decoder.check_mode("image", model, has_image=False)
    overrides = cfg is not None or negative_prompt is not None  # an empty negative prompt is an error, not ignored
    run_decoder = decoder.with_cfg(weight=cfg, negative_prompt=negative_prompt) if overrides else decoder
    cfg_config: CFGConfig = run_decoder.cfg
    seeds = _seeds(seed, len(texts))
    requests = [ImageRequest(p, s, k) for p, s in zip(texts, seeds) for k in range(n)]
    start = time.perf_counter()
    token_rows, trace, intermediates = [], [], []
    with torch.inference_mode():
        for lo in range(0, len(requests), micro):
            chunk = requests[lo: lo + micro]
            sampler = _sampler(greedy, rng, chunk[0].seed, model.device)
            result = run_images(model, run_decoder, chunk, cfg=cfg_config, sampler=sampler, progress=progress,
                                loop=_outer_loop(model, fast))
            decoder.raise_on_bad_boundaries(result.state)
            _raise_on_flags(result.flags, chunk)
            token_rows.append(result.tokens)
            trace += [{**e, "batch_start": lo} for e in result.state.trace.events]
            for item in result.state.trace.images:
                for row, pil in enumerate(to_pil(item["pixels"])):
                    req = chunk[row] if row < len(chunk) else chunk[-1]
                    intermediates.append({"prompt": texts.index(req.prompt), "image": req.index,
                                          "strategy": item["strategy"], "label": item["label"], "picture": pil})
        tokens = torch.cat(token_rows).view(len(texts), n, -1)
        pictures = []
        for lo in range(0, len(requests), micro):
            pictures += to_pil(model.decode_image_tokens(tokens.view(len(requests), -1)[lo: lo + micro]))
    images = [pictures[i * n:(i + 1) * n] for i in range(len(texts))]
    return ImageResult(texts, seeds, tokens.cpu(), images, trace, intermediates, time.perf_counter() - start)


def _outer_loop(model: Any, fast: Any):
    """The outer loop of a run: the graph fast path on CUDA (unless ``fast=False``), else the eager loop. ``fast``
    may also be a ``core.graph.FastOptions`` (e.g. ``FastOptions(compile="inductor")``: fewer kernels a step, ~8 s of
    compiling on the first run of a shape)."""
    from janus_decoding.core.graph import FastLoop, FastOptions

    if not isinstance(fast, FastOptions):
        if fast is None:
            fast = model.device.type == "cuda"
        if not fast:
            from janus_decoding.core.loop import run

            return run
        fast = FastOptions()
    # One fast loop per model, kept between calls: the next run of the same shape and decoder replays the last
    # run's graphs (no capture, no warm-up step). It keeps that run's KV cache too; `release_fast_path` lets go.
    kept = getattr(model, "_fast_loop", None)
    if kept is None or kept.options != fast:
        kept = FastLoop(fast)
        model._fast_loop = kept
    return kept


def release_fast_path(model: Any) -> None:
    """Let go of the graphs, buffers and KV cache the model's fast loop keeps from its last run."""
    kept = getattr(model, "_fast_loop", None)
    if kept is not None:
        kept.release()


def _raise_on_flags(flags: torch.Tensor, chunk: Sequence[ImageRequest] | Sequence[str]) -> None:
    if bool(flags.any()):
        row = int(flags.nonzero()[0])
        from .decoder import StrategyOutputError

        raise StrategyOutputError(f"the final logits of row {row} were NaN, +inf or had no finite entry")


def _text_run(decoder: "Decoder", model: Any, rows: list[list[int]], pixels, *, max_new_tokens: int, seed: int,
              greedy: bool, rng: str, stream: Callable[[str], None] | None, prompts: list[str],
              fast: Any = None) -> TextResult:
    max_new_tokens = _check_int("max_new_tokens", max_new_tokens, 1)
    sampler = _sampler(greedy, rng, seed, model.device)
    start = time.perf_counter()
    streamer = _Streamer(model, stream) if stream is not None else None
    with torch.inference_mode():
        decoder_hooks = _StreamingHooks(decoder, streamer) if streamer is not None else decoder
        result = run_text(model, decoder_hooks, rows, max_new_tokens=max_new_tokens, sampler=sampler,
                          seeds=[seed] * len(rows), pixel_values=pixels, prompts=prompts,
                          loop=_outer_loop(model, fast if streamer is None else False))  # streaming reads each token
        decoder.raise_on_bad_boundaries(result.state)
        _raise_on_flags(result.flags, prompts)
    lengths = result.lengths.tolist()
    token_lists = [result.tokens[i, :lengths[i]].tolist() for i in range(len(rows))]
    texts = [model.decode_text(t) for t in token_lists]
    return TextResult(texts, token_lists, list(result.state.trace.events), time.perf_counter() - start)


class _Streamer:
    """Prints text as it is generated (streaming costs one host sync per token; only when asked for)."""

    def __init__(self, model: Any, sink: Callable[[str], None]) -> None:
        self.model, self.sink, self.ids, self.shown, self.done = model, sink, [], "", False

    def __call__(self, tokens: torch.Tensor) -> None:
        if self.done:
            return
        token = int(tokens[0])
        if token == self.model.eos_id:
            self.done = True
            return
        self.ids.append(token)
        text = self.model.decode_text(self.ids)
        self.sink(text[len(self.shown):])
        self.shown = text


class _StreamingHooks:
    def __init__(self, decoder: "Decoder", streamer: _Streamer) -> None:
        self._decoder, self._streamer = decoder, streamer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._decoder, name)

    def after_sample(self, state, tokens, probs) -> None:
        self._decoder.after_sample(state, tokens, probs)
        self._streamer(tokens)


def answer(decoder: "Decoder", model: Any, images: Sequence[Any], question: str, *, max_new_tokens: int = 128,
           seed: int = 0, greedy: bool = False, rng: str = "row", stream: Callable[[str], None] | None = None,
           fast: Any = None) -> TextResult:
    """Answer ``question`` about ``images`` (PIL images) with this decoder (image understanding, text mode).
    ``fast``: as in :func:`generate_images` (streaming runs eagerly: it reads every token on the host)."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("the question is empty")
    images = list(images)
    if not images:
        raise ValueError("understanding needs at least one image")
    model.require_janus("image understanding")
    decoder.check_mode("text", model, has_image=True)
    rows = [model.understanding_prompt_ids(question, len(images))]
    pixels = [model.preprocess_images(images)]
    return _text_run(decoder, model, rows, pixels, max_new_tokens=max_new_tokens, seed=seed, greedy=greedy,
                     rng=rng, stream=stream, prompts=[question], fast=fast)


def chat(decoder: "Decoder", model: Any, prompt: str | Sequence[str], *, max_new_tokens: int = 128, seed: int = 0,
         greedy: bool = False, rng: str = "row", stream: Callable[[str], None] | None = None,
         fast: Any = None) -> TextResult:
    """Text in, text out (Janus's chat template, or a plain causal LM's own encoding / chat template).
    ``fast``: as in :func:`answer`."""
    texts = _prompts(prompt)
    decoder.check_mode("text", model, has_image=False)
    rows = [model.chat_prompt_ids(t) for t in texts]
    return _text_run(decoder, model, rows, None, max_new_tokens=max_new_tokens, seed=seed, greedy=greedy, rng=rng,
                     stream=stream if len(texts) == 1 else None, prompts=texts, fast=fast)
