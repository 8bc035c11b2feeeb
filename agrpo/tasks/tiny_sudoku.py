"""tiny-sudoku: 4x4 Sudoku in a 16-character dialect, for the shipped tiny models.

Fill the empty cells of a puzzle with a unique solution.

Prompt: the 16 puzzle digits, row-major, '0' for an empty cell, then '='
("0310200404001043="). Completion: the 16 solution digits ("4312213434211243").

Score (reward and grade alike): the fraction of the puzzle's empty cells whose digit in the
completion is right. The completion is read by position, so a short completion or a
non-digit leaves those cells wrong; the given cells are not scored.

Demonstrations (`target`, what `agrpo sft` imitates) come from a teacher: `solution` (the
default) gives the true solution; a weaker teacher knows only some of the rules and fills the
empty cells with one of the grids that satisfy the clues and the rules it knows, chosen
uniformly at random with a seed taken from the puzzle (so the same puzzle always gets the same
demonstration). On the 256 held-out puzzles, against the true solutions:

| teacher | rules it knows | cell accuracy | puzzles solved | grids it chooses from (mean) |
|---|---|---|---|---|
| `solution` | all | 1.000 | 1.000 | 1 |
| `rows_columns` | rows, columns | 0.920 | 0.861 | 1.3 |
| `rows_boxes` | rows, 2x2 boxes | 0.647 | 0.175 | 15.8 |
| `rows` | rows | 0.426 | 0.023 | 403 |

(expected values over the teacher's draw). `model_free_accuracy` is the line a model has to
beat to show it reads more than the clues: a guesser that picks uniformly among the digits
the clues allow in each cell scores 0.708.

Puzzles come from reasoning_gym's `mini_sudoku` generator (each has a unique solution):
about 0.4 ms a kept puzzle, so the 20,000-problem training pool takes ~8 s on one core.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

from agrpo.errors import AgrpoError
from agrpo.tasks.base import Task
from agrpo.tasks.reasoning import row_field

CELLS = 16
DIGITS = "1234"
# The published 4x4 test split (256 puzzles) has 7 to 12 empty cells:
# 7: 82, 8: 83, 9: 76, 10: 0, 11: 12, 12: 3. The default range covers all of it.
MIN_EMPTY, MAX_EMPTY = 7, 12
# a 4x4 puzzle with more than 12 empty cells never has a unique solution
MOST_EMPTY = 12


def _units():
    rows = [[4 * r + c for c in range(4)] for r in range(4)]
    cols = [[4 * r + c for r in range(4)] for c in range(4)]
    boxes = [[4 * (br + r) + bc + c for r in range(2) for c in range(2)] for br in (0, 2) for bc in (0, 2)]
    return rows + cols + boxes


UNITS = _units()
ROWS, COLUMNS, BOXES = UNITS[:4], UNITS[4:8], UNITS[8:]
# the rules each teacher knows (None: the true solution)
TEACHERS = {"solution": None, "rows_columns": ROWS + COLUMNS, "rows_boxes": ROWS + BOXES, "rows": ROWS}


def _peers(units) -> list[set[int]]:
    return [{j for u in units if i in u for j in u if j != i} for i in range(CELLS)]


def fillings(puzzle: str, units) -> list[str]:
    """Every grid that keeps the clues of `puzzle` and has no repeated digit in any of `units`,
    in lexicographic order."""
    peers, grid = _peers(units), list(puzzle)
    empty = [i for i, ch in enumerate(puzzle) if ch == "0"]
    out: list[str] = []

    def fill(k: int) -> None:
        if k == len(empty):
            out.append("".join(grid))
            return
        i = empty[k]
        for d in DIGITS:
            if all(grid[j] != d for j in peers[i]):
                grid[i] = d
                fill(k + 1)
                grid[i] = "0"

    fill(0)
    return out


def teacher_grid(puzzle: str, solution: str, teacher: str) -> str:
    """The demonstration `teacher` gives for `puzzle` (see the module docstring)."""
    units = TEACHERS[teacher]
    if units is None:
        return solution
    grids = fillings(puzzle, units)  # never empty: the solution keeps every rule
    pick = int.from_bytes(hashlib.blake2b(f"{teacher}:{puzzle}".encode(), digest_size=8).digest(), "big")
    return grids[pick % len(grids)]


def model_free_accuracy(rows: list[dict]) -> float:
    """Expected cell accuracy of a guesser that fills each empty cell with a digit drawn
    uniformly from those its row, column and box clues allow."""
    peers, total = _peers(UNITS), 0.0
    for row in rows:
        puzzle = row["puzzle"]
        empty = [i for i, ch in enumerate(puzzle) if ch == "0"]
        if not empty:
            total += 1.0
            continue
        total += sum(1 / (4 - len({puzzle[j] for j in peers[i]} - {"0"})) for i in empty) / len(empty)
    return total / max(len(rows), 1)


def is_solved_grid(grid: str) -> bool:
    """True if `grid` is 16 digits 1-4 with every row, column and 2x2 box a permutation."""
    return (
        len(grid) == CELLS
        and all(ch in DIGITS for ch in grid)
        and all(len({grid[i] for i in unit}) == 4 for unit in UNITS)
    )


def score_sudoku(completion, puzzle: str, solution: str) -> float:
    """Fraction of the empty cells of `puzzle` that `completion` fills with the solution's digit."""
    empty = [i for i, ch in enumerate(puzzle) if ch == "0"]
    if not empty:
        return 1.0
    if not isinstance(completion, str):
        return 0.0
    right = sum(1 for i in empty if i < len(completion) and completion[i] == solution[i])
    return right / len(empty)


