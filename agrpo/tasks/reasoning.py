"""What the natural-language reasoning tasks (gsm8k, math, countdown, sudoku) share.

A completion is read the way the paper's prompts ask for it:

    <think> reasoning </think>            (or <reasoning> ... </reasoning>)
    <answer> final answer </answer>       (math: \\boxed{} inside)

* The text is cut at the first end-of-turn token (`<|eot_id|>`, `<|endoftext|>`, `<|role_end|>`,
  `<|im_end|>`, ...): what a model writes after its turn ended, padding included, is not
  part of the answer.
* The answer region is the first `<answer>` block. A block opened but never closed runs to
  the end of the turn (a completion cut by the length limit keeps what it wrote).
* Without an `<answer>` tag, the answer is the last `\\boxed{}` of the turn, an explicit
  final-answer mark the prompts ask for (LLaDA-8B-Instruct often drops the opening tag and
  ends with `\\boxed{6}`: refusing those would score its GSM8K output 9 points below d1's
  grader). Without either there is no answer and the correctness terms are 0. The official
  AGRPO parser grades the whole text instead, so any number or expression written while
  reasoning can count as the answer: the correctness reward is then earned by text that
  never says what its answer is.
* Tags match in any letter case; whitespace around them does not matter. Only the first
  MAX_COMPLETION_CHARS characters are read, and every scan is linear, so runaway or hostile
  text costs milliseconds.

Every task defines one answer check; its correctness reward and its grader call it, so
"correct" means the same in training and in evaluation.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
from pathlib import Path
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlparse

from agrpo.errors import AgrpoError
from agrpo.tasks.base import FILE_KEYS, check_file

END_OF_TURN = (
    "<|eot_id|>", "<|endoftext|>", "<|im_end|>", "<|role_end|>", "<|end_of_text|>", "<|end|>", "<|eos|>", "</s>", "<eos>",
)
# the shared "<" lets the regex engine skip ahead with a fast literal scan
_END_OF_TURN = re.compile("<(?:" + "|".join(re.escape(t[1:]) for t in END_OF_TURN) + ")")
# a hundred times the paper's longest completions (512 tokens): what a runaway completion
# writes beyond this is not read, which bounds the work on hostile text
MAX_COMPLETION_CHARS = 200_000
_ANSWER_OPEN = re.compile(r"<answer>", re.IGNORECASE)
_ANSWER_CLOSE = re.compile(r"</answer>", re.IGNORECASE)
# the backslash is optional: "boxed{4}" is a slip of the same mark, not prose
_BOXED = re.compile(r"\\?(?:boxed|fbox)\s*\{")
_BOX_NAME_BEFORE = re.compile(r"\\?(?:boxed|fbox)\s{0,8}$")
_BRACE = re.compile(r"[{}]")


def completion_text(completion) -> str:
    """The text of a completion: a string, or TRL's conversational form (a list of messages)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content")
        return content if isinstance(content, str) else ""
    return ""


def end_turn(text: str) -> str:
    """`text` up to its first end-of-turn token (and at most MAX_COMPLETION_CHARS)."""
    text = text[:MAX_COMPLETION_CHARS]
    match = _END_OF_TURN.search(text)
    return text[: match.start()] if match else text


def has_think_block(completion) -> bool:
    """A `<think>...</think>` (or `<reasoning>...</reasoning>`) pair, in that order."""
    text = end_turn(completion_text(completion))
    # only the first opening tag of each kind needs trying: if no closing tag follows the
    # first, none follows a later one (and trying each would cost O(n^2) on hostile text)
    for kind in ("think", "reasoning"):
        opening = re.search(f"<{kind}>", text, re.IGNORECASE)
        if opening and re.compile(f"</{kind}>", re.IGNORECASE).search(text, opening.end()):
            return True
    return False


def has_answer_block(completion) -> bool:
    """An `<answer>...</answer>` pair, in that order."""
    text = end_turn(completion_text(completion))
    opening = _ANSWER_OPEN.search(text)
    return bool(opening and _ANSWER_CLOSE.search(text, opening.end()))


def boxed_spans(text: str) -> list[tuple[int, int, int]]:
    """(start of `\\boxed`, start of content, end of content) of every balanced `\\boxed{...}`,
    in order of their start. One pass over the braces, so hostile text (thousands of
    unclosed `\\boxed{`) costs linear time."""
    spans, stack = [], []
    # a scan over the braces alone (a fast character-class search); a "{" opens a box when
    # the box's name ends just before it
    for match in _BRACE.finditer(text):
        i = match.start()
        if text[i] == "}":
            if stack:
                opened = stack.pop()
                if opened is not None:
                    spans.append((opened[0], opened[1], i))
        else:
            name = _BOX_NAME_BEFORE.search(text, max(0, i - 16), i)
            stack.append((name.start(), i + 1) if name else None)
    return sorted(spans)


