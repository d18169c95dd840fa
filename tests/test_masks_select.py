"""Exact selection: hand-computed cases, exact counts, ties by position, global scope vs brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from modelzoo_ext.errors import UserError
from modelzoo_ext.masks.scores import float_keys, magnitude_keys, random_keys, wanda_scores
from modelzoo_ext.masks.select import (
    Structure,
    Threshold,
    ThresholdFinder,
    cols_mask,
    kept_count,
    n_m_mask,
    per_row_mask,
    rows_mask,
    threshold_mask,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def brute_force_keep(values: np.ndarray, kept: int) -> np.ndarray:
    """Reference: keep the `kept` largest |values|, ties to the earlier position (stable sort)."""
    order = np.argsort(-np.abs(values.astype(np.float64)), kind="stable")
    keep = np.zeros(values.size, dtype=bool)
    keep[order[:kept]] = True
    return keep


def layer_mask(keys: np.ndarray, sparsity: float) -> np.ndarray:
    """One tensor's unstructured mask as `masks compute` selects it in layer scope."""
    from modelzoo_ext.masks.passes import unstructured_masks

    (produce,), _ = unstructured_masks("w", keys, (sparsity,))
    return produce().copy().reshape(keys.shape)


@pytest.mark.parametrize("dtype", DTYPES)
def test_weights_1_to_8_at_half_keep_5_to_8(dtype):
    weight = torch.tensor([[3.0, -8.0, 1.0, 6.0], [-5.0, 2.0, 7.0, -4.0]], dtype=dtype)
    mask = layer_mask(magnitude_keys(weight), 0.5)
    assert mask.tolist() == [[False, True, False, True], [True, False, True, False]]


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_go_to_earlier_positions(dtype):
    weight = torch.tensor([[1.0, 2.0, 2.0, 2.0], [2.0, 3.0, 0.0, 1.0]], dtype=dtype)
    # 8 weights, 50% -> keep 4: the 3, then three of the four 2s, first by row-major position.
    mask = layer_mask(magnitude_keys(weight), 0.5)
    assert mask.tolist() == [[False, True, True, True], [False, True, False, False]]


def test_two_four_hand_case():
    weight = torch.tensor(
        [[0.1, -0.9, 0.5, 0.2, 4.0, 3.0, -2.0, 1.0], [1.0, 1.0, 1.0, 1.0, 0.0, -0.3, 0.0, 0.0]]
    )
    mask = n_m_mask(magnitude_keys(weight), 2, 4)
    assert mask.tolist() == [
        [False, True, True, False, True, True, False, False],
        [True, True, False, False, True, True, False, False],  # ties -> lower index
    ]


def test_n_m_needs_divisible_input():
    with pytest.raises(UserError, match="divisible"):
        n_m_mask(torch.zeros(2, 6, dtype=torch.int16), 2, 4, name="w")


@pytest.mark.parametrize("text", ["4:4", "5:4", "0:4", "2-4", "dense"])
def test_bad_structures_are_refused(text):
    with pytest.raises(UserError):
        Structure.parse(text)


def test_rows_hand_case():
    weight = torch.tensor([[1.0, 1.0, 1.0], [4.0, 0.0, 0.0], [-2.0, 2.0, -0.5], [0.1, 0.1, 0.1]])
    # row L1 norms: 3, 4, 4.5, 0.3 -> at 50% keep rows 1 and 2.
    mask = rows_mask(weight.abs(), 0.5)
    assert mask.tolist() == [[False] * 3, [True] * 3, [True] * 3, [False] * 3]


def test_cols_hand_case():
    weight = torch.tensor([[1.0, 0.0, 3.0, 0.5], [1.0, 0.1, -3.0, 0.5]])
    # column sums 2, 0.1, 6, 1 -> at 50% keep columns 0 and 2.
    mask = cols_mask(weight.abs(), 0.5)
    assert mask.tolist() == [[True, False, True, False], [True, False, True, False]]


def test_wanda_activations_change_the_winner():
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]])
    norms = torch.tensor([10.0, 1.0, 1.0, 1.0])  # input channel 0 carries large activations
    scores = wanda_scores(weight, norms)  # [[10, 2, 3, 4], [40, 3, 2, 1]]
    mask = per_row_mask(float_keys(scores), 0.5)
    assert mask.tolist() == [[True, False, False, True], [True, True, False, False]]
    magnitude_only = per_row_mask(magnitude_keys(weight), 0.5)
    assert magnitude_only[0].tolist() == [False, False, True, True]  # without activations 3, 4 win


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.37, 0.5, 0.9, 0.999])
def test_exact_counts_and_brute_force(dtype, sparsity):
    generator = torch.Generator().manual_seed(7)
    weight = (torch.randn(37, 53, generator=generator) * 3).round().to(dtype)  # many ties
    kept = kept_count(weight.numel(), sparsity)
    mask = layer_mask(magnitude_keys(weight), sparsity)
    assert int(mask.sum()) == kept
    expected = brute_force_keep(weight.float().numpy().reshape(-1), kept)
    assert np.array_equal(mask.reshape(-1), expected)


