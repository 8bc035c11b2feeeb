"""The paper tasks' graders on real model output (agreement with d1's parser, speed) and on
hostile completions (no exception, no slow case, nothing scored correct that is not)."""

import csv
import json
import math
import re
import time
from pathlib import Path

import pytest

from agrpo import tasks
from agrpo.tasks import mathcheck

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
D1 = SHARED / "d1_llada_128.json"

# d1 lost the references of the two GSM8K test problems whose answer is negative (its own
# parser dropped the sign and stored null); GSM8K's answers are -10 and -3
MISSING_GSM8K = {"Southlandia": "-10", "dropped 8 degrees": "-3"}

# MATH-500 items where d1's string comparison says "wrong" but the answer is equal to the
# reference (checked by hand): 15.975 = 639/40, 0.25 = 1/4, 3/24 = 1/8, "8 + 8 + 15 = 31 units"
# states 31, 36.00 = \$36, 6/3 = 2, 1.5 = 3/2, 58500 = 58,500, 2516 for 2516_8 (the base
# the question asks for), an unboxed \frac{1}{4}, 8/84 = 2/21, C = \text{(C)},
# 2240/78125 = 448/15625, 8/18 = 4/9, [-2, 7] for x \in [-2,7], 0.09 = 9/100
D1_MATH_MISSES = (33, 46, 72, 131, 202, 226, 231, 238, 247, 251, 311, 312, 348, 351, 414, 441)


def write_public_files(d1: dict, out: Path) -> dict:
    """d1's records written in each task's public file format: {d1 key: (task, path)}."""
    t = d1["tasks"]

    def number(value, question):
        if value is None:
            return next(v for k, v in MISSING_GSM8K.items() if k in question)
        return str(int(value)) if float(value).is_integer() else repr(float(value))

    with open(out / "gsm8k.jsonl", "w") as fh:
        for r in t["gsm8k"]:
            fh.write(json.dumps({"question": r["question"], "answer": "... #### " + number(r["ground_truth"], r["question"])}) + "\n")
    with open(out / "math.jsonl", "w") as fh:
        for r in t["math500"]:
            fh.write(json.dumps({"problem": r["question"], "solution": f"\\boxed{{{r['ground_truth']}}}"}) + "\n")
    with open(out / "countdown.jsonl", "w") as fh:
        for r in t["countdown"]:
            nums, target = r["ground_truth"]
            fh.write(json.dumps({"input": ",".join(map(str, nums)), "output": str(target)}) + "\n")
    with open(out / "sudoku.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Puzzle", "Solution"])
        for r in t["sudoku"]:
            writer.writerow([re.search(r"[0-9]{16}", r["question"]).group(0), r["ground_truth"]])
    return {"gsm8k": ("gsm8k", out / "gsm8k.jsonl"), "math500": ("math", out / "math.jsonl"),
            "countdown": ("countdown", out / "countdown.jsonl"), "sudoku": ("sudoku", out / "sudoku.csv")}


@pytest.fixture(scope="module")
def d1_graded(tmp_path_factory):
    if not D1.is_file():
        pytest.skip("../shared/data/d1_llada_128.json absent")
    d1 = json.loads(D1.read_text())
    files = write_public_files(d1, tmp_path_factory.mktemp("d1"))
    t0 = time.perf_counter()
    graded = {}
    for key, (name, path) in files.items():
        task = tasks.get(name)
        rows = task.load("test", path)
        records = d1["tasks"][key]
        assert len(rows) == len(records)
        graded[key] = (rows, [task.grade(r["completion"], **row) for r, row in zip(records, rows)])
    return d1, graded, time.perf_counter() - t0


def accuracy_pct(key, rows, grades, drop=()):
    if key == "sudoku":  # d1 pools correct cells over all empty cells
        empty = [row["puzzle"].count("0") for row in rows]
        return 100 * sum(g * e for g, e in zip(grades, empty)) / sum(empty)
    return 100 * sum(g for i, g in enumerate(grades) if i not in drop) / len(grades)


def test_graders_agree_with_d1_on_real_llada_output(d1_graded):
    d1, graded, seconds = d1_graded
    ours = {key: accuracy_pct(key, *graded[key]) for key in graded}
    reported = d1["d1_parser_accuracy_pct"]
    for key in ("gsm8k", "countdown", "sudoku"):
        assert abs(ours[key] - reported[key]) <= 2.0, (key, ours[key], reported[key])
    # MATH-500: math-verify accepts equal answers d1's string comparison misses; counted as
    # d1 counts them, the rest agrees within 2 points
    rows, grades = graded["math500"]
    assert all(grades[i] == 1.0 for i in D1_MATH_MISSES)
    assert abs(accuracy_pct("math500", rows, grades, drop=D1_MATH_MISSES) - reported["math500"]) <= 2.0
    assert ours["math500"] > reported["math500"]
    # measured at 68-70 / 29.2 / 21.1 / 11.72: the figures are not trivially met
    assert 60 < ours["gsm8k"] < 80 and 10 < ours["countdown"] < 30
    # every recorded completion graded in well under a minute on 2 cores (measured ~8 s)
    assert seconds < 60


