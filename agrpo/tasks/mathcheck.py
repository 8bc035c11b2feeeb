"""Is a math answer equal to the reference? math-verify, under a time limit that holds anywhere.

math-verify turns LaTeX into sympy and compares the two (fractions, decimals, percentages,
thousands separators, units in `\\text{}`, sets, intervals). Its own time limit is
`signal.alarm`, which exists only in the main thread of the main interpreter, and a signal
cannot interrupt a long C-level computation anyway (sympy evaluating `10^{10^{10}}` sits in
one big-integer power for minutes). So the comparison runs in a separate process:

    this process --(stdin/stdout, one JSON line each way)--> server (imports math-verify once)
    server --(pipe)--> checker, a fork of the server; killed and re-forked when it runs over

The server is single-threaded, so forking it is safe and quick (~5 ms, math-verify already
imported), whatever threads the training process runs; the caller waits with `select`, which
works in any thread. A check that runs over `TIME_LIMIT_S` counts as not equal. Cheap
pre-checks send nothing that is sure to blow up (answers longer than `MAX_ANSWER_CHARS`,
power towers, huge exponents or factorials), which keeps time-outs rare.
"""

from __future__ import annotations

import functools
import json
import os
import re
import select
import subprocess
import sys
import threading

from agrpo.errors import AgrpoError
from agrpo.tasks.reasoning import (
    ReasoningTask,
    RewardTerm,
    answer_format,
    answer_region,
    column,
    row_field,
    think_format,
    unbox,
)

# MATH-500's longest reference answer has 53 characters; a model answer 20x longer than
# that is not a final answer
MAX_ANSWER_CHARS = 1000
TIME_LIMIT_S = 0.5
# the checker's address space: enough for sympy, small enough that a runaway big-integer
# computation fails with MemoryError before it slows the machine
CHECKER_MEMORY_BYTES = 2 * 2**30
# how long the caller waits for the server beyond the time limit (re-forking the checker)
SERVER_GRACE_S = 10.0
# the first answer also pays for starting the server and importing math-verify and sympy
STARTUP_S = 60.0

# 9^{9^9}, 9**9**9, 9^(9^9): a tower of numeric powers is astronomically large (symbols,
# as in 2^{2^n}, are left alone: nothing is computed)
_TOWER = re.compile(r"\d\s*(\^|\*\*)\s*[{(]?\s*\d+\s*(\^|\*\*)")
# an exponent or factorial argument with 5+ digits (10^{10000} is already 10,000 digits)
_BIG_EXPONENT = re.compile(r"(\^|\*\*)\s*[{(]?\s*[-+]?\d{5,}|\d{5,}\s*!|\\(?:tbinom|binom|dbinom)\s*\{\s*\d{5,}")


# sympy's LaTeX parser recurses per bracket and slows down sharply past a few dozen levels;
# real answers nest a handful
MAX_NESTING = 24


def _nesting(text: str) -> int:
    depth = deepest = 0
    for ch in text:
        if ch in "({[":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in ")}]":
            depth -= 1
    return deepest


def _hopeless(text: str) -> bool:
    return (
        len(text) > MAX_ANSWER_CHARS or bool(_TOWER.search(text)) or bool(_BIG_EXPONENT.search(text))
        or _nesting(text) > MAX_NESTING
    )


# ---- the server and its checker (run in the separate process) ----------------------------

def _equal(gold: str, answer: str) -> bool:
    from math_verify import parse, verify

    # the time limits are ours (the checker is killed), so math-verify's signal alarms stay off
    parsed_gold = parse(f"${gold}$", parsing_timeout=None)
    parsed_answer = parse(f"${answer}$", parsing_timeout=None)
    return bool(verify(parsed_gold, parsed_answer, timeout_seconds=None))


def _checker_loop(conn) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (CHECKER_MEMORY_BYTES, CHECKER_MEMORY_BYTES))
    while True:
        try:
            gold, answer = conn.recv()
        except (EOFError, OSError):
            os._exit(0)
        try:
            result = _equal(gold, answer)
        except BaseException:  # noqa: BLE001 - MemoryError, RecursionError, sympy's own errors: not equal
            result = False
        conn.send(result)


def _fork_checker():
    from multiprocessing.connection import Pipe

    server_end, checker_end = Pipe()
    pid = os.fork()
    if pid == 0:
        server_end.close()
        _checker_loop(checker_end)
    checker_end.close()
    return pid, server_end


def _kill(pid: int) -> None:
    try:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _serve() -> None:
    import logging

    import math_verify  # noqa: F401 - imported once here, shared by every forked checker

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns that its timeouts are off
    # the LaTeX parser builds itself on first use (~0.3 s): once here, inherited by every fork
    _equal("1", "\\frac{2}{2}")
    pid, conn = _fork_checker()
    for line in sys.stdin:
        gold, answer, limit = json.loads(line)
        conn.send((gold, answer))
        result = None
        if conn.poll(limit):
            try:
                result = conn.recv()
            except (EOFError, OSError):
                pass
        if result is None:  # ran over, or died (out of memory): replace it
            _kill(pid)
            conn.close()
            pid, conn = _fork_checker()
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    _kill(pid)


