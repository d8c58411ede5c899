"""``latent_control``: detect drift during image generation and steer it back through the KV cache.

Wiring (math: ``strategies/latent_control_math.py``; learned parts: ``strategies/latent_control_modules.py``):

- ``hidden_states`` keeps the last-position hidden state at ``layer``; ``after_sample`` (each step t ≥ 1, so only
  image tokens are watched) pushes the conditional rows' state into a ``window``-slot buffer, condenses it, computes
  s_t, Var(s), u_t (entropy of the distribution actually sampled) and the per-image ``fire`` mask — device ops only;
- ``kv_inject`` (before the next token is fed) builds ``control_tokens`` embeddings per image and appends them for the
  firing images (both rows of the pair, or the conditional row only); the other rows get masked slots.

Host reads: ``kv_inject`` reads ``fire.any()`` once per step (one tiny device→host copy) and returns nothing when no
image fires. The alternative, appending every step with a device-side row mask, avoids that read but forwards K extra
tokens through every layer at every step and grows the cache by K slots per step (576·K for a Janus image instead of
the declared bound), so masked work would dwarf the read; and the think forward would run every step. The run is
therefore eager (``graph_safe = False``: an append changes the cache length anyway). Events (step, row, s_t, u_t) are
kept on the device and written to the trace once, at the end.

Cache bound (``kv_growth``): every append serves at least one image that has injections left, so a run appends at
most ``num_pairs × max_injections`` times, ``control_tokens`` slots each.

Learned parts load from ``weights`` (safetensors); without it the training-free forms run and the think forward is
skipped, since only the learned translator reads z. Untrained modules are never built here.
"""

from __future__ import annotations

import os

import torch

from janus_decoding.core.cfg import merge_branches, pair_rows, split_branches
from janus_decoding.core.protocol import KVAppend
from janus_decoding.core.sampling import entropy_nats
from janus_decoding.plugins.strategy import Param, Strategy, StrategyError

from .latent_control_math import (cosine, left_pad, masked_mean, pool_window, shape_tokens, slide, translate, trigger,
                                  window_variance)
from .latent_control_modules import load_modules

_THRESHOLDS = ("tau_drop", "tau_var", "tau_entropy", "tau_sim", "cooldown", "max_injections", "max_scale")


