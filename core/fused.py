"""The fast step's layer math: LLaMA blocks with fewer kernels, over weights concatenated once.

A decoder layer for one new token per row, as two functions around attention (which the loop runs, since it owns
the cache): ``_attention_inputs`` (the previous MLP's residual → rms norm → one q/k/v GEMM → rotary; pure) or
``_attention_inputs_cached`` (the same, storing the new k/v into the cache it is handed) and
``_layer_rest`` (output projection and residual → rms norm → one gate/up GEMM → SiLU·mul → down projection, whose
residual the next layer adds; with the Triton GEMM, SiLU·mul runs in the gate/up GEMM's epilogue). Each residual add
sits in front of a norm so that a compiler fuses the two.
``fuse_projections`` concatenates each layer's q/k/v and gate/up weights once, leaving the modules views of them.
``_layer_pieces`` hands the two functions out plain or through ``torch.compile`` (``core/compiling.py``: one
wrapper per function and backend for the process).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .compiling import compiled, known_inductor_options
from .skinny_gemm import launch_for, skinny_gemm_unchecked, sum_parts

__all__ = ["add_delta", "add_delta_and_norm", "final_rms_norm", "fuse_projections", "rms_norm"]


@dataclass
class _LayerWeights:
    ln1: torch.Tensor  # [H]
    eps1: float
    qkv: torch.Tensor  # [(nq + 2·nkv)·D, H]
    o: torch.Tensor  # [H, nq·D]
    ln2: torch.Tensor
    eps2: float
    gate_up: torch.Tensor  # [2·I, H]
    down: torch.Tensor  # [H, I]
    scaling: float


def _concat_rows(linears: list[nn.Linear]) -> torch.Tensor:
    """One ``[Σ out, in]`` weight for several linears; the modules keep row views of it (no memory is added)."""
    weights = [m.weight for m in linears]
    base = weights[0]
    offset = base.storage_offset()
    shared = all(w.untyped_storage().data_ptr() == base.untyped_storage().data_ptr() for w in weights)
    if shared:
        rows = 0
        for w in weights:
            if not w.is_contiguous() or w.storage_offset() != offset + rows * w.shape[1]:
                shared = False
                break
            rows += w.shape[0]
    if shared:
        total = sum(w.shape[0] for w in weights)
        return base.as_strided((total, base.shape[1]), (base.shape[1], 1), offset)
    with torch.inference_mode(False), torch.no_grad():
        fused = torch.cat([w.detach() for w in weights], 0)
        start = 0
        for module, w in zip(linears, weights):
            module.weight = nn.Parameter(fused[start: start + w.shape[0]], requires_grad=False)
            start += w.shape[0]
    return fused


def fuse_projections(adapter: Any) -> list[_LayerWeights] | str:
    """Per-layer weights for the fused step, or a reason why these layers cannot be fused.

    The q/k/v and gate/up weights of each layer are concatenated once; the modules' own ``weight`` parameters then
    become row views of the concatenation, so the model holds the same values in the same memory and every other
    path (the eager loop, hooks, saving aside) sees no change. Saving such a model with safetensors needs
    ``save_pretrained``'s handling of shared tensors.
    """
    cached = getattr(adapter, "_fast_layer_weights", None)
    if cached is not None and all(
        w.qkv.data_ptr() == layer.self_attn.q_proj.weight.data_ptr() for w, layer in zip(cached, adapter.layers)
    ):
        return cached
    out: list[_LayerWeights] = []
    for index, layer in enumerate(adapter.layers):
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        needed = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        needed += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if any(not isinstance(m, nn.Linear) for m in needed):
            return f"layer {index} is not a LLaMA block (q/k/v/o and gate/up/down linears)"
        if any(m.bias is not None for m in needed):
            return f"layer {index} has projection biases"
        if type(getattr(mlp, "act_fn", None)).__name__ not in ("SiLU", "SiLUActivation"):
            return f"layer {index}'s MLP activation is not SiLU"
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if any(not hasattr(n, "variance_epsilon") or not hasattr(n, "weight") for n in norms):
            return f"layer {index}'s norms are not RMS norms"
        q, k, v, o, gate, up, down = needed
        out.append(_LayerWeights(
            ln1=norms[0].weight, eps1=float(norms[0].variance_epsilon), qkv=_concat_rows([q, k, v]), o=o.weight,
            ln2=norms[1].weight, eps2=float(norms[1].variance_epsilon), gate_up=_concat_rows([gate, up]),
            down=down.weight, scaling=float(attn.scaling),
        ))
    adapter._fast_layer_weights = out
    return out


def final_rms_norm(adapter: Any) -> tuple[torch.Tensor, float] | None:
    """The weight and epsilon of the model's final norm when it is a LLaMA RMS norm (what :func:`rms_norm` needs to
    stand in for it), else None."""
    norm = getattr(getattr(adapter, "lm", None), "norm", None)
    if hasattr(norm, "variance_epsilon") and isinstance(getattr(norm, "weight", None), torch.Tensor):
        return norm.weight, float(norm.variance_epsilon)
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """A LLaMA RMS norm as one fused op (transformers' module runs ~7 kernels)."""
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


GEMM_FORMS = ("cublas", "matvec", "triton")


def _linear(x: torch.Tensor, weight: torch.Tensor, gemm: str = "cublas", parts: bool = False,
            programs: int = 128) -> torch.Tensor:
    """``x @ weight.T`` for ``x`` ``[M, K]``, ``weight`` ``[N, K]``, in one of three forms (``GEMM_FORMS``):

    * ``"cublas"``: ``F.linear``.
    * ``"matvec"`` (one row, compiled pieces only): a multiply-reduce in fp32 — the products of two bf16 numbers are
      exact in fp32, so this is a GEMM's arithmetic in another summation order. Inductor turns it into one reduction
      kernel that reads each weight once at close to copy bandwidth, with the work that produces ``x`` (the rms
      norm, SiLU·mul) fused in front and the residual add behind; at one row cuBLAS's split-K GEMV needs a second
      reduction kernel (measured in benchmarks/README.md). Never run uncompiled: eagerly it would materialise
      ``[M, N, K]``.
    * ``"triton"`` (2–64 rows, the image batch): :mod:`core.skinny_gemm`'s kernel, whose launch fills the GPU where
      cuBLAS's tiles leave multiprocessors idle or add a split-K reduction (``benchmarks/gemm.py``). Compiled, a
      split GEMM's parts are summed by the kernel that reads the result (``parts=True``: returned unsummed,
      ``[splits, M, N]`` fp32, for a later compiled function to add with :func:`add_delta`); ``programs``: how many
      programs a split GEMM aims at (``launch_for``).
    """
    if gemm == "matvec":
        return (x.float()[:, None, :] * weight.float()[None]).sum(-1).to(x.dtype)
    if gemm == "triton":
        launch = launch_for(weight.shape[0], weight.shape[1], caller_sums=torch.compiler.is_compiling(),
                            programs=programs)
        return skinny_gemm_unchecked(x, weight, launch, parts=parts)
    return F.linear(x, weight)


def add_delta(h: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The residual add of a layer's MLP output ``delta`` — ``[B, H]``, or the down projection's unsummed split
    parts ``[splits, B, H]`` fp32, summed here so that a compiler folds the sum into the add's kernel."""
    return h + sum_parts(delta, h.dtype)


def add_delta_and_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The last MLP's residual (:func:`add_delta`; None before the first layer) and an rms norm → ``h`` and the
    normed ``h`` (one kernel compiled; the sum of the down projection's split parts joins it): the final norm after
    the last layer, and a layer's input norm where the q/k/v GEMM runs on its own (``core/qkv_rope.py``)."""
    if delta is not None:
        h = add_delta(h, delta)
    return h, rms_norm(h, weight, eps)


def _gated_mlp_inner(x: torch.Tensor, gate_up_weight: torch.Tensor, gemm: str = "cublas") -> torch.Tensor:
    """``silu(x @ gate.T) · (x @ up.T)`` from the concatenated ``[gate; up]`` weight: with the Triton GEMM in its
    epilogue (no SiLU·mul kernel, no ``[B, 2·I]`` product in memory), otherwise as the GEMM and then the ops."""
    if gemm == "triton":
        return skinny_gemm_unchecked(x, gate_up_weight, launch_for(*gate_up_weight.shape, glu=True), glu=True)
    gate_up = _linear(x, gate_up_weight, gemm)  # [B, 2·I]
    inner = gate_up.shape[1] // 2
    return F.silu(gate_up[:, :inner]) * gate_up[:, inner:]


def _attention_inputs(h: torch.Tensor, delta: torch.Tensor | None, ln: torch.Tensor, eps: float,
                      qkv_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, nq: int, nkv: int,
                      gemm: str = "cublas") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's first half up to attention: the previous layer's MLP residual → rms norm → one q/k/v GEMM →
    rotary. ``h`` ``[B, H]`` plus ``delta`` (the previous MLP's output, None before layer 0) → the layer's input
    ``h`` and q ``[B, nq, D]``, k and v ``[B, nkv, D]``. The residual add is done here so that a compiler fuses it
    into the norm's kernel. ``sin`` carries rotate-half's sign, so rotate_half(x)·sin = flip(x)·sin."""
    if delta is not None:
        h = add_delta(h, delta)
    b, d = h.shape[0], cos.shape[-1]
    qkv = _linear(rms_norm(h, ln, eps), qkv_weight, gemm)  # [B, (nq + 2·nkv)·D]
    qk = qkv[:, : (nq + nkv) * d].view(b, nq + nkv, d)
    v = qkv[:, (nq + nkv) * d:].view(b, nkv, d)
    turned = qk.view(b, nq + nkv, 2, d // 2).flip(2).view(b, nq + nkv, d)
    qk = torch.addcmul(qk * cos, turned, sin)
    return h, qk[:, :nq], qk[:, nq:], v


def _attention_inputs_cached(h: torch.Tensor, delta: torch.Tensor | None, ln: torch.Tensor, eps: float,
                             qkv_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, nq: int, nkv: int,
                             keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor,
                             gemm: str = "cublas") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_attention_inputs` that also writes the new k and v at ``slot`` ``[1]`` of the layer's cache
    ``keys``/``values`` ``[B, nkv, L, D]`` (in place) → ``h`` and q ``[B, nq, D]``.

    Why here and not beside attention: compiled, the rotary kernel stores k and v straight into the cache (a
    scatter store), where two ``index_copy_`` kernels per layer ran before (~3 µs each, 60 a step at the 7B shape);
    q then gets a buffer of its own, so the k part is written only to the cache. The v store shares no data with
    the rotary kernel, so Inductor fuses it in only when told to (``FIRST_HALF_OPTIONS``).
    """
    h, q, k, v = _attention_inputs(h, delta, ln, eps, qkv_weight, cos, sin, nq, nkv, gemm)
    keys.index_copy_(2, slot, k[:, :, None])
    values.index_copy_(2, slot, v[:, :, None])
    return h, (q.contiguous() if torch.compiler.is_compiling() else q)


def _layer_rest(h: torch.Tensor, attended: torch.Tensor, o_weight: torch.Tensor, ln: torch.Tensor, eps: float,
                gate_up_weight: torch.Tensor, down_weight: torch.Tensor,
                gemm: str = "cublas", programs: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's second half after attention: output projection + residual → rms norm → gate/up → SiLU·mul → down.
    ``[B, H]``, ``[B, nq·D]`` → ``h`` after the attention residual and the MLP's output ``delta``, which the next
    layer's first half (or the loop, after the last layer) adds with :func:`add_delta` (compiled with the Triton
    GEMM, ``delta`` is the down projection's unsummed split parts: their sum joins the next norm's kernel).
    transformers' arithmetic: each projection rounded to the dtype, then the residual added. ``programs``: what the
    split-K output and down projections aim at (``launch_for``)."""
    h = h + _linear(attended, o_weight, gemm, programs=programs)
    inner = _gated_mlp_inner(rms_norm(h, ln, eps), gate_up_weight, gemm)  # [B, I]
    return h, _linear(inner, down_weight, gemm, parts=True, programs=programs)


def _layer_pieces(backend: str | None, gemm: str = "cublas", writes_cache: bool = False,
                  inductor: tuple[tuple[str, Any], ...] = ()) -> tuple[Callable, Callable]:
    """The two halves, plain or compiled with ``backend`` (every layer and run of the same shapes reuses them);
    ``gemm="matvec"`` (one row): their GEMV reductions timed at compile (``compiling.TUNED_OPTIONS``);
    ``writes_cache``: the first half is :func:`_attention_inputs_cached`; ``inductor``: more Inductor settings
    (``FastOptions.inductor``)."""
    first = _attention_inputs_cached if writes_cache else _attention_inputs
    if backend is None:
        return first, _layer_rest
    tune = gemm == "matvec"
    extra = known_inductor_options(inductor)
    first_options = {**(known_inductor_options(tuple(FIRST_HALF_OPTIONS.items())) if writes_cache else {}), **extra}
    return (compiled(first, backend, tune_reductions=tune, options=first_options or None),
            compiled(_layer_rest, backend, tune_reductions=tune, options=extra or None))


# The first half that stores k and v: Inductor fuses two pointwise nodes only when they share data, and the v store
# reads nothing the rotary kernel reads — so it ran as a kernel of its own (37 µs a step at the 7B shape).
# ``aggressive_fusion`` lets nodes of the same iteration space fuse without shared data (with multi-head attention
# q, k and v have one shape, and the v store joins the rotary kernel).
# ``score_fusion_memory_threshold`` 0: the same for fusing two consumers of one buffer (the GEMM's output).
FIRST_HALF_OPTIONS = {"aggressive_fusion": True, "score_fusion_memory_threshold": 0}


class PrefillLayers:
    """The prompt's forward (``core.loop.forward``'s ``layer_fn``) through the fused layer math: for each layer, the
    same two halves as the one-token step over the ``[B·T, H]`` rows of the prompt, with attention (SDPA over the
    cache, causal) between them, uncompiled and with cuBLAS's GEMMs (the prompt's rows vary in number).

    Why: with identical rows prefilled once (``core.loop.distinct_rows``) the prompt's forward at the 7B shape has
    ~5 ms of GPU work, and transformers' layer modules spent ~1.5 ms of host time each launching it (~40 ms of the
    GPU waiting, the profile's ``idle``); these layers launch ~15 kernels with little Python around them.
    """

    def __init__(self, weights: list[_LayerWeights], head_dim: int, num_kv_heads: int) -> None:
        self.weights, self.head_dim, self.num_kv_heads = weights, head_dim, num_kv_heads
        self._signed: tuple[Any, torch.Tensor, torch.Tensor] | None = None  # (cos_sin, cos, sin with the sign)

    def _rotary(self, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, T, D]`` cos and sin → ``[B·T, 1, D]``, sin carrying rotate-half's sign (once per forward)."""
        if self._signed is None or self._signed[0] is not cos_sin:
            cos, sin = cos_sin
            half = cos.shape[-1] // 2
            # made on the device: a host tensor's copy could not be captured (core/prompt_graph.py)
            sign = torch.ones(cos.shape[-1], device=sin.device, dtype=sin.dtype)
            sign[:half] = -1
            self._signed = (cos_sin, cos.reshape(-1, 1, cos.shape[-1]), (sin * sign).reshape(-1, 1, sin.shape[-1]))
        return self._signed[1], self._signed[2]

    def __call__(self, index: int, h: torch.Tensor, mask: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor],
                 cache: Any) -> torch.Tensor:
        """Layer ``index`` over ``h`` ``[B, T, H]`` with the ``[B, 1, T, L]`` mask of the slots each position may see;
        writes the T new keys and values through ``cache.update`` (as the modules do) → ``[B, T, H]``."""
        w, d, nkv = self.weights[index], self.head_dim, self.num_kv_heads
        b, t, hidden = h.shape
        nq = w.o.shape[1] // d
        cos, sin = self._rotary(cos_sin)
        rows, q, k, v = _attention_inputs(h.reshape(b * t, hidden), None, w.ln1, w.eps1, w.qkv, cos, sin, nq, nkv)
        q, k, v = (x.reshape(b, t, -1, d).transpose(1, 2) for x in (q, k, v))  # [B, heads, T, D]
        keys, values = cache.update(k, v, index)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=w.scaling,
                                             enable_gqa=nq != nkv)  # [B, nq, T, D]
        out = out.transpose(1, 2).reshape(b * t, nq * d)
        rows, delta = _layer_rest(rows, out, w.o, w.ln2, w.eps2, w.gate_up, w.down)
        return add_delta(rows, delta).view(b, t, hidden)
