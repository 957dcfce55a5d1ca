"""Scoped fix for lvis 0.5.3 on numpy >= 1.24.

``LVISEval.accumulate`` (lvis/eval.py, ~lines 361-362) calls ``.astype(dtype=np.float)``.
``np.float`` was only ever an alias of the builtin ``float`` and numpy 1.24 removed it, so
``LVISEval.run()`` raises AttributeError. Upstream fixed it on master only; PyPI still ships 0.5.3.

The fix changes nothing global: ``LVISEvalCompat.accumulate`` is the *unmodified* code object of
``LVISEval.accumulate`` bound to a private copy of lvis.eval's globals in which ``np`` is a proxy
that adds ``float`` and forwards everything else to numpy. numpy, the ``lvis.eval`` module and
the original ``LVISEval`` class are untouched, so no other code can observe the change.
"""

from __future__ import annotations

import builtins
import functools
import types

import numpy as np


class _NumpyWithFloat(types.ModuleType):
    """numpy as lvis 0.5.3 expects it: ``np.float`` is the builtin float (what it was pre-1.24)."""

    float = builtins.float

    def __init__(self) -> None:
        super().__init__("numpy")

    def __getattr__(self, name: str):  # only reached for names other than `float`
        return getattr(np, name)


def _with_numpy_float(func: types.FunctionType) -> types.FunctionType:
    """Copy of `func` whose global name ``np`` resolves to the proxy (same code object)."""
    scoped_globals = dict(func.__globals__)
    scoped_globals["np"] = _NumpyWithFloat()
    patched = types.FunctionType(func.__code__, scoped_globals, func.__name__, func.__defaults__, func.__closure__)
    patched.__kwdefaults__ = func.__kwdefaults__
    return functools.update_wrapper(patched, func)


@functools.cache
def lvis_eval_class() -> type:
    """``LVISEvalCompat``: ``lvis.LVISEval`` with ``accumulate`` runnable on numpy >= 1.24 (and
    unchanged on older numpy); otherwise identical. Built on first use, since ``import lvis``
    also imports cv2 and matplotlib."""
    from lvis.eval import LVISEval

    class LVISEvalCompat(LVISEval):
        accumulate = _with_numpy_float(LVISEval.accumulate)

    return LVISEvalCompat


def __getattr__(name: str):
    # `from navit_dense.evaluation.lvis_compat import LVISEvalCompat` without importing lvis early.
    if name == "LVISEvalCompat":
        return lvis_eval_class()
    raise AttributeError(name)
