"""``dola``: Decoding by Contrasting Layers with the adaptive plausibility constraint (Chuang et al., ICLR 2024).

The plugin wires ``strategies/dola_math.py`` to the ``post_cfg`` hook point: it declares the candidate layers as
early exits (``exit_layers``: the loop runs their last-position hidden states through the mode's head in the same
call as the final rows), guides the cond/uncond pairs of their logits exactly like the final logits in image mode,
picks the premature layer and returns the contrast. The mature distribution is the logits stream DoLa receives (so
``repetition_penalty > dola`` penalises the mature logits; ``dola > repetition_penalty``, the paper's and
transformers' order, penalises the contrast scores).

Defaults differ by mode: text follows the official code and transformers ≤ 4.55.4 (no final norm on early exits,
one premature layer for the whole batch); image tokens go through Janus's MLP ``gen_head``, which is trained on
final-normed states, so early exits are normed by default, and the layer is chosen per image (per CFG pair).
"""

from __future__ import annotations

import torch

from janus_decoding.plugins.strategy import Param, Strategy, StrategyError

from .dola_math import candidate_layers, dola_step


class DoLa(Strategy):
    """Contrast the final layer with the most different early exit, inside the plausible head (DoLa + APC)."""

    name = "dola"
    params = (
        Param("layers", "str|list[int]", "high", "'low', 'high' (transformers' buckets) or layer indices in [0, N)"),
        Param("alpha", "float", 0.1, "APC: keep tokens with q_N ≥ α·max q_N", low=0.0, high=1.0, high_open=True),
        Param("min_tokens_to_keep", "int", 1, low=1),
        Param("distance", "str", "official", choices=("official", "textbook")),
        Param("selection", "str", None, "'batch' (text default) or 'row' (image default)", choices=("batch", "row")),
        Param("final_norm", "bool", None, "apply the final norm to early exits (text default false, image true)"),
    )
    hooks = ("post_cfg",)

    def check(self) -> None:
        layers = self.config["layers"]
        if isinstance(layers, str) and layers not in ("low", "high"):
            raise StrategyError(f"`dola`: `layers` must be 'low', 'high' or a list of layer indices, got {layers!r}")
        if isinstance(layers, list) and not layers:
            raise StrategyError("`dola`: `layers` must not be an empty list")
        # Conservative: unless rows are explicitly independent, batch jobs must not pack prompts together.
        self.couples_rows = self.config["selection"] != "row"

    def check_run(self, state) -> None:
        try:
            self._layers = candidate_layers(self.config["layers"], state.num_layers,
                                            tied_embeddings=state.adapter.tied_embeddings)
        except ValueError as exc:
            raise StrategyError(f"`dola`: {exc}") from None

    def begin(self, state) -> None:
        image = state.mode == "image"
        self._selection = self.config["selection"] or ("row" if image else "batch")
        norm = self.config["final_norm"]
        self._final_norm = image if norm is None else norm
        self._alpha = self.tensor(state, "alpha")
        self._layer_ids = torch.tensor(self._layers, device=state.adapter.device)
        self._chosen = state.step_buffer("dola.premature_layer", (state.num_pairs,), torch.long)

    def exit_layers(self, state) -> list[tuple[int, bool]]:
        return [(layer, self._final_norm) for layer in self._layers]

    def post_cfg(self, state, logits: torch.Tensor) -> torch.Tensor:
        early = state.exit_logits(self._layers, final_norm=self._final_norm)  # [J, B, V]
        if state.mode == "image":
            early = state.guide(early.transpose(0, 1)).transpose(0, 1)  # [J, P, V]
        contrast, index = state.compiled(dola_step)(
            logits, early, alpha=self._alpha, distance=self.config["distance"], selection=self._selection,
            min_tokens_to_keep=self.config["min_tokens_to_keep"])  # [P, V], [P]
        self._chosen.index_copy_(0, state.step_t.view(1), self._layer_ids[index][None])
        return contrast

    def end(self, state) -> None:
        steps = state.step + 1
        state.trace.write(self.name, premature_layers=self._chosen[:steps].T.tolist(), candidates=self._layers)
