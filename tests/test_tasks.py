import collections
import json
from pathlib import Path

import pytest

from agrpo.errors import AgrpoError
from agrpo.tasks import TinyCountdownTask, TinySudokuTask, get_task, load_countdown_jsonl, load_examples, load_sudoku_csv
from agrpo.tasks import base
from agrpo.tasks.tiny_countdown import check_expression, solve
from agrpo.tasks.tiny_sudoku import is_solved_grid

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SUDOKU_CSV = DATA / "sudoku4x4_test.csv"
COUNTDOWN_JSONL = DATA / "countdown_cd3_test.jsonl"
needs_data = pytest.mark.skipif(
    not SUDOKU_CSV.is_file() or not COUNTDOWN_JSONL.is_file(), reason="shared test splits absent"
)

# puzzle 0310|2004|0400|1043, solution 4312|2134|3421|1243: empty cells 0,3,5,6,8,10,11,13
PUZZLE, SOLUTION = "0310200404001043", "4312213434211243"


# ---- registry ----------------------------------------------------------------------------

def test_get_task_by_name_and_unknown_name():
    assert isinstance(get_task("tiny-sudoku"), TinySudokuTask)
    assert isinstance(get_task("tiny-countdown"), TinyCountdownTask)
    with pytest.raises(AgrpoError, match="unknown task 'chess': choose one of countdown, gsm8k, gsm8k-platinum, math, sudoku, tiny-countdown, tiny-sudoku"):
        get_task("chess")
    with pytest.raises(AgrpoError, match="bad settings"):
        get_task("tiny-sudoku", min_value=3)
    assert get_task("tiny-sudoku", min_empty=4, max_empty=6).max_empty == 6


def test_bad_counts_and_settings_are_refused():
    task = TinySudokuTask()
    for n, seed in ((-1, 0), (2.5, 0), (3, -2), (3, True)):
        with pytest.raises(AgrpoError):
            task.train_examples(n, seed)
    with pytest.raises(AgrpoError, match="swap"):
        TinySudokuTask(min_empty=9, max_empty=8)
    with pytest.raises(AgrpoError, match="0 to 12"):
        TinySudokuTask(max_empty=13)
    with pytest.raises(AgrpoError, match="empty range"):
        TinyCountdownTask(min_target=50, max_target=10)
    assert task.train_examples(0, 0) == []


# ---- sudoku ------------------------------------------------------------------------------

def test_sudoku_hand_worked_scores():
    task = TinySudokuTask()
    assert task.grade(SOLUTION, puzzle=PUZZLE, solution=SOLUTION) == 1.0
    # cells 0 and 13 wrong: 6 of 8 empty cells right
    wrong_two = "1" + SOLUTION[1:13] + "4" + SOLUTION[14:]
    assert task.grade(wrong_two, puzzle=PUZZLE, solution=SOLUTION) == 0.75
    # only the first row written: cells 0 and 3 right, the other six missing
    assert task.grade("4312", puzzle=PUZZLE, solution=SOLUTION) == 0.25
    # given cells are not scored, even when the completion contradicts them
    assert task.grade("4" + "9" * 2 + "2" + SOLUTION[4:], puzzle=PUZZLE, solution=SOLUTION) == 1.0
    # a non-digit in empty cell 0: only cell 3 of the eight right
    assert task.grade("x312", puzzle=PUZZLE, solution=SOLUTION) == 0.125
    for junk in ("", None, "=" * 100, "\x00\n", 12):
        assert task.grade(junk, puzzle=PUZZLE, solution=SOLUTION) == 0.0
    assert task.target({"prompt": PUZZLE + "=", "puzzle": PUZZLE, "solution": SOLUTION}) == SOLUTION


def test_sudoku_reward_is_the_grade_per_row():
    task = TinySudokuTask()
    other = ("1002020100030310", "1432324141232314")
    rewards = task.reward(
        [PUZZLE + "=", other[0] + "="], [SOLUTION[:8], other[1]],
        puzzle=[PUZZLE, other[0]], solution=[SOLUTION, other[1]],
    )
    # first half of SOLUTION: cells 0, 3, 5, 6 of the 8 empty ones
    assert rewards == [0.5, 1.0]
    with pytest.raises(AgrpoError, match="align"):
        task.reward([PUZZLE + "="], [SOLUTION], puzzle=[PUZZLE, PUZZLE], solution=[SOLUTION])
    with pytest.raises(AgrpoError, match="'solution' column"):
        task.grade(SOLUTION, puzzle=PUZZLE)


