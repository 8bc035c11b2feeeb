"""Built-in tasks, by name: data, prompt, rewards and grader in one file each.

    task = agrpo.tasks.get("gsm8k")
    rows = task.load("test", path="gsm8k_test.jsonl")   # or the public dataset, without path
    task.prompt(rows[0])                               # [system, user] chat messages
    task.rewards                                       # RewardTerm(name, fn, weight), TRL's convention
    task.grade(completion, **rows[0])                  # evaluation score in [0, 1]

The paper's tasks (gsm8k, gsm8k-platinum, math, countdown, sudoku) speak natural language.
tiny-sudoku and tiny-countdown are the 16-character dialect the shipped tiny models read.
"""

from __future__ import annotations

from pathlib import Path

from agrpo.errors import AgrpoError
from agrpo.tasks.base import Task
from agrpo.tasks.competition_math import MathTask
from agrpo.tasks.countdown import CountdownTask
from agrpo.tasks.gsm8k import GSM8KPlatinumTask, GSM8KTask
from agrpo.tasks.reasoning import ReasoningTask, RewardTerm
from agrpo.tasks.sudoku import SudokuTask
from agrpo.tasks.tiny_countdown import TinyCountdownTask, load_countdown_jsonl
from agrpo.tasks.tiny_sudoku import TinySudokuTask, load_sudoku_csv

TASKS: dict[str, type] = {
    cls.name: cls
    for cls in (
        GSM8KTask, GSM8KPlatinumTask, MathTask, CountdownTask, SudokuTask, TinySudokuTask, TinyCountdownTask,
    )
}
DEFAULT_TASK = TinySudokuTask.name


def get_task(name: str, **kwargs):
    """A task by name; `kwargs` go to its constructor (e.g. held_out, or min_empty for tiny-sudoku)."""
    if name not in TASKS:
        raise AgrpoError(f"unknown task {name!r}: choose one of {', '.join(sorted(TASKS))}")
    try:
        return TASKS[name](**kwargs)
    except TypeError as e:
        raise AgrpoError(f"bad settings for task {name!r} ({e}): see {TASKS[name].__name__}'s arguments") from None


get = get_task


def load_examples(name: str, path: str | Path) -> list[dict]:
    """Test rows of a task read from a file in its public format."""
    return get_task(name).load("test", path)


def trained_task(model: str) -> str | None:
    """The task a shipped or trained model was made for, when that is on record: `tiny:<x>` is
    tiny-<x>; a run, checkpoint or SFT model directory has it in its run's config.yaml."""
    model = str(model)
    if model.startswith("tiny:"):  # tiny:sudoku, or a variant of its base: tiny:sudoku-rows-boxes
        name = "tiny-" + model[len("tiny:"):]
        fits = [t for t in TASKS if name == t or name.startswith(t + "-")]
        return max(fits, key=len) if fits else None
    path = Path(model).expanduser()
    if not path.exists():
        return None
    import yaml

    for where in (path, *list(path.parents)[:3]):  # run/, run/model, run/checkpoints/step_N
        config = where / "config.yaml"
        if config.is_file():
            try:
                task = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("task")
            except (OSError, yaml.YAMLError, AttributeError):
                return None
            return task if task in TASKS else None
    return None


def check_task_matches(task_name: str, models: list[str], given: bool) -> str:
    """The task to evaluate: `task_name` when given, else the one the models were made for. A tiny
    (character-level) task and a model made for another task are refused: the dialects differ, so
    the score would be meaningless. Natural-language models may be evaluated across tasks."""
    known = {m: trained_task(m) for m in models}
    if not given:
        found = {t for t in known.values() if t}
        if len(found) > 1:
            raise AgrpoError(f"the models were made for different tasks ({', '.join(sorted(found))}): pass task=")
        return found.pop() if found else task_name
    for model, made_for in known.items():
        if made_for and made_for != task_name and (TASKS[made_for].character_level or TASKS[task_name].character_level):
            raise AgrpoError(
                f"{model} was made for task {made_for!r}, not {task_name!r}: pass task={made_for} (or leave task out), "
                f"or a model made for {task_name}"
            )
    return task_name


def check_model_fits(task, model: str) -> None:
    """The shipped tiny models read only the tiny tasks' dialect: say so before loading."""
    if str(model).startswith("tiny:") and not task.character_level:
        raise AgrpoError(
            f"the shipped tiny models cannot read task {task.name!r} (natural language): use task=tiny-sudoku or "
            "task=tiny-countdown, or a natural-language model such as GSAI-ML/LLaDA-8B-Instruct"
        )


__all__ = [
    "DEFAULT_TASK", "TASKS", "CountdownTask", "GSM8KPlatinumTask", "GSM8KTask", "MathTask", "ReasoningTask",
    "RewardTerm", "SudokuTask", "Task", "TinyCountdownTask", "TinySudokuTask", "check_model_fits", "check_task_matches",
    "get", "trained_task",
    "get_task", "load_countdown_jsonl", "load_examples", "load_sudoku_csv",
]
