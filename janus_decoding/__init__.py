"""janus-decoding: a plugin registry of decoding strategies for Janus / Janus-Pro.

    >>> import janus_decoding as jd
    >>> model = jd.load_model("tiny")                      # random weights: draws noise
    >>> decoder = jd.Decoder.from_spec("top_k(top_k=100) > temperature(temperature=0.9)")
    >>> result = decoder.generate_images(model, ["a red cube"], n=2, seed=0)
"""

from __future__ import annotations

__version__ = "0.1.0"

from typing import Any

__all__ = ["__version__", "load_model", "Decoder", "list_strategies", "release_fast_path", "SpecError",
           "StrategyError"]


def load_model(path_or_name: str = "tiny", *, device: str = "cpu", dtype: Any = None):
    """Load a Janus / Janus-Pro folder (transformers or DeepSeek format) or a plain causal LM, never from a hub.

    ``"tiny"`` is a small random checkpoint written on first use. Returns the model handle the decoder methods take.
    """
    from janus_decoding.models.api import load

    return load(path_or_name, device=device, dtype=dtype)


def list_strategies() -> list[dict[str, Any]]:
    """Every registered strategy (built-in and plugins) with its declaration and distribution."""
    from janus_decoding.plugins.registry import default_registry

    registry = default_registry()
    return [registry.describe(name) for name in registry.names()]


def release_fast_path(model: Any) -> None:
    """Free what the fast path keeps on ``model`` between calls: the last run's CUDA graphs, buffers and KV cache
    (kept so that the next run of the same shape and decoder replays them instead of capturing anew)."""
    from janus_decoding.plugins.generation import release_fast_path as release

    release(model)


def __getattr__(name: str) -> Any:  # keep `import janus_decoding` light: torch loads on first use
    if name == "Decoder":
        from janus_decoding.plugins.decoder import Decoder

        return Decoder
    if name == "SpecError":
        from janus_decoding.plugins.spec import SpecError

        return SpecError
    if name == "StrategyError":
        from janus_decoding.plugins.strategy import StrategyError

        return StrategyError
    raise AttributeError(name)
