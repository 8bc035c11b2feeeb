"""How the paper's tasks read a completion, as properties over every case of a rule: the tags in
every order, every end-of-turn token, completions of every realistic length, every arrangement
of a Countdown number multiset, the MATH levels trained on, and work that grows linearly with
hostile text."""

import itertools
import json
import time
from collections import Counter
from pathlib import Path

import pytest

from agrpo import families, tasks
from agrpo.tasks import mathcheck
from agrpo.tasks.reasoning import answer_format, answer_region, think_format

TOKENIZERS = Path(__file__).resolve().parents[2] / "shared" / "tokenizers"
PAPER_TASKS = ("gsm8k", "math", "countdown", "sudoku")
P, S = "0310200404001043", "4312213434211243"  # a 4x4 puzzle and its solution
# a row of each task and an answer that is right for it
ROWS = {
    "gsm8k": ({"question": "q", "answer": "18"}, "\\boxed{18}"),
    "math": ({"problem": "p", "answer": "18"}, "\\boxed{18}"),
    "countdown": ({"nums": [3, 6, 9], "target": 18}, "3 + 6 + 9 = 18"),
    "sudoku": ({"puzzle": P, "solution": S}, S),
}


def scores(name: str, completion, row: dict) -> dict:
    """Every reward term of the task, its total and the grade of one completion."""
    task = tasks.get(name)
    columns = {k: [v] for k, v in row.items()}
    out = {t.name: t.fn(["p"], [completion], **columns)[0] for t in task.rewards}
    out["total"] = task.reward(["p"], [completion], **columns)[0]
    out["grade"] = task.grade(completion, **row)
    return out


def full_marks(name: str) -> dict:
    row, answer = ROWS[name]
    return scores(name, f"<think>\nwork\n</think>\n<answer>\n{answer}\n</answer>", row)


def test_the_right_answers_earn_full_marks():
    """The answers of ROWS are right: the other tests compare against these marks."""
    for name in PAPER_TASKS:
        marks = full_marks(name)
        assert marks["grade"] == 1.0 and marks["total"] == pytest.approx(4.0), (name, marks)


# -- the answer is read however long the completion -----------------------------------------------

def reasoning_text(chars: int) -> str:
    """Plausible working of exactly `chars` characters (numbers, no tags, no boxes)."""
    lines, i = [], 0
    while sum(map(len, lines)) < chars:
        i += 1
        lines.append(f"Step {i}: {i} + {2 * i} = {3 * i}, and we carry the {i % 10} over to the next line.\n")
    return "".join(lines)[:chars]


LENGTHS = (100, 1_000, 2_363, 4_000, 10_000, 30_000, 100_000)


@pytest.mark.parametrize("name", PAPER_TASKS)
def test_the_answer_is_read_at_the_end_of_long_completions(name):
    """A completion that reasons at length (up to 100,000 characters, far beyond what 512 tokens
    spell) and then answers is read to its answer: full marks, with the answer block closed or not
    and, for the math tasks, with a final \\boxed{} and no tags."""
    row, answer = ROWS[name]
    marks = full_marks(name)
    for chars in LENGTHS:
        work = reasoning_text(chars)
        assert len(work) == chars
        closed = f"<think>\n{work}\n</think>\n<answer>\n{answer}\n</answer>"
        assert scores(name, closed, row) == marks, (name, chars)
        unclosed = f"<think>\n{work}\n</think>\n<answer>\n{answer}"
        assert scores(name, unclosed, row)["grade"] == 1.0, (name, chars)
        if name in ("gsm8k", "math"):
            assert scores(name, f"{work}\nSo the answer is \\boxed{{18}}.", row)["grade"] == 1.0, (name, chars)
            inside = f"<think>w</think><answer>{work} Hence \\boxed{{18}}.</answer>"
            assert scores(name, inside, row)["grade"] == 1.0, (name, chars)


# -- the tags in every order ------------------------------------------------------------------------

def _case(tag: str, k: int) -> str:
    """Tags match in any letter case: a few spellings, picked by k."""
    return (tag, tag.upper(), tag.title(), tag.swapcase())[k % 4]


