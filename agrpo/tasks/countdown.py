"""countdown: reach a target by combining the given numbers with + - * / and parentheses.

Data: train `Jiayi-Pan/Countdown-Tasks-3to4`, its first 20,000 rows with three numbers (as
the official code), minus the test problems; test: a file only (the paper's
`countdown_cd3_test.jsonl`). A file: JSON lines of {"input": "a,b,c", "output": "target"} or
{"nums": [a, b, c], "target": t}. Rows: {"nums": [a, b, c], "target": t}.

Prompt: the system prompt asks for `expression = target` inside `<answer>`; the user
message is "Target: t\\nNumbers: [a, b, c]".

Answer: the `<answer>` block, with a `\\boxed{}` unwrapped; the expression is what comes
before the first "=" (`expr`, `expr = target`, `\\boxed{expr}` and `\\boxed{expr} = target`
all work; `\\times`, `\\cdot`, `\\div`, `×`, `÷` and `−` read as operators). It is checked by the
tiny task's parser (no `eval`), with exact fractions, and must use each given number exactly
once: the numbers are compared before anything is computed, so garbage is never multiplied
out.

Rewards (AGRPO.md §4): format, weight 1.0, from -0.5 to 1.0 (+1/3 the right side of the
last "=" is the target, +1/3 the left side holds only digits, + - * / ( ) and spaces, +1/3
its numbers are exactly the given ones, -0.5 for more than one "="); correct, weight 3.0.
grade: 1.0 if correct, else 0.0.
"""

from __future__ import annotations

import re
from fractions import Fraction

from agrpo.errors import AgrpoError
from agrpo.tasks.base import FILE_KEYS
from agrpo.tasks.reasoning import (
    ReasoningTask,
    RewardTerm,
    answer_region,
    column,
    hub_records,
    read_jsonl,
    row_field,
    unwrap_boxed,
)
from agrpo.tasks.tiny_countdown import check_expression

HUB_NAME = "Jiayi-Pan/Countdown-Tasks-3to4"
HUB_ROWS = 20000
NUMBERS = 3

_OPERATORS = {
    "\\times": "*", "\\cdot": "*", "\\div": "/", "×": "*", "·": "*", "∗": "*", "÷": "/", "−": "-", "–": "-",
    "\\left(": "(", "\\right)": ")", "\\left": "", "\\right": "",
}
_OPERATOR = re.compile("|".join(re.escape(k) for k in sorted(_OPERATORS, key=len, reverse=True)))
_FORMAT_LHS = re.compile(r"[\d\s+\-*/()]+")


def _normalise(text: str) -> str:
    return " ".join(_OPERATOR.sub(lambda m: _OPERATORS[m.group(0)], text).split())


def _canonical(digits: str) -> str:
    # numbers compared as text: int() of a 5,000-digit string raises in Python >= 3.11
    return digits.lstrip("0") or "0"


def countdown_answer(completion) -> str | None:
    """The answer block with its `\\boxed{}` unwrapped, or None without one."""
    region = answer_region(completion)
    return None if region is None else unwrap_boxed(region).strip()


def countdown_correct_answer(completion, nums, target) -> bool:
    """The one check of this task: the expression uses `nums` once each and equals `target`."""
    answer = countdown_answer(completion)
    if not answer:
        return False
    expression = _normalise(answer.split("=", 1)[0])
    valid, value = check_expression(expression, nums)
    return valid and value == Fraction(int(target))


def countdown_format_score(completion, nums, target) -> float:
    answer = countdown_answer(completion)
    if not answer or "=" not in answer:
        return 0.0
    parts = answer.split("=")
    lhs, rhs = parts[0].strip(), parts[-1].strip()
    score = -0.5 if len(parts) > 2 else 0.0
    if re.fullmatch(r"\d+", rhs) and _canonical(rhs) == str(int(target)):
        score += 1 / 3
    if _FORMAT_LHS.fullmatch(lhs):
        score += 1 / 3
    if sorted(_canonical(d) for d in re.findall(r"\d+", lhs)) == sorted(str(int(n)) for n in nums):
        score += 1 / 3
    return score


