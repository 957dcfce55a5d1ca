"""Data loading: token-budget sampler -> dataset -> task collate -> MicroBatch."""

from __future__ import annotations

import random
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..data import PackedBatch, ResolutionSampler, TokenDrop
from ..data.decode import BadInputWarning, DataError
from .sampler import SampleKey, TokenBudgetSampler
from .task import PackPlan, SmallImageError, Task


@dataclass
class MicroBatch:
    batch: PackedBatch | None  # None: every sample of this rank's share was skipped (training only)
    targets: Any
    epoch: int
    step: int  # step within the epoch
    skipped: dict[str, int]  # training samples dropped from this batch, per reason (DataError.reason)

    def pin_memory(self) -> "MicroBatch":
        """Page-locked copies of every tensor (the DataLoader calls this with pin_memory=True on
        CUDA), so the trainer's non-blocking copies to the device overlap with compute."""
        return replace(self, batch=self.batch.pin_memory() if self.batch is not None else None, targets=_pinned(self.targets))


def _pinned(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.pin_memory()
    if isinstance(obj, dict):
        return {k: _pinned(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_pinned(v) for v in obj)
    return obj


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

    def describe(self, index: int) -> str:
        """The item's index, and its file when the dataset says (``image_file``)."""
        image_file = getattr(self.dataset, "image_file", None)
        return f"{index} ({image_file(index)})" if image_file is not None else str(index)

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
    """Packs the samples of one micro-batch (this rank's share). A training sample whose image
    ends up smaller than one patch is skipped like a DataError; if nothing is left the
    micro-batch is empty (``batch`` None) and the trainer deals with it on every rank."""

    def __init__(self, task: Task, describe=str, **pack):
        self.task, self.describe, self.pack = task, describe, pack

    def __call__(self, items: list[tuple[SampleKey, Any]]) -> MicroBatch:
        first = items[0][0]
        kept = [(k, s) for k, s in items if not isinstance(s, Skipped)]
        skipped = Counter(s.reason for _, s in items if isinstance(s, Skipped))
        while kept:
            plan = PackPlan(max_tokens=[k.budget for k, _ in kept], seed=[k.seed for k, _ in kept], **self.pack)
            try:
                batch, targets = self.task.collate([s for _, s in kept], plan)
            except SmallImageError as e:
                key, _ = kept.pop(e.position)
                if not self.pack["train"]:
                    raise DataError(f"evaluation item {self.describe(key.index)}", "smaller_than_patch",
                                    f"{e}; evaluation never drops images: remove it from the evaluation set") from None  # fmt: skip
                warnings.warn(f"training sample {self.describe(key.index)} skipped (smaller_than_patch): {e}", BadInputWarning, stacklevel=2)
                skipped["smaller_than_patch"] += 1
                continue
            return MicroBatch(batch, targets, first.epoch, first.step, dict(skipped))
        return MicroBatch(None, None, first.epoch, first.step, dict(skipped))


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
    keyed = _KeyedDataset(dataset, cfg.seed, train)
    collate = Collator(
        task,
        describe=keyed.describe,
        patch_size=patch_size,
        seq_len=d.seq_len,
        num_prefix_tokens=num_prefix_tokens,
        algorithm=d.packing,
        max_images_per_seq=d.max_images_per_seq or None,
        token_drop=token_drop,
        max_side=d.max_side,
        train=train,
    )
    return DataLoader(
        keyed,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=d.num_workers,
        persistent_workers=d.num_workers > 0,
        pin_memory=cfg.train.device != "cpu" and torch.cuda.is_available(),
        # Its own generator: otherwise every new iterator draws from the global torch RNG,
        # which would shift model randomness (drop path) between a resumed and a straight run.
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def steps(loader: DataLoader, epoch: int, start_step: int) -> Iterator[list[MicroBatch]]:
    """The micro-batches of each optimizer step from (epoch, start_step) on, across epoch
    boundaries, forever (an epoch's last step may hold fewer than train.grad_accum)."""
    sampler: TokenBudgetSampler = loader.batch_sampler
    while True:
        sampler.set_epoch(epoch, start_step)
        group: list[MicroBatch] = []
        for m in loader:
            group.append(m)
            if len(group) == sampler.micros_in_step(epoch, m.step):
                yield group
                group = []
        epoch, start_step = epoch + 1, 0
