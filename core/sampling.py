"""Choosing the next token: greedy, the counter-based row RNG, or a seeded ``torch.Generator``.

``rng="row"`` draws each row's random numbers from a hash of (prompt seed, image index within its prompt, step,
stream/attempt, vocabulary index) in integer tensor ops, then samples by the exponential race
``argmax(p / E)`` with ``E = -log(U)`` (equivalent to multinomial sampling; gpt-fast's sync-free trick). A row's
tokens therefore do not depend on batch size, micro-batching or its neighbours, and the step has no private
generator, so it traces under ``torch.compile`` and replays under a CUDA graph with fresh numbers (the step lives in
a device tensor). ``rng="torch"`` is ``torch.multinomial`` with a seeded generator: bit for bit the published recipe.
"""

from __future__ import annotations

from typing import Literal

import torch

RNG = Literal["row", "torch"]
RNGS: tuple[str, ...] = ("row", "torch")

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31, so a 32-bit lane times a multiplier never overflows int64.
_M1 = 0x7FEB352D
_M2 = 0x2C1B3C6D
_M3 = 0x297A2D39


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix (xorshift-multiply rounds) on int64 tensors holding values in [0, 2**32)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK32
    x = x ^ (x >> 16)
    x = (x * _M3) & _MASK32
    x = x ^ (x >> 15)
    return x


def row_uniforms(keys: torch.Tensor, step: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniforms in (0, 1) of shape ``[R, V]`` from per-row keys ``[R, 3]`` = (seed, image index, stream).

    Pure function of its inputs: the same (seed, image, stream, step, vocab index) always gives the same number.
    """
    return row_uniforms_from(row_key_hash(keys), step, vocab_hash(vocab_size, keys.device))


def row_key_hash(keys: torch.Tensor) -> torch.Tensor:
    """The step-independent part of :func:`row_uniforms`: a hash ``[R, 1]`` of (seed, image index, stream)."""
    seed, image, stream = keys[:, 0:1], keys[:, 1:2], keys[:, 2:3]  # [R, 1] each
    h = _hash32(seed & _MASK32)
    h = _hash32(h ^ ((seed >> 32) & _MASK32))
    h = _hash32(h ^ (image & _MASK32))
    return _hash32(h ^ (stream & _MASK32))


def vocab_hash(vocab_size: int, device: torch.device | str) -> torch.Tensor:
    """The step-independent hash ``[1, V]`` of each vocabulary index."""
    vocab = torch.arange(vocab_size, device=device, dtype=torch.int64).view(1, -1)  # [1, V]
    return _hash32(vocab + 0x9E3779B)


def row_uniforms_from(key_hash: torch.Tensor, step: torch.Tensor, vocab_hashes: torch.Tensor) -> torch.Tensor:
    """:func:`row_uniforms` from its precomputed parts (a decode step that replays needs only this)."""
    h = _hash32(key_hash ^ (step.to(torch.int64) & _MASK32))  # [R, 1]
    bits = _hash32(h ^ vocab_hashes)  # [R, V]
    return ((bits >> 8).to(torch.float64) + 0.5).to(torch.float32) * (1.0 / (1 << 24))


# The race's argmax in this many pieces of each row, then over the pieces' winners: the same first index of the
# maximum (a NaN wins, as in argmax), but a compiled step runs rows × pieces programs where one reduction had a
# program per row (16 rows of 16384 at the image batch: one kernel of 10 µs on an H200, benchmarks/README.md).
RACE_PIECES = 16


def race(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The exponential race ``argmax(p / E)``, ``E = -log(U)``: a multinomial draw per row ``[R, V]`` → ``[R]``."""
    scores = probs / -torch.log(uniforms)
    rows, vocab = scores.shape
    if vocab % RACE_PIECES:
        return torch.argmax(scores, dim=-1)
    width = vocab // RACE_PIECES
    best, where = scores.view(rows, RACE_PIECES, width).max(dim=-1)  # [R, S]: each piece's max and its first index
    piece = torch.argmax(best, dim=-1, keepdim=True)  # [R, 1]: the first piece holding the row's maximum
    return (piece * width + where.gather(-1, piece))[:, 0]


def race_from(probs: torch.Tensor, key_hash: torch.Tensor, step: torch.Tensor,
              vocab_hashes: torch.Tensor) -> torch.Tensor:
    """:func:`sample_row_rng` from the precomputed hashes (what a replayed decode step runs): one pure function,
    so a compiling loop fuses the hash rounds, the uniforms and the race into a kernel or two."""
    return race(probs, row_uniforms_from(key_hash, step, vocab_hashes))


def sample_row_rng(probs: torch.Tensor, keys: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """Exponential race over fp32 probabilities ``[R, V]`` → ``[R]`` token ids; zero-probability tokens never win."""
    return race(probs, row_uniforms(keys, step, probs.shape[-1]))


def sample_torch(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """``torch.multinomial`` on ``[R, V]`` probabilities with a seeded generator → ``[R]``."""
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """fp32 softmax of the final logits (a row of all ``-inf`` gives NaN, which the loop flags)."""
    return torch.softmax(logits.float(), dim=-1)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token of each row ``[R, V]`` → ``[R]`` (the first one on ties, as ``torch.argmax``)."""
    return torch.argmax(logits, dim=-1)


def probabilities_and_flags(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`probabilities` and, per row, whether the logits cannot be sampled as they are ``[R]`` bool: a row's
    max is NaN if it holds a NaN, +inf if it holds +inf, -inf if it has no finite entry (one reduction)."""
    return probabilities(logits), ~torch.isfinite(logits.amax(-1))


def entropy_nats(probs: torch.Tensor) -> torch.Tensor:
    """Entropy ``[R]`` in nats of the distribution actually sampled (0·log 0 counted as 0)."""
    logp = torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))
    return -(probs * logp).sum(-1)
