"""tiny-countdown: Countdown in a 16-character dialect, for the shipped tiny models.

Combine the given numbers with + - * / and parentheses to hit a target.

Prompt: "a,b,c:target=" ("30,100,93:23="). Completion: an expression that uses each given
number exactly once ("100-93+30" would be 37). Spaces are ignored; there is no unary minus
and numbers are written without leading zeros, as in the prompt.

Expressions are parsed by a small recursive-descent parser (never `eval`) and computed with
exact fractions, so 3/(1/5) equals 15 and a division by zero makes the expression invalid.

grade: 1.0 if the expression is valid, uses exactly the given numbers and equals the target,
else 0.0. reward: the same 1.0, 0.1 for a valid expression over exactly the given numbers
that misses the target (it learned the format), 0.0 otherwise.

Problems come from reasoning_gym's `countdown` generator, whose mix (mostly + and -, some
* and /) matches the published three-number test split (85% vs 87% of problems solvable
with + and - alone). It builds each problem with sympy, so a kept problem costs ~3 ms: the
20,000-problem training pool takes about a minute on one core the first time; later requests
in the same process reuse it.
"""

from __future__ import annotations

import itertools
from fractions import Fraction

from agrpo.errors import AgrpoError
from agrpo.tasks.base import Task
from agrpo.tasks.reasoning import read_jsonl, row_field

# an expression over three numbers up to 100 is at most 13 characters (three 3-digit
# numbers, two operators, one pair of parentheses); 16 leaves room to spare
COMPLETION_CHARS = 16
# the published test split: three numbers from 1 to 100, targets from 1 to 100
MIN_VALUE, MAX_VALUE, MIN_TARGET, MAX_TARGET = 1, 100, 1, 100
# bounds the parser's work on arbitrary model output
MAX_EXPRESSION_CHARS = 256
MAX_DEPTH = 32
VALID_REWARD = 0.1

_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_ATOM = 3


class _Invalid(Exception):
    pass


class _Parser:
    """expr := term (('+'|'-') term)*; term := factor (('*'|'/') factor)*; factor := number | '(' expr ')'.

    Builds a tree of ints (leaves) and (op, left, right) tuples.
    """

    def __init__(self, text: str):
        self.tokens = self._tokenize(text)
        self.pos = 0

    @staticmethod
    def _tokenize(text: str) -> list:
        tokens, i = [], 0
        while i < len(text):
            ch = text[i]
            if ch == " ":
                i += 1
            elif ch in "+-*/()":
                tokens.append(ch)
                i += 1
            elif "0" <= ch <= "9":
                j = i
                while j < len(text) and "0" <= text[j] <= "9":
                    j += 1
                if text[i] == "0" and j - i > 1:
                    raise _Invalid
                tokens.append(int(text[i:j]))
                i = j
            else:
                raise _Invalid
        return tokens

    def _peek(self):
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def parse(self):
        tree = self._expr(0)
        if self.pos != len(self.tokens):
            raise _Invalid
        return tree

    def _expr(self, depth: int):
        tree = self._term(depth)
        while self._peek() in ("+", "-"):
            op = self.tokens[self.pos]
            self.pos += 1
            tree = (op, tree, self._term(depth))
        return tree

    def _term(self, depth: int):
        tree = self._factor(depth)
        while self._peek() in ("*", "/"):
            op = self.tokens[self.pos]
            self.pos += 1
            tree = (op, tree, self._factor(depth))
        return tree

    def _factor(self, depth: int):
        tok = self._peek()
        self.pos += 1
        if isinstance(tok, int):
            return tok
        if tok == "(" and depth < MAX_DEPTH:
            tree = self._expr(depth + 1)
            if self._peek() != ")":
                raise _Invalid
            self.pos += 1
            return tree
        raise _Invalid


def _leaves(tree) -> list[int]:
    if isinstance(tree, int):
        return [tree]
    return _leaves(tree[1]) + _leaves(tree[2])


def _apply(op: str, a: Fraction, b: Fraction) -> Fraction:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0:
        raise _Invalid
    return a / b


def _value(tree) -> Fraction:
    if isinstance(tree, int):
        return Fraction(tree)
    return _apply(tree[0], _value(tree[1]), _value(tree[2]))


def check_expression(completion, numbers) -> tuple[bool, Fraction | None]:
    """(uses exactly `numbers` and is a valid expression, its value or None).

    Never raises: anything that is not such an expression gives (False, None).
    """
    if not isinstance(completion, str) or len(completion) > MAX_EXPRESSION_CHARS:
        return False, None
    try:
        tree = _Parser(completion).parse()
        # compared before computing, so arbitrary numbers in garbage are never multiplied out
        if sorted(_leaves(tree)) != sorted(int(n) for n in numbers):
            return False, None
        return True, _value(tree)
    except (_Invalid, TypeError, ValueError):
        return False, None


def score_countdown(completion, numbers, target) -> tuple[float, float]:
    """(grade, reward) of one completion."""
    valid, value = check_expression(completion, numbers)
    if not valid:
        return 0.0, 0.0
    if value == Fraction(int(target)):
        return 1.0, 1.0
    return 0.0, VALID_REWARD


def _format(op: str, left: tuple[str, int], right: tuple[str, int]) -> tuple[str, int]:
    """Join two (text, precedence) parts with the fewest parentheses that keep the value."""
    prec = _PRECEDENCE[op]
    ltext = left[0] if left[1] >= prec else f"({left[0]})"
    # a+(b-c) = a+b-c and a*(b/c) = a*b/c exactly, so equal precedence only needs brackets
    # after - and /
    needs = right[1] < prec or (right[1] == prec and op in "-/")
    rtext = f"({right[0]})" if needs else right[0]
    return ltext + op + rtext, prec