class LatentControl(Strategy):
    """Watch image tokens drift from the prompt and inject control tokens into the KV cache to pull them back."""

    name = "latent_control"
    params = (
        Param("layer", "int", None, "hidden-state layer watched, in [1, N] (default N, the last)", low=1),
        Param("window", "int", 32, "image tokens watched (condenser and Var(s))", low=2),
        Param("memory_tokens", "int", 8, "memory vectors the condenser makes (≤ window)", low=1),
        Param("control_tokens", "int", 4, "embeddings appended per injection", low=1),
        Param("tau_drop", "float", 0.05, "fire when Δs < −tau_drop and Var(s) > tau_var", low=0.0),
        Param("tau_var", "float", 0.002, low=0.0),
        Param("tau_entropy", "float", 3.5, "fire when u (nats) > tau_entropy and s < tau_sim", low=0.0),
        Param("tau_sim", "float", 0.25, low=-1.0, high=1.0),
        Param("cooldown", "int", 16, "steps between two injections of an image", low=0),
        Param("max_injections", "int", 4, "injections per image", low=0),
        Param("max_scale", "float", 1.0, "bound of the translator's gate", low=0.0, low_open=True),
        Param("rows", "str", "both", "rows of a pair that receive the tokens", choices=("cond", "both")),
        Param("weights", "str", None, "safetensors file of the learned condenser/translator/shaper"),
    )
    hooks = ("hidden_states", "kv_inject")
    modes = ("image",)
    needs = ("janus",)
    graph_safe = False

    def check(self) -> None:
        c = self.config
        if c["memory_tokens"] > c["window"]:
            raise StrategyError(f"`latent_control`: `memory_tokens` ({c['memory_tokens']}) must be ≤ `window` "
                                f"({c['window']})")
        if c["weights"] is not None and not os.path.isfile(c["weights"]):
            raise StrategyError(f"`latent_control`: `weights` file {c['weights']!r} does not exist")

    def check_run(self, state) -> None:
        n, layer = state.num_layers, self.config["layer"]
        self._layer = n if layer is None else layer
        if not 1 <= self._layer <= n:
            raise StrategyError(f"`latent_control`: `layer` must be in [1, {n}] for this model, got {layer}")
        self._modules = None
        if self.config["weights"] is not None:
            try:
                self._modules = load_modules(self.config["weights"], hidden_size=state.adapter.hidden_size,
                                             memory_tokens=self.config["memory_tokens"],
                                             control_tokens=self.config["control_tokens"], device=state.adapter.device)
            except ValueError as exc:
                raise StrategyError(f"`latent_control`: {exc}") from None

    def kv_growth(self, state) -> int:
        return state.num_pairs * self.config["max_injections"] * self.config["control_tokens"]

    def hidden_layers(self, state) -> list[int]:
        return [self._layer]

    def prompt_layers(self, state) -> list[int]:
        return [self._layer]

    def begin(self, state) -> None:
        p, w, h, dev = state.num_pairs, self.config["window"], state.adapter.hidden_size, state.adapter.device
        self._t = {k: self.tensor(state, k) for k in _THRESHOLDS}
        # the plain user prompts' embeddings, [P, Tp, H] left-padded
        self._prompt, self._prompt_valid = left_pad([state.embed_text(text).float() for text in state.prompts])
        self._anchor = masked_mean(self._prompt, self._prompt_valid)  # [P, H]
        self._p = None  # the prompt's pooled hidden state at `layer`, after the prefill
        self._window = torch.zeros(p, w, h, device=dev)
        self._sims = torch.zeros(p, w, device=dev)
        self._seen = torch.zeros((), dtype=torch.long, device=dev)
        self._since = torch.full((p,), self.config["cooldown"] + 1, dtype=torch.long, device=dev)
        self._count = torch.zeros(p, dtype=torch.long, device=dev)
        self._fire = torch.zeros(p, dtype=torch.bool, device=dev)
        self._events: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def hidden_states(self, state, hidden: dict[int, torch.Tensor]) -> None:
        self._hidden = hidden[self._layer]  # [B, H]

    def after_sample(self, state, tokens: torch.Tensor, probs: torch.Tensor) -> None:
        if self._p is None:
            cond, _ = split_branches(state.prompt_hidden(self._layer).float(), state.layout)  # [P, T0, H]
            self._p = masked_mean(cond, split_branches(state.attention_mask, state.layout)[0])
        if state.step == 0:  # the prefill's last position is the prompt, not an image token
            return
        t = self._t
        h = split_branches(self._hidden.float(), state.layout)[0]  # [P, H]
        self._window = slide(self._window, h)
        self._seen = self._seen + 1
        self._memory, m = self._condense()
        s = cosine(m, self._p)
        prev = self._sims[:, -1]
        self._sims = slide(self._sims, s)
        self._s, self._m, self._u = s, m, entropy_nats(probs)
        self._since = self._since + 1
        self._fire = trigger(s, prev, (self._seen >= 2).expand_as(s), window_variance(self._sims, self._seen), self._u,
                             self._since, self._count, tau_drop=t["tau_drop"], tau_var=t["tau_var"],
                             tau_entropy=t["tau_entropy"], tau_sim=t["tau_sim"], cooldown=t["cooldown"],
                             max_injections=t["max_injections"])

    def kv_inject(self, state) -> list[KVAppend]:
        if self.config["max_injections"] == 0 or not bool(self._fire.any()):  # the one host read per step
            return []
        fire = self._fire
        tokens = self._control_tokens(state).to(state.adapter.dtype)  # [P, K, H]
        rows = pair_rows(fire, state.layout) if self.config["rows"] == "both" else \
            merge_branches(fire, torch.zeros_like(fire), state.layout)  # [B]
        self._count = self._count + fire.long()
        self._since = torch.where(fire, torch.zeros_like(self._since), self._since)
        self._events.append((state.step - 1, fire, self._s, self._u))
        return [self._append(state, pair_rows(tokens, state.layout), rows)]

    def _append(self, state, embeds: torch.Tensor, rows: torch.Tensor) -> KVAppend:
        """The cache action for ``embeds`` ``[B, K, H]`` on ``rows`` ``[B]`` (a seam the injection tests replace)."""
        return KVAppend(embeds=embeds, rows=rows, advance=True)

    def _condense(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._modules is None:
            return pool_window(self._window, self._seen, self.config["memory_tokens"])
        filled = torch.arange(self._window.shape[1], device=self._window.device) >= self._window.shape[1] - self._seen
        memory = self._modules.condenser(self._window, filled.expand(self._window.shape[:2]))
        return memory, memory.mean(1)

    def _control_tokens(self, state) -> torch.Tensor:
        if self._modules is None:
            return shape_tokens(translate(self._m, self._p, self._t["max_scale"]), self._anchor,
                                self.config["control_tokens"])
        # think: the plain prompt's embeddings followed by the memory tokens, one LM forward, mean-pooled into z
        valid = torch.cat([self._prompt_valid, torch.ones(self._memory.shape[:2], dtype=torch.bool,
                                                          device=self._memory.device)], 1)
        embeds = torch.cat([self._prompt, self._memory], 1).to(state.adapter.dtype)
        z = masked_mean(state.lm_forward(embeds, valid).float(), valid)  # [P, H]
        c = self._modules.translator(z, self._m, self._p, self._t["max_scale"])
        return self._modules.shaper(c, self._anchor)

    def end(self, state) -> None:
        for step, fire, s, u in self._events:  # one device→host copy per injection, after the run
            fired, s, u = fire.tolist(), s.tolist(), u.tolist()
            for row in (r for r, f in enumerate(fired) if f):
                state.trace.write(self.name, step=step, injected_before_step=step + 1, row=row, s_t=s[row], u_t=u[row])
        state.trace.write(self.name, injections=self._count.tolist(),
                          form="learned" if self._modules is not None else "training-free")
