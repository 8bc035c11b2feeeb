"""The RL recipe across epochs and across a resume: every epoch visits each training row once in
an order of its own, and the last evaluation a resumed run reports is the one it made before it
stopped, not the base's."""

import json

import pytest

from agrpo.config import load_config
from agrpo.recipes import rl
from agrpo.recipes.rl import RLConfig
from agrpo.tasks.tiny_sudoku import TinySudokuTask

POOL, PER_STEP = 6, 2
STEPS_PER_EPOCH = POOL // PER_STEP


def settings(tmp_path, **kw):
    over = [
        "model=tiny:sudoku-rows-boxes", f"output_dir={tmp_path}", f"train_pool={POOL}", f"prompts_per_step={PER_STEP}",
        "group_size=2", "num_samples=1", "sampling.steps=4", "eval_sampling.steps=4", "eval_size=4", "eval_every=0",
        "save_every=0", "time_budget_s=0", "progress=false", "lr=1e-3",
    ] + [f"{k}={v}" for k, v in kw.items()]
    return load_config(RLConfig, None, over)


@pytest.fixture
def prompts_seen(monkeypatch):
    """The distinct prompts of each training step, in the order the step drew them."""
    steps = []
    real = TinySudokuTask.reward

    def reward(self, prompts, completions, **columns):
        steps.append(list(dict.fromkeys(prompts)))
        return real(self, prompts, completions, **columns)

    monkeypatch.setattr(TinySudokuTask, "reward", reward)
    return steps


def epochs_of(steps: list[list[str]]) -> list[list[str]]:
    flat = [p for step in steps for p in step]
    return [flat[i : i + POOL] for i in range(0, len(flat), POOL)]


def train_file(tmp_path):
    """Six training puzzles in a file: the same rows whatever the seed."""
    from agrpo.tasks import get_task

    rows = get_task("tiny-sudoku").train_examples(POOL, seed=0)
    path = tmp_path / "train.csv"
    path.write_text("Puzzle,Solution\n" + "".join(f"{r['puzzle']},{r['solution']}\n" for r in rows))
    return path


def test_each_epoch_visits_every_row_once_in_an_order_of_its_own(tmp_path, prompts_seen):
    """Three epochs over six rows: each epoch uses every row exactly once, no two epochs in the
    same order; another seed gives other orders of the same rows."""
    data = train_file(tmp_path)
    orders = {}
    for seed in (0, 1):
        prompts_seen.clear()
        summary = rl.train(settings(tmp_path, name=f"epochs{seed}", epochs=3, seed=seed, train_data=data))
        assert summary["steps"] == 3 * STEPS_PER_EPOCH and summary["train_rows"] == POOL
        epochs = epochs_of(prompts_seen)
        assert len(epochs) == 3 and all(len(e) == POOL for e in epochs)
        rows = set(epochs[0])
        assert len(rows) == POOL and all(set(e) == rows for e in epochs), epochs
        assert len({tuple(e) for e in epochs}) == 3, f"seed {seed}: an epoch repeats another's order"
        orders[seed] = epochs
    assert set(orders[0][0]) == set(orders[1][0])
    assert all(a != b for a, b in zip(orders[0], orders[1])), "two seeds draw an epoch in the same order"


def test_a_run_resumed_mid_epoch_keeps_the_order(tmp_path, prompts_seen):
    """Stopped inside the second epoch and resumed, a run draws the prompts the straight run draws."""
    rl.train(settings(tmp_path, name="straight", epochs=3))
    straight = list(prompts_seen)
    prompts_seen.clear()
    rl.train(settings(tmp_path, name="split", max_steps=STEPS_PER_EPOCH + 1, save_every=STEPS_PER_EPOCH + 1))
    rl.train(settings(tmp_path, name="split", epochs=3, max_steps=0, resume=True))
    assert prompts_seen == straight


def test_the_last_evaluation_survives_a_resume(tmp_path, monkeypatch, capsys):
    """A run evaluated at step 2, stopped there and resumed, then interrupted at step 3 before any
    new evaluation: its summary gives the step-2 evaluation as the last one (its accuracy, share
    solved and step), never the base's, and the resumed run says so when it starts."""
    first = settings(tmp_path, name="run", max_steps=2, eval_every=2, save_every=2, eval_size=16, lr=3e-3)
    done = rl.train(first)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    at_two = next(line for line in lines if line["step"] == 2)
    assert done["final_accuracy"] == at_two["eval_accuracy"]
    assert at_two["eval_accuracy"] != done["base_accuracy"]  # the two can be told apart

    calls = []
    real = TinySudokuTask.reward

    def interrupt_at_step_3(self, prompts, completions, **columns):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(self, prompts, completions, **columns)

    monkeypatch.setattr(TinySudokuTask, "reward", interrupt_at_step_3)
    capsys.readouterr()
    resumed = settings(tmp_path, name="run", max_steps=6, eval_every=4, save_every=2, eval_size=16, lr=3e-3,
                       resume=True, progress=True)
    with pytest.raises(KeyboardInterrupt):
        rl.train(resumed)
    err = capsys.readouterr().err
    assert f"resuming at step 2; base accuracy {done['base_accuracy']:.3f}, last evaluated " \
           f"{at_two['eval_accuracy']:.3f}" in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["steps"] == 2
    assert summary["base_accuracy"] == done["base_accuracy"]
    assert summary["last_eval_accuracy"] == at_two["eval_accuracy"]
    assert summary["last_eval_solved"] == at_two["eval_solved"]
    assert summary["last_eval_step"] == 2