def _trees(values: tuple[int, ...]):
    """(value, text, precedence) of every expression over `values` in this order."""
    if len(values) == 1:
        yield Fraction(values[0]), str(values[0]), _ATOM
        return
    for cut in range(1, len(values)):
        for lv, lt, lp in _trees(values[:cut]):
            for rv, rt, rp in _trees(values[cut:]):
                for op in "+-*/":
                    if op == "/" and rv == 0:
                        continue
                    text, prec = _format(op, (lt, lp), (rt, rp))
                    yield _apply(op, lv, rv), text, prec


def solve(numbers, target) -> str | None:
    """The shortest expression (first found among equals) over `numbers` equal to `target`, or None."""
    goal = Fraction(int(target))
    best = None
    for order in dict.fromkeys(itertools.permutations(int(n) for n in numbers)):
        for value, text, _ in _trees(order):
            if value == goal and (best is None or len(text) < len(best)):
                best = text
    return best


def make_row(numbers, target: int) -> dict:
    numbers = [int(n) for n in numbers]
    return {"prompt": f"{','.join(map(str, numbers))}:{int(target)}=", "numbers": numbers, "target": int(target)}


class TinyCountdownTask(Task):
    """Three numbers from [min_value, max_value] and a target from [min_target, max_target]."""

    name = "tiny-countdown"
    stream_name = "countdown"
    completion_chars = COMPLETION_CHARS

    def __init__(self, min_value: int = MIN_VALUE, max_value: int = MAX_VALUE, min_target: int = MIN_TARGET,
                 max_target: int = MAX_TARGET, held_out=None):
        for label, value in (("min_value", min_value), ("max_value", max_value),
                             ("min_target", min_target), ("max_target", max_target)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise AgrpoError(f"{label} must be a positive integer, got {value!r}")
        if min_value > max_value or min_target > max_target:
            raise AgrpoError(
                f"empty range: values {min_value}..{max_value}, targets {min_target}..{max_target}: "
                "each minimum must be at most its maximum"
            )
        self.min_value, self.max_value = min_value, max_value
        self.min_target, self.max_target = min_target, max_target
        super().__init__(held_out)

    def key(self, row: dict) -> str:
        # the order the numbers are listed in does not make a different problem
        return f"{sorted(int(n) for n in row['numbers'])}:{int(row['target'])}"

    def _settings(self) -> tuple:
        return (self.min_value, self.max_value, self.min_target, self.max_target)

    def _source(self, stream_seed: int):
        # imported here: reasoning_gym loads all its generators (and sympy) on import
        from reasoning_gym.games.countdown import CountdownConfig, CountdownDataset

        data = CountdownDataset(CountdownConfig(
            min_numbers=3, max_numbers=3, min_value=self.min_value, max_value=self.max_value,
            min_target=self.min_target, max_target=self.max_target, seed=stream_seed, size=1,
        ))

        def draw(index: int) -> dict | None:
            try:
                meta = data[index]["metadata"]
            except (ValueError, ZeroDivisionError, TypeError):  # no expression within the target range
                return None
            row = make_row(meta["numbers"], meta["target"])
            # reasoning_gym's own answer is sympy's rendering (spaces, sometimes a leading
            # unary minus), so the reference comes from our solver; it must fit the budget
            solution = solve(row["numbers"], row["target"])
            if solution is None or len(solution) > self.completion_chars:
                return None
            return row

        return draw

    def grade(self, completion: str, **row) -> float:
        return self._score(completion, row)[0]

    def reward(self, prompts: list[str], completions: list[str], **columns) -> list[float | None]:
        rows = self._rows(prompts, completions, columns)
        return [self._score(c, r)[1] for c, r in zip(completions, rows)]

    def _score(self, completion, row: dict) -> tuple[float, float]:
        return score_countdown(completion, row_field(row, "numbers", self.name), row_field(row, "target", self.name))

    def target(self, row: dict) -> str:
        solution = solve(row_field(row, "numbers", self.name), row_field(row, "target", self.name))
        if solution is None:
            raise AgrpoError(f"no expression over {row['numbers']} reaches {row['target']}: drop this problem")
        return solution

    def _read(self, path) -> list[dict]:
        return load_countdown_jsonl(path)


def load_countdown_jsonl(path) -> list[dict]:
    """Rows of a JSON-lines file of {"input": "a,b,c", "output": "target"} objects."""
    rows = []
    for where, obj in read_jsonl(path, "Countdown", '{"input": "30,100,93", "output": "23"}'):
        if "input" not in obj or "output" not in obj:
            raise AgrpoError(f"{where}: each line needs \"input\" and \"output\" keys")
        try:
            numbers = [int(str(v).strip()) for v in str(obj["input"]).split(",")]
            target = int(str(obj["output"]).strip())
        except ValueError:
            raise AgrpoError(
                f"{where}: input must be comma-separated integers and output an integer, "
                f"got {obj['input']!r}, {obj['output']!r}"
            ) from None
        if len(numbers) < 2 or min(numbers) < 0:
            raise AgrpoError(f"{where}: input needs at least two non-negative numbers, got {obj['input']!r}")
        rows.append(make_row(numbers, target))
    return rows
