"""glibc malloc settings for CPU runs: keep freed activation buffers instead of page-faulting
them back on every step.

A ViT step on the CPU allocates and frees the same few MB-sized activations (qkv, MLP hidden,
attention outputs) in every block. With glibc's defaults the allocator adapts its mmap
threshold as it goes and trims the top of the heap whenever more than twice that threshold is
free, so a share of those buffers goes back to the kernel after use and comes back as fresh,
zero-filled pages: up to tens of thousands of minor page faults per forward (``getrusage``).
Fixed thresholds made the demo detector's training step 3-7% faster and a 12-block benchmark
forward about 8% faster here (README, "Speed against timm's NaFlexViT"). The price: the
process keeps its peak heap (up to ``TRIM_THRESHOLD`` of free memory at its top) instead of
returning it. PyTorch's CUDA caching allocator makes the same trade on GPUs;
jemalloc / tcmalloc (LD_PRELOAD) are the other usual CPU fix, and mallopt leaves them alone.

Process-wide: every model in the process benefits, so a benchmark that times two models in one
process compares them under the same allocator (with less noise), not one against the other.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
MMAP_THRESHOLD = 32 << 20  # glibc's own upper bound for the adaptive threshold on 64-bit
TRIM_THRESHOLD = 512 << 20
ENV_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_buffers() -> dict:
    """Fix glibc's mmap threshold at 32 MiB and its trim threshold at 512 MiB for this process
    (and the data workers it forks later). Returns what happened: ``{"applied": bool, ...}``
    with the reason when nothing was changed (not Linux / not glibc, or the user already set
    one of glibc's MALLOC_*_ variables, which then win)."""
    preset = [v for v in ENV_VARS if v in os.environ]
    if preset:
        return {"applied": False, "reason": f"{', '.join(preset)} set in the environment: left as the user chose"}
    if not sys.platform.startswith("linux"):
        return {"applied": False, "reason": f"platform {sys.platform}: glibc mallopt only"}
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return {"applied": False, "reason": "no mallopt in this process's C library"}
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success; musl's stub returns 0.
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) != 1:
        return {"applied": False, "reason": "mallopt refused the settings (not glibc?)"}
    return {"applied": True, "mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD}