def make_row(puzzle: str, solution: str) -> dict:
    return {"prompt": puzzle + "=", "puzzle": puzzle, "solution": solution}


class TinySudokuTask(Task):
    """4x4 Sudoku with between `min_empty` and `max_empty` empty cells."""

    name = "tiny-sudoku"
    stream_name = "sudoku"
    completion_chars = CELLS

    def __init__(self, min_empty: int = MIN_EMPTY, max_empty: int = MAX_EMPTY, held_out=None, teacher: str = "solution"):
        if teacher not in TEACHERS:
            raise AgrpoError(f"unknown Sudoku teacher {teacher!r}: choose one of {', '.join(TEACHERS)}")
        self.teacher = teacher
        for label, value in (("min_empty", min_empty), ("max_empty", max_empty)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MOST_EMPTY:
                raise AgrpoError(f"{label} must be an integer from 0 to {MOST_EMPTY}, got {value!r}")
        if min_empty > max_empty:
            raise AgrpoError(f"min_empty={min_empty} is larger than max_empty={max_empty}: swap them")
        self.min_empty, self.max_empty = min_empty, max_empty
        super().__init__(held_out)

    def key(self, row: dict) -> str:
        return row["puzzle"]

    def _settings(self) -> tuple:
        return (self.min_empty, self.max_empty)

    def _source(self, stream_seed: int):
        # imported here: reasoning_gym loads all its generators on import (~1 s), which
        # commands that never generate Sudoku should not pay
        from reasoning_gym.games.mini_sudoku import MiniSudokuConfig, MiniSudokuDataset

        data = MiniSudokuDataset(
            MiniSudokuConfig(min_empty=self.min_empty, max_empty=self.max_empty, seed=stream_seed, size=1)
        )

        def draw(index: int) -> dict | None:
            try:
                meta = data[index]["metadata"]
            except RuntimeError:  # the generator gave up on a solved board
                return None
            puzzle = "".join(str(v) for line in meta["puzzle"] for v in line)
            # the generator stops removing clues early when the next removal would allow a
            # second solution, so it can fall short of min_empty
            if not self.min_empty <= puzzle.count("0") <= self.max_empty:
                return None
            return make_row(puzzle, "".join(str(v) for line in meta["solution"] for v in line))

        return draw

    def baselines(self, rows: list[dict]) -> dict[str, float]:
        return {"model_free_accuracy": model_free_accuracy(rows)}

    def grade(self, completion: str, **row) -> float:
        return score_sudoku(completion, row_field(row, "puzzle", self.name), row_field(row, "solution", self.name))

    def target(self, row: dict) -> str:
        solution = row_field(row, "solution", self.name)
        return teacher_grid(row_field(row, "puzzle", self.name), solution, self.teacher)

    def _read(self, path) -> list[dict]:
        return load_sudoku_csv(path)


def load_sudoku_csv(path) -> list[dict]:
    """Rows of a CSV with columns Puzzle,Solution (16 digits each, row-major, '0' = empty)."""
    path = Path(path)
    if not path.is_file():
        raise AgrpoError(f"no Sudoku file at {path}: pass the path of a CSV with columns Puzzle,Solution")
    rows = []
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"Puzzle", "Solution"} - set(reader.fieldnames or ())
        if missing:
            raise AgrpoError(f"{path} lacks column(s) {', '.join(sorted(missing))}: the header must be Puzzle,Solution")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            puzzle, solution = (row.get("Puzzle") or "").strip(), (row.get("Solution") or "").strip()
            if not puzzle and not solution:
                continue
            if len(puzzle) != CELLS or any(ch not in "0" + DIGITS for ch in puzzle):
                raise AgrpoError(f"{where}: Puzzle must be 16 digits 0-4, got {puzzle!r}")
            if not is_solved_grid(solution):
                raise AgrpoError(
                    f"{where}: Solution {solution!r} is not a solved 4x4 grid "
                    "(16 digits 1-4, no repeats in a row, column or box)"
                )
            clash = [i for i in range(CELLS) if puzzle[i] != "0" and puzzle[i] != solution[i]]
            if clash:
                raise AgrpoError(f"{where}: Solution contradicts the Puzzle's given digit at cell {clash[0]}")
            rows.append(make_row(puzzle, solution))
    if not rows:
        raise AgrpoError(f"{path} holds no puzzles: add rows below the Puzzle,Solution header")
    return rows
