"""Held-out evaluation: sample (greedy by default) and grade with the task's grader.

`evaluate` scores a list of rows in one go (the training recipes call it). The evaluation
recipe works on `complete_rows` (one batch: completions, grades and reward terms of the rows
it was given) and summarises with `summarize`, which puts a 95% confidence interval on each
accuracy: Wilson's score interval when every grade is 0 or 1, else the normal interval of the
mean (Sudoku's fraction of cells, for example).
"""

from __future__ import annotations

import math

import torch

from agrpo.data import decode_completions, encode_prompts
from agrpo.policy import unwrap
from agrpo.sampling import SamplingConfig, generate

Z95 = 1.959963984540054


def _columns(rows: list[dict]) -> dict[str, list]:
    return {k: [row.get(k) for row in rows] for k in rows[0] if k != "prompt"} if rows else {}


def _complete(core, tokenizer, task, rows: list[dict], sampling: SamplingConfig, generator, chat_template: bool):
    device = next(core.parameters()).device
    ids, mask = encode_prompts(tokenizer, [task.prompt(row) for row in rows], chat_template, device)
    rollout = generate(core, ids, mask, sampling, generator)
    return decode_completions(tokenizer, rollout.completion, rollout.stop_ids)


def _grades(task, rows: list[dict], texts: list[str]) -> list[float]:
    return [float(task.grade(text, **{k: v for k, v in row.items() if k != "prompt"})) for row, text in zip(rows, texts)]


@torch.no_grad()
def evaluate(
    policy,
    tokenizer,
    task,
    examples: list[dict],
    sampling: SamplingConfig,
    batch_size: int = 128,
    generator: torch.Generator | None = None,
    chat_template: bool = False,
    progress=None,
) -> dict:
    """{"accuracy": mean grade in [0, 1], "scores": [...], "completions": [...]}."""
    core = unwrap(policy)
    was_training = core.training
    core.eval()
    scores, completions = [], []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        texts = _complete(core, tokenizer, task, batch, sampling, generator, chat_template)
        scores.extend(_grades(task, batch, texts))
        completions.extend(texts)
        if progress is not None:
            progress(len(batch))
    core.train(was_training)
    accuracy = sum(scores) / max(len(scores), 1)
    return {"accuracy": accuracy, "scores": scores, "completions": completions}


def reward_terms(task, prompts: list, completions: list[str], rows: list[dict]) -> list[dict[str, float | None]]:
    """Per completion, each weighted reward term of the task by name (they sum to its reward).
    A task without named terms has one, `reward`."""
    columns = _columns(rows)
    terms = getattr(task, "rewards", None)
    if not terms:
        values = {"reward": list(task.reward(prompts, completions, **columns))}
    else:
        values = {}
        for term in terms:
            raw = term.fn(prompts, completions, **columns)
            values[term.name] = [None if v is None else term.weight * float(v) for v in raw]
    return [{name: (None if v[i] is None else float(v[i])) for name, v in values.items()} for i in range(len(completions))]


@torch.no_grad()
def complete_rows(policy, tokenizer, task, rows: list[dict], sampling: SamplingConfig, generator=None,
                  chat_template: bool = False) -> list[dict]:
    """One sampler call on `rows`: per row {"prompt", "completion", "rewards", "grade"},
    every score computed against that same row."""
    core = unwrap(policy)
    was_training = core.training
    core.eval()
    texts = _complete(core, tokenizer, task, rows, sampling, generator, chat_template)
    core.train(was_training)
    prompts = [task.prompt(row) for row in rows]
    terms = reward_terms(task, prompts, texts, rows)
    grades = _grades(task, rows, texts)
    return [
        {"prompt": p, "completion": t, "rewards": r, "grade": g} for p, t, r, g in zip(prompts, texts, terms, grades)
    ]


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a binomial proportion (sensible at 0/n and n/n, unlike the normal one)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at 0/n and n/n the bound that should equal the estimate is off by rounding (5.6e-17 above 0):
    # pin it, and keep every interval around its estimate and inside [0, 1]
    low = 0.0 if successes <= 0 else min(p, max(0.0, centre - half))
    high = 1.0 if successes >= n else max(p, min(1.0, centre + half))
    return low, high


def mean_interval(values: list[float], z: float = Z95) -> tuple[float, float]:
    """Normal interval of a mean (sample standard deviation), clipped to [0, 1]; one value says nothing."""
    n = len(values)
    if n < 2:
        return 0.0, 1.0
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = z * sd / math.sqrt(n)
    return max(0.0, mean - half), min(1.0, mean + half)


def summarize(grades: list[float], rewards: list[dict[str, float | None]]) -> dict:
    """Accuracy, counts, 95% interval (and which one) and mean reward terms of one setting."""
    n = len(grades)
    binary = all(g in (0.0, 1.0) for g in grades)
    correct = sum(1 for g in grades if g == 1.0)
    wrong = sum(1 for g in grades if g == 0.0)
    low, high = wilson_interval(correct, n) if binary else mean_interval(grades)
    means = {}
    for name in dict.fromkeys(k for r in rewards for k in r):
        vals = [r[name] for r in rewards if r.get(name) is not None]
        means[name] = sum(vals) / len(vals) if vals else None
    return {
        "accuracy": sum(grades) / n if n else 0.0,
        "n": n, "correct": correct, "wrong": wrong, "partial": n - correct - wrong,
        "ci95": [low, high], "ci_method": "wilson" if binary else "normal (mean of fractional grades)",
        "reward_means": means,
    }
