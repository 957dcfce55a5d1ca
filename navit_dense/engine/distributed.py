"""torchrun / DDP plumbing: nccl on GPU, gloo on CPU; everything degrades to no-ops in one process."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


class CollectiveTimeoutError(RuntimeError):
    """A collective operation failed or waited past the timeout: another rank stopped or died."""


def init_distributed(device: str = "auto", timeout_s: float | None = None) -> DistEnv:
    """Join the torchrun process group when launched by torchrun (RANK/WORLD_SIZE set).
    ``timeout_s`` bounds every collective: a rank that stops (SIGSTOP, a hang) then ends the
    run instead of blocking the others forever (see collective_errors)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s) if timeout_s and timeout_s > 0 else None  # a bad value: check_config names it
        dist.init_process_group("nccl" if device == "cuda" else "gloo", device_id=dev if device == "cuda" else None, timeout=timeout)
    return DistEnv(rank, world_size, local_rank, dev)


@contextmanager
def collective_errors(timeout_s: float) -> Iterator[None]:
    """Re-raise a collective that failed or timed out (gloo raises; NCCL's watchdog aborts the
    process itself) as a CollectiveTimeoutError that says what happened and which setting
    bounds the wait."""
    try:
        yield
    except RuntimeError as e:
        text = str(e).lower()
        if not dist.is_initialized() or not (isinstance(e, dist.DistError) or any(w in text for w in ("timed out", "gloo", "nccl", "connection closed"))):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CollectiveTimeoutError(
            f"rank {dist.get_rank()}: a collective operation with the other ranks failed or waited longer than "
            f"train.collective_timeout_s={timeout_s:g} s: another rank stopped, hung or died ({first})"
        ) from e


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def average_gradients(params: Iterable[torch.Tensor], world_size: int) -> None:
    """What DDP's backward does, explicitly: every gradient summed over the ranks and divided by
    the world size; a parameter without a gradient on a rank counts as zeros there."""
    for p in params:
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            all_reduce_sum(p.grad).div_(world_size)


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's obj, in rank order (on every rank)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's obj on every rank."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
