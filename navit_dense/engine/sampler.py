"""Token-budget batching, the same on every rank.

Every rank computes the same epoch plan from the seed alone (no communication):

1. shuffle the image indices (seed, epoch); with repeat factors (LVIS repeat-factor sampling)
   image i appears floor(r_i) times plus once more with probability frac(r_i), redrawn per epoch;
2. give each image its token budget (fixed, or sampled per epoch with a ResolutionSampler)
   and its token cost from its size alone (``budget_grid``, before any decoding);
3. cut the order into GLOBAL micro-batches of about ``tokens_per_batch`` tokens (never fewer
   images than ranks; an image larger than the budget is a micro-batch of its own), and group
   ``grad_accum`` of them into one optimizer step. Nothing is dropped: the last micro-batch
   and the last step of an epoch may be smaller (a last micro-batch with fewer images than
   ranks joins the one before it), and losses are normalized by the step's own global
   counts, so a smaller step is still the loss of its whole (smaller) batch;
4. split each micro-batch across ranks by tokens (longest first onto the least loaded rank),
   so ranks get near-equal token counts, and yield this rank's share.

The union of the shards of a micro-batch is exactly the batch a single process would see.
"""

from __future__ import annotations

import functools
from typing import Iterator, NamedTuple, Sequence

import numpy as np

from ..data import ResolutionSampler, TokenDrop, budget_grid


class SampleKey(NamedTuple):
    """What the data loader asks the dataset for: the image and how to pack it."""

    index: int
    budget: int  # per-image token budget (max_tokens for pack_images)
    seed: int  # token-drop seed of this image (per image: independent of batching and rank)
    epoch: int
    step: int  # optimizer step within the epoch
    repeat: int = 0  # occurrence of this image earlier in the epoch (repeat-factor sampling), 0 = first


@functools.lru_cache(maxsize=1 << 16)
def _grid_tokens(height: int, width: int, patch_size: int, budget: int, max_side: int | None) -> int:
    h, w = budget_grid(height, width, patch_size, budget, max_side=max_side)
    return h * w


def expected_kept(num_tokens: int, token_drop: TokenDrop | None) -> int:
    """Tokens an image keeps after dropping (see TokenDrop.expected_kept)."""
    return num_tokens if token_drop is None else token_drop.expected_kept(num_tokens)


def shard_by_tokens(items: Sequence[int], costs: Sequence[int], world_size: int) -> list[list[int]]:
    """Split items over ranks with near-equal total cost; each shard keeps the input order."""
    loads = [(0, 0, r) for r in range(world_size)]  # (tokens, images, rank)
    owner = {}
    for pos in sorted(range(len(items)), key=lambda p: (-costs[p], p)):
        load, count, r = min(loads)
        loads[r] = (load + costs[pos], count + 1, r)
        owner[pos] = r
    return [[items[p] for p in range(len(items)) if owner[p] == r] for r in range(world_size)]


