"""The per-step metrics on hand-checked cases; end to end, a paper task's terms sum to its reward."""

import json
from types import SimpleNamespace

import pytest
import torch

from test_paper_rl import nl_model, write_data  # noqa: F401  (nl_model is a fixture)

from agrpo.config import load_config
from agrpo.recipes import rl
from agrpo.step_metrics import RewardRecorder, completion_lengths, samples_of, step_means, step_sums, zero_spread_fraction
from agrpo.tasks import RewardTerm

NAN = float("nan")


def test_zero_spread_fraction_by_hand():
    # groups of 2: equal -> flat; 0 vs 1 -> spread; one reward left -> flat; none -> flat
    r = torch.tensor([1.0, 1.0, 0.0, 1.0, NAN, 2.0, NAN, NAN], dtype=torch.float64)
    assert zero_spread_fraction(r, 2) == 0.75
    assert zero_spread_fraction(torch.tensor([0.0, 0.5, 0.5, 0.5], dtype=torch.float64), 4) == 0.0


def rollout(completion, entropy, sampled, stop_ids=(9,)):
    return SimpleNamespace(completion=torch.tensor(completion), entropy=torch.tensor(entropy),
                           sampled=torch.tensor(sampled), stop_ids=stop_ids)


def test_lengths_and_entropy_by_hand():
    # rows: first EOS at 1 (a token after it does not count), EOS at 0, none (length 4)
    ro = rollout([[5, 9, 6, 9], [9, 9, 9, 9], [1, 2, 3, 4]], [[1.0, 2.0, 0, 0], [0, 0, 0, 0], [3.0, 4.0, 5.0, 6.0]],
                 [[True, True, False, False], [False, False, False, False], [True, False, True, False]])
    assert completion_lengths(ro).tolist() == [1, 0, 4]
    task = SimpleNamespace(reward=lambda *a, **k: None)
    summed = step_sums(task, [], [ro])
    line = step_means(summed, torch.tensor([1.0, 2.0], dtype=torch.float64), 2)
    assert line["completion_length"] == pytest.approx(5 / 3)  # (1 + 0 + 4) / 3
    assert line["entropy"] == pytest.approx((1 + 2 + 3 + 5) / 4)  # policy-drawn tokens only
    assert line["zero_spread_frac"] == 0.0 and not any(k.startswith("reward_") for k in line)


def test_reward_terms_are_weighted_means_over_the_step():
    def fmt(prompts, completions, **kw):
        return [1.0 if c.startswith("<") else 0.0 for c in completions]

    def correct(prompts, completions, answer, **kw):
        return [None if a is None else float(c.endswith(a)) for c, a in zip(completions, answer)]

    terms = (RewardTerm("format", fmt, 0.5), RewardTerm("correct", correct, 3.0))
    task = SimpleNamespace(rewards=terms, reward=lambda p, c, **k: [0.0] * len(c))
    recorder = RewardRecorder(task)
    assert task.reward is recorder
    task.reward(["p", "p"], ["<a>4", "x5"], answer=["4", "4"])
    task.reward(["q", "q"], ["<b>7", "<7"], answer=[None, "7"])
    calls = recorder.take()
    assert len(calls) == 2 and recorder.take() == []
    ro = rollout([[9]], [[0.0]], [[False]])
    line = step_means(step_sums(task, calls, [ro]), torch.zeros(4, dtype=torch.float64), 2)
    assert line["reward_format"] == pytest.approx(0.5 * 3 / 4)
    assert line["reward_correct"] == pytest.approx(3.0 * 2 / 3)  # the None is left out, not zeroed
    assert samples_of(5, calls, 3) == [
        {"step": 5, "prompt": "p", "completion": "<a>4", "reward": 0.0},
        {"step": 5, "prompt": "p", "completion": "x5", "reward": 0.0},
        {"step": 5, "prompt": "q", "completion": "<b>7", "reward": 0.0},
    ]


def test_terms_sum_to_the_logged_reward_on_a_paper_task(nl_model, tmp_path):  # noqa: F811
    train, test = write_data(tmp_path, "countdown")
    over = [f"model={nl_model}", "task=countdown", f"train_data={train}", f"eval_data={test}", f"output_dir={tmp_path}",
            "prompts_per_step=2", "group_size=2", "num_samples=2", "train_pool=4", "eval_size=2", "max_steps=2",
            "progress=false", "eval_every=1", "save_every=0", "sampling.gen_length=8", "sampling.block_length=8",
            "sampling.steps=4", "eval_sampling.gen_length=8", "eval_sampling.block_length=8", "eval_sampling.steps=4",
            "log_samples_every=2"]
    rl.train(load_config(rl.RLConfig, None, over))
    run = tmp_path / "countdown-agrpo"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("eval_accuracy" in line for line in lines)  # eval_every=1 on the test file
    for line in lines[1:]:
        terms = [v for k, v in line.items() if k.startswith("reward_") and k not in ("reward_mean", "reward_std")]
        assert len(terms) == 2 and sum(terms) == pytest.approx(line["reward_mean"])
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [2] * 4 and all(isinstance(s["completion"], str) for s in samples)

