"""Reusable timing, memory and FLOP-count helpers for backbone benchmarks.

Timing: :func:`time_interleaved` runs several variants round-robin (warmup rounds, then timed
rounds) so slow drift of a noisy machine hits every variant alike; report medians, and
ratios of medians measured in the same run.

Memory: :func:`peak_memory` returns the peak of *extra* bytes allocated while a callable runs
(weights and inputs that already exist are not counted, the returned outputs are).
- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the
  allocation at the start.
- CPU: PyTorch has no CPU peak counter, so the callable runs once under ``torch.profiler``
  with ``profile_memory=True``; every allocation / free of the CPU allocator is recorded as a
  ``[memory]`` event with a signed byte count, and the peak is the maximum of their running
  sum in time order. This counts tensor storage only (not Python objects, not allocator or
  malloc slack), exactly, and independently of timing noise.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch


def set_threads(num_threads: int) -> dict:
    """Pin intra-op threads (and inter-op to 1 if still possible); returns what is in force."""
    torch.set_num_threads(num_threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work has started
        pass
    return {"intra_op": torch.get_num_threads(), "inter_op": torch.get_num_interop_threads()}


def synchronize(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Wall-clock seconds per timed call, plus the process CPU seconds (all threads) of the
    same calls. On a contended machine wall time inflates with descheduling while CPU time
    mostly does not (it still includes OpenMP spin-waiting), so both are kept."""

    times_s: list[float] = field(default_factory=list)
    cpu_s: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def min_s(self) -> float:
        return min(self.times_s)

    @property
    def median_cpu_s(self) -> float:
        return statistics.median(self.cpu_s)

    @property
    def spread(self) -> float:
        """(max - min) / median of wall times: a crude noise indicator."""
        return (max(self.times_s) - min(self.times_s)) / self.median_s if self.times_s else 0.0

    def as_dict(self) -> dict:
        return {
            "median_s": self.median_s,
            "min_s": self.min_s,
            "spread": self.spread,
            "median_cpu_s": self.median_cpu_s,
            "times_s": [round(t, 6) for t in self.times_s],
            "cpu_s": [round(t, 6) for t in self.cpu_s],
        }


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    warmup: int = 1,
    repeats: int = 3,
    device: torch.device | str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Timing]:
    """Time each callable ``repeats`` times after ``warmup`` untimed calls, round-robin."""
    out = {name: Timing() for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            synchronize(device)
            c0, t0 = time.process_time(), time.perf_counter()
            result = fn()
            synchronize(device)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            del result
            if r >= warmup:
                out[name].times_s.append(dt)
                out[name].cpu_s.append(dc)
            if log is not None:
                tag = "warmup" if r < warmup else f"repeat {r - warmup + 1}"
                log(f"  {tag} {name}: {dt:.3f}s wall, {dc:.3f}s cpu")
    return out


class StageClock:
    """Wall seconds accumulated per named stage of a pipeline, to show where time goes.

    ``with clock("forward"): ...`` times a block; ``with clock.methods({"forward": [(obj,
    "name"), ...]}): ...`` times calls of existing methods (e.g. inside a library's own
    inference function) by wrapping them on the instance for the duration of the block."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - t0)

    @contextmanager
    def methods(self, stages: Mapping[str, Sequence[tuple[object, str]]]):
        targets = [(stage, obj, name) for stage, pairs in stages.items() for obj, name in pairs]
        for _, obj, name in targets:
            if name in vars(obj):
                raise ValueError(f"{type(obj).__name__}.{name} is already an instance attribute; cannot time it")
        try:
            for stage, obj, name in targets:
                setattr(obj, name, self._timed(stage, getattr(obj, name)))
            yield self
        finally:
            for _, obj, name in targets:
                if name in vars(obj):
                    delattr(obj, name)

    def _timed(self, stage: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(stage, time.perf_counter() - t0)

        return timed


def _cpu_peak_from_profile(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")  # DeviceType.CPU
    ]
    events.sort(key=lambda t: t[0])
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return peak


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[int, str]:
    """(peak extra bytes while ``fn`` runs, method description). The result of ``fn`` is
    dropped after the call (so outputs count toward the peak but not beyond it)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        del result
        return int(peak), "torch.cuda.max_memory_allocated - memory_allocated at start"
    return _cpu_peak_from_profile(fn), (
        "torch.profiler(profile_memory=True): max running sum of CPU allocator [memory] events "
        "(tensor bytes allocated minus freed during the call; weights/inputs excluded, outputs included)"
    )


# ---- packing bound ---------------------------------------------------------------------------
class _BudgetExceeded(Exception):
    pass


def _bins_fit(items: Sequence[int], num_bins: int, capacity: int, budget: int) -> bool:
    """Exact bin-packing feasibility by depth-first search (items sorted decreasing, bins with
    equal load are interchangeable). Raises _BudgetExceeded after ``budget`` search nodes."""
    items = sorted(items, reverse=True)
    loads = [0] * num_bins
    suffix = [0] * (len(items) + 1)
    for i in range(len(items) - 1, -1, -1):
        suffix[i] = suffix[i + 1] + items[i]
    nodes = 0

    def dfs(i: int) -> bool:
        nonlocal nodes
        if i == len(items):
            return True
        nodes += 1
        if nodes > budget:
            raise _BudgetExceeded
        # space that no remaining item can use any more is waste
        usable = sum(capacity - l for l in loads if capacity - l >= items[-1])
        if usable < suffix[i]:
            return False
        seen = set()
        for b in range(num_bins):
            load = loads[b]
            if load in seen or load + items[i] > capacity:
                continue
            seen.add(load)
            loads[b] = load + items[i]
            if dfs(i + 1):
                return True
            loads[b] = load
        return False

    return dfs(0)


def optimal_pad_fraction(
    lengths: Sequence[int], seq_len: int, pad_multiple: int = 8, extra_bins: int = 2, budget: int = 20_000
) -> dict:
    """Smallest pad fraction any packer can reach for these run lengths when the sequence
    length may shrink to a multiple of ``pad_multiple`` (<= seq_len), i.e. min over the number
    of sequences S and length L of 1 - sum(lengths) / (S * L). ``exact`` is False when the
    search budget ran out somewhere; the value is then a lower bound."""
    total, longest = sum(lengths), max(lengths)
    if longest > seq_len:
        raise ValueError("an item is longer than seq_len")
    round_up = lambda n: -(-n // pad_multiple) * pad_multiple  # noqa: E731
    s_min = -(-total // seq_len)
    best, exact = None, True
    for S in range(s_min, min(len(lengths), s_min + extra_bins) + 1):
        lo = max(round_up(-(-total // S)), round_up(longest))
        hi = seq_len if seq_len % pad_multiple == 0 else round_up(seq_len) - pad_multiple
        if lo > seq_len:
            continue
        # smallest L in [lo, hi] (multiples of pad_multiple) that is feasible; unknown counts as
        # feasible so the result stays a valid lower bound
        candidates = list(range(lo, max(hi, lo) + 1, pad_multiple)) + ([seq_len] if seq_len % pad_multiple else [])
        left, right, found = 0, len(candidates) - 1, None
        while left <= right:
            mid = (left + right) // 2
            try:
                ok = _bins_fit(lengths, S, candidates[mid], budget)
            except _BudgetExceeded:
                ok, exact = True, False
            if ok:
                found, right = candidates[mid], mid - 1
            else:
                left = mid + 1
        if found is not None:
            pad = 1 - total / (S * found)
            if best is None or pad < best["pad_fraction"]:
                best = {"pad_fraction": pad, "num_sequences": S, "seq_len": found}
    if best is None:
        return {"pad_fraction": None, "exact": exact}
    best["exact"] = exact
    return best


# ---- FLOP model -----------------------------------------------------------------------------
def layer_flops(n: int, dim: int) -> float:
    """FLOPs of one pre-LN ViT block (mlp_ratio 4) on one attention unit of n tokens:
    24 n D^2 (qkv 6nD^2 + proj 2nD^2 + mlp 16nD^2) + 4 n^2 D (QK^T and AV)."""
    return 24.0 * n * dim * dim + 4.0 * n * n * dim


def transformer_flops(units: Sequence[int], dim: int, depth: int = 1) -> float:
    """Sum of :func:`layer_flops` over attention units (images, or whole padded sequences)."""
    return depth * sum(layer_flops(int(n), dim) for n in units)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
