"""Fixture strategies for the ``kv_inject`` hook point: appended entries (``KVAppend``) and edits (``KVEdit``)."""

from __future__ import annotations

import torch

from janus_decoding.core.cfg import pair_rows
from janus_decoding.core.protocol import KVAppend, KVEdit
from janus_decoding.plugins.hookspecs import hookimpl
from janus_decoding.plugins.strategy import Param, Strategy


def _end_record(strategy: Strategy, state) -> None:
    state.trace.write(strategy.name, fill=list(state.cache.fill), next_positions=state.next_positions.clone(),
                      valid=state.cache.valid.clone(), **state.memory.get(strategy.name, {}))


class Inject(Strategy):
    """Before step `at`, append `count` entries (the embeddings of `text`) for the rows of image `image`.

    ``image = -1``: no row injects (every new slot masked); ``image = -2``: all rows (``rows=None``).
    """

    name = "inject"
    params = (Param("at", "int", 3, low=1), Param("count", "int", 2, low=1), Param("image", "int", -1, low=-2),
              Param("advance", "bool", True), Param("text", "str", "once upon a time there was"),
              Param("as_ids", "bool", False))
    hooks = ("kv_inject",)
    graph_safe = False

    def kv_growth(self, state):
        return self.config["count"]

    def kv_inject(self, state):
        if state.step != self.config["at"]:
            return []
        k, image = self.config["count"], self.config["image"]
        ids = torch.tensor(state.adapter.tokenize(self.config["text"])[:k], device=state.adapter.device)
        ids = ids[None].expand(state.rows, -1)  # [B, K]
        if image == -2:
            rows = None
        else:
            chosen = torch.zeros(state.num_pairs, dtype=torch.bool, device=ids.device)
            if image >= 0:
                chosen[image] = True
            rows = pair_rows(chosen, state.layout)  # [B]: both rows of a pair inject together
        state.memory[self.name] = {"fill_before": list(state.cache.fill),
                                   "positions_before": state.next_positions.clone()}
        if self.config["as_ids"]:
            return [KVAppend(ids=ids, rows=rows, advance=self.config["advance"])]
        return [KVAppend(embeds=state.embed_text(self.config["text"])[None, :k].expand(state.rows, -1, -1),
                         rows=rows, advance=self.config["advance"])]

    def end(self, state) -> None:
        _end_record(self, state)


class SteerKV(Strategy):
    """Before step `at`, add `scale` to every cached key and value of slot `slot` in layer `layer`."""

    name = "steer_kv"
    params = (Param("at", "int", 3, low=1), Param("layer", "int", 1, low=0), Param("slot", "int", 0, low=0),
              Param("scale", "float", 0.0))
    hooks = ("kv_inject",)

    def kv_inject(self, state):
        if state.step != self.config["at"]:
            return []
        delta = torch.full((state.adapter.head_dim,), self.config["scale"], device=state.adapter.device)
        return [KVEdit(self.config["layer"], self.config["slot"], d_key=delta, d_value=delta)]


@hookimpl
def register_strategies(register) -> None:
    for cls in (Inject, SteerKV):
        register(cls)
