"""What the RL recipe logs about each step beyond the loss: reward terms, lengths, spread, entropy.

    recorder = RewardRecorder(task)          # wraps task.reward; the recipe calls it as before
    ...                                      # rollouts and rewards of one step
    sums = step_sums(task, recorder.take(), rollouts)   # per process; reduce_sum, then
    step_means(summed, group_size, rewards)  # -> the metrics line's new keys

Every mean is a ratio of sums, so N processes log what one process would.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from agrpo.errors import AgrpoError
from agrpo.evaluation import reward_terms
from agrpo.fileio import write_atomic
from agrpo.runlog import read_jsonl

SAMPLES = "samples.jsonl"


class RewardRecorder:
    """Stands in for `task.reward` and remembers each call's inputs and values until `take()`."""

    def __init__(self, task):
        self.reward = task.reward
        self.calls: list[tuple] = []
        task.reward = self

    def __call__(self, prompts, completions, **columns):
        values = self.reward(prompts, completions, **columns)
        self.calls.append((prompts, completions, columns, list(values)))
        return values

    def take(self) -> list[tuple]:
        calls, self.calls = self.calls, []
        return calls


def completion_lengths(rollout) -> torch.Tensor:
    """[B] tokens before the first end-of-sequence id (the whole length when there is none)."""
    comp = rollout.completion
    stop = torch.isin(comp, torch.tensor(rollout.stop_ids, device=comp.device, dtype=comp.dtype))
    first = stop.to(torch.int8).argmax(dim=1)
    return torch.where(stop.any(dim=1), first, torch.full_like(first, comp.shape[1]))


def step_sums(task, calls: list[tuple], rollouts: list) -> dict[str, float]:
    """Sums and counts of this process's share of a step, to be summed over processes."""
    out = {"length_sum": 0.0, "rows": 0.0, "entropy_sum": 0.0, "committed": 0.0}
    for rollout in rollouts:
        out["length_sum"] += float(completion_lengths(rollout).sum())
        out["rows"] += rollout.completion.shape[0]
        # the entropy of the distribution each policy-drawn token was sampled from
        out["entropy_sum"] += float(rollout.entropy[rollout.sampled].sum())
        out["committed"] += float(rollout.sampled.sum())
    # the tiny tasks have one reward (reward_mean says it all); every process lists every term, in order,
    # so that the sums line up when they are reduced
    named = getattr(task, "rewards", None) or ()
    for term in named:
        out[f"term_sum/{term.name}"] = out[f"term_count/{term.name}"] = 0.0
    if named:
        # evaluated again on the recorded inputs: a reward costs milliseconds, a rollout seconds
        for prompts, completions, columns, _ in calls:
            rows = [{k: v[i] for k, v in columns.items()} for i in range(len(prompts))]
            for terms in reward_terms(task, prompts, completions, rows):
                for name, v in terms.items():
                    if v is not None:
                        out[f"term_sum/{name}"] += v
                        out[f"term_count/{name}"] += 1
    return out


def zero_spread_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """Share of groups whose rewards are all equal (NaN = no reward; fewer than two rewards count as
    no spread): such a group has zero advantages and teaches nothing."""
    groups = rewards.reshape(-1, group_size)
    valid = ~torch.isnan(groups)
    hi = torch.where(valid, groups, torch.full_like(groups, -math.inf)).amax(dim=1)
    lo = torch.where(valid, groups, torch.full_like(groups, math.inf)).amin(dim=1)
    flat = (valid.sum(dim=1) < 2) | (hi == lo)
    return float(flat.double().mean()) if groups.shape[0] else float("nan")


def step_means(summed: dict[str, float], rewards: torch.Tensor, group_size: int) -> dict[str, float]:
    """The metrics line's keys from the summed `step_sums` and all processes' rewards (NaN = None)."""
    line = {
        "completion_length": summed["length_sum"] / summed["rows"] if summed["rows"] else float("nan"),
        "zero_spread_frac": zero_spread_fraction(rewards, group_size),
        "entropy": summed["entropy_sum"] / summed["committed"] if summed["committed"] else float("nan"),
    }
    for key, total in summed.items():
        if key.startswith("term_sum/"):
            name = key.split("/", 1)[1]
            count = summed[f"term_count/{name}"]
            line[f"reward_{name}"] = total / count  # weighted: the terms sum to reward_mean
    return line


def samples_of(step: int, calls: list[tuple], n: int) -> list[dict]:
    """The first `n` completions of a step (a group shares its prompt: they show its spread)."""
    out = []
    for prompts, completions, _, values in calls:
        for prompt, completion, value in zip(prompts, completions, values):
            if len(out) == n:
                return out
            out.append({"step": step, "prompt": prompt, "completion": completion, "reward": value})
    return out


def open_samples(run_dir, keep_through: int) -> Path:
    """`run_dir/samples.jsonl` holding only lines of steps <= `keep_through` (-1: a fresh file), so
    that a resumed run does not list a step twice."""
    path = Path(run_dir) / SAMPLES
    kept = [r for r in read_jsonl(path, repair=True) if r.get("step", 0) <= keep_through]
    write_atomic(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in kept).encode("utf-8"))
    return path


def check_trackers(report_to: list[str]) -> list[str] | None:
    """`report_to` for `Accelerator(log_with=...)`, after checking each tracker's package is installed."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available}
    for name in report_to:
        if not available[name]():
            raise AgrpoError(f"report_to={name} needs the {name} package: pip install {name}, or drop {name} from report_to")
    return list(report_to) or None


def flat_config(values: dict, prefix: str = "") -> dict:
    """Nested config -> {dotted key: int | float | str | bool}, what every tracker's hparams accept."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)):
            out[f"{prefix}{key}"] = value
        else:
            out[f"{prefix}{key}"] = str(value)
    return out
