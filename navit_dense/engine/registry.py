"""The task registry: task name -> Task class.

It imports no task, so the engine never depends on the tasks built on it: the built-in tasks
register themselves when ``navit_dense.tasks`` is imported (the tools do that), a project's
own task when its module is imported (``@register_task("name")`` on the class).
"""

from __future__ import annotations

import difflib

_TASKS: dict[str, type] = {}


def register_task(name: str, cls: type | None = None):
    """``register_task("x", XTask)`` or ``@register_task("x")`` on the class."""

    def add(cls: type) -> type:
        if name in _TASKS and _TASKS[name] is not cls:
            raise ValueError(f"task {name!r} is already registered by {_TASKS[name].__qualname__}")
        cls.name = name
        _TASKS[name] = cls
        return cls

    return add if cls is None else add(cls)


def task_names() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str) -> type:
    if name not in _TASKS:
        names = task_names()
        close = difflib.get_close_matches(name, names, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        known = f"registered tasks: {', '.join(names)}" if names else "no task is registered"
        raise KeyError(f"unknown task {name!r}; {hint}{known} (the built-in tasks register on `import navit_dense.tasks`, "
                       f"your own on importing its module)")  # fmt: skip
    return _TASKS[name]
