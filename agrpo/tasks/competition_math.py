"""math: competition mathematics (Hendrycks MATH), tested on MATH-500.

Data: train `qwedsacf/competition_math` (the MATH problems, as the official AGRPO code
loads them) at levels 1-4, minus the MATH-500 problems; test `HuggingFaceH4/MATH-500`.
A file: JSON lines of {"problem", "solution", "answer"?}; without "answer", the reference is
the last `\\boxed{}` of the solution. Rows: {"problem", "answer"} (+ "level" from the hub).

Prompt, rewards and grade as gsm8k (think 0.5, answer 0.5, correct 3.0; grade 1.0/0.0):
math-verify compares LaTeX (`\\frac{14}{3}` = `14/3`, `10\\%` = `10`, `5\\text{ cm}` = `5`,
intervals, sets, tuples).
"""

from __future__ import annotations

import re

from agrpo.errors import AgrpoError
from agrpo.tasks.mathcheck import MathAnswerTask
from agrpo.tasks.reasoning import boxed_spans, hub_records, read_jsonl

TRAIN_HUB_NAME = "qwedsacf/competition_math"
TEST_HUB_NAME = "HuggingFaceH4/MATH-500"
# the official code drops level 5 (too hard for LLaDA-8B to learn from)
MAX_TRAIN_LEVEL = 4


def last_boxed(text: str) -> str | None:
    """The content of the last balanced `\\boxed{}` of a reference solution."""
    spans = boxed_spans(text)
    return text[spans[-1][1] : spans[-1][2]].strip() if spans else None


def _row(obj: dict, where: str) -> dict:
    problem = obj.get("problem")
    if not isinstance(problem, str):
        raise AgrpoError(f'{where}: each row needs a "problem" string (and "answer", or a "solution" with \\boxed{{}})')
    answer = obj.get("answer")
    if not isinstance(answer, str) or not answer.strip():
        answer = last_boxed(obj["solution"]) if isinstance(obj.get("solution"), str) else None
    if not answer:
        raise AgrpoError(f'{where}: no "answer" and no \\boxed{{}} in the "solution": give one of them')
    row = {"problem": problem, "answer": answer.strip()}
    if "level" in obj:
        row["level"] = obj["level"]
    return row


def _level(row: dict) -> int | None:
    digits = re.findall(r"\d+", str(row.get("level", "")))
    return int(digits[-1]) if digits else None


class MathTask(MathAnswerTask):
    name = "math"
    question_column = "problem"

    def _read(self, path) -> list[dict]:
        rows = read_jsonl(path, "MATH", '{"problem": "...", "solution": "... \\\\boxed{4}", "answer": "4"}')
        return [_row(obj, where) for where, obj in rows]

    def _hub(self, split: str) -> list[dict]:
        if split == "test":
            return [_row(r, f"{TEST_HUB_NAME} (test)") for r in hub_records(TEST_HUB_NAME, "test")]
        rows = []
        for r in hub_records(TRAIN_HUB_NAME, "train"):
            level = _level(r)
            # problems whose reference has no \boxed{} cannot be graded: skipped, not refused
            if level is not None and level <= MAX_TRAIN_LEVEL and last_boxed(r.get("solution") or ""):
                rows.append(_row(r, TRAIN_HUB_NAME))
        return rows