def test_rewards_on_real_output_follow_the_grade(d1_graded):
    d1, graded, _ = d1_graded
    rows, grades = graded["countdown"]
    task = tasks.get("countdown")
    completions = [r["completion"] for r in d1["tasks"]["countdown"]]
    columns = {k: [row[k] for row in rows] for k in rows[0]}
    correct = dict((t.name, t.fn(None, completions, **columns)) for t in task.rewards)["countdown_correct"]
    assert correct == grades
    totals = task.reward(None, completions, **columns)
    assert all(-0.5 <= t <= 4.0 for t in totals) and max(totals) == 4.0


# ---- hostile completions -----------------------------------------------------------------

def _payloads() -> list[str]:
    big = "1" * 100_000
    out = [
        "9**9**9**9", "10**10**10", "9^{9^{9^{9}}}", "10^{10^{10}}", "(10^{10})!", "99999999!", "2^{1000000}",
        "10^{9999}", "\\prod_{i=1}^{100000} i", "\\sum_{i=1}^{10^{10}} i", "\\binom{100000}{50000}",
        "\\binom{10^{4}}{5000}", "e^{e^{e^{e^{10}}}}", "\\int_0^\\infty e^{-x^2} dx", "x^{x^{x^{x}}}",
        big, "9" * 5000, "-" + "9" * 5000, big + "." + big, "1e309", "1e-400", "10**-10**10",
        "(" * 10_000 + "1" + ")" * 10_000, "{" * 5000, "}" * 5000, "\\sqrt{" * 1000 + "2" + "}" * 1000,
        "\\frac{" * 500 + "1" + "}{2}" * 500, "[" * 3000, "((1))" * 1000, "1+" * 5000 + "1", "1/" * 1000 + "0",
        "__import__('os').system('x')", "eval('1+1')", "().__class__.__bases__[0].__subclasses__()",
        "lambda: 0", "import os; os.system('echo hi')", "exec('x=1')", "open('/etc/passwd').read()",
        "١٨", "１８", "٣+٥", "²", "½", "Ⅻ", "𝟏𝟖", "\u0661\u0660\u0660", "1\u200b8", "\ufeff18",
        "x" * 1_000_000, "<answer>" * 100_000, "</answer>" * 50_000, "<think>" * 100_000, "\\boxed{" * 5000,
        "\\boxed{}" * 1000, "\\boxed{\\boxed{\\boxed{", "boxed{" * 3000, "=" * 1000, "= = =",
        "nan", "NaN", "inf", "-inf", "\\infty", "-\\infty", "0/0", "1/0", "\\frac{1}{0}", "\\frac{0}{0}",
        "", " ", "\n", "\x00", "\t\r\x0b", "<", ">", "</answer>", "<answer>", "<answer><answer>", "</think><think>",
        "<|eot_id|>", "<|endoftext|>" * 1000, "<|im_end|><answer>1</answer>", "\\begin{pmatrix}" * 100,
        "\\text{" * 1000, "\\left(" * 2000, "$" * 5000, "\\" * 10_000, "%" * 1000, "\\\\" * 1000,
        "0" * 16, "5" * 16, "1234" * 4, "4321" * 4000, "0.5.5.5", "1,2,3,4,5,6", "-0", "+-+-1",
        "(1+2)*(3+4)*(5+6)" * 100, "1" * 17, "2" * 4299 + "3", "\U0010ffff" * 1000, "\ud800",
    ]
    return out


