"""The learned parts of ``latent_control`` (condenser, translator, shaper) and their safetensors file.

The strategy never builds these itself: it loads them from the ``weights`` file (:func:`load_modules`) or uses the
training-free forms of ``strategies/latent_control_math.py``. Building :class:`LatentControlModules` directly gives
untrained weights; that is for writing a file to train from (or for benchmarks), never a silent default.

File layout: a flat safetensors state dict with tensors ``condenser.*``, ``translator.*``, ``shaper.*``. The hidden
size H, the memory-token count M, the control-token count K and the bottleneck ``width`` are read back from the
tensor shapes; a shape that does not fit the model or the strategy's parameters is an error naming the tensor.
No training command ships yet: the modules are plain ``nn.Module`` s so one can be written against any objective.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["Condenser", "Translator", "Shaper", "LatentControlModules", "save_modules", "load_modules"]

FORMAT = "janus_decoding.latent_control/1"
# Norm floor for unit vectors (a zero direction stays zero).
_EPS = 1e-8


class Condenser(nn.Module):
    """Learned latent queries ``[M, width]`` cross-attend to the window; a residual MLP refines the result.

    ``forward(window [P, W, H], filled [P, W] bool)`` → memory ``[P, M, H]``.
    """

    def __init__(self, hidden: int, memory_tokens: int, width: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(memory_tokens, width) / math.sqrt(width))
        self.key = nn.Linear(hidden, width, bias=False)
        self.value = nn.Linear(hidden, width, bias=False)
        self.out = nn.Linear(width, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, width), nn.GELU(), nn.Linear(width, hidden))

    def forward(self, window: torch.Tensor, filled: torch.Tensor) -> torch.Tensor:
        keys, values = self.key(window), self.value(window)  # [P, W, width]
        scores = torch.einsum("mw,pnw->pmn", self.queries, keys) / math.sqrt(self.queries.shape[-1])  # [P, M, W]
        # an empty window (nothing seen yet) attends uniformly to zeros instead of producing NaN
        visible = filled | ~filled.any(-1, keepdim=True)  # [P, W]
        attn = torch.softmax(scores.masked_fill(~visible[:, None], float("-inf")), dim=-1)
        memory = self.out(attn @ values)  # [P, M, H]
        return memory + self.mlp(memory)


class Translator(nn.Module):
    """MLP over ``[z, m, p]`` → a unit direction, times a gate ``max_scale · sigmoid(·)`` → control vector ``[P, H]``."""

    def __init__(self, hidden: int, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3 * hidden, width), nn.GELU(), nn.Linear(width, hidden))
        self.gate = nn.Linear(3 * hidden, 1)

    def forward(self, z: torch.Tensor, m: torch.Tensor, p: torch.Tensor, max_scale: float | torch.Tensor) -> torch.Tensor:
        x = torch.cat([z, m, p], dim=-1)  # [P, 3H]
        direction = self.net(x)
        direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(_EPS)
        return max_scale * torch.sigmoid(self.gate(x)) * direction


class Shaper(nn.Module):
    """Control vector ``[P, H]`` → K embeddings ``[P, K, H]``: the prompt anchor plus a learned, anchor-scaled offset."""

    def __init__(self, hidden: int, control_tokens: int, width: int) -> None:
        super().__init__()
        self.control_tokens = control_tokens
        self.net = nn.Sequential(nn.Linear(hidden, width), nn.GELU(), nn.Linear(width, control_tokens * hidden))

    def forward(self, c: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        offset = self.net(c).view(c.shape[0], self.control_tokens, -1)  # [P, K, H]
        return anchor[:, None] + anchor.norm(dim=-1, keepdim=True)[:, None] * offset


class LatentControlModules(nn.Module):
    """The three learned parts together. Constructed directly, the weights are untrained (see the module docs)."""

    def __init__(self, hidden: int, memory_tokens: int, control_tokens: int, width: int) -> None:
        super().__init__()
        self.condenser = Condenser(hidden, memory_tokens, width)
        self.translator = Translator(hidden, width)
        self.shaper = Shaper(hidden, control_tokens, width)


def save_modules(modules: LatentControlModules, path: str | Path) -> Path:
    """Write the modules' state dict to a safetensors file (tensors contiguous, on the CPU)."""
    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in modules.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": FORMAT})
    return path


def load_modules(path: str | Path, *, hidden_size: int, memory_tokens: int, control_tokens: int,
                 device: torch.device | str = "cpu") -> LatentControlModules:
    """Load the modules for a model of ``hidden_size`` and the strategy's M and K; fp32, eval mode, no gradients.

    :raises ValueError: naming ``weights`` (unreadable file) or the tensor (missing, unexpected or wrong shape).
    """
    try:
        tensors = load_file(str(path), device="cpu")
    except (OSError, SafetensorError) as exc:
        raise ValueError(f"`weights`: cannot read {str(path)!r} as safetensors: {exc}") from None
    queries = tensors.get("condenser.queries")
    if queries is None or queries.dim() != 2:
        raise ValueError(f"`weights`: tensor `condenser.queries` is missing or not 2-d in {str(path)!r}")
    modules = LatentControlModules(hidden_size, memory_tokens, control_tokens, int(queries.shape[1]))
    expected = modules.state_dict()
    for name, tensor in expected.items():
        if name not in tensors:
            raise ValueError(f"`weights`: tensor `{name}` is missing from {str(path)!r}")
        if tuple(tensors[name].shape) != tuple(tensor.shape):
            raise ValueError(f"`weights`: tensor `{name}` has shape {tuple(tensors[name].shape)}, but this model "
                             f"(hidden size {hidden_size}) with memory_tokens={memory_tokens}, "
                             f"control_tokens={control_tokens} needs {tuple(tensor.shape)}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ValueError(f"`weights`: unexpected tensor `{unexpected[0]}` in {str(path)!r}")
    modules.load_state_dict({k: v.float() for k, v in tensors.items()})
    return modules.to(device).eval().requires_grad_(False)
