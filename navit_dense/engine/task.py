"""The task interface: everything task-specific the engine needs, and the task registry.

A task (classification, detection, segmentation, ...) declares the dataclasses of its
``model`` and ``data`` config sections, is constructed with the resolved config
(``self.cfg``, a typed dataclass) and provides:

- ``build_model()``: an nn.Module containing a NaViT, called as ``model(packed_batch) -> outputs``;
- ``build_dataset(split)``: the "train" or "val" :class:`TaskDataset` (None if the task has no such split);
- ``collate(samples, plan)``: packs a list of samples into ``(PackedBatch, targets)`` with
  ``plan.pack(images)``;
- ``count(batch, targets)``: the quantities losses are normalized by (default: images);
- ``losses(outputs, targets, ctx)``: a dict of scalar tensors whose ``'loss'`` entry is
  optimized. Normalize by ``ctx.totals`` (global counts over all ranks and all micro-batches
  of the step), never by local counts: then summing over micro-batches and ranks gives the
  loss of the whole global batch, so gradient accumulation and DDP match one big batch.
  Every entry is summed that way for logging;
- ``build_evaluator()``: an :class:`Evaluator`.

A task whose datasets can hand un-normalized pixels to its collate sets
``supports_uint8_patches`` and, when ``self.pixel_norm`` is set (``data.uint8_patches``,
resolved at construction), builds datasets that skip their normalization and packs with
``replace(plan, pixel_norm=self.pixel_norm)``: uint8 patches, normalized by the model on the
device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, Sequence

import torch
import torch.nn as nn

from ..data import PackedBatch, TokenDrop, pack_images
from ..data.packed_batch import PixelNorm
from ..models import NaViT, build_backbone
from ..models.pretrained import load_pretrained
from .config import ConfigError, DataConfig, ModelConfig
from .registry import get_task, register_task, task_names

__all__ = ["Evaluator", "LossContext", "PackPlan", "SmallImageError", "Task", "TaskDataset", "get_task", "register_task", "task_names"]


class TaskDataset(Protocol):
    def __len__(self) -> int: ...

    def image_size(self, index: int) -> tuple[int, int]:
        """(height, width) of the image, known without decoding it (it sets the token cost)."""

    def __getitem__(self, index: int) -> Any:
        """One sample. For a bad input raise navit_dense.data.DataError (or return None): the
        engine drops a training sample with a warning and counts it per reason (run summary),
        and lets the error stop an evaluation. Draw augmentation randomness from the global
        random/numpy/torch RNGs: the engine seeds them per (seed, epoch, index), so samples do
        not depend on workers, ranks or resumes. A dataset may also offer ``skip_summary() ->
        dict`` (what it dropped while loading, e.g. bad annotations) for the run summary, and
        ``repeat_factors() -> Sequence[float]`` (one value >= 1 per image) to repeat images
        in every training epoch (LVIS repeat-factor sampling; repeats get their own augmentation),
        and ``image_file(index) -> str`` so that warnings and errors about an item name its file."""


class Evaluator(Protocol):
    def process(self, outputs: Any, targets: Any) -> None: ...

    def state(self) -> Any:
        """Picklable results accumulated by this process (gathered to rank 0 under DDP)."""

    def merge(self, states: list[Any]) -> None:
        """Add the states of the other processes before metrics() is called on rank 0."""

    def metrics(self) -> dict[str, float]: ...


class SmallImageError(ValueError):
    """A sample's image (after its transforms) is smaller than one patch, so it has no token.
    ``position``: the sample's place in the batch (sample order)."""

    def __init__(self, position: int, size: tuple[int, int], patch_size: int):
        self.position, self.size, self.patch_size = position, size, patch_size
        super().__init__(f"{size[0]}x{size[1]} is smaller than one {patch_size}x{patch_size} patch")


