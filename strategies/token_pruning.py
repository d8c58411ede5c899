"""``token_pruning``: drop image tokens inside the language model's prefill (FastV, with random/uniform baselines).

The plugin wires ``strategies/token_pruning_math.py`` to the ``layer`` hook point: entering decoder layer ``layer`` it
scores the image positions (FastV: the head-averaged attention the last prompt position paid them in layer
``layer − 1``, from ``state.attention_scores``), keeps every text position plus the top ``ceil(keep_ratio · n_image)``
image positions and returns them as a ``LayerKeep``. The loop does the rest: the sequence shrinks from that layer on,
kept tokens keep their position ids, and layers ≥ ``layer`` cache only kept positions. ``mode="soft"`` zeros the
dropped positions' hidden states instead (nothing is removed, nothing saved). The trace records the kept count and
the counted prefill FLOPs saved (FastV's model), which ``--explain`` prints.
"""

from __future__ import annotations

from janus_decoding.core.protocol import LayerKeep
from janus_decoding.plugins.strategy import Param, Strategy, StrategyError

from .token_pruning_math import fastv_scores, flops_saved, keep_count, prefill_flops, random_scores, \
    select_positions, uniform_scores


class TokenPruning(Strategy):
    """Prune image tokens at a decoder layer during the prefill (FastV; random and uniform baselines)."""

    name = "token_pruning"
    params = (
        Param("method", "str", "fastv", "how image tokens are ranked", choices=("fastv", "random", "uniform")),
        Param("layer", "int", 2, "prune entering this decoder layer, in [1, N)", low=1),
        Param("keep_ratio", "float", 0.5, "fraction of image tokens kept (rounded up)", low=0.0, high=1.0,
              low_open=True),
        Param("mode", "str", "hard", "'hard' removes positions; 'soft' zeros their hidden states",
              choices=("hard", "soft")),
        Param("seed", "int", 0, "seed of method='random'"),
    )
    hooks = ("layer",)
    modes = ("text",)
    needs = ("image", "janus")

    def check_run(self, state) -> None:
        if state.mode != "text":
            raise StrategyError(f"`{self.name}` prunes image-understanding prompts; it does not support image mode")
        if state.image_token_mask is None or not bool(state.image_token_mask.any()):
            raise StrategyError(f"`{self.name}` needs an input image: the prompt has no image tokens")
        if self.config["layer"] >= state.num_layers:
            raise StrategyError(f"`{self.name}`: `layer` must be in [1, {state.num_layers}) for this model "
                                f"({state.num_layers} layers), got {self.config['layer']}")
        counts = state.image_token_mask.sum(-1).tolist()  # once per run, before the prefill
        if len(set(counts)) != 1:
            raise StrategyError(f"`{self.name}`: every row must hold the same number of image tokens, got {counts}")
        self._n_image = counts[0]
        self._n_keep = keep_count(self._n_image, self.config["keep_ratio"])

    def kv_layer_reduction(self, state) -> dict[int, int]:
        """Hard mode drops ``n_image − n_keep`` positions from layer ``layer`` on: allocate those layers shorter."""
        if self.config["mode"] != "hard" or state.image_token_mask is None:
            return {}
        n_image = int(state.image_token_mask.sum(-1).max())  # host read once, at setup
        return {self.config["layer"]: n_image - keep_count(n_image, self.config["keep_ratio"])}

    def layer_points(self, state) -> list[int]:
        return [self.config["layer"]]

    def layer(self, state, layer: int, hidden):
        mask = state.image_token_mask  # [B, T0]
        if hidden.shape[1] != mask.shape[1]:
            raise StrategyError(f"`{self.name}`: another layer hook shortened the prompt before layer {layer}")
        method = self.config["method"]
        if method == "fastv":
            scores = fastv_scores(state.attention_scores(layer - 1)[..., -mask.shape[1]:])  # [B, T0]
        elif method == "uniform":
            scores = uniform_scores(mask, self._n_keep)
        else:
            scores = random_scores(tuple(mask.shape), self.config["seed"], mask.device)
        positions = select_positions(scores, mask, self._n_keep)  # [B, T']
        soft = self.config["mode"] == "soft"
        n, kept = mask.shape[1], positions.shape[1]
        d, m, depth = state.adapter.hidden_size, state.adapter.intermediate_size, state.num_layers
        state.trace.write(self.name, method=method, layer=layer, mode=self.config["mode"],
                          image_tokens=self._n_image, kept_image_tokens=self._n_keep, prompt_tokens=n,
                          kept_tokens=n if soft else kept, prefill_flops=prefill_flops(n, d, m, depth),
                          flops_saved=0.0 if soft else flops_saved(n, d, m, depth, layer, kept))
        return LayerKeep(positions, soft=soft)
