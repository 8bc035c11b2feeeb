"""sudoku: fill a 4x4 Sudoku, written as 16 digits row by row with 0 for an empty cell.

Data: train from a file, or (without one) 20,000 puzzles generated with reasoning-gym by the
tiny task's generator, minus the test puzzles; test: a file only (the paper's
`sudoku4x4_test.csv`). A file: CSV with columns Puzzle,Solution. Rows: {"puzzle", "solution"}.

Prompt: the system prompt explains the grid and works three examples of its own; the user
message is "Puzzle: <16 digits>".

Answer: the `<answer>` block (a `\\boxed{}` unwrapped) with spaces, line breaks, commas and
bars removed, read cell by cell; a short answer leaves the missing cells wrong (the
official code left-pads it to 16, shifting every digit).

Rewards (AGRPO.md §4): format, weight 1.0, up to 1.0 (0.25 for 16 digits, then +0.25 if
each of 1-4 appears four times, +0.5 if every given cell is kept); correct, weight 3.0, the
fraction of empty cells right. grade: that fraction (pool it over empty cells, as d1 does, by
weighting each puzzle by its number of empty cells).
"""

from __future__ import annotations

import re

from agrpo.errors import AgrpoError
from agrpo.tasks.base import FILE_KEYS
from agrpo.tasks.reasoning import ReasoningTask, RewardTerm, answer_region, column, row_field, unbox
from agrpo.tasks.tiny_sudoku import TinySudokuTask, load_sudoku_csv, score_sudoku

GENERATED_TRAIN_ROWS = 20000
_SEPARATORS = re.compile(r"[\s,|]+")


def sudoku_grid(completion) -> str | None:
    """The answer block as a string of cells, or None without one."""
    region = answer_region(completion)
    return None if region is None else _SEPARATORS.sub("", unbox(region))


def sudoku_score(completion, puzzle: str, solution: str) -> float:
    """The one check of this task: the fraction of `puzzle`'s empty cells filled right."""
    grid = sudoku_grid(completion)
    return score_sudoku(grid or "", puzzle, solution)


def sudoku_format_score(completion, puzzle: str) -> float:
    grid = sudoku_grid(completion)
    if grid is None or not re.fullmatch(r"[0-9]{16}", grid):
        return 0.0
    score = 0.25
    if "".join(sorted(grid)) == "1111222233334444":
        score += 0.25
    if all(p == "0" or p == g for p, g in zip(puzzle, grid)):
        score += 0.5
    return score


def sudoku_format(prompts, completions, **columns) -> list[float]:
    """Up to 1.0: 16 digits, four of each digit, the given cells kept (see the module)."""
    puzzles = column(columns, "puzzle", len(completions))
    return [sudoku_format_score(c, p) for c, p in zip(completions, puzzles)]


def sudoku_correct(prompts, completions, **columns) -> list[float]:
    """The fraction of the empty cells filled with the solution's digit."""
    puzzles, solutions = column(columns, "puzzle", len(completions)), column(columns, "solution", len(completions))
    return [sudoku_score(c, p, s) for c, p, s in zip(completions, puzzles, solutions)]


