"""Packing invariants, resize-to-budget geometry, token dropping, and bad input."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import navit_dense as nd
from navit_dense.data import PACKING_ALGORITHMS, ResolutionSampler, TokenDrop, budget_grid, pack_lengths, patchify, resize_to_grid


# ---- bin packing --------------------------------------------------------------------------
@given(
    lengths=st.lists(st.integers(1, 64), min_size=1, max_size=60),
    capacity=st.integers(64, 200),
    algorithm=st.sampled_from(PACKING_ALGORITHMS),
    cap=st.one_of(st.none(), st.integers(1, 6)),
)
def test_pack_lengths_invariants(lengths, capacity, algorithm, cap):
    bins = pack_lengths(lengths, capacity, algorithm, max_images_per_seq=cap)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))  # every item exactly once
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)  # no overflow
    assert all(b for b in bins)
    if cap is not None:
        assert all(len(b) <= cap for b in bins)
    assert bins == pack_lengths(lengths, capacity, algorithm, max_images_per_seq=cap)  # deterministic


@given(lengths=st.lists(st.integers(1, 64), min_size=1, max_size=60), capacity=st.integers(64, 200))
def test_decreasing_heuristics_never_use_more_bins_than_next_fit(lengths, capacity):
    nf = len(pack_lengths(lengths, capacity, "next_fit"))
    lower_bound = math.ceil(sum(lengths) / capacity)
    for algorithm in ("first_fit_decreasing", "best_fit_decreasing", "balanced"):
        n = len(pack_lengths(lengths, capacity, algorithm))
        assert lower_bound <= n <= nf


def test_first_fit_follows_paper_greedy_order():
    # Items in input order go to the first sequence with room.
    assert pack_lengths([6, 6, 3, 4, 1], 10, "first_fit") == [[0, 2, 4], [1, 3]]
    # next-fit never revisits a closed sequence
    assert pack_lengths([6, 6, 3, 4, 1], 10, "next_fit") == [[0], [1, 2], [3, 4]]
    assert pack_lengths([6, 6, 3, 4, 1], 10, "best_fit_decreasing") == [[0, 3], [1, 2, 4]]


def test_pack_lengths_rejects_oversized_and_unknown():
    with pytest.raises(ValueError, match="image 1 needs 20 tokens"):
        pack_lengths([5, 20], 10)
    with pytest.raises(ValueError, match="unknown packing algorithm"):
        pack_lengths([5], 10, "worst_fit")


# ---- resize to budget ---------------------------------------------------------------------
@given(
    height=st.integers(1, 5000),
    width=st.integers(1, 5000),
    budget=st.integers(1, 1024),
    max_side=st.one_of(st.none(), st.sampled_from([64, 128, 256, 512, 1024])),
)
def test_budget_grid_respects_budget_and_aspect(height, width, budget, max_side):
    P = 16
    h, w = budget_grid(height, width, P, budget, max_side=max_side)
    assert h >= 1 and w >= 1 and h * w <= budget
    if max_side is not None:
        assert max(h, w) * P <= max_side
    # each side within one patch of the exact aspect ratio (unless pinned at one patch)
    if h > 1 and w > 1:
        # one scale s explains both sides: h = ceil(H * s) and w = ceil(W * s), i.e. the
        # intervals ((h - 1) / H, h / H] and ((w - 1) / W, w / W] overlap
        assert max((h - 1) / height, (w - 1) / width) < min(h / height, w / width) + 1e-12
    # the budget is used: one more step of scale would not fit
    h2, w2 = budget_grid(height, width, P, budget + max(h, w) * 4, max_side=max_side)
    assert h2 >= h and w2 >= w


def _largest_grid_by_enumeration(H, W, P, budget, max_side, allow_upscale):
    """The spec, checked exhaustively: over every scale s where a side's patch count changes
    (s = k / H or k / W), the grid (ceil(H s), ceil(W s)) (at least 1 x 1) of the largest s
    that fits the budget, the side cap and, without upscaling, s <= 1 / P."""
    cap = max_side // P if max_side is not None else budget
    best, best_s = (1, 1), Fraction(0)
    for along in (H, W):
        for k in range(1, budget + 1):
            s = Fraction(k, along)
            grid = (max(1, math.ceil(H * s)), max(1, math.ceil(W * s)))
            fits = grid[0] * grid[1] <= budget and max(grid) <= cap and (allow_upscale or s * P <= 1)
            if fits and s > best_s:
                best, best_s = grid, s
    return best


@given(
    height=st.integers(1, 3000),
    width=st.integers(1, 3000),
    budget=st.integers(1, 300),
    max_side=st.one_of(st.none(), st.sampled_from([64, 128, 256, 512])),
    allow_upscale=st.booleans(),
)
def test_budget_grid_is_the_largest_fitting_scale(height, width, budget, max_side, allow_upscale):
    got = budget_grid(height, width, 16, budget, max_side=max_side, allow_upscale=allow_upscale)
    assert got == _largest_grid_by_enumeration(height, width, 16, budget, max_side, allow_upscale)


def test_budget_grid_examples():
    assert budget_grid(512, 512, 16, 256) == (16, 16)
    assert budget_grid(20000, 50, 16, 256) == (256, 1)
    assert budget_grid(50, 20000, 16, 256, max_side=1024) == (1, 64)
    assert budget_grid(300, 451, 16, 256) == (13, 19)


# ---- pack_images --------------------------------------------------------------------------
sizes_strategy = st.lists(st.tuples(st.integers(16, 200), st.integers(16, 200)), min_size=1, max_size=8)


@given(sizes=sizes_strategy, budget=st.integers(4, 64), algorithm=st.sampled_from(PACKING_ALGORITHMS), prefix=st.integers(0, 2))
def test_pack_images_layout(sizes, budget, algorithm, prefix):
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, h, w, generator=gen) for h, w in sizes]
    batch = nd.pack_images(images, patch_size=8, max_tokens_per_image=budget, seq_len=96, algorithm=algorithm, num_prefix_tokens=prefix)
    batch.validate()
    assert batch.num_images == len(images)
    assert batch.seq_len <= 96
    for i, image in enumerate(images):
        h, w = batch.grid_sizes[i].tolist()
        assert h * w <= budget
        expected = patchify(resize_to_grid(image, (h, w), 8), 8)
        s, o = int(batch.seq_index[i]), int(batch.seq_offset[i])
        run = slice(o + prefix, o + prefix + h * w)
        torch.testing.assert_close(batch.patches[s, run], expected)
        rows, cols = batch.positions[s, run].unbind(-1)
        assert torch.equal(rows * w + cols, batch.token_index[s, run])
        assert torch.equal(batch.token_index[s, run], torch.arange(h * w))
        torch.testing.assert_close(batch.frac_positions[s, run, 0], (rows.float() + 0.5) / h)
        torch.testing.assert_close(batch.frac_positions[s, run, 1], (cols.float() + 0.5) / w)
        assert bool((batch.token_index[s, o : o + prefix] == -1).all())
        assert bool(batch.prefix_mask[s, o : o + prefix].all())
    # The buffer is allocated uninitialised: every slot no patch was copied to must be zero.
    assert bool((batch.patches[batch.padding_mask | batch.prefix_mask] == 0).all())


def test_balanced_packing_has_little_padding():
    rng = np.random.default_rng(0)
    images = [torch.rand(3, int(h), int(w)) for h, w in rng.integers(32, 400, size=(200, 2))]
    ours = nd.pack_images(images, 16, 256, 2048)
    paper = nd.pack_images(images, 16, 256, 2048, algorithm="first_fit", fixed_seq_len=True)
    assert ours.pad_fraction <= 0.01
    assert ours.pad_fraction < paper.pad_fraction


def test_fixed_seq_len_and_cap():
    images = [torch.rand(3, 64, 64) for _ in range(5)]
    batch = nd.pack_images(images, 16, 16, 128, fixed_seq_len=True, max_images_per_seq=2)
    assert batch.seq_len == 128 and batch.num_sequences == 3
    assert torch.bincount(batch.seq_index).max() <= 2


# ---- token dropping -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "drop",
    [TokenDrop("constant", rate=0.5), TokenDrop("beta", alpha=2, beta=5, max_rate=0.8), TokenDrop("resolution", min_rate=0.1, max_rate=0.7, min_tokens=16, max_tokens=64)],
)
def test_token_drop_is_seeded_and_consistent(drop):
    images = [torch.rand(3, 16 * h, 16 * w) for h, w in [(4, 4), (8, 8), (2, 7), (8, 3)]]
    a = nd.pack_images(images, 16, 64, 256, allow_upscale=False, token_drop=drop, seed=3)
    b = nd.pack_images(images, 16, 64, 256, allow_upscale=False, token_drop=drop, seed=3)
    c = nd.pack_images(images, 16, 64, 256, allow_upscale=False, token_drop=drop, seed=4)
    a.validate()
    assert torch.equal(a.token_index, b.token_index) and torch.equal(a.drop_rates, b.drop_rates)
    assert not torch.equal(a.token_index, c.token_index)
    areas = a.grid_sizes.prod(1)
    # the one rate sampled per image decides how many tokens are packed
    expected = torch.clamp(torch.round(areas * (1 - a.drop_rates.double())), min=1).long()
    assert torch.equal(a.num_kept, expected)
    for i in range(a.num_images):
        kept = a.kept_indices(i)
        assert bool((kept[1:] > kept[:-1]).all()) and int(kept.max()) < int(areas[i])
    if drop.mode == "resolution":
        assert a.drop_rates[1] > a.drop_rates[0]  # larger images drop more


def test_no_drop_without_token_drop():
    batch = nd.pack_images([torch.rand(3, 64, 96)], 16, 64, 64, allow_upscale=False)
    assert int(batch.num_kept[0]) == 24 and float(batch.drop_rates[0]) == 0.0


def test_resolution_sampler_low_biased():
    sampler = ResolutionSampler(64, 512, loc=-0.5, multiple=16)
    rng = np.random.default_rng(0)
    sides = np.array([sampler.sample(rng) for _ in range(2000)])
    assert sides.min() >= 64 and sides.max() <= 512 and (sides % 16 == 0).all()
    assert sides.mean() < (64 + 512) / 2 - 40
    again = np.array([ResolutionSampler(64, 512).sample(np.random.default_rng(0)) for _ in range(3)])
    assert len(set(again.tolist())) == 1


# ---- bad input ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "image, message",
    [
        (torch.rand(1, 64, 64), "3-channel"),
        (torch.rand(4, 64, 64), "3-channel"),
        (torch.rand(64, 64), "3-channel"),
        (torch.rand(3, 0, 64), "zero-size"),
        (torch.rand(3, 8, 64), "smaller than one 16x16 patch"),
        (torch.full((3, 32, 32), float("nan")), "NaN"),
        (torch.randint(0, 255, (3, 32, 32), dtype=torch.uint8), "floating-point"),
        (np.zeros((3, 32, 32), dtype=np.float32), "torch.Tensor"),
    ],
)
def test_bad_images_are_rejected_with_clear_errors(image, message):
    with pytest.raises((ValueError, TypeError), match=message) as info:
        nd.pack_images([torch.rand(3, 32, 32), image], 16, 16, 64)
    assert "images[1]" in str(info.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_non_finite_pixel_is_rejected(bad):
    image = torch.rand(3, 48, 40)
    image[2, 47, 0] = bad
    with pytest.raises(ValueError, match=r"images\[0\]: contains NaN or infinite"):
        nd.pack_images([image], 16, 16, 64)


def test_huge_finite_pixels_are_accepted():
    # Their sum overflows to inf: the fast finite test must fall back to the exact one.
    image = torch.full((3, 32, 32), 3e38)
    assert not torch.isfinite(image.sum())
    batch = nd.pack_images([image], 16, 4, 64)
    assert bool((batch.patches[~batch.padding_mask] == 3e38).all())


def test_image_larger_than_sequence():
    with pytest.raises(ValueError, match="does not fit in seq_len=64"):
        nd.pack_images([torch.rand(3, 256, 256)], 16, 256, 64)
    batch = nd.pack_images([torch.rand(3, 256, 256)], 16, 256, 64, fit_to_seq_len=True)
    assert int(batch.grid_sizes.prod()) <= 64
    with pytest.raises(ValueError, match="at least one image"):
        nd.pack_images([], 16, 16, 64)


def test_per_image_drop_seeds_do_not_depend_on_batch_composition():
    drop = TokenDrop("beta", alpha=2, beta=2, max_rate=0.8)
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 96), torch.rand(3, 96, 32)]
    together = nd.pack_images(images, 16, 64, 256, token_drop=drop, seed=[11, 12, 13])
    alone = nd.pack_images(images[1:2], 16, 64, 256, token_drop=drop, seed=[12])
    assert torch.equal(together.kept_indices(1), alone.kept_indices(0))
    assert float(together.drop_rates[1]) == float(alone.drop_rates[0])
    with pytest.raises(ValueError, match="seed has 2 entries for 3 images"):
        nd.pack_images(images, 16, 64, 256, token_drop=drop, seed=[1, 2])


@given(lengths=st.lists(st.integers(1, 300), min_size=1, max_size=40), capacity=st.integers(300, 1200))
def test_capacity_search_beats_plain_balanced_at_every_capacity(lengths, capacity):
    def area(bins):
        longest = max(sum(lengths[i] for i in b) for b in bins)
        return len(bins) * min(capacity, -(-longest // 8) * 8)

    searched = pack_lengths(lengths, capacity, "balanced", shrink_multiple=8)
    assert sorted(i for b in searched for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in searched)
    assert area(searched) >= sum(lengths)
    # What the search promises: no capacity it could shrink to gives a smaller area.
    for c in range(-(-max(lengths) // 8) * 8, capacity + 8, 8):
        assert area(searched) <= area(pack_lengths(lengths, min(c, capacity), "balanced")), c


def test_capacity_search_regression_example():
    # The old early stop used ceil(total / c) * c as a bound, which is not one: it settled for
    # 3 x 40 slots where 2 x 56 fit.
    lengths = [17, 31, 21, 7, 14, 21]
    bins = pack_lengths(lengths, 64, "balanced", shrink_multiple=8)
    assert len(bins) == 2 and max(sum(lengths[i] for i in b) for b in bins) <= 56


def test_pack_native_keeps_each_image_grid_and_pixels():
    images = [torch.rand(3, 70, 100), torch.rand(3, 130, 50)]
    batch = nd.data.pack_native(images, 16, seq_len=64)
    assert batch.grid_sizes.tolist() == [[5, 7], [9, 4]]  # ceil(h / 16) x ceil(w / 16), not the budget resize
    for i, image in enumerate(images):
        h, w = batch.grid_sizes[i].tolist()
        padded = torch.nn.functional.pad(image, (0, w * 16 - image.shape[2], 0, h * 16 - image.shape[1]))
        s, o = int(batch.seq_index[i]), int(batch.seq_offset[i])
        torch.testing.assert_close(batch.patches[s, o : o + h * w], patchify(padded, 16), rtol=0, atol=0)
