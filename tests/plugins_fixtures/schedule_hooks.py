"""Fixture strategies for the ``schedule`` hook point (Rollback, Rebuild, nested answers) and the host services."""

from __future__ import annotations

from janus_decoding.core.protocol import Rebuild, Rollback
from janus_decoding.plugins.hookspecs import hookimpl
from janus_decoding.plugins.strategy import Param, Strategy


class RollbackOnce(Strategy):
    """At step `at`, drop the last `steps` tokens once and regenerate them with RNG stream `stream`."""

    name = "rollback_once"
    params = (Param("at", "int", 8, low=1), Param("steps", "int", 4, low=1), Param("stream", "int", 1, low=0))
    hooks = ("schedule",)
    graph_safe = False

    def schedule_points(self, state):
        return [self.config["at"]]

    def schedule(self, state):
        if state.memory.get(self.name):
            return None
        state.memory[self.name] = {"before": state.generated[:, : state.step].clone(),
                                   "fill_at_rollback": list(state.cache.fill)}
        return Rollback(self.config["steps"], self.config["stream"])

    def end(self, state) -> None:
        state.trace.write(self.name, history_complete=bool(state.history_valid.all()), keys=state.rng_keys.clone(),
                          fill=list(state.cache.fill), **state.memory.get(self.name, {}))


class RebuildOnce(Strategy):
    """At step `at`, restart from a new prompt text (plus the image tokens so far), once."""

    name = "rebuild_once"
    params = (Param("at", "int", 8, low=1), Param("prompt", "str", "a small green dog sleeping"),
              Param("growth", "int", 32, low=0))
    hooks = ("schedule",)
    graph_safe = False

    def kv_growth(self, state):
        return self.config["growth"]

    def schedule_points(self, state):
        return [self.config["at"]]

    def schedule(self, state):
        if state.memory.get(self.name):
            return None
        state.memory[self.name] = True
        return Rebuild([self.config["prompt"]] * state.num_pairs)

    def end(self, state) -> None:
        state.trace.write(self.name, prompt_ids=state.prompt_ids.clone(), mask=state.attention_mask.clone(),
                          positions=state.prompt_positions.clone(), fill=list(state.cache.fill))


class UseServices(Strategy):
    """At step `at`, call the host-side services and record what they return (nothing changes in the run)."""

    name = "use_services"
    params = (Param("at", "int", 8, low=1), Param("layer", "int", 2, low=0),
              Param("question", "str", "what is in the picture?"), Param("text", "str", "a red cube"))
    hooks = ("schedule",)
    graph_safe = False

    def prompt_layers(self, state):
        return [self.config["layer"]]

    def schedule_points(self, state):
        return [self.config["at"]]

    def schedule(self, state):
        cols = state.image_grid[1]
        done = state.step // cols  # full grid rows generated so far
        embeds = state.embed_text(self.config["text"])  # [T, H]
        state.memory[self.name] = {
            "partial": state.decode_partial(state.generated[:, : done * cols]),
            "grid_rows": done,
            "text_embeds": embeds,
            "lm_out": state.lm_forward(embeds[None]),
            "prompt_hidden": state.prompt_hidden(self.config["layer"]).clone(),
            "answer": state.answer(None, self.config["question"], max_new_tokens=6),
        }
        return None

    def end(self, state) -> None:
        state.trace.write(self.name, **state.memory.get(self.name, {}))


class CheckImageFeatures(Strategy):
    """Text mode: compare ``state.encode_image`` with the features the loop merged into the prompt."""

    name = "check_image_features"
    hooks = ("input_embeddings",)
    modes = ("text",)
    needs = ("image", "janus")
    graph_safe = False

    def input_embeddings(self, state, embeds):
        features = state.encode_image(state.pixel_values[0])  # [n, tokens, H]
        merged = embeds[0][state.image_token_mask[0]]  # [n·tokens, H]
        last = state.encode_image(state.pixel_values[0], layers=[self._vision_layers(state)])
        state.trace.write(self.name, features=features, merged=merged, last_layer=last)
        return embeds

    @staticmethod
    def _vision_layers(state) -> int:
        return state.adapter.model.config.vision_config.num_hidden_layers


@hookimpl
def register_strategies(register) -> None:
    for cls in (RollbackOnce, RebuildOnce, UseServices, CheckImageFeatures):
        register(cls)