# three puzzles of our own (from the generator's training side, none in the paper's test
# split), each solved by cells that have a single possible digit
SYSTEM_PROMPT = """You will be given a 4x4 Sudoku puzzle as a string of 16 digits, read left to right and top to bottom, where 0 marks an empty cell.
Fill every empty cell with a digit from 1 to 4 so that each row, each column and each of the four 2x2 boxes holds 1, 2, 3 and 4 once.
Solve it step by step inside <think> </think> tags. Then write the completed grid inside <answer> </answer> tags as 16 digits with no spaces:
<think>
reasoning
</think>
<answer>
16 digits
</answer>

Puzzle: 0024401303022000
<think>
Rows:
R1: 0 0 2 4
R2: 4 0 1 3
R3: 0 3 0 2
R4: 2 0 0 0
R1C2: row 1 has 2 and 4, column 2 has 3, the top-left box has 4, so it is 1.
R2C2: row 2 has 4, 1 and 3, so it is 2.
R3C1: column 1 has 4 and 2, row 3 has 3, so it is 1.
R3C3: row 3 now has 1, 3 and 2, so it is 4.
R4C2: column 2 has 1, 2 and 3, so it is 4.
R4C3: column 3 has 2, 1 and 4, so it is 3.
R4C4: row 4 now has 2, 4 and 3, so it is 1.
R1C1: row 1 now has 1, 2 and 4, so it is 3.
Grid:
R1: 3 1 2 4
R2: 4 2 1 3
R3: 1 3 4 2
R4: 2 4 3 1
</think>
<answer>
3124421313422431
</answer>

Puzzle: 3412210010004030
<think>
Rows:
R1: 3 4 1 2
R2: 2 1 0 0
R3: 1 0 0 0
R4: 4 0 3 0
R2C3: column 3 has 1 and 3, row 2 has 2, so it is 4.
R2C4: row 2 now has 2, 1 and 4, so it is 3.
R3C3: column 3 now has 1, 4 and 3, so it is 2.
R3C4: column 4 has 2 and 3, row 3 has 1, so it is 4.
R4C2: row 4 has 4 and 3, column 2 has 4 and 1, so it is 2.
R4C4: row 4 now has 4, 2 and 3, so it is 1.
R3C2: row 3 now has 1, 2 and 4, so it is 3.
Grid:
R1: 3 4 1 2
R2: 2 1 4 3
R3: 1 3 2 4
R4: 4 2 3 1
</think>
<answer>
3412214313244231
</answer>

Puzzle: 3002023024100004
<think>
Rows:
R1: 3 0 0 2
R2: 0 2 3 0
R3: 2 4 1 0
R4: 0 0 0 4
R1C2: column 2 has 2 and 4, row 1 has 3, so it is 1.
R1C3: row 1 now has 3, 1 and 2, so it is 4.
R2C1: column 1 has 3 and 2, row 2 has 2 and 3, the top-left box has 1, so it is 4.
R2C4: row 2 now has 4, 2 and 3, so it is 1.
R3C4: row 3 has 2, 4 and 1, so it is 3.
R4C1: column 1 now has 3, 4 and 2, so it is 1.
R4C2: column 2 now has 1, 2 and 4, so it is 3.
R4C3: row 4 now has 1, 3 and 4, so it is 2.
Grid:
R1: 3 1 4 2
R2: 4 2 3 1
R3: 2 4 1 3
R4: 1 3 2 4
</think>
<answer>
3142423124131324
</answer>"""


class SudokuTask(ReasoningTask):
    name = "sudoku"
    system_prompt = SYSTEM_PROMPT
    rewards = (
        RewardTerm("sudoku_format", sudoku_format, 1.0),
        RewardTerm("sudoku_correct", sudoku_correct, 3.0),
    )

    def key(self, row: dict) -> str:
        return row["puzzle"]

    def user_message(self, row: dict) -> str:
        return f"Puzzle: {row['puzzle']}"

    def grade(self, completion, **row) -> float:
        return sudoku_score(completion, row_field(row, "puzzle", self.name), row_field(row, "solution", self.name))

    def _read(self, path) -> list[dict]:
        return [{"puzzle": r["puzzle"], "solution": r["solution"]} for r in load_sudoku_csv(path)]

    def _hub(self, split: str) -> list[dict]:
        if split == "test":
            raise AgrpoError(
                f"the 4x4 Sudoku test split is not on the hub: pass {FILE_KEYS['test']}, a CSV such as sudoku4x4_test.csv"
            )
        generator = TinySudokuTask(held_out=[{"puzzle": k} for k in self.excluded])
        rows = generator.train_examples(GENERATED_TRAIN_ROWS, 0)
        return [{"puzzle": r["puzzle"], "solution": r["solution"]} for r in rows]

    def _hub_test_keys(self) -> frozenset:
        return frozenset()  # the generator already left out `held_out`
