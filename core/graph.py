"""The fast path of generation (image and text modes): the decode step with fixed shapes, captured as CUDA graphs
and replayed.

:class:`FastLoop` has the signature of :func:`core.loop.run` (pass it as ``run_images(..., loop=FastLoop())``). The
prefill, the first token and every host-side decision (schedule hooks, KV injection) run eagerly, as in ``run``;
the one-token steps between them run as one captured step each:

    re-embed the last tokens → forward one token (write K/V at device slots, read only the filled length) →
    ``hidden_states`` hooks → head → ``pre_logits`` hooks → guidance → ``post_cfg`` hooks → sample → record

Text mode is the same step with the text embeddings and ``lm_head``, no guidance, and the eager loop's EOS
bookkeeping (finished rows get pad ids) done on the device; the host looks at the finished flags once every
``EOS_CHECK_EVERY`` steps, as the eager loop does.

Everything that changes from step to step is a device tensor advanced inside the graph: the step (``state.step_t``),
the position ids, the cache slot each layer writes, the last tokens. A replay therefore needs no host work, and the
host mirrors (``cache.fill``, ``state.step``) are advanced beside it.

Attention reads only what is filled, three ways (``FastOptions.attention``; ``"auto"``, the default, takes
``"triton"`` where few (row, head) pairs would leave SDPA's kernels short of work, else ``"sdpa"``):

* ``"sdpa"``: ``scaled_dot_product_attention`` over a read length rounded up to a bucket of ``bucket`` slots, with a
  mask of the written, visible slots; one graph per bucket, captured when first needed (``bucket=0``: one graph
  reading the whole cache).
* ``"flash"``: the flash kernel's variable-length entry with a per-row count of used keys (``seqused_k``), which
  reads exactly the filled slots, so one graph serves every step. It has no mask, so it is used only while every
  filled slot is visible to every row (no left padding, no masked injection); otherwise the run uses ``"sdpa"``.
* ``"triton"``: this project's split-KV decode kernels (``core/decode_attention.py``): the read length comes from the
  device, the cache's validity bits are the mask, and the new key and value are written into the cache by the
  attention kernel itself; one graph serves every step. Needs the fused layers, Triton and CUDA (or Triton's
  interpreter); otherwise the run uses ``"sdpa"``.

The layers run as transformers' modules (``layers="transformers"``) or as the same math with fewer kernels
(``layers="fused"``: one GEMM for q/k/v and one for gate/up, over weights concatenated once and shared with the
modules, which keep views of them; the residual adds fused into the output GEMMs).

What cannot be captured runs eagerly, and the loop says so once per reason (an :class:`EagerStepWarning`): a
strategy with ``graph_safe = False`` (the whole run); a ``schedule`` hook (its boundaries); a ``kv_inject``
action (that step's injection). Hooks run their Python once, at capture: graph-safe strategies keep per-run state in
device tensors updated in place. A step that *replaces* a tensor in ``state.memory`` (``memory[k] = f(memory[k])``)
or ``state.last_probs`` is committed back into the original tensor at the end of the captured step, so the next
replay reads the new value rather than the one frozen at capture.

With ``graphs=False`` (or without CUDA) the same step code runs eagerly: the graph-free path, which the CPU tests
compare with the core loop token for token.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F

from .cache import StaticKVCache
from .cfg import pair_rows
from .decode_attention import decode_attention, decode_attention_unavailable, few_programs, launch_config
from .embedding_table import image_embedding_table
from .exits import head_logits
from .fused import (GEMM_FORMS, PrefillLayers, _layer_pieces, _LayerWeights, add_delta, add_delta_and_norm,
                    final_rms_norm, fuse_projections)
from .loop import (EOS_CHECK_EVERY, RunResult, Sampler, _Boundary, apply_schedule, finish_text, inject, prefill, run,
                   select_token)
from .protocol import HookRunner, NoHooks, Rebuild
from .prompt_graph import PromptGraph, PromptRunner, prompt_capturable
from .qkv_rope import qkv_rope, qkv_rope_unavailable
from .reuse import Slot, detach, memory_tensors, run_tensors, snapshot, transplant
from .sampling import race_from, row_key_hash, vocab_hash
from .skinny_gemm import AUTO_ROWS, load_kernels, skinny_gemm_cannot_run
from .state import StepState

__all__ = ["EagerStepWarning", "FastLoop", "FastOptions", "fuse_projections"]


class EagerStepWarning(UserWarning):
    """Some steps of a run go eagerly instead of through a captured graph (said once per reason)."""


_SAID: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _SAID:
        _SAID.add(message)
        warnings.warn(message, EagerStepWarning, stacklevel=3)


@dataclass(frozen=True)
class FastOptions:
    """How the fast step is built. The defaults are the fastest measured on an H200 (see ``benchmarks/README.md``)."""

    graphs: bool = True  # capture and replay CUDA graphs (CUDA only); False: run the same step code eagerly
    layers: Literal["fused", "transformers"] = "fused"
    # "auto": "triton" where few (row, head) pairs leave SDPA's kernels short of work (text at small batch) and the
    # kernels can run, else "sdpa" (what measured fastest on an H200 for each; benchmarks/README.md)
    attention: Literal["auto", "sdpa", "flash", "triton"] = "auto"
    # "sdpa": read lengths are rounded up to a multiple of this (0 = the whole cache, one graph); 32 measured 0.4 and
    # 0.8 % faster than 64 at the 7B image batch, for twice the captured graphs (benchmarks/README.md)
    bucket: int = 32
    split: int = 0  # "triton": cache slots each attention program reads (a power of two; 0 = per launch_config)
    check_syncs: bool = False  # CUDA, graph-free: run each step under torch.cuda.set_sync_debug_mode("error")
    # fused layers: compile the two pure pieces of a layer, the core's sampling math and strategies' `state.compiled`
    # math with this torch.compile backend ("inductor" fuses rope, the q/k/v split, SiLU·mul, guidance and the row
    # draw into fewer kernels; "max-autotune": Inductor also times Triton GEMM templates against cuBLAS per shape);
    # None: plain ops. Compiled once per shape and process, at the warm-up step.
    compile: str | None = None
    # fused layers: the layer GEMMs as "cublas" (F.linear) or "triton" (core/skinny_gemm.py, up to 64 rows); "auto":
    # "triton" for 17–32 rows on CUDA (the image batch of 16 with CFG, where it measured faster on an H200), the
    # one-row multiply-reduce when compiling one row (text at batch 1), else "cublas"
    # ("matvec" asks for that multiply-reduce; compiled pieces only)
    gemm: Literal["auto", "cublas", "triton", "matvec"] = "auto"
    # "triton": the programs a split-K GEMM (output and down projections) aims at (core.skinny_gemm.launch_for)
    split_programs: int = 128
    # with graphs: the prompt's forward captured too and replayed by the next run of the same signature when the
    # prefill calls no hook with tensors (core/prompt_graph.py)
    prompt_graph: bool = True
    # "triton" GEMMs with the first half storing k/v: the rotary and the k/v store in the q/k/v GEMM's epilogue
    # (core/qkv_rope.py: one kernel a layer fewer)
    rotary_in_gemm: bool = True
    # image mode on CUDA: the image tokens' embeddings looked up in a table built once (core/embedding_table.py)
    # instead of re-embedded through the model's MLP each step
    image_table: bool = True
    # Inductor settings for the compiled layer pieces, as (name, value) pairs (dotted names for sub-configs, e.g.
    # ("triton.cooperative_reductions", True)); names this torch does not know are left out
    inductor: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.layers not in ("fused", "transformers"):
            raise ValueError(f"`layers` must be 'fused' or 'transformers', got {self.layers!r}")
        if self.attention not in ("auto", "sdpa", "flash", "triton"):
            raise ValueError(f"`attention` must be 'auto', 'sdpa', 'flash' or 'triton', got {self.attention!r}")
        if not isinstance(self.split, int) or self.split and (self.split < 16 or self.split & (self.split - 1)):
            raise ValueError(f"`split` must be 0 or a power of two >= 16, got {self.split!r}")
        if not isinstance(self.bucket, int) or self.bucket < 0:
            raise ValueError(f"`bucket` must be an integer >= 0, got {self.bucket!r}")
        if self.gemm not in ("auto", *GEMM_FORMS):
            raise ValueError(f"`gemm` must be 'auto', 'cublas', 'triton' or 'matvec', got {self.gemm!r}")
        if not isinstance(self.split_programs, int) or self.split_programs < 1:
            raise ValueError(f"`split_programs` must be an integer >= 1, got {self.split_programs!r}")
        if not isinstance(self.inductor, tuple) or not all(isinstance(p, tuple) and len(p) == 2 and
                                                            isinstance(p[0], str) for p in self.inductor):
            raise ValueError(f"`inductor` must be a tuple of (name, value) pairs, got {self.inductor!r}")
        for name in ("rotary_in_gemm", "image_table", "prompt_graph"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be a bool, got {getattr(self, name)!r}")
        if self.compile is not None and (not isinstance(self.compile, str) or not self.compile):
            raise ValueError(f"`compile` must be None or a torch.compile backend name, got {self.compile!r}")


# ----------------------------------------------------------------------------------------------------------------
# The cache as transformers' attention sees it inside the fast step
# ----------------------------------------------------------------------------------------------------------------


class _CacheView:
    """Writes new K/V at each layer's device slot and hands attention the first ``read_len`` slots."""

    def __init__(self, cache: StaticKVCache, slot: torch.Tensor, read_len: int) -> None:
        self.cache, self.slot, self.read_len = cache, slot, read_len

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        keys, values = self.cache.keys[layer_idx], self.cache.values[layer_idx]
        slot = self.slot[layer_idx: layer_idx + 1]  # [1]
        keys.index_copy_(2, slot, key_states.to(keys.dtype))
        values.index_copy_(2, slot, value_states.to(values.dtype))
        return keys[:, :, : self.read_len], values[:, :, : self.read_len]


