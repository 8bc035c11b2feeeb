"""gsm8k: grade-school math word problems with a numeric answer.

Data: train `openai/gsm8k` (main); test `openai/gsm8k` (main) or, with
`GSM8KTask(test_set="platinum")` / task `gsm8k-platinum`, `madrylab/gsm8k-platinum`
(the same problems with the mislabelled ones fixed or dropped; the AGRPO paper reports it,
d1 and most papers report the original). A file: JSON lines of
{"question": "...", "answer": "... #### 42"}. Rows: {"question", "answer": "42"}.

Prompt: the shared math system prompt (think, then `\\boxed{}` inside `<answer>`) and the
question. Rewards (AGRPO.md §4): think block 0.5, answer block 0.5, correct 3.0, the answer
checked by math-verify (so `18`, `18.00`, `\\$18`, `1,000` and `1{,}000` all match, unlike the
official grader, which keeps the first integer). grade: 1.0 if correct, else 0.0.
"""

from __future__ import annotations

from agrpo.errors import AgrpoError
from agrpo.tasks.mathcheck import MathAnswerTask
from agrpo.tasks.reasoning import hub_records, read_jsonl

HUB_NAME = "openai/gsm8k"
PLATINUM_HUB_NAME = "madrylab/gsm8k-platinum"


def final_answer(solution: str) -> str:
    """The number after GSM8K's `####` marker, without thousands separators."""
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def _row(obj: dict, where: str) -> dict:
    question, answer = obj.get("question"), obj.get("answer")
    if not isinstance(question, str) or not isinstance(answer, str) or "####" not in answer:
        raise AgrpoError(f'{where}: each row needs "question" and "answer" strings, the answer ending "#### <number>"')
    return {"question": question, "answer": final_answer(answer)}


class GSM8KTask(MathAnswerTask):
    name = "gsm8k"

    def __init__(self, held_out=None, test_set: str = "gsm8k"):
        if test_set not in ("gsm8k", "platinum"):
            raise AgrpoError(f"test_set must be gsm8k or platinum, got {test_set!r}")
        self.test_set = test_set
        super().__init__(held_out)

    def _read(self, path) -> list[dict]:
        rows = read_jsonl(path, "GSM8K", '{"question": "...", "answer": "... #### 42"}')
        return [_row(obj, where) for where, obj in rows]

    def _hub(self, split: str) -> list[dict]:
        name = PLATINUM_HUB_NAME if split == "test" and self.test_set == "platinum" else HUB_NAME
        return [_row(r, f"{name} ({split})") for r in hub_records(name, split, "main")]


class GSM8KPlatinumTask(GSM8KTask):
    name = "gsm8k-platinum"

    def __init__(self, held_out=None):
        super().__init__(held_out, test_set="platinum")