def answer_region(completion) -> str | None:
    """Where the answer is read, stripped: the inside of the first `<answer>` block; without
    an `<answer>` tag, the last `\\boxed{}` of the turn; without either, None."""
    text = end_turn(completion_text(completion))
    opening = _ANSWER_OPEN.search(text)
    if opening is None:
        spans = boxed_spans(text)
        return text[spans[-1][1] : spans[-1][2]].strip() if spans else None
    closing = _ANSWER_CLOSE.search(text, opening.end())
    return text[opening.end() : closing.start() if closing else len(text)].strip()


def unbox(text: str) -> str:
    """The content of the first `\\boxed{}` of `text`; `text` itself without one.

    Slips seen in real output are read as meant: an empty `\\boxed{}101` gives the text
    around it, an unclosed `\\boxed{30` (the closing brace forgotten before `</answer>`)
    gives what follows it."""
    spans = boxed_spans(text)
    if spans:
        start, content_start, content_end = spans[0]
        content = text[content_start:content_end].strip()
        return content or (text[:start] + text[content_end + 1 :]).strip()
    opened = _BOXED.search(text)
    return text[opened.end() :].strip() if opened else text


def unwrap_boxed(text: str) -> str:
    """`text` with its first `\\boxed{...}` replaced by the content (`\\boxed{a} = b` -> `a = b`)."""
    spans = boxed_spans(text)
    if not spans:
        return text
    start, content_start, content_end = spans[0]
    return text[:start] + text[content_start:content_end] + text[content_end + 1 :]


# ---- rewards in TRL's convention ----------------------------------------------------------

@dataclass(frozen=True)
class RewardTerm:
    """One named reward function `fn(prompts, completions, **columns) -> list[float | None]`
    and its weight in the task's total reward. A term is itself such a function, named by its
    `__name__`, so `reward_funcs=list(task.rewards)` with `reward_weights=[t.weight for t in
    task.rewards]` hands a task's reward to TRL's trainers as it is."""

    name: str
    fn: Callable
    weight: float

    def __post_init__(self):
        object.__setattr__(self, "__name__", self.name)  # what TRL logs a reward function as

    def __call__(self, prompts, completions, **columns) -> list[float | None]:
        return self.fn(prompts, completions, **columns)


def think_format(prompts, completions, **columns) -> list[float]:
    """1.0 if the completion holds a think (or reasoning) block, else 0.0."""
    return [float(has_think_block(c)) for c in completions]


def answer_format(prompts, completions, **columns) -> list[float]:
    """1.0 if the completion holds an answer block, else 0.0."""
    return [float(has_answer_block(c)) for c in completions]


def column(columns: dict, name: str, n: int) -> list:
    """A dataset column aligned with the `n` completions, or a one-line error."""
    if name not in columns:
        raise AgrpoError(f"this reward needs a {name!r} column, got columns {sorted(columns)}: pass the task's rows")
    values = list(columns[name])
    if len(values) != n:
        raise AgrpoError(f"column {name!r} has {len(values)} values for {n} completions: align the columns")
    return values


def row_field(row: dict, name: str, task: str):
    """A column of one row, or a one-line error naming the columns the row has."""
    if name not in row:
        raise AgrpoError(
            f"{task} rows need a {name!r} column, got columns {sorted(row)}: use rows from the task's load"
        )
    return row[name]


# ---- data ---------------------------------------------------------------------------------

def read_jsonl(path, describe: str, example: str) -> list[tuple[str, dict]]:
    """(location, object) for every non-empty line of a JSON-lines file."""
    path = Path(path)
    if not path.is_file():
        raise AgrpoError(f"no {describe} file at {path}: pass the path of a JSON-lines file of {example} objects")
    out = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                raise AgrpoError(f"{where}: not valid JSON: each line must be one object like {example}") from None
            if not isinstance(obj, dict):
                raise AgrpoError(f"{where}: each line must be one object like {example}")
            out.append((where, obj))
    if not out:
        raise AgrpoError(f"{path} holds no problems: add one JSON object a line")
    return out


def _hub_host() -> str:
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except ImportError:
        endpoint = "https://huggingface.co"
    return urlparse(endpoint).hostname or "huggingface.co"