def _global_masks(tensors: dict[str, torch.Tensor], levels: list[float], read_order: list[str]):
    total = sum(t.numel() for t in tensors.values())
    keys = {name: magnitude_keys(t) for name, t in tensors.items()}
    bits = 15 if next(iter(keys.values())).dtype == np.int16 else 31
    finder = ThresholdFinder([kept_count(total, s) for s in levels], bits)
    for name in read_order:
        finder.add_high(name, keys[name])
    if finder.needs_low_pass():
        for name in read_order:
            finder.add_low(name, keys[name])
    plan = finder.plan()
    return [{n: threshold_mask(keys[n], *plan[n][i])[0] for n in read_order} for i in range(len(levels))]


shapes = st.lists(st.tuples(st.integers(1, 6), st.integers(1, 9)), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(
    shapes=shapes,
    dtype=st.sampled_from(DTYPES),
    levels=st.lists(st.floats(0.0, 0.99), min_size=1, max_size=3, unique=True),
    spread=st.sampled_from([2.0, 50.0]),
    seed=st.integers(0, 10_000),
)
def test_global_scope_matches_brute_force(shapes, dtype, levels, spread, seed):
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        f"t{i}": (torch.randn(shape, generator=generator) * spread).round().to(dtype) / 4
        for i, shape in enumerate(shapes)
    }
    names = sorted(tensors)
    read_order = list(reversed(names))  # reading order (shards) must not change the result
    concatenated = np.concatenate([tensors[n].float().numpy().reshape(-1) for n in names])
    for level, masks in zip(levels, _global_masks(tensors, levels, read_order), strict=True):
        kept = kept_count(concatenated.size, level)
        got = np.concatenate([masks[n].reshape(-1) for n in names])
        assert got.sum() == kept
        assert np.array_equal(got, brute_force_keep(concatenated, kept))


def test_levels_are_nested():
    generator = torch.Generator().manual_seed(3)
    tensors = {"a": torch.randn(20, 30, generator=generator), "b": torch.randn(10, 7, generator=generator)}
    levels = [0.2, 0.5, 0.8]
    masks = _global_masks(tensors, levels, ["a", "b"])
    for lower, higher in zip(masks, masks[1:], strict=False):
        for name in tensors:
            assert not (higher[name] & ~lower[name]).any()


def test_random_keys_depend_on_seed_and_name_only():
    a = random_keys(1, "model.layers.0.mlp.up_proj.weight", (8, 16))
    assert np.array_equal(a, random_keys(1, "model.layers.0.mlp.up_proj.weight", (8, 16)))
    assert not np.array_equal(a, random_keys(2, "model.layers.0.mlp.up_proj.weight", (8, 16)))
    assert not np.array_equal(a, random_keys(1, "model.layers.1.mlp.up_proj.weight", (8, 16)))
    assert a.dtype == np.int32 and int(a.min()) >= 0


@pytest.mark.parametrize("budget", [1, 2, 500, 1999, 2999, 3000])
def test_partial_ties_from_either_end(budget):
    # 3000 ties spread over a large tensor (several scan blocks), everything else below or above.
    generator = torch.Generator().manual_seed(0)
    keys = torch.randint(0, 3, (600, 1000), generator=generator, dtype=torch.int16) * 10
    keys.view(-1)[torch.randperm(keys.numel(), generator=generator)[:3000]] = 15
    threshold = Threshold(15, budget)
    with_count, used = threshold_mask(keys.numpy(), threshold, budget, 3000)
    without_count, _ = threshold_mask(keys.numpy(), threshold, budget)
    flat = keys.reshape(-1)
    ties = torch.nonzero(flat == 15).reshape(-1)
    expected = flat > 15
    expected[ties[:budget]] = True
    assert (
        used == budget
        and np.array_equal(with_count.reshape(-1), expected.numpy())
        and np.array_equal(without_count, with_count)
    )


def _search_masks(tensors: dict[str, torch.Tensor], levels: list[float], step: int):
    """Layer scope through the count search (`bracket.tensor_masks`); None where it gave up."""
    from modelzoo_ext.masks.bracket import tensor_masks

    masks = {}
    for name, tensor in tensors.items():
        keys = magnitude_keys(tensor)
        found = tensor_masks(keys, [kept_count(keys.size, s) for s in levels], step=step)
        masks[name] = None if found is None else [produce().copy() for produce in found[0]]
    return masks