def _wrappers(claim: str):
    return [
        lambda p: p,
        lambda p: f"<answer>{p}</answer>",
        lambda p: f"<think>{p}</think><answer>{p}</answer>",
        lambda p: f"<answer>\\boxed{{{p}}}</answer>",
        lambda p: f"\\boxed{{{p}}}",
        lambda p: f"<answer>{p}",
        lambda p: f"<think>{p}",
        lambda p: f"<answer>{p}</answer><|eot_id|><|endoftext|><|endoftext|>",
        lambda p: f"<reasoning>r</reasoning>\n<answer>\n{p} = {claim}\n</answer>",
        lambda p: f"<answer>{p}</answer>" * 3,
        lambda p: p + "</answer>",
        lambda p: f"<ANSWER> {p} </Answer>",
        lambda p: f"<answer>\\boxed{{{p}}} = {claim}</answer>",
        lambda p: f"<answer>{p}\\boxed{{</answer>",
        lambda p: "<answer>" + p[: len(p) // 2] + "<|im_end|>" + p,
        lambda p: f"<think>x</think><answer>\\boxed{{{p}}}\n</answer>",
    ]


# each row's answer is never among the payloads: no hostile completion may be correct
HOSTILE_ROWS = {
    "gsm8k": {"question": "q", "answer": "7919"},
    "math": {"problem": "p", "answer": "\\frac{7919}{3}"},
    "countdown": {"nums": [2, 3, 5], "target": 97},
    "sudoku": {"puzzle": "0310200404001043", "solution": "4312213434211243"},
}


@pytest.mark.parametrize("name", sorted(HOSTILE_ROWS))
def test_hostile_completions(name):
    task, row = tasks.get(name), HOSTILE_ROWS[name]
    # "<payload> = claim": countdown's target (no expression reaches it), a wrong number for math
    claim = str(row["target"]) if "target" in row else "7918"
    completions = [wrap(p) for p in _payloads() for wrap in _wrappers(claim)]
    completions += [None, 12, ["not", "messages"], [{"role": "assistant", "content": None}]]
    assert len(completions) >= 1000
    if name == "countdown":
        from agrpo.tasks.tiny_countdown import solve

        assert solve(row["nums"], row["target"]) is None
    columns = {k: [v] for k, v in row.items()}
    slowest, slowest_case = 0.0, None
    timeouts_before = mathcheck._SERVER.timeouts
    for completion in completions:
        t0 = time.perf_counter()
        values = [term.fn(["p"], [completion], **columns)[0] for term in task.rewards]
        total = task.reward(["p"], [completion], **columns)[0]
        grade = task.grade(completion, **row)
        seconds = time.perf_counter() - t0
        if seconds > slowest:
            slowest, slowest_case = seconds, completion
        for v in values + [total, grade]:
            assert isinstance(v, float) and math.isfinite(v)
        assert 0.0 <= grade < 1.0 and -0.5 <= total < 4.0
        if name != "sudoku":
            assert grade == 0.0 and values[-1] == 0.0, repr(completion)[:200]
    print(f"{name}: {len(completions)} hostile completions, slowest {slowest:.3f} s: {repr(slowest_case)[:80]}, "
          f"math-verify time-outs {mathcheck._SERVER.timeouts - timeouts_before}")
    assert slowest < 1.0, repr(slowest_case)[:200]


def test_answers_are_checked_under_a_time_limit_from_any_thread():
    from concurrent.futures import ThreadPoolExecutor

    # not caught by the cheap pre-checks: only the time limit stops sympy here
    slow = "(10^{10})!"
    assert not mathcheck._hopeless(slow)
    with ThreadPoolExecutor(2) as pool:
        t0 = time.perf_counter()
        results = list(pool.map(lambda a: mathcheck.answers_equal("3", a), [slow, "\\frac{6}{2}", "3.0", "4"]))
    assert results == [False, True, True, False]
    # the slow answer runs for minutes unchecked; 0.5 s limit plus three quick checks
    assert time.perf_counter() - t0 < 2.5
    # the checker was replaced after the time-out, and still answers
    assert mathcheck.answers_equal("\\frac{1}{2}", "0.5")


def test_code_in_answers_is_never_run(tmp_path):
    marker = tmp_path / "ran"
    code = [
        f"__import__('os').system('touch {marker}')", f"exec(\"open('{marker}', 'w')\")",
        f"1 + __import__('os').system('touch {marker}')", f"x = open('{marker}', 'w').write('x')",
        f"(lambda: __import__('os').system('touch {marker}'))()",
    ]
    for snippet in code:
        for wrapped in (snippet, f"${snippet}$", f"\\boxed{{{snippet}}}", f"{snippet} = 6"):
            completion = f"<answer>{wrapped}</answer>"
            assert tasks.get("math").grade(completion, answer="0") == 0.0
            assert tasks.get("gsm8k").grade(completion, answer="7") == 0.0
            assert tasks.get("countdown").grade(completion, nums=[1, 2, 3], target=6) == 0.0
    assert not marker.exists()


def test_a_missing_math_verify_is_an_error_not_zero_scores(monkeypatch):
    import importlib.util

    from agrpo.errors import AgrpoError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "math_verify" else real(name, *a))
    monkeypatch.setattr(mathcheck, "_SERVER", mathcheck._Server())
    with pytest.raises(AgrpoError, match="pip install math-verify"):
        mathcheck.answers_equal("17", "\\frac{34}{2}")
