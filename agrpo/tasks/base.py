"""What every tiny (character-level) task provides, and the seeded generation they share.

A task owns its data, prompt format, grader and reward. The RL reward is built from the
same scoring code as the evaluation grader, so "correct" means one thing everywhere.

Train and eval problems never overlap, whatever `n` and `seed` are asked for: each problem
has a key (the puzzle, or the numbers and target), and a fixed hash of that key puts it in
exactly one split. Generation draws problems from a seeded stream and keeps only those of
the requested split, so disjointness holds by construction rather than by comparing against
one particular eval set. Each split and seed also gets its own stream of generator seeds, so
eval problems are not merely train problems that happened to be filtered out.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Iterable

from agrpo.errors import AgrpoError

# one key in EVAL_SHARE goes to eval; a small share keeps most of the problem space for
# training, a large one makes eval sets cheap to draw (Countdown costs ~2 ms a draw)
EVAL_SHARE = 4
# a stream that yields this many draws in a row without a new problem of its split is taken
# to be exhausted (settings that allow only a handful of distinct problems)
MAX_FRUITLESS_DRAWS = 1000
# what `load` generates when no file is given (the sizes of the recipes' defaults)
LOAD_TRAIN_ROWS, LOAD_TEST_ROWS = 5000, 256

Source = Callable[[int], "dict | None"]

# (task name, settings, split, seed) -> generated rows so far; generation is deterministic,
# so a later, larger request extends the same list and a smaller one is a prefix of it
_STREAMS: dict[tuple, "_Stream"] = {}


# the command-line keys that name a task's files, by what the file is for
FILE_KEYS = {
    "train": "train_data=<file>",
    "test": "eval_data=<file> (agrpo train) or data=<file> (agrpo eval)",
    "held_out": "eval_data=<file> or exclude_file=<file>",
}


def check_file(task: str, path, role: str) -> None:
    """Refuse a missing file in one line that names the key it came from (`FILE_KEYS[role]`)."""
    if not Path(path).is_file():
        raise AgrpoError(f"no {task} file at {path}: pass {FILE_KEYS[role]} with an existing file in the task's "
                         "public format")


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _check_count(n, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise AgrpoError(f"{what} must be a non-negative integer, got {n!r}")
    return n


class _Stream:
    def __init__(self, source: Source, keep: Callable[[dict], bool], key: Callable[[dict], str]):
        self.source, self.keep, self.key = source, keep, key
        self.rows: list[dict] = []
        self.seen: set[str] = set()
        self.next_index = 0

    def take(self, n: int, describe: str) -> list[dict]:
        fruitless = 0
        while len(self.rows) < n:
            row = self.source(self.next_index)
            self.next_index += 1
            k = self.key(row) if row is not None else None
            if row is None or k in self.seen or not self.keep(row):
                fruitless += 1
                if fruitless >= MAX_FRUITLESS_DRAWS:
                    raise AgrpoError(
                        f"{describe}: only {len(self.rows)} distinct problems found, {n} requested: "
                        "ask for fewer or widen the task's settings"
                    )
                continue
            fruitless = 0
            self.seen.add(k)
            self.rows.append(row)
        return self.rows[:n]


class Task:
    """Base class of the built-in tasks (see the module docstring for the split rule).

    Subclasses set `name` and `completion_chars` and implement `key`, `_settings`,
    `_source`, `grade` and `target`; `reward` defaults to the grader.
    """

    name: str = ""
    # what the split hash and the generator seeds are keyed on: the name the task had when
    # the shipped checkpoints were trained, so a rename keeps their train/eval split
    stream_name: str = ""
    completion_chars: int = 0
    # the 16-character dialect of the shipped tiny models, not natural language
    character_level = True

    def __init__(self, held_out: Iterable[dict] | str | Path | None = None):
        # problems of a published test split may also come out of the generator; naming
        # that split here keeps them out of both generated sets
        if isinstance(held_out, (str, Path)):
            check_file(self.name, held_out, "held_out")
            held_out = self._read(held_out)
        self._held_out = frozenset(self.key(row) for row in held_out or ())

    @property
    def excluded(self) -> frozenset:
        """Keys of the problems kept out of every generated set."""
        return self._held_out

    # ---- what a subclass provides -------------------------------------------------------

    def key(self, row: dict) -> str:
        """The problem's identity: two rows with the same key are the same problem."""
        raise NotImplementedError

    def _settings(self) -> tuple:
        """The generator settings, as a hashable value (part of the cache key)."""
        raise NotImplementedError

    def _source(self, stream_seed: int) -> Source:
        """index -> a row, or None when that index yields no usable problem."""
        raise NotImplementedError

    def grade(self, completion: str, **row) -> float:
        """Evaluation score of one completion, in [0, 1]."""
        raise NotImplementedError

    def target(self, row: dict) -> str:
        """A reference completion (what supervised training imitates)."""
        raise NotImplementedError

    def _read(self, path: str | Path) -> list[dict]:
        """Rows read from a file in the task's published format."""
        raise AgrpoError(f"task {self.name!r} has no file format: generate its data instead")

    # ---- shared behaviour ---------------------------------------------------------------

    def load(self, split: str, path: str | Path | None = None) -> list[dict]:
        """Rows of `split` ("train" or "test"): the file at `path` if given, else the
        generated set (LOAD_TRAIN_ROWS training problems, LOAD_TEST_ROWS held-out ones)."""
        if split not in ("train", "test"):
            raise AgrpoError(f"unknown split {split!r} for task {self.name!r}: choose train or test")
        if path:
            check_file(self.name, path, split)
            rows = self._read(path)
            return [r for r in rows if self.key(r) not in self._held_out] if split == "train" else rows
        return self.train_examples(LOAD_TRAIN_ROWS, 0) if split == "train" else self.eval_examples(LOAD_TEST_ROWS)

    def prompt(self, row: dict) -> str:
        """The prompt text of a row (the tiny tasks' 16-character dialect, no chat template)."""
        return row["prompt"]

    def split_of(self, row: dict) -> str:
        """'eval' or 'train': the split a problem may appear in (fixed by its key)."""
        return "eval" if _hash64(f"{self.stream_name}|{self.key(row)}") % EVAL_SHARE == 0 else "train"

    def train_examples(self, n: int, seed: int, path: str | Path | None = None) -> list[dict]:
        """`n` distinct generated problems; the same (n, seed) always gives the same list.
        With `path`, the first `n` rows of that file instead."""
        if path:
            return self.load("train", path)[: _check_count(n, "n")]
        return self._examples("train", n, seed)

    def eval_examples(self, n: int, seed: int = 0, path: str | Path | None = None) -> list[dict]:
        """`n` distinct held-out problems, disjoint from every `train_examples` output.
        With `path`, the first `n` rows of that file instead."""
        if path:
            return self.load("test", path)[: _check_count(n, "n")]
        return self._examples("eval", n, seed)

    def baselines(self, rows: list[dict]) -> dict[str, float]:
        """Reference accuracies on `rows` that need no model (e.g. a guesser), by name."""
        return {}

    def reward(self, prompts: list[str], completions: list[str], **columns) -> list[float | None]:
        """One reward per completion; `columns` are dataset columns aligned with `prompts`."""
        return [self.grade(c, **row) for c, row in zip(completions, self._rows(prompts, completions, columns))]

    def _rows(self, prompts: list[str], completions: list[str], columns: dict) -> list[dict]:
        if len(completions) != len(prompts):
            raise AgrpoError(
                f"{len(prompts)} prompts but {len(completions)} completions: pass one completion per prompt"
            )
        for name, values in columns.items():
            if len(values) != len(prompts):
                raise AgrpoError(
                    f"column {name!r} has {len(values)} values for {len(prompts)} prompts: align the columns"
                )
        return [{name: values[i] for name, values in columns.items()} for i in range(len(prompts))]

    def _examples(self, split: str, n: int, seed: int) -> list[dict]:
        n = _check_count(n, "n")
        seed = _check_count(seed, "seed")
        cache_key = (type(self).__qualname__, self.name, self._settings(), self._held_out, split, seed)
        stream = _STREAMS.get(cache_key)
        if stream is None:
            stream_seed = _hash64(f"{self.stream_name}|{split}|{seed}")
            stream = _Stream(
                self._source(stream_seed),
                keep=lambda row: self.split_of(row) == split and self.key(row) not in self._held_out,
                key=self.key,
            )
            _STREAMS[cache_key] = stream
        rows = stream.take(n, f"{self.name} {split} set (seed {seed})")
        # copies, so a caller editing its rows cannot change what the next call returns
        return [{k: list(v) if isinstance(v, list) else v for k, v in row.items()} for row in rows]