@dataclass
class PackPlan:
    """How the samples of one batch are packed: the engine fills it in, ``collate`` calls pack()."""

    max_tokens: list[int]  # per-sample token budget, in sample order
    seed: int | list[int]  # token-drop seeds: one per sample (or one for the batch)
    patch_size: int
    seq_len: int
    num_prefix_tokens: int
    algorithm: str
    token_drop: TokenDrop | None  # None at evaluation
    max_side: int | None = None  # cap on the longer side in pixels (data.max_side)
    train: bool = False  # a training batch (augmented, token-dropped) or an evaluation one
    max_images_per_seq: int | None = None  # data.max_images_per_seq (None: no limit; 1: no packing)
    pixel_norm: PixelNorm | None = None  # set: the images are un-normalized (float [0, 1] or uint8), packed as uint8 patches

    def pack(self, images: Sequence[torch.Tensor]) -> PackedBatch:
        """Raises SmallImageError for an image smaller than one patch (the engine skips that
        training sample, or names the evaluation item)."""
        for i, image in enumerate(images):
            if torch.is_tensor(image) and min(image.shape[-2:]) < self.patch_size:  # pack_images explains other bad inputs
                raise SmallImageError(i, tuple(image.shape[-2:]), self.patch_size)
        return pack_images(
            images,
            self.patch_size,
            seq_len=self.seq_len,
            max_tokens=self.max_tokens,
            algorithm=self.algorithm,
            num_prefix_tokens=self.num_prefix_tokens,
            token_drop=self.token_drop,
            seed=self.seed,
            max_side=self.max_side,
            max_images_per_seq=self.max_images_per_seq,
            pixel_norm=self.pixel_norm,
        )


@dataclass
class LossContext:
    step: int  # optimizer step being computed (0-based)
    totals: dict[str, float]  # task.count() summed over ranks and micro-batches of this step


class Task(ABC):
    name: ClassVar[str] = ""
    ModelConfig: ClassVar[type] = ModelConfig
    DataConfig: ClassVar[type] = DataConfig
    supports_uint8_patches: ClassVar[bool] = False  # see the module docstring

    def __init__(self, cfg):
        self.cfg = cfg
        # model.backbone.init is read by build_backbone unless turned off (evaluating a
        # checkpoint, whose weights replace it anyway); its report is logged by the trainer.
        self.load_pretrained = True
        self.pretrained_report: dict | None = None
        # Resolved here, in the main process, so that datasets and the collate (in the data
        # workers) agree; None: normalized float patches.
        self.pixel_norm: PixelNorm | None = None
        if self.uint8_patches():  # a supporting task's data config has mean and std
            try:
                self.pixel_norm = PixelNorm(cfg.data.mean, cfg.data.std)
            except ValueError as e:
                raise ConfigError(f"data.mean / data.std: {e}") from None

    def uint8_patches(self) -> bool:
        """``data.uint8_patches`` resolved: null (auto) is on for a supporting task on a CUDA run."""
        value = self.cfg.data.uint8_patches
        if value is None:
            device = self.cfg.train.device
            return self.supports_uint8_patches and (device == "cuda" or (device == "auto" and torch.cuda.is_available()))
        if value and not self.supports_uint8_patches:
            raise ConfigError(f"data.uint8_patches=true: task {self.name!r} packs normalized float patches only; set it to false or null")
        return value

    def build_backbone(self, **defaults) -> NaViT:
        """The configured NaViT: ``defaults`` (task choices such as global_pool) under the
        config's explicit fields, initialised from ``model.backbone.init`` when it names a file."""
        b = self.cfg.model.backbone
        net = build_backbone(b.name, **{**defaults, **b.overrides()})
        if b.init.path and self.load_pretrained:
            try:
                self.pretrained_report = load_pretrained(net, b.init.path, b.init.format, b.init.prefix)
            except (OSError, ValueError) as e:
                raise type(e)(f"model.backbone.init: {e}") from None
        return net

    @abstractmethod
    def build_model(self) -> nn.Module: ...

    @abstractmethod
    def build_dataset(self, split: str) -> TaskDataset | None: ...

    @abstractmethod
    def collate(self, samples: list[Any], plan: PackPlan) -> tuple[PackedBatch, Any]: ...

    def count(self, batch: PackedBatch, targets: Any) -> dict[str, float]:
        return {"images": float(batch.num_images)}

    @abstractmethod
    def losses(self, outputs: Any, targets: Any, ctx: LossContext) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def build_evaluator(self) -> Evaluator: ...
