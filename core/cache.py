"""The static KV cache: allocated once per run, written in place, read up to the filled length.

Why not transformers' own caches: the hook contract needs per-layer fill lengths (vision-token pruning keeps fewer
positions in layers >= k), per-row slot validity (KV injection into some rows only) and a truncate-to-step service
(TwiG rolls a stage back). The decoder layers themselves are transformers' modules; they only call ``update``.
"""

from __future__ import annotations

import torch


class StaticKVCache:
    """Keys and values of every layer in preallocated buffers ``[B, H_kv, L_max, D]``.

    Slot ``j`` of layer ``l`` is visible to row ``b`` iff ``valid[l, b, j]``; ``fill[l]`` is the number of slots
    written in layer ``l`` (the same for every row: rows that skip an injection get masked slots, never a ragged
    cache). The loop calls :meth:`begin_write` before each forward, so ``update`` (called by transformers'
    attention) knows where the new entries go, and :meth:`end_write` after it.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        batch: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        layer_lengths: list[int] | None = None,
    ) -> None:
        self.num_layers = num_layers
        self.batch = batch
        self.max_len = max_len
        # Slots each layer can hold: layers after a hard-pruning layer hook may be allocated shorter (the hook
        # declares it up front through `kv_layer_reduction`), so pruning really saves memory.
        self.capacity = list(layer_lengths) if layer_lengths is not None else [max_len] * num_layers
        if len(self.capacity) != num_layers or any(not 0 < c <= max_len for c in self.capacity):
            raise ValueError(f"layer_lengths must give {num_layers} lengths in (0, {max_len}], got {layer_lengths}")
        self.keys = [torch.zeros((batch, num_kv_heads, c, head_dim), dtype=dtype, device=device)
                     for c in self.capacity]
        self.values = [torch.zeros((batch, num_kv_heads, c, head_dim), dtype=dtype, device=device)
                       for c in self.capacity]
        self.valid = torch.zeros(num_layers, batch, max_len, dtype=torch.bool, device=device)  # [N, B, L]
        self.fill = [0] * num_layers  # host ints: lengths are known on the host at every step boundary
        self.group = [0] * num_layers  # layers with one group id share fill and validity (one mask per group)
        self.read_len: int | None = None  # slots returned to attention; None = exactly what is filled
        self._pending = [0] * num_layers  # slots being written by the current forward
        self._write_slots: list[torch.Tensor] = []
        self._rows: tuple[torch.Tensor, torch.Tensor] | None = None  # a forward over distinct rows (begin_write)

    # -- writing ---------------------------------------------------------------------------------------------
    def begin_write(self, length: int, visible: torch.Tensor | None = None,
                    rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Reserve ``length`` slots after each layer's fill; ``visible`` ``[B, length]`` says who may see them.

        ``rows`` = ``(first [U], inverse [B])``: the forward runs over U distinct rows only (a prefill of identical
        prompts, ``core.loop.distinct_rows``); ``update`` then writes row ``inverse[b]``'s entries into row ``b``
        and hands attention the cache of rows ``first``."""
        if max(self.fill) + length > self.max_len:
            raise RuntimeError(
                f"KV cache overflow: {max(self.fill)} + {length} slots > {self.max_len} allocated "
                "(a strategy grew the cache more than it declared in `kv_growth`)"
            )
        device = self.valid.device
        if visible is None:
            visible = torch.ones(self.batch, length, dtype=torch.bool, device=device)
        self._pending = [length] * self.num_layers
        self._rows = rows
        self._write_slots = [torch.arange(f, f + length, device=device) for f in self.fill]
        for layer, f in enumerate(self.fill):
            self.valid[layer, :, f : f + length] = visible

    def restrict_write(self, layers: range, keep: torch.Tensor) -> None:
        """Mid-forward (prefill): layers in ``layers`` store only the positions ``keep`` ``[B, T']`` of this write."""
        new_group = max(self.group) + 1
        n = keep.shape[1]
        for layer in layers:
            f, length = self.fill[layer], self._pending[layer]
            written = self.valid[layer, :, f : f + length].clone()
            self.valid[layer, :, f : f + length] = False
            self.valid[layer, :, f : f + n] = torch.gather(written, 1, keep)
            self._pending[layer] = n
            self._write_slots[layer] = self._write_slots[layer][:n]
            self.group[layer] = new_group

    def end_write(self) -> None:
        for layer in range(self.num_layers):
            self.fill[layer] += self._pending[layer]
        self._pending = [0] * self.num_layers
        self._rows = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """transformers' attention hands us the new keys/values ``[B, H_kv, T, D]``; we return the readable cache."""
        slots = self._write_slots[layer_idx]
        if self.written(layer_idx) > self.capacity[layer_idx]:
            raise RuntimeError(f"KV cache overflow in layer {layer_idx}: {self.written(layer_idx)} slots > "
                               f"{self.capacity[layer_idx]} allocated (a strategy declared a larger "
                               "`kv_layer_reduction` than it pruned)")
        if self._rows is not None:  # entries of the distinct rows, written into every row they stand for
            key_states, value_states = key_states[self._rows[1]], value_states[self._rows[1]]
        self.keys[layer_idx].index_copy_(2, slots, key_states.to(self.keys[layer_idx].dtype))
        self.values[layer_idx].index_copy_(2, slots, value_states.to(self.values[layer_idx].dtype))
        end = self.read_len if self.read_len is not None else self.written(layer_idx)
        keys, values = self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]
        if self._rows is not None:
            return keys[self._rows[0]], values[self._rows[0]]
        return keys, values

    # -- reading ---------------------------------------------------------------------------------------------
    def written(self, layer: int) -> int:
        """Slots of ``layer`` holding entries, counting those written by the forward in progress."""
        return self.fill[layer] + self._pending[layer]

    def visible_slots(self, layer: int) -> torch.Tensor:
        """``[B, L]`` validity of the readable slots of ``layer`` (including those being written now)."""
        end = self.read_len if self.read_len is not None else self.written(layer)
        return self.valid[layer, :, :end]

    def attention_mask(self, layer: int, length: int) -> torch.Tensor:
        """``[B, 1, T, L]`` bool: visible slots, causal among the ``length`` slots being written now."""
        visible = self.visible_slots(layer)  # [B, L]
        slot = torch.arange(visible.shape[1], device=visible.device)
        causal = slot[None, :] <= (self.fill[layer] + torch.arange(length, device=visible.device))[:, None]  # [T, L]
        return visible[:, None, None, :] & causal[None, None]

    # -- services --------------------------------------------------------------------------------------------
    def truncate_to(self, fill: list[int]) -> None:
        """Forget every slot past ``fill`` (per layer); TwiG's regeneration rolls a stage back this way."""
        for layer, new in enumerate(fill):
            if new > self.fill[layer]:
                raise ValueError(f"cannot truncate layer {layer} to {new} slots: it holds only {self.fill[layer]}")
            self.valid[layer, :, new:] = False
            self.fill[layer] = new

    def reset(self) -> None:
        """Empty the cache (a rebuilt prompt is prefilled from scratch); buffers are kept."""
        self.valid.zero_()
        self.fill = [0] * self.num_layers
        self.group = [0] * self.num_layers

    def renew(self) -> None:
        """As newly allocated: empty, every entry zero (a kept cache handed to the next run of the same shape; masked
        slots inside a read length are multiplied by zero weights, so they must hold finite numbers)."""
        self.reset()
        for t in self.keys + self.values:
            t.zero_()

    def geometry(self) -> tuple:
        """What a run of the same shape asks a cache for (``core.runs._new_cache``)."""
        k = self.keys[0]
        return (self.num_layers, self.batch, self.max_len, k.shape[1], k.shape[3], k.dtype, k.device,
                tuple(self.capacity))

    def add_(self, layer: int, slot: int, d_key: torch.Tensor | None, d_value: torch.Tensor | None,
             rows: torch.Tensor | None = None) -> None:
        """In-place additive edit of one cached slot (KV steering); ``d_*`` broadcast to ``[B, H_kv, D]``."""
        scale = 1.0 if rows is None else rows.view(-1, 1, 1).to(self.keys[layer].dtype)
        if d_key is not None:
            self.keys[layer][:, :, slot] += d_key.to(self.keys[layer].dtype) * scale
        if d_value is not None:
            self.values[layer][:, :, slot] += d_value.to(self.values[layer].dtype) * scale

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