def _reference(pieces: list[str]) -> tuple[str | None, bool, bool]:
    """(answer region, has an answer block, has a think block) of a completion given as its
    pieces (tags and text), read by the documented rules, independently of the code."""
    low = [p.lower() for p in pieces]
    opening = next((i for i, p in enumerate(low) if p == "<answer>"), None)
    answer_block = False
    if opening is None:
        region = None
        text = "".join(pieces)
        if "\\boxed{" in text:  # segments hold flat boxes only: the last one
            region = text.rsplit("\\boxed{", 1)[1].split("}", 1)[0].strip()
    else:
        closing = next((j for j in range(opening + 1, len(low)) if low[j] == "</answer>"), len(low))
        region = "".join(pieces[opening + 1 : closing]).strip()
        answer_block = closing < len(low)
    think = any(
        low[i] == f"<{kind}>" and low[j] == f"</{kind}>"
        for kind in ("think", "reasoning") for i in range(len(low)) for j in range(i + 1, len(low))
    )
    return region, answer_block, think


TAG_SETS = [
    ("<answer>", "</answer>", "<think>", "</think>"),
    ("<answer>", "</answer>", "</answer>", "<think>", "</think>"),
    ("<answer>", "<answer>", "</answer>", "<think>", "</think>"),
    ("<answer>", "</answer>", "<reasoning>", "</reasoning>", "</think>"),
    ("<answer>", "<answer>", "</answer>", "</answer>", "<think>"),
]


@pytest.mark.parametrize("tags", TAG_SETS, ids=lambda t: "".join(t))
@pytest.mark.parametrize("boxes", [False, True], ids=["plain", "boxed"])
def test_every_order_of_the_tags(tags, boxes):
    """For every arrangement of the tags between pieces of text: the answer region is the text
    after the first <answer> up to the first </answer> after it (to the end when none follows),
    else the last \\boxed{}; an answer block needs <answer> before </answer> and a think block
    <think> (or <reasoning>) before its closing tag. A closing tag before its opening tag is no
    block."""
    orders = sorted(set(itertools.permutations(tags)))
    assert len(orders) >= 24
    for k, order in enumerate(orders):
        pieces = []
        for i, tag in enumerate(order):
            pieces.append(f" \\boxed{{{10 + i}}} seg{i} " if boxes else f" seg{i} ")
            pieces.append(_case(tag, k + i))
        pieces.append(" \\boxed{99} end " if boxes else " end ")
        text = "".join(pieces)
        region, answer_block, think = _reference(pieces)
        assert answer_region(text) == region, text
        assert answer_format(["p"], [text]) == [float(answer_block)], text
        assert think_format(["p"], [text]) == [float(think)], text


# -- the end of the turn ---------------------------------------------------------------------------

def _end_of_turn_tokens() -> list[str]:
    """The end-of-turn and EOS tokens of the families and the README's list, and of the real
    Dream and SDAR tokenizers when they are at hand."""
    found = {"<|eot_id|>", "<|endoftext|>", "<|im_end|>"}
    for family in families.FAMILIES.values():
        found.update(family.end_of_turn)
    for name in ("dream", "sdar"):
        config = TOKENIZERS / name / "tokenizer_config.json"
        if config.is_file():
            settings = json.loads(config.read_text())
            eos = settings.get("eos_token")
            found.add(eos["content"] if isinstance(eos, dict) else eos)
            found.update(t["content"] for t in settings.get("added_tokens_decoder", {}).values()
                         if t["content"] in ("<|im_end|>", "<|endoftext|>"))
    return sorted(t for t in found if t)