# ---- the caller's side ---------------------------------------------------------------------

class _Server:
    def __init__(self):
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.pending = b""
        self.first = True
        self.timeouts = 0

    def _start(self) -> None:
        import importlib.util

        if importlib.util.find_spec("math_verify") is None:
            # without it every answer would silently count as wrong
            raise AgrpoError("checking math answers needs math-verify: pip install math-verify")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agrpo.tasks.mathcheck"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, env=env,
        )
        self.pending = b""
        self.first = True

    def _stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def _read_line(self, wait_s: float) -> bytes | None:
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.pending:
            ready, _, _ = select.select([fd], [], [], wait_s)
            if not ready:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return line

    def equal(self, gold: str, answer: str, limit: float) -> bool | None:
        """True/False, or None when the check ran over `limit`."""
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            try:
                self.proc.stdin.write((json.dumps([gold, answer, limit]) + "\n").encode())
                self.proc.stdin.flush()
                line = self._read_line(limit + (STARTUP_S if self.first else SERVER_GRACE_S))
            except OSError:
                line = None
            if line is None:
                self._stop()
                return None
            self.first = False
            result = json.loads(line)
            if result is None:
                self.timeouts += 1
            return result


_SERVER = _Server()


def answers_equal(gold: str, answer: str) -> bool:
    """Whether `answer` (LaTeX or plain) is mathematically equal to `gold`. No answer makes it
    raise; a missing math-verify does (AgrpoError), rather than scoring everything wrong.

    An answer that cannot be checked within TIME_LIMIT_S, or is longer than
    MAX_ANSWER_CHARS, is not equal. Safe to call from any thread or worker process.
    """
    if not isinstance(gold, str) or not isinstance(answer, str):
        return False
    gold, answer = gold.strip(), answer.strip()
    if not answer or not gold or _hopeless(answer) or len(gold) > MAX_ANSWER_CHARS:
        return False
    return answer == gold or _checked(gold, answer)


# a group of completions often repeats an answer, and an answer that ran over would run
# over again; keys are short (MAX_ANSWER_CHARS)
@functools.lru_cache(maxsize=1 << 16)
def _checked(gold: str, answer: str) -> bool:
    return bool(_SERVER.equal(gold, answer, TIME_LIMIT_S))


def _without_unit_words(answer: str) -> str:
    """`800 ml` -> `800`, `5 books` -> `5`: plain words after the answer name its unit
    (math-verify reads units only inside `\\text{}`)."""
    words = answer.split()
    while len(words) > 1 and words[-1].rstrip(".").isascii() and words[-1].rstrip(".").isalpha():
        words.pop()
    return " ".join(words)


def math_answer_correct(completion, gold) -> bool:
    """The check of gsm8k and math: the first `\\boxed{}` of the answer region (the whole
    region without one) equals `gold`, with or without plain unit words after it."""
    region = answer_region(completion)
    if region is None:
        return False
    answer = unbox(region)
    if answers_equal(str(gold), answer):
        return True
    bare = _without_unit_words(answer)
    return bare != answer and answers_equal(str(gold), bare)


def math_correct(prompts, completions, **columns) -> list[float]:
    """1.0 if the answer equals the `answer` column, else 0.0."""
    gold = column(columns, "answer", len(completions))
    return [float(math_answer_correct(c, g)) for c, g in zip(completions, gold)]


# AGRPO.md §4: 0.5 for a think block, 0.5 for an answer block, 3.0 for the right answer
MATH_REWARDS = (
    RewardTerm("think_format", think_format, 0.5),
    RewardTerm("answer_format", answer_format, 0.5),
    RewardTerm("math_correct", math_correct, 3.0),
)

MATH_SYSTEM_PROMPT = r"""You will be given a math problem. Work it out step by step inside <think> </think> tags. Then give the final answer inside <answer> </answer> tags, with only the final number or expression written in \boxed{}:
<think>
step-by-step reasoning
</think>
<answer>
\boxed{final answer}
</answer>"""


class MathAnswerTask(ReasoningTask):
    """gsm8k and math: the problem in one column, the reference in `answer`, the shared
    math prompt and rewards, graded 1.0 / 0.0 by `math_answer_correct`."""

    system_prompt = MATH_SYSTEM_PROMPT
    rewards = MATH_REWARDS
    question_column = "question"

    def key(self, row: dict) -> str:
        return " ".join(row[self.question_column].split())

    def user_message(self, row: dict) -> str:
        return row[self.question_column]

    def grade(self, completion, **row) -> float:
        return float(math_answer_correct(completion, row_field(row, "answer", self.name)))


if __name__ == "__main__":
    _serve()