def countdown_format(prompts, completions, **columns) -> list[float]:
    """From -0.5 to 1.0: how well the answer follows `expression = target` (see the module)."""
    nums, target = column(columns, "nums", len(completions)), column(columns, "target", len(completions))
    return [countdown_format_score(c, n, t) for c, n, t in zip(completions, nums, target)]


def countdown_correct(prompts, completions, **columns) -> list[float]:
    """1.0 if the expression uses every number once and equals the target, else 0.0."""
    nums, target = column(columns, "nums", len(completions)), column(columns, "target", len(completions))
    return [float(countdown_correct_answer(c, n, t)) for c, n, t in zip(completions, nums, target)]


SYSTEM_PROMPT = """You will be given a target number and a list of numbers. Write an arithmetic expression that uses every listed number exactly once, with +, -, * and / and any parentheses you need, whose value is the target.
Try combinations one at a time inside <think> </think> tags, checking each result. Then write the expression, an equals sign and the target inside <answer> </answer> tags:
<think>
reasoning
</think>
<answer>
expression = target
</answer>
For example, with target 30 and numbers [4, 9, 6], a correct answer is
<answer>
9 * 4 - 6 = 30
</answer>"""


def _row(obj: dict, where: str) -> dict:
    if "input" in obj and "output" in obj:
        nums, target = str(obj["input"]).split(","), obj["output"]
    elif isinstance(obj.get("nums"), list) and "target" in obj:
        nums, target = obj["nums"], obj["target"]
    else:
        raise AgrpoError(f'{where}: each row needs "input" and "output", or "nums" (a list) and "target"')
    try:
        nums, target = [int(str(v).strip()) for v in nums], int(str(target).strip())
    except ValueError:
        raise AgrpoError(f"{where}: the numbers and the target must be integers, got {obj}") from None
    if len(nums) < 2 or min(nums) < 0:
        raise AgrpoError(f"{where}: at least two non-negative numbers are needed, got {nums}")
    return {"nums": nums, "target": target}


class CountdownTask(ReasoningTask):
    name = "countdown"
    system_prompt = SYSTEM_PROMPT
    rewards = (
        RewardTerm("countdown_format", countdown_format, 1.0),
        RewardTerm("countdown_correct", countdown_correct, 3.0),
    )

    def key(self, row: dict) -> str:
        # the order the numbers are listed in does not make a different problem
        return f"{sorted(int(n) for n in row['nums'])}:{int(row['target'])}"

    def user_message(self, row: dict) -> str:
        return f"Target: {row['target']}\nNumbers: {list(row['nums'])}"

    def grade(self, completion, **row) -> float:
        nums, target = row_field(row, "nums", self.name), row_field(row, "target", self.name)
        return float(countdown_correct_answer(completion, nums, target))

    def _read(self, path) -> list[dict]:
        rows = read_jsonl(path, "Countdown", '{"input": "30,100,93", "output": "23"}')
        return [_row(obj, where) for where, obj in rows]

    def _hub(self, split: str) -> list[dict]:
        if split == "test":
            raise AgrpoError(
                "the Countdown test split is not on the hub: "
                f"pass {FILE_KEYS['test']}, a JSON-lines file such as countdown_cd3_test.jsonl"
            )
        records = hub_records(HUB_NAME, "train")[:HUB_ROWS]
        return [_row(r, HUB_NAME) for r in records if len(r.get("nums") or ()) == NUMBERS]

    def _hub_test_keys(self) -> frozenset:
        if not self.excluded:
            raise AgrpoError(
                "countdown's hub training rows must leave out the test problems: "
                f"pass the test file, {FILE_KEYS['held_out']}, such as countdown_cd3_test.jsonl"
            )
        return frozenset()