@pytest.mark.parametrize("name", PAPER_TASKS)
@pytest.mark.parametrize("end", _end_of_turn_tokens())
def test_nothing_after_the_end_of_the_turn_is_read(name, end):
    """Text after an end-of-turn token (padding, a second turn) never changes a reward or a grade:
    every completion scores what the text before its first end-of-turn token scores."""
    row, answer = ROWS[name]
    wrong = {"gsm8k": "\\boxed{17}", "math": "\\boxed{17}", "countdown": "3 * 6 - 9 = 9", "sudoku": "1" * 16}[name]
    heads = [
        f"<think>w</think><answer>{answer}</answer>",
        f"<think>w</think><answer>{answer}",
        "<think>w</think>",
        "<think>w",
        "",
        f"<answer>{wrong}</answer>",
        f"so \\boxed{{{answer}}}" if name in ("gsm8k", "math") else "no answer",
    ]
    tails = [
        f"<answer>{wrong}</answer>",
        f"<think>x</think><answer>{answer}</answer>",
        f"</answer><answer>{wrong}",
        f"\\boxed{{{wrong}}}",
        f"<|endoftext|>{end}<answer>{answer}</answer>",
        f"\n{end}" * 3,
    ]
    for head in heads:
        expected = scores(name, head, row)
        for tail in tails:
            got = scores(name, head + end + tail, row)
            assert got == expected, (name, end, head, tail)
    # the marks before the end are what they would be without it (full marks stay full)
    assert scores(name, heads[0] + end + tails[0], row) == full_marks(name)


# -- MATH: the levels trained on --------------------------------------------------------------------

class FakeHub:
    def __init__(self, data):
        self.data = data

    def __call__(self, name, config=None, split=None):
        if (name, split) not in self.data:
            raise FileNotFoundError(f"Dataset {name} doesn't exist on the Hub")
        return list(self.data[(name, split)])


def test_math_trains_on_levels_one_to_four_only(monkeypatch):
    """The MATH training rows are the problems of levels 1 to 4 (the paper's choice: level 5 is
    left out) with a boxed reference, minus MATH-500's; a problem of unknown level is left out."""
    import datasets

    spellings = (lambda n: f"Level {n}", lambda n: n, lambda n: f"level {n}", lambda n: str(n))
    train, kept = [], []
    for level in range(1, 6):
        for k, spell in enumerate(spellings):
            problem = f"problem of level {level}, #{k}"
            train.append({"problem": problem, "solution": f"so \\boxed{{{level}{k}}}", "level": spell(level),
                          "type": "Algebra"})
            if level <= 4:
                kept.append(problem)
    train += [
        {"problem": "unknown level", "solution": "\\boxed{1}", "level": "Level ?", "type": "Algebra"},
        {"problem": "no level", "solution": "\\boxed{1}", "type": "Algebra"},
        {"problem": "no box", "solution": "it is 3", "level": "Level 2", "type": "Algebra"},
        {"problem": "in the test set", "solution": "\\boxed{2}", "level": "Level 1", "type": "Algebra"},
    ]
    test = [{"problem": "in the test set", "solution": "\\boxed{2}", "answer": "2", "level": 1}]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets, "load_dataset", FakeHub({
        ("qwedsacf/competition_math", "train"): train, ("HuggingFaceH4/MATH-500", "test"): test,
    }))
    rows = tasks.get("math").load("train")
    assert sorted(r["problem"] for r in rows) == sorted(kept)
    assert Counter(int(str(r["level"])[-1]) for r in rows) == {1: 4, 2: 4, 3: 4, 4: 4}
    assert sorted(r["problem"] for r in tasks.get("math").train_examples(100, seed=0)) == sorted(kept)


# -- Countdown: each number exactly once -------------------------------------------------------------

MULTISETS = [(3, 6, 9), (5, 5, 7), (2, 2, 2), (1, 10, 10), (4, 8, 15, 16), (7, 7, 3, 3)]


def _variants(nums: tuple[int, ...]) -> list[list[int]]:
    """Number lists an answer might use: every arrangement of `nums`, and lists one edit away
    (a number repeated, dropped, replaced, or one of a pair swapped for the other)."""
    out = {tuple(p) for p in itertools.permutations(nums)}
    for i in range(len(nums)):
        out.add(nums + (nums[i],))
        out.add(nums[:i] + nums[i + 1 :])
        for value in sorted(set(nums) | {nums[i] + 1}):
            out.add(nums[:i] + (value,) + nums[i + 1 :])
    return [list(v) for v in sorted(out) if v]