# ----------------------------------------------------------------------------------------------------------------
# Committing replaced state tensors back in place
# ----------------------------------------------------------------------------------------------------------------


def _copy_by_kernel(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst ← src`` as an elementwise kernel. Why not ``copy_``: between contiguous tensors of one dtype it is a
    memcpy, which a captured graph holds as a copy node among its kernel nodes (two a step before; as kernels they
    join the stream of kernels like any other). ×1 (and ≠ False) is exact; a NaN may come out with another payload."""
    if dst.dtype == torch.bool:
        torch.ne(src, False, out=dst)
    else:
        torch.mul(src, 1, out=dst)


def _commit(state: StepState, before: list[tuple[Slot, torch.Tensor]], probs: torch.Tensor | None) -> None:
    """Copy tensors the step put in place of existing ones back into the originals (stable addresses)."""
    for slot, old in before:
        try:
            new = slot.get()
        except (KeyError, IndexError):  # the step removed it
            continue
        if isinstance(new, torch.Tensor) and new is not old and new.shape == old.shape and new.dtype == old.dtype \
                and new.device == old.device:
            _copy_by_kernel(old, new)
            slot.set(old)
    if probs is not None and state.last_probs is not probs and state.last_probs is not None \
            and state.last_probs.shape == probs.shape and state.last_probs.dtype == probs.dtype:
        _copy_by_kernel(probs, state.last_probs)
        state.last_probs = probs


# ----------------------------------------------------------------------------------------------------------------
# The row RNG with its step-independent hashes computed once per run
# ----------------------------------------------------------------------------------------------------------------


class _RowDraw:
    """``sample_row_rng`` with the key and vocabulary hashes kept in buffers: the same numbers, fewer kernels a step."""

    def __init__(self, state: StepState, vocab_size: int) -> None:
        self.key_hash = row_key_hash(state.rng_keys)  # [P, 1]
        self.vocab_hashes = vocab_hash(vocab_size, state.rng_keys.device)  # [1, V]

    def refresh(self, state: StepState) -> None:
        """After eager work that may have changed the keys (a rollback's stream)."""
        self.key_hash.copy_(row_key_hash(state.rng_keys))

    def __call__(self, probs: torch.Tensor, state: StepState) -> torch.Tensor:
        return state.compiled(race_from)(probs, self.key_hash, state.step_t, self.vocab_hashes)


@dataclass
class _TextEnd:
    """Text mode's end-of-sequence bookkeeping, in device buffers the captured step updates in place."""

    finished: torch.Tensor  # [P] bool
    lengths: torch.Tensor  # [P] tokens generated per row
    eos_id: int | None
    pad_id: int

    def finish(self, state: StepState, tokens: torch.Tensor) -> torch.Tensor:
        return finish_text(state, tokens, self.finished, self.lengths, self.eos_id, self.pad_id)

    def all_done(self, t: int) -> bool:
        """Every row has finished (a host sync, asked every ``EOS_CHECK_EVERY`` steps as the eager loop does)."""
        return self.eos_id is not None and (t + 1) % EOS_CHECK_EVERY == 0 and bool(self.finished.all())


# ----------------------------------------------------------------------------------------------------------------
# One run's fast step
# ----------------------------------------------------------------------------------------------------------------


class _Stepper:
    """Static buffers, the step body and its graphs for one run."""

    def __init__(self, options: FastOptions, state: StepState, hooks: HookRunner, sampler: Sampler, graphs: bool,
                 layer_weights: list[_LayerWeights] | None, text: "_TextEnd | None" = None) -> None:
        self.options, self.state, self.hooks, self.sampler = options, state, hooks, sampler
        self.text = text
        self.graphs = graphs
        self.weights = layer_weights
        adapter, cache = state.adapter, state.cache
        device = adapter.device
        self.rows = state.rows
        self.tok = torch.zeros(state.num_pairs, dtype=torch.long, device=device)  # [P] last tokens
        self.pos = state.next_positions.clone()  # [B]
        self.slot = torch.zeros(adapter.num_layers, dtype=torch.long, device=device)  # [N] slot each layer writes
        self.slot_ids = torch.arange(cache.max_len, device=device)  # [L]
        # the additive mask's two values (0 visible, -inf not), as tensors of the step's dtype for torch.where
        self.mask_values = torch.tensor([0.0, float("-inf")], dtype=adapter.dtype, device=device)
        self.attention = options.attention
        # slots each layer holds (a cache may allocate layers after a pruning layer shorter)
        self.capacity = list(getattr(cache, "capacity", [cache.max_len] * adapter.num_layers))
        self.launch = launch_config(device, self.rows, adapter.num_heads, options.split)  # for "triton"
        if self.attention == "flash" and min(self.capacity) < cache.max_len:
            _say_once("fast path: layers with a shorter cache; attention uses the masked sdpa kernel instead of flash")
            self.attention = "sdpa"
        self.dirty = True  # host state is newer than the buffers
        self.stream = torch.cuda.Stream(device=device) if graphs else None
        self.pool = torch.cuda.graph_pool_handle() if graphs else None
        self.captured: dict[tuple[str, int], Any] = {}
        self.prompt_graph: PromptGraph | None = None  # the prefill's, for the next run of this signature
        self.baked: dict[tuple, torch.Tensor] | None = None  # the run's tensors the graphs were captured with
        self.adopting = False  # a later run's state: its tensors go into the baked ones at the next load
        self.warm = False
        self.stats = {"replays": 0, "graph_free_steps": 0, "captures": 0, "capture_s": 0.0, "eager_steps": 0}
        # image tokens' embeddings looked up instead of re-embedded (core/embedding_table.py says why CUDA only)
        self.image_table = image_embedding_table(adapter) \
            if options.image_table and state.mode == "image" and device.type == "cuda" else None
        self.row_draw = None
        if sampler.rng == "row" and not sampler.greedy and sampler.row_draw is None:
            vocab = adapter.image_vocab_size if state.mode == "image" else adapter.vocab_size
            self.row_draw = _RowDraw(state, vocab)
            self.sampler = dataclasses.replace(sampler, row_draw=self.row_draw)
        self.rotary_in_gemm = False
        if layer_weights is not None:
            # cos/sin of every position a run can reach (positions < slots ≤ max_len), rows looked up per step
            half = adapter.head_dim // 2
            sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(device=device, dtype=adapter.dtype)
            positions = torch.arange(2 * cache.max_len, device=device)[None]  # [1, 2L]
            probe = torch.zeros(1, 1, adapter.hidden_size, dtype=adapter.dtype, device=device)
            cos, sin = adapter.rotary(probe, positions)  # [1, 2L, D]
            self.cos_table, self.sin_table = cos[0], sin[0] * sign  # rotate_half(x)·sin = flip(x)·(sign·sin)
            self.final_norm = final_rms_norm(adapter)
            self.rotary_in_gemm = self._rotary_in_gemm(layer_weights[0])
            self.normed: torch.Tensor | None = None  # the step's final norm, made beside the last residual
        if self.attention == "flash":
            b = self.rows
            nkv, length = adapter.num_kv_heads, cache.max_len
            self.cu_q = torch.arange(b + 1, dtype=torch.int32, device=device)
            self.cu_k = torch.arange(b + 1, dtype=torch.int32, device=device) * (nkv * length)

    def _rotary_in_gemm(self, first: _LayerWeights) -> bool:
        """Whether the layers' first halves run as norm + :func:`qkv_rope` (the Triton GEMM's path with the first
        half storing k/v, when the kernel can take these shapes)."""
        if not self.options.rotary_in_gemm or self.options.gemm != "triton" or self.attention == "triton":
            return False
        adapter, cache = self.state.adapter, self.state.cache
        probe = torch.empty((self.rows, first.qkv.shape[1]), dtype=first.qkv.dtype, device=first.qkv.device)
        return qkv_rope_unavailable(probe, first.qkv, adapter.head_dim, first.o.shape[1] // adapter.head_dim,
                                    adapter.num_kv_heads, cache.keys[0]) is None

    # -- host ↔ buffers ---------------------------------------------------------------------------------------
    def load(self, t: int, tokens: torch.Tensor) -> None:
        """Bring the buffers up to the host state after eager work (prefill, a schedule hook, an injection)."""
        if self.adopting:
            self._adopt_tensors()
        state, cache = self.state, self.state.cache
        self.pos.copy_(state.next_positions)
        state.next_positions = self.pos
        fills = cache.fill
        if len(set(fills)) == 1:
            self.slot.fill_(fills[0])
        else:
            self.slot.copy_(torch.tensor(fills, dtype=torch.long))
        self.tok.copy_(tokens)
        state.step_t.fill_(t)
        if self.row_draw is not None:
            self.row_draw.refresh(state)
        if self.attention == "flash" and not self._all_visible():
            _say_once("fast path: filled cache slots are masked for some rows (left padding or a masked injection); "
                      "attention uses the masked sdpa kernel instead of flash")
            self.attention = "sdpa"
        self.dirty = False

    def _all_visible(self) -> bool:
        cache = self.state.cache
        firsts = {}
        for layer, group in enumerate(cache.group):
            firsts.setdefault(group, layer)
        return all(bool(cache.valid[layer, :, : cache.fill[layer]].all()) for layer in firsts.values())

    # -- the next run of the same shape ------------------------------------------------------------------------
    def slots(self) -> dict:
        """The run's tensors by path (``core.reuse``), with the loop's text bookkeeping."""
        return run_tensors(self.state, self.hooks, {"text": self.text})

    def adopt(self, state: StepState, text: "_TextEnd | None") -> None:
        """Serve a later run of the same signature (``FastLoop._signature``): its tensors take the place of the
        baked ones at the first load; the graphs are replayed, no warm-up step is needed."""
        self.state, self.text = state, text  # (the last run's now hold copies: `finish`)
        self.adopting, self.dirty, self.warm = True, True, True
        self.stats = {"replays": 0, "graph_free_steps": 0, "captures": 0, "capture_s": 0.0, "eager_steps": 0,
                      "reused_step": True, "reused_graphs": len(self.captured)}

    def _adopt_tensors(self) -> None:
        self.adopting = False
        why = "the last run ran no step" if self.baked is None else transplant(self.baked, self.slots())
        if why is not None:  # build anew with this run's tensors
            self.captured.clear()
            self.baked = None
            self.stats["reused_graphs"] = 0
            self.stats["not_reused"] = why

    def finish(self) -> None:
        """End of a run: its slots get copies of the baked tensors, which the next run will overwrite."""
        if self.baked is not None:
            detach(self.baked, self.slots())

    # -- the step ---------------------------------------------------------------------------------------------
    def read_len(self) -> int:
        cache = self.state.cache
        if self.attention in ("flash", "triton"):
            return cache.max_len
        bucket = self.options.bucket
        need = max(cache.fill) + 1
        if bucket == 0:
            return cache.max_len
        return min(cache.max_len, -(-need // bucket) * bucket)

    def step(self, t: int, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step through the fast body (replayed, captured or run); returns the tokens buffer."""
        cache = self.state.cache
        if self.dirty:
            self.load(t, tokens)
        if any(f + 1 > c for f, c in zip(cache.fill, self.capacity)):
            raise RuntimeError(f"KV cache overflow: {max(cache.fill)} + 1 slots > {min(self.capacity)} allocated "
                               "(a strategy grew the cache more than it declared in `kv_growth`)")
        length = self.read_len()
        key = (self.attention, length)
        if not self.graphs:
            self._run_body(length)
            self.stats["graph_free_steps"] += 1
        elif key in self.captured:
            self.captured[key].replay()
            self.stats["replays"] += 1
        elif not self.warm:
            self._on_stream(lambda: self._run_body(length))  # warm-up: a real step, run eagerly on the capture stream
            self.warm = True
            self.stats["graph_free_steps"] += 1
        else:
            self._capture(key, length)
            self.captured[key].replay()
            self.stats["replays"] += 1
        for layer in range(len(cache.fill)):
            cache.fill[layer] += 1
        return self.tok

    def _on_stream(self, fn: Callable[[], None]) -> None:
        current = torch.cuda.current_stream()
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            fn()
        current.wait_stream(self.stream)

    def _capture(self, key: tuple[str, int], length: int) -> None:
        start = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        generator = self.sampler.generator
        if generator is not None and not self.sampler.greedy and self.sampler.rng == "torch":
            graph.register_generator_state(generator)

        def capture() -> None:
            graph.capture_begin(pool=self.pool)
            try:
                self._run_body(length)
            finally:
                graph.capture_end()

        self._on_stream(capture)
        self.captured[key] = graph
        self.stats["captures"] += 1
        self.stats["capture_s"] += time.perf_counter() - start

    def _run_body(self, length: int) -> None:
        before = [(slot, slot.get()) for slot in memory_tensors(self.state.memory).values()]
        probs = self.state.last_probs
        if self.options.check_syncs and self.state.adapter.device.type == "cuda" and not self.graphs:
            torch.cuda.set_sync_debug_mode("error")
            try:
                self._body(length)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        else:
            self._body(length)
        _commit(self.state, before, probs)
        if self.baked is None:  # what this and every later capture bakes in (the commit restored replaced tensors)
            self.baked = snapshot(self.slots())

    def _body(self, length: int) -> None:
        """Tokens ``self.tok`` → the next tokens, in place; advances the position, slot and step buffers."""
        state, hooks, adapter, cache = self.state, self.hooks, self.state.adapter, self.state.cache
        if state.mode == "image":
            ids = pair_rows(self.tok, state.layout)  # [B]
            embeds = adapter.embed_image_tokens(ids) if self.image_table is None else \
                self.image_table.index_select(0, ids)  # [B, H]
        else:
            embeds = adapter.embed_text(self.tok[:, None])[:, 0]
        n = adapter.num_layers
        index = self.slot.view(n, 1, 1).expand(n, self.rows, 1)  # [N, B, 1]
        cache.valid.scatter_(2, index, True)  # the slots written now are visible to every row
        wanted = set(hooks.hidden_layers(state))
        captured: dict[int, torch.Tensor] = {}
        if self.weights is not None:
            h = self._fused_layers(embeds, length, wanted, captured)
        else:
            h = self._module_layers(embeds, length, wanted, captured)
        if captured:
            hooks.hidden_states(state, captured)
        self.pos.add_(1)
        self.slot.add_(1)
        if self.weights is not None and self.final_norm is not None:
            h = self.normed
        else:
            h = adapter.final_norm(h)
        logits = head_logits(state, hooks, h, captured)  # [B, V]; the exits' rows in the same head call
        tokens = select_token(state, hooks, logits, self.sampler)  # [P]
        state.exits = None  # this step's: never read by another
        if self.text is not None:
            tokens = self.text.finish(state, tokens)
        _copy_by_kernel(self.tok, tokens)
        state.step_t.add_(1)

    def _masks(self, length: int, dtype: torch.dtype) -> list[torch.Tensor]:
        """Per layer, the additive ``[B, 1, 1, R]`` mask of the written, visible slots (one tensor per cache group
        and read length: R is the bucket, or the layer's capacity if shorter)."""
        cache = self.state.cache
        made: dict[tuple[int, int], torch.Tensor] = {}
        masks = []
        for layer, group in enumerate(cache.group):
            read = min(length, self.capacity[layer])
            if (group, read) not in made:
                visible = cache.valid[layer, :, :read] & (self.slot_ids[:read] <= self.slot[layer])  # [B, R]
                made[group, read] = torch.where(visible, self.mask_values[0], self.mask_values[1])[:, None, None, :]
            masks.append(made[group, read])
        return masks

    def _used_keys(self) -> dict[int, torch.Tensor]:
        """Per cache group, ``[B]`` int32 keys to read (the flash kernel's ``seqused_k``)."""
        cache = self.state.cache
        used: dict[int, torch.Tensor] = {}
        for layer, group in enumerate(cache.group):
            if group not in used:
                used[group] = (self.slot[layer: layer + 1] + 1).to(torch.int32).expand(self.rows).contiguous()
        return used

    def _module_layers(self, embeds, length, wanted, captured) -> torch.Tensor:
        adapter, cache = self.state.adapter, self.state.cache
        h = embeds[:, None]  # [B, 1, H]
        positions = self.pos[:, None]  # [B, 1]
        cos_sin = adapter.rotary(h, positions)
        masks = self._masks(length, h.dtype)
        view = _CacheView(cache, self.slot, length)
        for index, layer in enumerate(adapter.layers):
            if index in wanted:
                captured[index] = h[:, -1]
            h = layer(h, masks[index], positions, view, True, cos_sin)
        if adapter.num_layers in wanted:
            captured[adapter.num_layers] = h[:, -1]
        return h[:, -1]

    def _fused_layers(self, embeds, length, wanted, captured) -> torch.Tensor:
        adapter = self.state.adapter
        d, nkv = adapter.head_dim, adapter.num_kv_heads
        h = embeds  # [B, H]
        if not self.rotary_in_gemm:
            cos = self.cos_table.index_select(0, self.pos)[:, None]  # [B, 1, D]
            sin = self.sin_table.index_select(0, self.pos)[:, None]
        masks = self._masks(length, h.dtype) if self.attention == "sdpa" else None  # once per step, shared by layers
        used = self._used_keys() if self.attention == "flash" else None
        gemm = self.options.gemm  # resolved by FastLoop._gemm: "cublas", "matvec" (one row) or "triton"
        kernel_writes = self.attention == "triton"  # the decode kernel stores k/v itself; else the first half does
        first_half, second_half = _layer_pieces(self.options.compile, gemm, writes_cache=not kernel_writes,
                                                inductor=self.options.inductor)
        cache = self.state.cache
        delta = None  # the last MLP output, added by the next layer's first half
        for index, w in enumerate(self.weights):
            nq = w.o.shape[1] // d
            if self.rotary_in_gemm:  # the norm, then one kernel: q/k/v GEMM, rotary, k/v into the cache
                h, x = self.state.compiled(add_delta_and_norm)(h, delta, w.ln1, w.eps1)
                q = qkv_rope(x, w.qkv, head_dim=d, num_heads=nq, num_kv_heads=nkv, cos_table=self.cos_table,
                             sin_table=self.sin_table, positions=self.pos, keys=cache.keys[index],
                             values=cache.values[index], slot=self.slot[index: index + 1]).view(-1, nq, d)
                k = v = None
            elif kernel_writes:
                h, q, k, v = first_half(h, delta, w.ln1, w.eps1, w.qkv, cos, sin, nq, nkv, gemm=gemm)
            else:
                h, q = first_half(h, delta, w.ln1, w.eps1, w.qkv, cos, sin, nq, nkv, cache.keys[index],
                                  cache.values[index], self.slot[index: index + 1], gemm=gemm)
                k = v = None
            if index in wanted:
                captured[index] = h
            out = self._attend(index, q, k, v, w.scaling, length, masks, used)  # [B, nq·D]
            h, delta = second_half(h, out, w.o, w.ln2, w.eps2, w.gate_up, w.down, gemm=gemm,
                                   programs=self.options.split_programs)
        if self.final_norm is not None:  # the last residual and the final norm in one compiled call
            h, self.normed = self.state.compiled(add_delta_and_norm)(h, delta, *self.final_norm)
        else:
            h = add_delta(h, delta)
        if adapter.num_layers in wanted:
            captured[adapter.num_layers] = h
        return h

    def _attend(self, index: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, scale: float,
                length: int, masks: list[torch.Tensor] | None, used: dict[int, torch.Tensor] | None) -> torch.Tensor:
        """Layer ``index``'s attention for the new token: q ``[B, nq, D]`` attending over the filled, visible slots
        → ``[B, nq·D]``. The new k/v ``[B, nkv, D]`` are written at the layer's slot by the Triton kernel (passed
        here) or already by the layer's first half (None)."""
        cache = self.state.cache
        keys, values = cache.keys[index], cache.values[index]  # [B, nkv, L, D]
        if self.attention == "triton":  # the kernel writes k/v at the slot itself
            slot = self.slot[index: index + 1]
            return decode_attention(q, k, v, keys, values, cache.valid[index], slot, scale, self.launch)
        if self.attention == "flash":
            return self._flash(q, keys, values, used[cache.group[index]], scale)
        b, nq, d = q.shape
        query = q.reshape(b, keys.shape[1], nq // keys.shape[1], d)  # one query token: GQA's shared heads as rows
        out = F.scaled_dot_product_attention(query, keys[:, :, :length], values[:, :, :length],
                                             attn_mask=masks[index], scale=scale)
        return out.reshape(b, nq * d)

    def _flash(self, q, keys, values, used, scale) -> torch.Tensor:
        """Flash attention over each row's first ``used`` slots of the ``[B, nkv, L, D]`` cache, read in place.

        The variable-length entry addresses key ``j`` of sequence ``b`` and head ``h`` at
        ``(cu_k[b] + j)·row_stride + h·head_stride``; with ``cu_k[b] = b·nkv·L``, row stride D and head stride L·D
        that is exactly element ``[b, h, j]`` of the cache.
        """
        b, nq, d = q.shape
        nkv, length = keys.shape[1], keys.shape[2]
        total = (b - 1) * nkv * length + length
        k = keys.as_strided((total, nkv, d), (d, length * d, 1))
        v = values.as_strided((total, nkv, d), (d, length * d, 1))
        out = torch.ops.aten._flash_attention_forward(
            q.contiguous(), k, v, self.cu_q, self.cu_k, 1, length, 0.0, False, False, scale=scale, seqused_k=used,
        )[0]  # [B, nq, D]
        return out.reshape(b, nq * d)


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class FastLoop:
    """An outer loop with :func:`core.loop.run`'s signature whose one-token steps replay captured CUDA graphs."""

    options: FastOptions = field(default_factory=FastOptions)
    stats: dict[str, Any] = field(default_factory=dict)  # the last run's counts (replays, captures, eager steps)
    # the last run's step (its graphs, buffers and cache) and what it was built for: the next run of the same
    # signature replays those graphs (`reusable_cache` hands it the cache they read)
    _kept: tuple[tuple, "_Stepper"] | None = field(default=None, repr=False, compare=False)

    def reusable_cache(self, geometry: tuple) -> StaticKVCache | None:
        """The cache kept with the last run's graphs when a new run asks for one of the same ``geometry``
        (``StaticKVCache.geometry``), renewed; else None, and the kept graphs and cache are let go first (so
        that a run of another shape never holds two caches)."""
        if self._kept is None:
            return None
        cache = self._kept[1].state.cache
        # a cache made under inference mode can only be written under it (and one made outside it, only outside)
        if cache.geometry() != geometry or cache.keys[0].is_inference() != torch.is_inference_mode_enabled():
            self.release()
            return None
        cache.renew()
        return cache

    def release(self) -> None:
        """Let go of the kept graphs, buffers and cache (a fast loop keeps its last run's until the next run)."""
        self._kept = None

    @staticmethod
    def _signature(options: FastOptions, state: StepState, hooks: HookRunner, sampler: Sampler, graphs: bool,
                   weights: list[_LayerWeights] | None, text: "_TextEnd | None") -> tuple:
        """Everything a captured step bakes in besides the run's tensors: the options, model, decoder (its spec:
        strategies' parameters), sampler, shapes, the cache object itself and the text bookkeeping's constants.
        Runs with equal signatures can replay each other's graphs."""
        spec = hooks.to_spec() if hasattr(hooks, "to_spec") else type(hooks).__name__
        configs = tuple((s.name, repr(sorted(s.config.items()))) for s in getattr(hooks, "strategies", None) or [])
        # strategies are Python objects whose decisions a capture bakes in: the same ones (hooks without any, such
        # as NoHooks, are interchangeable)
        owner = id(hooks) if getattr(hooks, "strategies", None) else type(hooks).__name__
        generator = sampler.generator if sampler.rng == "torch" and not sampler.greedy else None
        return (options, graphs, id(state.adapter), id(weights), owner, spec, configs, state.mode, state.layout,
                state.num_pairs, state.rows, state.total_steps, tuple(state.prompt_ids.shape), state.cfg_schedule,
                tuple(state.history.shape), state.history_offset, state.compile_backend, sampler.greedy, sampler.rng,
                id(generator), id(sampler.row_draw), None if text is None else (text.eos_id, text.pad_id),
                id(state.cache), tuple(sorted(state.memory.get("_prompt_layers", ()))))

    def eager_reason(self, state: StepState, hooks: HookRunner, sampler: Sampler) -> str | None:
        """Why a whole run must go through the eager loop, or None."""
        strategies = getattr(hooks, "strategies", None)
        if strategies is None and not isinstance(hooks, NoHooks):
            return f"fast path: hooks of type {type(hooks).__name__} declare no graph safety; the run goes eagerly"
        unsafe = [s.name for s in strategies or [] if not getattr(s, "graph_safe", True)]
        if unsafe:
            return f"fast path: strategies {', '.join(unsafe)} are not graph-safe; their runs go eagerly"
        if self._graphs(state) and sampler.rng == "torch" and not sampler.greedy and sampler.generator is not None \
                and not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
            return "fast path: this torch cannot register a private generator with a CUDA graph; the run goes eagerly"
        return None

    def _graphs(self, state: StepState) -> bool:
        return self.options.graphs and state.adapter.device.type == "cuda"

    def __call__(self, state: StepState, hooks: HookRunner, batch: Any, embeds: torch.Tensor, sampler: Sampler, *,
                 eos_id: int | None = None, pad_id: int = 0, rebuild: Callable[[StepState, Rebuild], tuple] | None = None,
                 progress: Callable[[int], None] | None = None) -> RunResult:
        reason = self.eager_reason(state, hooks, sampler)
        if reason is not None:
            _say_once(reason)
            self.stats = {"eager_run": reason}
            return run(state, hooks, batch, embeds, sampler, eos_id=eos_id, pad_id=pad_id, rebuild=rebuild,
                       progress=progress)
        graphs = self._graphs(state)
        if self.options.graphs and not graphs:
            _say_once("fast path: no CUDA device; the fast step runs without graphs")
        weights = None
        if self.options.layers == "fused":
            fused = fuse_projections(state.adapter)
            if isinstance(fused, str):
                _say_once(f"fast path: {fused}; the step runs transformers' layer modules")
            else:
                weights = fused
        attention = self.options.attention
        if attention == "auto":
            adapter = state.adapter
            auto_ok = weights is not None and adapter.device.type == "cuda" \
                and decode_attention_unavailable(adapter.device, adapter.head_dim) is None
            attention = "triton" if auto_ok and few_programs(adapter.device, state.rows, adapter.num_heads) else "sdpa"
        if attention == "flash" and (state.adapter.device.type != "cuda" or weights is None):
            _say_once("fast path: flash attention needs CUDA and the fused layers; using sdpa")
            attention = "sdpa"
        if attention == "triton":
            why = "it needs the fused layers" if weights is None else \
                decode_attention_unavailable(state.adapter.device, state.adapter.head_dim)
            if why is not None:
                _say_once(f"fast path: the Triton decode attention cannot run ({why}); using sdpa")
                attention = "sdpa"
        options = dataclasses.replace(self.options, attention=attention, gemm=self._gemm(state, weights))
        return self._run(state, hooks, batch, embeds, sampler, graphs, weights, options, rebuild, progress, eos_id,
                         pad_id)

    def _gemm(self, state: StepState, weights: list[_LayerWeights] | None) -> str:
        """The form of the fused layers' GEMMs for this run (``fused.GEMM_FORMS``; the options say why)."""
        wanted, rows, device = self.options.gemm, state.rows, state.adapter.device
        if weights is None:
            return "cublas"
        if wanted == "auto":
            if rows == 1 and self.options.compile is not None:
                return "matvec"
            fits = device.type == "cuda" and rows in AUTO_ROWS
            wanted = "triton" if fits and skinny_gemm_cannot_run(device) is None else "cublas"
        elif wanted == "triton":
            why = f"{rows} rows are more than its 64" if rows > 64 else skinny_gemm_cannot_run(device)
            if why is not None:
                _say_once(f"fast path: the Triton GEMM cannot run ({why}); using cuBLAS")
                return "cublas"
        if wanted == "triton":
            load_kernels()
        if wanted == "matvec" and self.options.compile is None:
            _say_once("fast path: gemm='matvec' needs compiled pieces (`compile`); using cuBLAS")
            return "cublas"
        return wanted

    def _run(self, state, hooks, batch, embeds, sampler, graphs, weights, options, rebuild, progress, eos_id,
             pad_id) -> RunResult:
        """``core.loop.run`` with the one-token steps going through the fast body."""
        state.compile_backend = options.compile if weights is not None else None
        hooks.begin(state)
        device = embeds.device
        text = None
        if state.mode == "text":
            text = _TextEnd(torch.zeros(state.num_pairs, dtype=torch.bool, device=device),
                            torch.zeros(state.num_pairs, dtype=torch.long, device=device), eos_id, pad_id)
        state.memory["_flags"] = torch.zeros(state.num_pairs, dtype=torch.bool, device=device)
        state.memory["_prompt_layers"] = set(hooks.prompt_layers(state))
        layer_fn = None if weights is None else PrefillLayers(weights, state.adapter.head_dim,
                                                                 state.adapter.num_kv_heads)
        signature = self._signature(options, state, hooks, sampler, graphs, weights, text)
        kept, self._kept = self._kept, None
        same = kept is not None and kept[0] == signature
        prompt = PromptRunner(kept[1].prompt_graph if same else None,
                              capture=graphs and options.prompt_graph and prompt_capturable(state, hooks))
        logits: torch.Tensor | None = prefill(state, hooks, batch, embeds, layer_fn, through=prompt)
        points = set(hooks.schedule_points(state))
        if points:
            _say_once("fast path: schedule hooks run eagerly at their step boundaries; the steps between replay")
        boundaries: dict[int, _Boundary | None] = {}
        if same:
            stepper = kept[1]
            stepper.adopt(state, text)
        else:
            stepper = _Stepper(options, state, hooks, sampler, graphs, weights, text)
        stepper.prompt_graph = prompt.captured
        if prompt.failed:
            _say_once(f"fast path: the prompt's forward could not be captured ({prompt.failed}); it runs eagerly")
        stepper.stats["prompt_replayed"] = prompt.replayed
        tokens: torch.Tensor | None = None
        t = 0
        while True:  # t == total_steps is visited once more, for a schedule hook after the last token
            state.step = t
            if t in points:
                state.step_t.fill_(min(t, state.total_steps - 1))
                t, logits, tokens, acted = apply_schedule(state, hooks, boundaries, rebuild, t, logits, tokens)
                if acted is not None:
                    stepper.dirty = True
                if acted == "rollback":
                    continue
            if t == state.total_steps:
                state.step = t - 1  # as after the last step
                break
            boundaries[t] = _Boundary(list(state.cache.fill), state.next_positions.clone(), logits) if points else None
            if logits is None:
                actions = hooks.kv_inject(state)
                if actions:
                    _say_once("fast path: KV injections run eagerly between replays")
                    if not stepper.dirty:
                        tokens = stepper.tok.clone()
                    state.step_t.fill_(t)
                    inject(state, hooks, actions)
                    stepper.dirty = True
                    stepper.stats["eager_steps"] += 1
                tokens = stepper.step(t, tokens)
            else:
                state.step_t.fill_(t)
                tokens = select_token(state, hooks, logits, sampler)
                if text is not None:
                    tokens = text.finish(state, tokens)
                stepper.dirty = True
                stepper.stats["eager_steps"] += 1
            logits = None
            if progress is not None:
                progress(1)
            if text is not None and text.all_done(t):
                break
            t += 1
        state.next_positions = state.next_positions.clone()  # detach from the step's buffer
        state.step_t.fill_(min(t, state.total_steps - 1))
        hooks.end(state)
        self.stats = {**stepper.stats, "attention": stepper.attention, "gemm": options.gemm,
                      "layers": "fused" if weights else "transformers", "graphs": graphs,
                      "rotary_in_gemm": stepper.rotary_in_gemm,
                      "read_lens": sorted({k[1] for k in stepper.captured})}
        stepper.finish()  # the run's tensors become its own copies; the kept ones serve the next run
        self._kept = (signature, stepper)
        if text is not None:
            lengths = text.lengths
        else:
            lengths = torch.full((state.num_pairs,), state.total_steps, dtype=torch.long, device=device)
        return RunResult(state.generated, lengths, state, state.memory["_flags"], sorted(boundaries))
