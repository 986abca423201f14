"""Benchmark tasks: fixed splits, the AUSteer prompt templates and contrastive pairs.

Typical use::

    from aufold.tasks import default_data_dir, get_task

    task = get_task("copa")
    items = task.load("pairs", default_data_dir())
    pairs = task.contrastive_pairs(items)
"""

from __future__ import annotations

from aufold.tasks.base import SPLITS, Task, TaskKind
from aufold.tasks.benchmark import BenchmarkTask, Split
from aufold.tasks.files import default_data_dir
from aufold.tasks.generic import GenericTask
from aufold.tasks.item import Item
from aufold.tasks.loading import load_split, read_pairs_or_task, resolve_data_dir, task_pairs
from aufold.tasks.numbers import format_number
from aufold.tasks.registry import get_task, task_names

__all__ = [
    "SPLITS",
    "BenchmarkTask",
    "GenericTask",
    "Item",
    "Split",
    "Task",
    "TaskKind",
    "default_data_dir",
    "format_number",
    "get_task",
    "load_split",
    "read_pairs_or_task",
    "resolve_data_dir",
    "task_pairs",
    "task_names",
]