def hub_records(name: str, split: str, config: str | None = None) -> list[dict]:
    """A public dataset's split from the Hugging Face hub, as a list of records."""
    try:
        import datasets
    except ImportError:
        raise AgrpoError(
            f"loading {name} needs the datasets package: pip install datasets, or pass {FILE_KEYS.get(split, 'a local file')}"
        ) from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes") or os.environ.get(
        "HF_DATASETS_OFFLINE", ""
    ).lower() in ("1", "true", "yes")
    if not offline:
        # the hub client retries an unreachable host for ~30 s; one quick probe says it at once
        host = _hub_host()
        try:
            socket.create_connection((host, 443), timeout=5).close()
        except OSError:
            raise AgrpoError(
                f"cannot reach {host} to download {name}: pass a local file, {FILE_KEYS.get(split, '')}, "
                "or set HF_HUB_OFFLINE=1 to use a copy already in the datasets cache"
            ) from None
    try:
        data = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001 - network, cache and schema errors all mean "not available"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = " (offline: only datasets already in the cache load)" if offline else ""
        raise AgrpoError(
            f"could not load {name} ({split}) from the hub{hint}: {first[:200]}: pass a local file instead, {FILE_KEYS.get(split, '')}"
        ) from None
    return [dict(r) for r in data]


class ReasoningTask:
    """Base of the natural-language tasks: `load`, `prompt`, `rewards`, `grade`.

    Subclasses set `name`, `system_prompt` and implement `key`, `user_message`, `grade`,
    `rewards`, `_read(path)` (the public file format) and `_hub(split)`.
    `held_out`: rows, or the path of a test file, whose problems never appear in "train".
    """

    name = ""
    system_prompt = ""
    character_level = False
    splits = ("train", "test")

    def __init__(self, held_out=None):
        if isinstance(held_out, (str, Path)):
            check_file(self.name, held_out, "held_out")
            held_out = self._read(held_out)
        self._held_out = frozenset(self.key(r) for r in held_out or ())
        self._cache: dict[tuple, list[dict]] = {}

    @property
    def excluded(self) -> frozenset:
        return self._held_out

    # ---- what a subclass provides -------------------------------------------------------

    def key(self, row: dict) -> str:
        raise NotImplementedError

    def user_message(self, row: dict) -> str:
        raise NotImplementedError

    def baselines(self, rows: list[dict]) -> dict[str, float]:
        """Reference accuracies that need no model: none for the paper's tasks."""
        return {}

    def grade(self, completion, **row) -> float:
        raise NotImplementedError

    @property
    def rewards(self) -> tuple[RewardTerm, ...]:
        raise NotImplementedError

    def _read(self, path) -> list[dict]:
        raise NotImplementedError

    def _hub(self, split: str) -> list[dict]:
        raise NotImplementedError

    def _hub_test_keys(self) -> frozenset:
        """Problems of the public test split, kept out of the public training split."""
        return frozenset(self.key(r) for r in self.load("test"))

    # ---- shared behaviour ---------------------------------------------------------------

    def load(self, split: str, path=None) -> list[dict]:
        """Rows of `split` ("train" or "test"): from `path` (the public file format) if
        given, else the public dataset from the hub. Train rows whose problem is in the
        test split (or in `held_out`) are removed."""
        if split not in self.splits:
            raise AgrpoError(f"unknown split {split!r} for task {self.name!r}: choose train or test")
        cache_key = (split, str(path) if path else None)
        if cache_key not in self._cache:
            if path:
                check_file(self.name, path, split)
            rows = self._read(path) if path else self._hub(split)
            if split == "train":
                drop = self._held_out | (self._hub_test_keys() if not path else frozenset())
                rows = [r for r in rows if self.key(r) not in drop]
            self._cache[cache_key] = rows
        return [dict(r) for r in self._cache[cache_key]]

    def prompt(self, row: dict) -> list[dict]:
        """Chat messages (system, then user) for one row."""
        return [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": self.user_message(row)},
        ]

    def reward(self, prompts, completions, **columns) -> list[float | None]:
        """The weighted sum of the reward terms; None where any term is None."""
        totals: list[float | None] = [0.0] * len(completions)
        for term in self.rewards:
            values = term.fn(prompts, completions, **columns)
            for i, v in enumerate(values):
                totals[i] = None if v is None or totals[i] is None else totals[i] + term.weight * v
        return totals

    def train_examples(self, n: int, seed: int, path=None) -> list[dict]:
        """`n` training rows drawn (by `seed`) from `load("train", path)`; all when fewer."""
        rows = self.load("train", path)
        if not rows:
            raise AgrpoError(f"no {self.name} training rows: every one is also a test problem (held_out)")
        if n < len(rows):
            rows = random.Random(seed).sample(rows, n)
        return rows

    def eval_examples(self, n: int, seed: int = 0, path=None) -> list[dict]:
        """The first `n` test rows."""
        return self.load("test", path)[:n]

    def target(self, row: dict) -> str:
        raise AgrpoError(f"task {self.name!r} has no reference completions: supervised training uses the tiny tasks")
