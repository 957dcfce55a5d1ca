"""Counting host round trips: the calls that make the host wait for a device tensor's values
(``.item()``, ``.tolist()``, ``.cpu()``, ``.numpy()``, ``bool()/int()/float()`` of a tensor,
``nonzero`` / ``unique`` / ``masked_select`` and boolean-mask indexing, whose output size
depends on the data). On a GPU each one stalls the stream; on a CPU nothing waits, but the
count is the same, so tests and tools/ can check a hot path here before it meets a GPU.

    with HostSyncCounter() as syncs:
        model(batch)
    assert syncs.total == 0, syncs.calls
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

_T = torch.Tensor
SYNCING = {
    _T.item: "item",
    _T.tolist: "tolist",
    _T.cpu: "cpu",
    _T.numpy: "numpy",
    _T.__bool__: "bool",
    _T.__int__: "int",
    _T.__float__: "float",
    _T.__index__: "index",
    _T.nonzero: "nonzero",
    torch.nonzero: "nonzero",
    _T.unique: "unique",
    torch.unique: "unique",
    torch.masked_select: "masked_select",
    _T.masked_select: "masked_select",
    torch.repeat_interleave: "repeat_interleave",  # output size read from a repeats tensor unless output_size is given
}


def _bool_index(args) -> bool:
    if len(args) < 2:
        return False
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in index)


class HostSyncCounter(TorchFunctionMode):
    """Counts host round trips (see the module docstring) by name while active.

    ignore: tensors that live on the host by design even in a GPU run, whose reads are no
    device round trips (e.g. torch.optim's per-parameter ``step`` counters, kept on the CPU
    unless the optimizer is fused or capturable)."""

    def __init__(self, ignore=()):
        super().__init__()
        self.calls: Counter[str] = Counter()
        self._ignore = {id(t) for t in ignore}

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = SYNCING.get(func)
        if name is not None and args and id(args[0]) in self._ignore:
            name = None
        if name == "repeat_interleave" and (not (len(args) > 1 and torch.is_tensor(args[1])) or (kwargs or {}).get("output_size")):
            name = None  # a Python int repeat count, or a known output size, needs no device value
        if name is None and func in (_T.__getitem__, _T.__setitem__) and _bool_index(args):
            name = "bool_index"
        if name is not None:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))
