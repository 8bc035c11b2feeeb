"""What a long run needs from the RL recipe: the schedule spans the planned steps (max_steps or epochs),
warmup by ratio, train and evaluation lengths apart, every checkpoint kept, trackers, the default preset."""

import json
import math

import pytest
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from test_rl import read, small, tiny_dir  # noqa: F401  (tiny_dir is a fixture)

from agrpo.cli import main
from agrpo.config import load_config
from agrpo.errors import AgrpoError
from agrpo.recipes import rl
from agrpo.recipes.rl import RLConfig, _lr_lambda, planned_steps


def test_warmup_ratio_and_cosine_reach_the_floor():
    cfg = RLConfig(lr_schedule="cosine", warmup_ratio=0.01, max_steps=150)
    fn = _lr_lambda(cfg, 150)
    # 1% of 150 rounds up to 2 warmup updates: 1/2, then the peak, then cosine down to 0
    assert [fn(0), fn(1), fn(2)] == [0.5, 1.0, 1.0]
    assert fn(2 + 74) == pytest.approx(0.5)
    assert fn(150) == 0.0 and fn(149) > 0


def test_planned_steps_from_epochs_and_max_steps():
    assert planned_steps(RLConfig(epochs=1.5, prompts_per_step=2), 10) == 8  # ceil(15 / 2)
    assert planned_steps(RLConfig(epochs=1.5, prompts_per_step=2, max_steps=3), 10) == 3
    assert planned_steps(RLConfig(max_steps=5), 10) == 5
    assert planned_steps(RLConfig(time_budget_s=60), 10) == 0


@pytest.mark.parametrize("objective, inner", [("agrpo", 1), ("diffu_grpo", 2)])
def test_cosine_spans_the_steps_epochs_plan(tiny_dir, tmp_path, objective, inner):  # noqa: F811
    # 10 training problems, 2 a step, 1.5 epochs: 8 steps of `inner` updates each; warmup 1 update
    cfg = small(tiny_dir, tmp_path, name="sched", epochs=1.5, train_pool=10, lr_schedule="cosine",
                warmup_ratio=0.1, lr=1e-3, eval_every=0, save_every=0, objective=objective, inner_steps=inner)
    summary = rl.train(cfg)
    assert summary["steps"] == summary["planned_steps"] == 8 and summary["train_rows"] == 10
    lrs = {line["step"]: line["lr"] for line in read(tmp_path / "sched") if "lr" in line}
    total, warm = 8 * inner, math.ceil(0.1 * 8 * inner)
    for step, lr in lrs.items():  # the lr after the step's updates
        updates = step * inner
        assert lr == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * (updates - warm) / (total - warm))))
    assert lrs[8] == 0.0


def test_train_and_eval_lengths_are_independent(tiny_dir, tmp_path, monkeypatch):  # noqa: F811
    seen = {"train": set(), "eval": set()}
    generate, evaluate = rl.generate, rl.evaluate

    def spy_generate(*a, **k):
        rollout = generate(*a, **k)
        seen["train"].add(rollout.completion.shape[1])
        return rollout

    def spy_evaluate(sampler, tokenizer, task, rows, sampling, **k):
        seen["eval"].add(sampling.gen_length)
        return evaluate(sampler, tokenizer, task, rows, sampling, **k)

    monkeypatch.setattr(rl, "generate", spy_generate)
    monkeypatch.setattr(rl, "evaluate", spy_evaluate)
    over = {"max_steps": 2, "sampling.gen_length": 24, "sampling.block_length": 12, "sampling.steps": 4,
            "eval_sampling.gen_length": 16, "eval_sampling.block_length": 16, "eval_sampling.steps": 4}
    rl.train(small(tiny_dir, tmp_path, name="lengths", **over))
    assert seen == {"train": {24}, "eval": {16}}


def test_keep_checkpoints_zero_keeps_every_one(tiny_dir, tmp_path):  # noqa: F811
    rl.train(small(tiny_dir, tmp_path, name="keep", max_steps=3, save_every=1, keep_checkpoints=0))
    assert sorted(p.name for p in (tmp_path / "keep/checkpoints").glob("step_*")) == [
        "step_000001", "step_000002", "step_000003"
    ]


@pytest.mark.parametrize("over, message", [
    (["keep_checkpoints=-1"], "keep_checkpoints must be >= 0"),
    (["warmup_steps=5", "warmup_ratio=0.01", "max_steps=10"], "both set"),
    (["lr_schedule=cosine", "time_budget_s=60"], "needs the planned length"),
    (["warmup_ratio=0.01", "time_budget_s=60"], "needs the planned length"),
    ([], "the run has no end"),
])
def test_schedule_mistakes_are_refused(over, message):
    with pytest.raises(AgrpoError, match=message):
        load_config(RLConfig, None, over)


def test_agrpo_train_without_a_preset_runs_the_tiny_one_with_its_budget(monkeypatch):
    seen = []
    monkeypatch.setattr(rl, "train", lambda cfg, **kw: seen.append(cfg) or {})
    assert main(["train", "seed=3"]) == 0
    assert seen[0].time_budget_s == 540 and seen[0].name == "" and seen[0].seed == 3
    assert RLConfig().time_budget_s == 0  # the budget belongs to the preset, not to every run


def test_missing_tracker_package_is_one_line(tmp_path, capsys):
    pytest.importorskip("accelerate")
    try:
        import tensorboard  # noqa: F401

        pytest.skip("tensorboard is installed")
    except ImportError:
        pass
    assert main(["train", f"output_dir={tmp_path}", "report_to=[tensorboard]", "max_steps=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "agrpo: error: report_to=tensorboard needs the tensorboard package: pip install tensorboard, or drop tensorboard from report_to"


class Recorder(GeneralTracker):
    name, requires_logging_directory = "recorder", False

    def __init__(self):
        super().__init__()
        self.config, self.logged = None, []

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        self.config = values

    def log(self, values, step=None, **kwargs):
        self.logged.append((step, values))


def test_trackers_get_the_config_and_every_metrics_line(tiny_dir, tmp_path):  # noqa: F811
    tracker = Recorder()
    rl.train(small(tiny_dir, tmp_path, name="tracked", max_steps=2), Accelerator(cpu=True, log_with=[tracker]))
    assert tracker.config["sampling.gen_length"] == 16 and tracker.config["lora.target_modules"].startswith("[")
    lines = read(tmp_path / "tracked")[1:]
    assert [step for step, _ in tracker.logged] == [1, 2]
    for (_, values), line in zip(tracker.logged, lines):
        assert values == {k: v for k, v in line.items() if k != "step"}
    assert json.dumps(tracker.config)
