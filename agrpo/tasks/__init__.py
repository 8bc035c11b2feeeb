"""Built-in tasks, by name: data, prompt format, grader and reward in one place each."""

from __future__ import annotations

from pathlib import Path

from agrpo.errors import AgrpoError
from agrpo.tasks.base import Task
from agrpo.tasks.countdown import CountdownTask, load_countdown_jsonl
from agrpo.tasks.sudoku import SudokuTask, load_sudoku_csv

TASKS: dict[str, type[Task]] = {SudokuTask.name: SudokuTask, CountdownTask.name: CountdownTask}
DEFAULT_TASK = SudokuTask.name


def get_task(name: str, **kwargs) -> Task:
    """A task by name; `kwargs` go to its constructor (e.g. min_empty for sudoku)."""
    if name not in TASKS:
        raise AgrpoError(f"unknown task {name!r}: choose one of {', '.join(sorted(TASKS))}")
    try:
        return TASKS[name](**kwargs)
    except TypeError as e:
        raise AgrpoError(f"bad settings for task {name!r} ({e}): see {TASKS[name].__name__}'s arguments") from None


def load_examples(name: str, path: str | Path) -> list[dict]:
    """Rows of a task's published file format (Sudoku CSV, Countdown JSON lines)."""
    return get_task(name).load(path)


__all__ = [
    "DEFAULT_TASK", "TASKS", "CountdownTask", "SudokuTask", "Task", "get_task", "load_countdown_jsonl",
    "load_examples", "load_sudoku_csv",
]