@settings(max_examples=60, deadline=None)
@given(
    shapes=shapes,
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    levels=st.lists(st.floats(0.0, 0.99), min_size=1, max_size=3, unique=True),
    spread=st.sampled_from([2.0, 50.0, 1000.0]),
    step=st.integers(1, 7),
    seed=st.integers(0, 10_000),
)
def test_count_search_thresholds_match_brute_force(shapes, dtype, levels, spread, step, seed):
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        f"t{i}": (torch.randn(s, generator=generator) * spread).round().to(dtype)
        for i, s in enumerate(shapes)
    }
    for name, level_masks in _search_masks(tensors, levels, step).items():
        if level_masks is None:  # giving up is allowed (the caller falls back), never a wrong answer
            continue
        values = tensors[name].float().numpy().reshape(-1)
        for level, mask in zip(levels, level_masks, strict=True):
            kept = kept_count(values.size, level)
            assert np.array_equal(mask.reshape(-1), brute_force_keep(values, kept))


def test_count_search_gives_up_then_histograms_are_exact(monkeypatch):
    from modelzoo_ext.masks import bracket, passes

    calls = []
    histogram_plan = passes._histogram_plan
    monkeypatch.setattr(passes, "_histogram_plan", lambda *a: calls.append(1) or histogram_plan(*a))
    monkeypatch.setattr(bracket, "MAX_PROBES", 2)

    # Every 4th weight (what a step-4 sample sees) is large, the rest tiny: the sample's guess
    # is far from the true median, so the search runs out of counts and must say so.
    monkeypatch.setattr(bracket, "sample_step", lambda numel, target=0: 4)
    weight = torch.full((64, 64), 0.001).to(torch.bfloat16)
    weight.view(-1)[::4] = 5.0
    weight.view(-1)[1::4] = torch.linspace(0.01, 0.02, 1024).to(torch.bfloat16)
    keys = magnitude_keys(weight)
    assert bracket.tensor_masks(keys, [2048], step=4) is None
    (produce,), _ = passes.unstructured_masks("w", keys, (0.5,))
    mask = produce()
    assert calls == [1]
    assert np.array_equal(mask.reshape(-1), brute_force_keep(weight.float().numpy().reshape(-1), 2048))


@pytest.mark.parametrize("sparsity", [0.1, 0.45, 0.5, 0.55, 0.9])
def test_partial_ties_found_in_chunks_from_either_end(monkeypatch, sparsity):
    from modelzoo_ext.masks import bracket

    monkeypatch.setattr(bracket, "_SCAN_CHUNK", 7)  # many chunks: the early stop and both directions
    generator = torch.Generator().manual_seed(11)
    weight = (torch.randn(61, 47, generator=generator) * 4).round().to(torch.bfloat16)  # few values
    keys = magnitude_keys(weight)
    kept = kept_count(keys.size, sparsity)
    (produce,), _ = bracket.tensor_masks(keys, [kept], step=3)
    mask = produce()
    assert np.array_equal(mask.reshape(-1), brute_force_keep(weight.float().numpy().reshape(-1), kept))


@settings(max_examples=60, deadline=None)
@given(
    shapes=shapes,
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    levels=st.lists(st.floats(0.0, 0.99), min_size=1, max_size=3, unique=True),
    spread=st.sampled_from([2.0, 50.0, 1000.0]),
    sample_every=st.integers(1, 5),
    seed=st.integers(0, 10_000),
)
def test_global_counts_match_brute_force(shapes, dtype, levels, spread, sample_every, seed):
    from modelzoo_ext.masks.format import unpack_bits
    from modelzoo_ext.masks.window import GlobalCounts, count_window

    generator = torch.Generator().manual_seed(seed)
    tensors = {
        f"t{i}": (torch.randn(s, generator=generator) * spread).round().to(dtype)
        for i, s in enumerate(shapes)
    }
    names = sorted(tensors)
    keys = {name: magnitude_keys(t) for name, t in tensors.items()}
    total = sum(k.size for k in keys.values())
    kept = [kept_count(total, s) for s in levels]
    sample = np.concatenate([keys[n].reshape(-1) for n in names])[::sample_every]
    counts = GlobalCounts(kept, total, sample)
    windows = set(counts.windows().values())
    for name in reversed(names):  # reading order must not matter
        counts.add(name, keys[name].shape, {w: count_window(keys[name], *w) for w in windows})
    finished = counts.finish()
    if finished is None:  # a miss is allowed (the caller falls back), never a wrong answer
        return
    values = np.concatenate([tensors[n].float().numpy().reshape(-1) for n in names])
    for level, k in enumerate(kept):
        masks = [finished[n][level] for n in names]
        got = np.concatenate(
            [unpack_bits(m.packed(), keys[n].shape).reshape(-1) for n, m in zip(names, masks, strict=False)]
        )
        assert got.sum() == sum(m.kept for m in masks) == k
        assert np.array_equal(got, brute_force_keep(values, k))
