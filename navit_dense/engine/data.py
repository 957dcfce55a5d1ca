"""Data loading: token-budget sampler -> dataset -> task collate -> MicroBatch."""

from __future__ import annotations

import random
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data import PackedBatch, ResolutionSampler, TokenDrop
from ..data.decode import BadInputWarning, DataError
from .sampler import SampleKey, TokenBudgetSampler
from .task import PackPlan, Task


@dataclass
class MicroBatch:
    batch: PackedBatch
    targets: Any
    epoch: int
    step: int  # step within the epoch
    skipped: dict[str, int]  # training samples dropped from this batch, per reason (DataError.reason)


@dataclass(frozen=True)
class Skipped:
    """What a worker sends instead of a training sample the dataset could not produce."""

    reason: str


@contextmanager
def _seeded(seed: int):
    """Seed python/numpy/torch for one sample and restore the caller's state afterwards, so
    augmentation depends only on (seed, epoch, index): the same with any number of workers or
    ranks and after a resume, and the main process RNG is left untouched."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


class _KeyedDataset(Dataset):
    """The task's dataset, seeded per sample. The skip policy lives here, once for every task:
    a training sample whose input is bad (the dataset raises DataError, or returns None) is
    dropped with a warning and counted per reason; at evaluation the error propagates, since
    metrics would silently count a dropped image as missed."""

    def __init__(self, dataset, seed: int, train: bool):
        self.dataset, self.seed, self.train = dataset, seed, train

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey):
        # Repeats of an image within an epoch (repeat-factor sampling) get their own augmentation.
        entropy = [self.seed, key.epoch, key.index] + ([key.repeat] if key.repeat else [])
        seed = int(np.random.SeedSequence(entropy).generate_state(1)[0])
        try:
            with _seeded(seed):
                sample = self.dataset[key.index]
        except DataError as e:
            if not self.train:
                raise
            warnings.warn(f"training sample {key.index} skipped ({e.reason}): {e}", BadInputWarning, stacklevel=2)
            return key, Skipped(e.reason)
        if sample is None:
            if not self.train:
                raise RuntimeError(f"the dataset returned no sample for evaluation item {key.index}; evaluation never drops images")
            return key, Skipped("dataset_returned_none")
        return key, sample


class Collator:
    def __init__(self, task: Task, **pack):
        self.task, self.pack = task, pack

    def __call__(self, items: list[tuple[SampleKey, Any]]) -> MicroBatch:
        first = items[0][0]
        kept = [(k, s) for k, s in items if not isinstance(s, Skipped)]
        if not kept:
            raise RuntimeError(f"every sample of micro-batch (epoch {first.epoch}, step {first.step}) was skipped by the dataset")
        plan = PackPlan(max_tokens=[k.budget for k, _ in kept], seed=[k.seed for k, _ in kept], **self.pack)
        batch, targets = self.task.collate([s for _, s in kept], plan)
        skipped = Counter(s.reason for _, s in items if isinstance(s, Skipped))
        return MicroBatch(batch, targets, first.epoch, first.step, dict(skipped))


def build_loader(task: Task, dataset, cfg, *, patch_size: int, num_prefix_tokens: int, train: bool, world_size: int, rank: int) -> DataLoader:
    """A DataLoader over MicroBatches; its ``batch_sampler`` is the TokenBudgetSampler (call set_epoch)."""
    d = cfg.data
    token_drop = None
    if train and d.token_drop.mode != "none":
        token_drop = TokenDrop(**asdict(d.token_drop))
    resolution = None
    if train and d.resolution.enabled:
        r = d.resolution
        resolution = ResolutionSampler(r.min_side, r.max_side, r.loc, r.scale, multiple=patch_size)
    sampler = TokenBudgetSampler(
        [dataset.image_size(i) for i in range(len(dataset))],
        patch_size=patch_size,
        max_tokens_per_image=d.max_tokens_per_image,
        tokens_per_batch=d.tokens_per_batch if train or not d.eval_tokens_per_batch else d.eval_tokens_per_batch,
        num_prefix_tokens=num_prefix_tokens,
        grad_accum=cfg.train.grad_accum,
        world_size=world_size,
        rank=rank,
        seed=cfg.seed,
        train=train,
        resolution=resolution,
        token_drop=token_drop,
        max_side=d.max_side,
        # Optional dataset hook (e.g. LVIS repeat factors); only training repeats images.
        repeat_factors=dataset.repeat_factors() if train and hasattr(dataset, "repeat_factors") else None,
    )
    collate = Collator(
        task,
        patch_size=patch_size,
        seq_len=d.seq_len,
        num_prefix_tokens=num_prefix_tokens,
        algorithm=d.packing,
        token_drop=token_drop,
        max_side=d.max_side,
        train=train,
    )
    return DataLoader(
        _KeyedDataset(dataset, cfg.seed, train),
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=d.num_workers,
        persistent_workers=d.num_workers > 0,
        # Its own generator: otherwise every new iterator draws from the global torch RNG,
        # which would shift model randomness (drop path) between a resumed and a straight run.
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def epochs(loader: DataLoader, epoch: int, start_step: int) -> Iterator[MicroBatch]:
    """Micro-batches from (epoch, start_step) on, across epoch boundaries, forever."""
    sampler: TokenBudgetSampler = loader.batch_sampler
    while True:
        sampler.set_epoch(epoch, start_step)
        if sampler.steps_in_epoch(epoch) == 0:
            raise RuntimeError(
                f"epoch {epoch} has no complete step: the training set holds fewer tokens than "
                f"data.tokens_per_batch x train.grad_accum ({sampler.tokens_per_batch} x {sampler.grad_accum})"
            )
        yield from loader
        epoch, start_step = epoch + 1, 0
