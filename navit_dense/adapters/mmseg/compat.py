"""Loading mmengine Runner checkpoints with torch >= 2.6.

mmengine 0.10.7 calls ``torch.load`` without ``weights_only``; since torch 2.6 that defaults
to True, and a Runner checkpoint holds more than tensors (its ``message_hub`` pickles
mmengine's HistoryBuffer and numpy arrays), so ``mmseg.apis.init_model(cfg, ckpt)``, ``load_from``
and ``resume`` fail with "Weights only load failed" (open-mmlab/mmengine#1655; the fix,
mmengine PR #1650, is unreleased). Full unpickling can run code from the file: use this only
for checkpoints you trust, such as your own runs.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

_FLAG = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"  # read by torch.load at every call


@contextmanager
def trusted_checkpoints():
    """Inside the block, torch.load calls that do not pass ``weights_only`` unpickle fully."""
    previous = os.environ.get(_FLAG)
    os.environ[_FLAG] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(_FLAG, None)
        else:
            os.environ[_FLAG] = previous
