"""Looking tasks up by name."""

from __future__ import annotations

from aufold.errors import AufoldError
from aufold.tasks.base import Task
from aufold.tasks.builtin import BENCHMARKS
from aufold.tasks.generic import GenericTask

TASKS: dict[str, Task] = {task.name: task for task in (*BENCHMARKS, GenericTask())}


def task_names() -> list[str]:
    """Return the names that :func:`get_task` knows, in a fixed order."""
    return list(TASKS)


def get_task(name: str) -> Task:
    """Return the task called ``name``; an unknown name raises an error listing the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise AufoldError(f"unknown task {name!r}; choose one of "
                          f"{', '.join(task_names())}") from None