class TokenBudgetSampler:
    """Batch sampler yielding lists of :class:`SampleKey` (one list per micro-batch of this rank)."""

    def __init__(
        self,
        sizes: Sequence[tuple[int, int]],
        *,
        patch_size: int,
        max_tokens_per_image: int,
        tokens_per_batch: int,
        num_prefix_tokens: int = 0,
        grad_accum: int = 1,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        train: bool = True,
        resolution: ResolutionSampler | None = None,
        token_drop: TokenDrop | None = None,
        repeat_factors: Sequence[float] | None = None,
        max_side: int | None = None,
    ):
        if not sizes:
            raise ValueError("the dataset is empty")
        if train and len(sizes) < world_size:
            raise ValueError(
                f"the training set holds {len(sizes)} image(s) for {world_size} ranks: every rank needs at least one "
                f"image per micro-batch; train with at most {len(sizes)} processes"
            )
        if repeat_factors is not None:
            repeat_factors = np.asarray(repeat_factors, dtype=np.float64)
            if repeat_factors.shape != (len(sizes),) or (repeat_factors < 1).any():
                raise ValueError(f"repeat_factors needs one value >= 1 per image ({len(sizes)} images)")
        self.repeat_factors = repeat_factors if train else None
        self.sizes = [(int(h), int(w)) for h, w in sizes]
        self.patch_size = patch_size
        self.max_tokens_per_image = max_tokens_per_image
        self.tokens_per_batch = tokens_per_batch
        self.num_prefix_tokens = num_prefix_tokens
        self.grad_accum = grad_accum if train else 1
        self.world_size, self.rank = world_size, rank
        self.seed = seed
        self.train = train
        self.resolution = resolution
        self.token_drop = token_drop if train else None
        self.max_side = max_side  # longer-side cap the collate applies (the cost must see it too)
        self.epoch, self.start_step = 0, 0
        self._plans: dict[int, tuple[list[int], list[int], list[list[list[int]]]]] = {}

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """Select the epoch; ``start_step`` skips the steps a resumed run has already done."""
        self.epoch, self.start_step = epoch, start_step

    def budgets(self, epoch: int) -> list[int]:
        if self.resolution is None:
            return [self.max_tokens_per_image] * len(self.sizes)
        rng = np.random.default_rng([self.seed, epoch, 1])
        sides = self.resolution.sample_many(rng, len(self.sizes)).tolist()
        return [min(self.resolution.max_tokens(s, self.patch_size), self.max_tokens_per_image) for s in sides]

    def plan(self, epoch: int) -> tuple[list[int], list[int], list[list[list[int]]]]:
        """(budgets, costs, steps): steps[s][m] lists the image indices of GLOBAL micro-batch m of step s."""
        if epoch not in self._plans:
            budgets = self.budgets(epoch)
            costs = [
                expected_kept(_grid_tokens(h, w, self.patch_size, b, self.max_side), self.token_drop) + self.num_prefix_tokens
                for (h, w), b in zip(self.sizes, budgets)
            ]
            if self.train:
                order = self._epoch_indices(epoch)
            else:
                order = list(range(len(self.sizes)))
            micros, current, tokens = [], [], 0
            for i in order:
                if current and tokens + costs[i] > self.tokens_per_batch and len(current) >= self.world_size:
                    micros.append(current)
                    current, tokens = [], 0
                current.append(i)
                tokens += costs[i]
            if len(current) < self.world_size and micros and self.train:
                micros[-1] += current  # every rank gets an image of every training micro-batch
            elif current:
                micros.append(current)
            k = self.grad_accum
            steps = [micros[j : j + k] for j in range(0, len(micros), k)]
            self._plans = {epoch: (budgets, costs, steps)}  # keep only the current epoch
        return self._plans[epoch]

    def _epoch_indices(self, epoch: int) -> list[int]:
        """The epoch's shuffled image indices, repeats included (a per-epoch list the
        batching above consumes like any other order)."""
        rng = np.random.default_rng([self.seed, epoch])
        if self.repeat_factors is None:
            return rng.permutation(len(self.sizes)).tolist()
        r = self.repeat_factors
        whole = np.floor(r)
        # Its own stream, so the draw does not shift the shuffle of runs without repeats.
        extra = np.random.default_rng([self.seed, epoch, 2]).random(len(r)) < r - whole
        return rng.permutation(np.repeat(np.arange(len(r)), whole.astype(np.int64) + extra)).tolist()

    def steps_in_epoch(self, epoch: int) -> int:
        return len(self.plan(epoch)[2])

    def micros_in_step(self, epoch: int, step: int) -> int:
        """Micro-batches of one step (``grad_accum``, fewer in an epoch's last step)."""
        return len(self.plan(epoch)[2][step])

    def _shards(self) -> Iterator[list[SampleKey]]:
        budgets, costs, steps = self.plan(self.epoch)
        seen: dict[int, int] = {}  # occurrences so far this epoch, counted on the global plan (same on every rank)
        for s in range(len(steps)):
            for micro in steps[s]:
                repeat = []
                for i in micro:
                    repeat.append(seen.get(i, 0))
                    seen[i] = repeat[-1] + 1
                if s < self.start_step:
                    continue
                positions = shard_by_tokens(list(range(len(micro))), [costs[i] for i in micro], self.world_size)[self.rank]
                if positions:  # only evaluation can leave a rank without images
                    keys = [(micro[p], repeat[p]) for p in positions]
                    yield [SampleKey(i, budgets[i], self._sample_seed(i, r), self.epoch, s, r) for i, r in keys]

    def _sample_seed(self, index: int, repeat: int = 0) -> int:
        # Per image (and repeat), so its token-drop pattern is the same whatever rank or batch it lands in.
        key = [self.seed, self.epoch, index, 3] + ([repeat] if repeat else [])
        return int(np.random.SeedSequence(key).generate_state(1)[0])

    def __iter__(self) -> Iterator[list[SampleKey]]:
        return self._shards()

    def __len__(self) -> int:
        return sum(1 for _ in self._shards())
