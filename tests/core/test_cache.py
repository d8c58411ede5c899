"""The static KV cache (core/cache.py): fill and validity bookkeeping, overflow, truncation, restricted writes."""

from __future__ import annotations

import pytest
import torch

from janus_decoding.core.cache import StaticKVCache

LAYERS, BATCH, HEADS, DIM, MAX = 3, 2, 2, 4, 10


def _cache() -> StaticKVCache:
    return StaticKVCache(num_layers=LAYERS, batch=BATCH, max_len=MAX, num_kv_heads=HEADS, head_dim=DIM,
                         dtype=torch.float32, device="cpu")


def _write(cache: StaticKVCache, length: int, visible: torch.Tensor | None = None, value: float = 1.0):
    """One forward's worth of writes: every layer gets ``length`` new keys/values."""
    cache.begin_write(length, visible)
    out = []
    for layer in range(LAYERS):
        n = cache._write_slots[layer].numel()
        kv = torch.full((BATCH, HEADS, n, DIM), value + layer)
        out.append(cache.update(kv, -kv, layer))
    cache.end_write()
    return out


def test_buffers_are_allocated_once_at_full_size():
    cache = _cache()
    assert all(k.shape == (BATCH, HEADS, MAX, DIM) for k in cache.keys)
    assert cache.valid.shape == (LAYERS, BATCH, MAX) and not cache.valid.any()
    assert cache.fill == [0] * LAYERS
    assert cache.nbytes() == 2 * LAYERS * BATCH * HEADS * MAX * DIM * 4
    pointers = [k.data_ptr() for k in cache.keys]
    _write(cache, 4)
    assert [k.data_ptr() for k in cache.keys] == pointers  # written in place


def test_fill_and_validity_bookkeeping():
    cache = _cache()
    prompt_valid = torch.tensor([[False, True, True], [True, True, True]])  # row 0 left-padded
    returned = _write(cache, 3, prompt_valid)
    assert cache.fill == [3] * LAYERS
    assert torch.equal(cache.valid[:, :, :3], prompt_valid.expand(LAYERS, -1, -1))
    keys, values = returned[1]
    assert keys.shape == (BATCH, HEADS, 3, DIM)  # attention reads exactly what is filled
    assert (keys == 2.0).all() and (values == -2.0).all()
    # a step: one slot, visible to every row
    cache.begin_write(1)
    assert cache.written(0) == 4 and cache.fill[0] == 3  # pending slots count as written during the forward
    assert cache.visible_slots(0).shape == (BATCH, 4)
    for layer in range(LAYERS):
        cache.update(torch.zeros(BATCH, HEADS, 1, DIM), torch.zeros(BATCH, HEADS, 1, DIM), layer)
    cache.end_write()
    assert cache.fill == [4] * LAYERS and cache.valid[:, :, 3].all()
    assert not cache.valid[:, :, 4:].any()


def test_injected_slots_masked_for_rows_that_did_not_inject():
    cache = _cache()
    _write(cache, 2)
    _write(cache, 2, torch.tensor([[True, True], [False, False]]))
    assert cache.fill == [4] * LAYERS  # one length for every row
    assert cache.valid[:, 0, :4].all()
    assert torch.equal(cache.valid[0, 1, :4], torch.tensor([True, True, False, False]))


def test_overflow_is_a_clear_error():
    cache = _cache()
    _write(cache, 8)
    with pytest.raises(RuntimeError, match=r"KV cache overflow: 8 \+ 3 slots > 10 allocated.*kv_growth"):
        cache.begin_write(3)
    assert cache.fill == [8] * LAYERS  # nothing half-reserved
    _write(cache, 2)
    assert cache.fill == [MAX] * LAYERS


def test_truncate_to_forgets_later_slots():
    cache = _cache()
    _write(cache, 3)
    mark = list(cache.fill)
    _write(cache, 4, value=9.0)
    cache.truncate_to(mark)
    assert cache.fill == [3] * LAYERS
    assert not cache.valid[:, :, 3:].any() and cache.valid[:, :, :3].all()
    returned = _write(cache, 1, value=5.0)
    assert returned[0][0].shape[2] == 4 and (returned[0][0][:, :, 3] == 5.0).all()


def test_truncate_to_cannot_grow():
    cache = _cache()
    _write(cache, 2)
    with pytest.raises(ValueError, match="cannot truncate layer 0 to 5 slots"):
        cache.truncate_to([5, 2, 2])


def test_restrict_write_keeps_positions_in_later_layers_and_forms_a_group():
    cache = _cache()
    cache.begin_write(5, torch.tensor([[False, True, True, True, True], [True] * 5]))
    cache.update(torch.ones(BATCH, HEADS, 5, DIM), torch.ones(BATCH, HEADS, 5, DIM), 0)
    keep = torch.tensor([[0, 2, 4], [1, 2, 3]])  # [B, T'] sorted per row
    cache.restrict_write(range(1, LAYERS), keep)
    assert cache.group == [0, 1, 1]
    assert cache._pending == [5, 3, 3]
    for layer in range(1, LAYERS):
        k, _ = cache.update(torch.ones(BATCH, HEADS, 3, DIM), torch.ones(BATCH, HEADS, 3, DIM), layer)
        assert k.shape[2] == 3
    cache.end_write()
    assert cache.fill == [5, 3, 3]
    # validity follows the kept positions: row 0 kept its padded slot 0 (invalid), then 2 and 4
    assert cache.valid[1, 0, :3].tolist() == [False, True, True]
    assert cache.valid[1, 1, :3].tolist() == [True, True, True]
    assert not cache.valid[1:, :, 3:].any()
    # the next step writes each layer after its own fill
    cache.begin_write(1)
    assert [s.tolist() for s in cache._write_slots] == [[5], [3], [3]]
    cache.end_write()
    # a second restriction makes a new group
    cache.begin_write(2)
    cache.restrict_write(range(2, LAYERS), torch.tensor([[1], [1]]))
    assert cache.group == [0, 1, 2]
    cache.end_write()


def test_reset_empties_but_keeps_buffers():
    cache = _cache()
    _write(cache, 4)
    cache.group[2] = 3
    pointers = [v.data_ptr() for v in cache.values]
    cache.reset()
    assert cache.fill == [0] * LAYERS and cache.group == [0] * LAYERS and not cache.valid.any()
    assert [v.data_ptr() for v in cache.values] == pointers


def test_add_edits_one_slot_for_chosen_rows():
    cache = _cache()
    _write(cache, 3, value=0.0)
    before = cache.keys[1].clone()
    cache.add_(1, 2, torch.ones(DIM), None, rows=torch.tensor([True, False]))
    diff = cache.keys[1] - before
    assert (diff[0, :, 2] == 1).all() and (diff[1] == 0).all()
    assert (diff[:, :, :2] == 0).all() and torch.equal(cache.values[1], -before)