def _count_solutions(puzzle: str, limit: int = 2) -> int:
    cells = list(puzzle)
    try:
        i = cells.index("0")
    except ValueError:
        return 1 if is_solved_grid(puzzle) else 0
    total = 0
    for d in "1234":
        cells[i] = d
        grid = "".join(cells)
        r, c = divmod(i, 4)
        peers = [4 * r + k for k in range(4)] + [4 * k + c for k in range(4)]
        peers += [4 * (r // 2 * 2 + a) + c // 2 * 2 + b for a in range(2) for b in range(2)]
        if sum(grid[p] == d for p in set(peers)) == 1:
            total += _count_solutions(grid, limit)
            if total >= limit:
                break
    return total


@pytest.fixture(scope="module")
def sudoku_sets():
    task = TinySudokuTask()
    train = task.train_examples(3000, seed=0) + task.train_examples(500, seed=1)
    evals = task.eval_examples(500) + task.eval_examples(200, seed=1)
    return task, train, evals


def test_sudoku_examples_are_well_formed(sudoku_sets):
    task, train, evals = sudoku_sets
    for row in train[:150] + evals[:50]:
        puzzle, solution = row["puzzle"], row["solution"]
        assert row["prompt"] == puzzle + "=" and len(puzzle) == 16
        assert is_solved_grid(solution)
        assert all(p in ("0", s) for p, s in zip(puzzle, solution))
        assert 7 <= puzzle.count("0") <= 12
        assert _count_solutions(puzzle) == 1
        assert task.grade(task.target(row), **row) == 1.0
    assert set(collections.Counter(r["puzzle"].count("0") for r in train)) == set(range(7, 13))


def test_sudoku_train_and_eval_are_disjoint(sudoku_sets):
    task, train, evals = sudoku_sets
    train_keys, eval_keys = {r["puzzle"] for r in train}, {r["puzzle"] for r in evals}
    assert len({r["puzzle"] for r in evals[:500]}) == 500
    assert train_keys.isdisjoint(eval_keys)
    assert {task.split_of(r) for r in train} == {"train"}
    assert {task.split_of(r) for r in evals} == {"eval"}
    # one seed's list never repeats a puzzle
    assert len({r["puzzle"] for r in train[:3000]}) == 3000


def test_generation_is_deterministic_and_prefix_stable(monkeypatch):
    monkeypatch.setattr(base, "_STREAMS", {})
    first = TinySudokuTask().train_examples(40, seed=5)
    monkeypatch.setattr(base, "_STREAMS", {})
    again = TinySudokuTask().train_examples(60, seed=5)
    assert again[:40] == first
    assert TinySudokuTask().train_examples(40, seed=6) != first
    # callers get copies: editing one list does not change the next answer
    first[0]["puzzle"] = "edited"
    assert TinySudokuTask().train_examples(1, seed=5)[0]["puzzle"] == again[0]["puzzle"]


def test_held_out_rows_are_kept_out_of_generated_sets():
    plain = TinySudokuTask(min_empty=6, max_empty=8).train_examples(30, seed=2)
    held = plain[3:6]
    task = TinySudokuTask(min_empty=6, max_empty=8, held_out=held)
    again = task.train_examples(27, seed=2)
    assert again == plain[:3] + plain[6:]


def test_too_small_a_problem_space_is_reported():
    # no empty cell: one puzzle per solved grid (288), about a quarter of them in eval
    task = TinySudokuTask(min_empty=0, max_empty=0)
    with pytest.raises(AgrpoError, match="distinct problems"):
        task.eval_examples(200)


@needs_data
def test_sudoku_csv_split():
    rows = load_sudoku_csv(SUDOKU_CSV)
    assert len(rows) == 256
    assert rows[0] == {"prompt": PUZZLE + "=", "puzzle": PUZZLE, "solution": SOLUTION}
    task = TinySudokuTask()
    assert all(task.grade(r["solution"], **r) == 1.0 for r in rows)
    # the distribution the default min/max empty cells were chosen from
    assert collections.Counter(r["puzzle"].count("0") for r in rows) == {7: 82, 8: 83, 9: 76, 11: 12, 12: 3}
    assert load_examples("tiny-sudoku", SUDOKU_CSV) == rows


@pytest.mark.parametrize("content, message", [
    ("Puzzle,Answer\n0310200404001043,4312213434211243\n", "lacks column"),
    ("Puzzle,Solution\n031020040400104,4312213434211243\n", ":2: Puzzle must be 16 digits"),
    ("Puzzle,Solution\n0310200404001043,4312213434211243\n0310200404001043,4312213434211244\n", ":3: Solution"),
    ("Puzzle,Solution\n1310200404001043,4312213434211243\n", "contradicts"),
    ("Puzzle,Solution\n", "no puzzles"),
])
def test_sudoku_csv_errors(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(AgrpoError, match=message):
        load_sudoku_csv(path)


def test_sudoku_csv_missing_file(tmp_path):
    with pytest.raises(AgrpoError, match="no Sudoku file"):
        load_sudoku_csv(tmp_path / "nope.csv")


# ---- countdown ---------------------------------------------------------------------------

def _scores(completion, numbers, target):
    task = TinyCountdownTask()
    row = {"numbers": numbers, "target": target}
    reward = task.reward(["p"], [completion], numbers=[numbers], target=[target])[0]
    return task.grade(completion, **row), reward


@pytest.mark.parametrize("completion, numbers, target, expected", [
    ("30-100+93", [30, 100, 93], 23, (1.0, 1.0)),
    ("30-(100-93)", [30, 100, 93], 23, (1.0, 1.0)),
    (" 93 - (100 - 30) ", [30, 100, 93], 23, (1.0, 1.0)),
    ("100-93+30", [30, 100, 93], 23, (0.0, 0.1)),  # 37
    ("(2+3)*4", [2, 3, 4], 20, (1.0, 1.0)),
    ("2+3*4", [2, 3, 4], 20, (0.0, 0.1)),  # precedence: 14
    ("2+3*4", [4, 3, 2], 14, (1.0, 1.0)),
    ("3/(1/5)", [3, 1, 5], 15, (1.0, 1.0)),  # exact fractions
    ("5/(3-1)", [3, 1, 5], 2, (0.0, 0.1)),  # 5/2, no rounding
    ("90/90*43", [90, 43, 90], 43, (1.0, 1.0)),
    ("4*5*6/6", [4, 5, 6], 20, (0.0, 0.0)),  # 6 used twice
    ("4*5", [4, 5, 6], 20, (0.0, 0.0)),  # 6 missing
    ("123-100", [30, 100, 93], 23, (0.0, 0.0)),  # a number not given
    ("3/(5-5)", [5, 5, 3], 3, (0.0, 0.0)),  # division by zero
    ("3+5-5", [5, 5, 3], 3, (1.0, 1.0)),
    ("-3+5+1", [3, 5, 1], 3, (0.0, 0.0)),  # no unary minus
    ("03+5-5", [5, 5, 3], 3, (0.0, 0.0)),  # numbers as written in the prompt
    ("30-100+93=23", [30, 100, 93], 23, (0.0, 0.0)),
])
def test_countdown_hand_worked(completion, numbers, target, expected):
    assert _scores(completion, numbers, target) == expected


@pytest.mark.parametrize("junk", [
    "1+(", "__import__('os')", "", "()", "1++2", "(((1+2)", "1+2)", "((((" * 100, "(" * 40 + "1" + ")" * 40,
    "9" * 300, "1" + "*99" * 80, None, 7, "1 2 3", "1e3", "½+1",
])
def test_countdown_garbage_scores_zero(junk):
    assert _scores(junk, [1, 2, 3], 6) == (0.0, 0.0)
    assert check_expression(junk, [1, 2, 3]) == (False, None)


def test_countdown_deep_but_valid_nesting_is_accepted():
    assert _scores("(" * 20 + "1+2" + ")" * 20 + "+3", [1, 2, 3], 6) == (1.0, 1.0)


def test_solver_picks_a_shortest_expression():
    assert solve([2, 3, 4], 20) == "(2+3)*4"
    assert solve([30, 100, 93], 23) == "30-100+93"
    assert solve([1, 2, 3], 100) is None
    task = TinyCountdownTask()
    with pytest.raises(AgrpoError, match="no expression"):
        task.target({"numbers": [1, 2, 3], "target": 100})


@pytest.fixture(scope="module")
def countdown_sets():
    task = TinyCountdownTask()
    return task, task.train_examples(600, seed=0), task.eval_examples(120)


def test_countdown_examples_and_targets(countdown_sets):
    task, train, evals = countdown_sets
    for row in train + evals:
        a, b, c = row["numbers"]
        assert row["prompt"] == f"{a},{b},{c}:{row['target']}="
        assert all(1 <= n <= 100 for n in row["numbers"]) and 1 <= row["target"] <= 100
        expr = task.target(row)
        assert len(expr) <= task.completion_chars
        assert task.grade(expr, **row) == 1.0


def test_countdown_train_and_eval_are_disjoint(countdown_sets):
    task, train, evals = countdown_sets
    key = lambda r: (tuple(sorted(r["numbers"])), r["target"])  # noqa: E731
    train_keys, eval_keys = {key(r) for r in train}, {key(r) for r in evals}
    assert len(train_keys) == 600 and len(eval_keys) == 120
    assert train_keys.isdisjoint(eval_keys)
    assert {task.split_of(r) for r in train} == {"train"} and {task.split_of(r) for r in evals} == {"eval"}


@needs_data
def test_countdown_jsonl_split():
    rows = load_countdown_jsonl(COUNTDOWN_JSONL)
    assert len(rows) == 256
    assert rows[0] == {"prompt": "30,100,93:23=", "numbers": [30, 100, 93], "target": 23}
    task = TinyCountdownTask()
    assert all(task.grade(task.target(r), **r) == 1.0 for r in rows)
    assert load_examples("tiny-countdown", COUNTDOWN_JSONL) == rows


@pytest.mark.parametrize("line, message", [
    ("{not json", ":1: not valid JSON"),
    (json.dumps({"input": "1,2,3"}), "needs \"input\" and \"output\""),
    (json.dumps({"input": "1,x,3", "output": "6"}), "comma-separated integers"),
    (json.dumps({"input": "1,2,3", "output": "six"}), "comma-separated integers"),
    (json.dumps({"input": "7", "output": "7"}), "at least two"),
])
def test_countdown_jsonl_errors(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(AgrpoError, match=message):
        load_countdown_jsonl(path)
    with pytest.raises(AgrpoError, match="no Countdown file"):
        load_countdown_jsonl(tmp_path / "missing.jsonl")


# ---- tiny-sudoku's weaker teachers -------------------------------------------------------

def _repeats(grid: str, units) -> int:
    return sum(4 - len({grid[i] for i in unit}) for unit in units)


def test_fillings_with_every_rule_give_the_unique_solution(sudoku_sets):
    from agrpo.tasks.tiny_sudoku import UNITS, fillings

    for row in sudoku_sets[2][:64]:
        assert fillings(row["puzzle"], UNITS) == [row["solution"]]


@pytest.mark.parametrize("teacher", ["rows_columns", "rows_boxes", "rows"])
def test_a_weaker_teacher_keeps_the_clues_and_the_rules_it_knows(sudoku_sets, teacher):
    from agrpo.tasks.tiny_sudoku import TEACHERS, UNITS, fillings

    task = TinySudokuTask(teacher=teacher)
    known = TEACHERS[teacher]
    unknown = [u for u in UNITS if u not in known]
    broken = 0
    for row in sudoku_sets[1][:200]:
        grid = task.target(row)
        assert grid == task.target(dict(row)) == TinySudokuTask(teacher=teacher).target(row)  # fixed per puzzle
        assert len(grid) == 16 and all(p in ("0", g) for p, g in zip(row["puzzle"], grid))
        assert _repeats(grid, known) == 0 and grid in fillings(row["puzzle"], known)
        broken += _repeats(grid, unknown) > 0
    # what it does not know, it gets wrong often (rows_columns is nearly a full solver)
    assert broken > (10 if teacher == "rows_columns" else 60)
    assert TinySudokuTask().target(sudoku_sets[1][0]) == sudoku_sets[1][0]["solution"]


def test_teacher_accuracies_and_the_model_free_line_are_as_documented():
    from agrpo.tasks.tiny_sudoku import TEACHERS, fillings, model_free_accuracy, score_sudoku

    held_out = TinySudokuTask().eval_examples(256)
    expected = {"rows_columns": (0.920, 0.861), "rows_boxes": (0.647, 0.175), "rows": (0.426, 0.023)}
    for teacher, (cells, solved) in expected.items():
        acc, whole = [], []
        for row in held_out:
            grids = fillings(row["puzzle"], TEACHERS[teacher])
            acc.append(sum(score_sudoku(g, row["puzzle"], row["solution"]) for g in grids) / len(grids))
            whole.append(1 / len(grids))
        assert round(sum(acc) / 256, 3) == cells and round(sum(whole) / 256, 3) == solved
    assert round(model_free_accuracy(held_out), 3) == 0.708
    # the guesser, played out: its mean over many draws lands on the closed form
    import random

    rng, row = random.Random(0), held_out[0]
    peers = [[j for j in range(16) if j != i and (j // 4 == i // 4 or j % 4 == i % 4 or
              (j // 8, j % 4 // 2) == (i // 8, i % 4 // 2))] for i in range(16)]
    draws = [score_sudoku("".join(c if c != "0" else rng.choice(sorted(set("1234") - {row["puzzle"][j] for j in peers[i]}))
                                  for i, c in enumerate(row["puzzle"])), row["puzzle"], row["solution"]) for _ in range(4000)]
    assert abs(sum(draws) / 4000 - model_free_accuracy([row])) < 0.01


def test_an_unknown_teacher_is_refused():
    with pytest.raises(AgrpoError, match="unknown Sudoku teacher 'boxes'.*rows_boxes"):
        TinySudokuTask(teacher="boxes")


def test_sft_teacher_is_a_tiny_sudoku_option(tmp_path, capsys):
    from agrpo.cli import main

    assert main(["sft", "task=tiny-countdown", "teacher=rows", f"output_dir={tmp_path}"]) == 2
    assert "teacher=rows is an option of tiny-sudoku's demonstrations" in capsys.readouterr().err
    assert main(["sft", "teacher=boxes", f"output_dir={tmp_path}", "steps=1"]) == 2
    assert "unknown Sudoku teacher 'boxes'" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing written for a refused run