@pytest.mark.parametrize("nums", MULTISETS, ids=str)
def test_countdown_credits_numbers_only_when_each_is_used_exactly_once(nums):
    """The format reward's third for the numbers and the correctness reward both need the numbers
    of the expression to be the given ones as a multiset: a number used twice, or one of a pair
    used for both, earns neither, in any order of writing."""
    task = tasks.get("countdown")
    target = sum(nums)
    seen_same_set = 0
    for used in _variants(nums):
        same = Counter(used) == Counter(nums)
        seen_same_set += set(used) == set(nums) and not same
        expression = " + ".join(map(str, used))
        completion = f"<think>w</think><answer>{expression} = {target}</answer>"
        got = scores("countdown", completion, {"nums": list(nums), "target": target})
        # the right side is the target (1/3) and the left side is well formed (1/3)
        assert got["countdown_format"] == pytest.approx(2 / 3 + (1 / 3 if same else 0.0)), used
        assert got["countdown_correct"] == float(same and sum(used) == target), used
        assert got["grade"] == got["countdown_correct"]
        assert task.grade(f"<answer>\\boxed{{{expression}}} = {target}</answer>", nums=list(nums),
                          target=target) == float(same), used
    assert seen_same_set > 0  # some variants use the same set of numbers with other counts


# -- hostile text costs time linear in its length ----------------------------------------------------

def _payloads(n: int) -> dict[str, str]:
    """Text of about n characters of the kinds that make a careless scan quadratic."""
    return {
        "digits": "9" * n,
        "digits and spaces": "1 " * (n // 2),
        "a long sum": "1+" * (n // 2) + "1",
        "open brackets": "(" * n,
        "answer tags": "<answer>" * (n // 8),
        "boxes": "\\boxed{" * (n // 7),
        "exponents": "2^" * (n // 2) + "2",
    }


def _wrap(name: str, payload: str) -> list[str]:
    target = ROWS[name][0].get("target", "18")
    return [f"<answer>{payload}</answer>", f"<answer>\\boxed{{{payload}}}</answer>",
            f"<answer>{payload} = {target}</answer>", f"\\boxed{{{payload}}}"]


def _seconds(name: str, texts: list[str]) -> float:
    row = ROWS[name][0]
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for text in texts:
            scores(name, text, row)
        best = min(best, time.perf_counter() - t0)
    return best


@pytest.mark.parametrize("name", PAPER_TASKS)
def test_grading_hostile_text_grows_linearly(name, monkeypatch):
    """Beyond the 1,000 characters a math answer may have, reading, pre-checking and grading
    hostile text costs time linear in its length, from 1,250 to 80,000 characters: at every size
    at most 4x the per-character cost of the longest, and 4x the text at most about 4x the time
    (a 20,000-digit answer through a quadratic scan costs seconds). math-verify itself is left out
    (it has its own time limit): only what runs before it is timed."""
    monkeypatch.setattr(mathcheck, "_checked", lambda gold, answer: False)
    sizes = (1_250, 2_500, 5_000, 10_000, 20_000, 40_000, 80_000)
    noise = 0.005  # seconds: timings below this say nothing on a busy machine

    def linear(times) -> str | None:
        per_char = times[-1] / sizes[-1]
        for n, seconds in zip(sizes, times):
            if seconds > 4 * per_char * n + noise:
                return f"{n} chars take {seconds:.4f} s, {sizes[-1]} chars {times[-1]:.4f} s"
        if times[-1] > 8 * max(times[-3], noise):
            return f"{sizes[-3]} chars take {times[-3]:.4f} s, {sizes[-1]} chars {times[-1]:.4f} s"
        return None

    for kind in _payloads(10):
        times = [float("inf")] * len(sizes)
        for _ in range(3):  # a busy machine can slow one measurement; a quadratic step is slow every time
            for i, n in enumerate(sizes):  # shortest first: a quadratic step fails here before it costs minutes
                seconds = _seconds(name, _wrap(name, _payloads(n)[kind]))
                assert seconds < 1.0, (name, kind, n, seconds)
                times[i] = min(times[i], seconds)
            problem = linear(times)
            if problem is None:
                break
        assert problem is None, f"{name}, {kind}: {problem}"
