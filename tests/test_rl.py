"""The RL recipe end to end on a tiny model: exact resume, skipped non-finite steps, CLI errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from agrpo.cli import main
from agrpo.config import check_documented, load_config
from agrpo.recipes import rl
from agrpo.recipes.rl import RLConfig
from agrpo.tiny.model import build_tiny_model
from agrpo.tiny.tokenizer import build_tokenizer

TIMING = {"step_s", "tokens_per_s", "wall_s"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_tiny_model(tok, hidden_size=32, num_layers=2, num_heads=2)
    out = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def small(tiny_dir, tmp_path, **kw):
    over = [
        f"model={tiny_dir}", f"output_dir={tmp_path}", "prompts_per_step=2", "group_size=2",
        "sampling.steps=4", "eval_sampling.steps=4", "eval_size=4", "eval_every=3", "save_every=3",
        "time_budget_s=0", "train_pool=32", "progress=false", "keep_checkpoints=3", "num_samples=2", "lr=1e-3",
    ] + [f"{k}={v}" for k, v in kw.items()]
    return load_config(RLConfig, None, over)


def read(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def strip(lines):
    return [{k: v for k, v in line.items() if k not in TIMING} for line in lines]


def test_resume_is_exact(tiny_dir, tmp_path):
    rl.train(small(tiny_dir, tmp_path, name="straight", max_steps=6))
    rl.train(small(tiny_dir, tmp_path, name="split", max_steps=3))
    rl.train(small(tiny_dir, tmp_path, name="split", max_steps=6, resume=True))
    a, b = tmp_path / "straight", tmp_path / "split"
    wa = load_file(a / "checkpoints/step_000006/model.safetensors")
    wb = load_file(b / "checkpoints/step_000006/model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    base = load_file(f"{tiny_dir}/model.safetensors")
    assert any(not torch.equal(base[k], wa[k]) for k in base)  # training did move the weights
    oa = torch.load(a / "checkpoints/step_000006/optimizer.pt")
    ob = torch.load(b / "checkpoints/step_000006/optimizer.pt")
    assert oa["state"].keys() == ob["state"].keys()
    for k in oa["state"]:
        for name, value in oa["state"][k].items():
            assert torch.equal(value, ob["state"][k][name])
    assert strip(read(a)) == strip(read(b))
    assert [line["step"] for line in read(b)] == [0, 1, 2, 3, 4, 5, 6]
    summary = json.loads((b / "summary.json").read_text())
    assert 0 <= summary["base_accuracy"] <= 1 and 0 <= summary["final_accuracy"] <= 1
    assert summary["steps"] == 6 and (b / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_non_finite_loss_skips_the_update(tiny_dir, tmp_path, monkeypatch):
    from agrpo.objectives import agrpo as objective

    real = objective.agrpo_loss
    calls = {"n": 0}

    def poisoned(policy, rollout, advantages, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the second step's loss is NaN
            backward = kw.pop("backward")
            loss, metrics = real(policy, rollout, advantages, **kw)
            backward(loss * float("nan"))
            return loss.detach() * float("nan"), {**metrics, "loss": float("nan")}
        return real(policy, rollout, advantages, **kw)

    monkeypatch.setattr(objective, "agrpo_loss", poisoned)
    rl.train(small(tiny_dir, tmp_path, name="nan", max_steps=3, save_every=1))
    run = tmp_path / "nan"
    w1 = load_file(run / "checkpoints/step_000001/model.safetensors")
    w2 = load_file(run / "checkpoints/step_000002/model.safetensors")
    w3 = load_file(run / "checkpoints/step_000003/model.safetensors")
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert all(torch.isfinite(v).all() for v in w2.values())
    assert any(not torch.equal(w2[k], w3[k]) for k in w2)  # the next step trains again
    lines = read(run)
    assert [line.get("skipped_steps") for line in lines[1:]] == [0, 1, 1]


def test_diffu_grpo_objective_trains_without_skips(tiny_dir, tmp_path):
    summary = rl.train(small(tiny_dir, tmp_path, name="d", max_steps=2, objective="diffu_grpo", inner_steps=2))
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0


def test_config_is_documented_and_checked():
    check_documented(RLConfig)
    with pytest.raises(Exception, match="block_length=5 must divide"):
        load_config(RLConfig, None, ["sampling.block_length=5"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "sampling.block_length=5"], "must divide"),
        (["train", "lr=abc"], "expected a number"),
        (["train", "no_such_key=1"], "unknown key"),
        (["train", "--objective", "ppo"], "choose one of"),
        (["eval", "model=./does/not/exist"], "exist"),
    ],
)
def test_cli_user_errors_exit_2_with_one_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_lora_with_kl_to_the_disabled_adapter(tiny_dir, tmp_path):
    # LoRA: only adapter weights train; the KL reference is the same model with the adapter off
    summary = rl.train(small(tiny_dir, tmp_path, name="lora", max_steps=2, beta=0.1, **{"lora.r": 4, "lora.target_modules": "[q_proj,v_proj]"}))
    assert summary["skipped_steps"] == 0
    lines = read(tmp_path / "lora")
    assert all(line["kl"] >= 0 for line in lines[1:])
    saved = load_file(tmp_path / "lora/checkpoints/step_000002/adapter_model.safetensors")
    assert saved and all("lora" in k for k in saved)


def test_frozen_reference_kl_is_zero_on_policy_then_positive(tiny_dir, tmp_path):
    rl.train(small(tiny_dir, tmp_path, name="kl", max_steps=3, beta=0.5, lr=1e-2))
    kls = [line["kl"] for line in read(tmp_path / "kl")[1:]]
    assert kls[0] == pytest.approx(0.0, abs=1e-6)  # before any update the policy is the reference
    assert kls[-1] > 0


def test_reward_of_the_wrong_length_is_a_clear_error(tiny_dir, tmp_path, monkeypatch):
    from agrpo.errors import AgrpoError
    from agrpo.tasks.tiny_sudoku import TinySudokuTask

    monkeypatch.setattr(TinySudokuTask, "reward", lambda self, prompts, completions, **cols: [0.0] * (len(prompts) // 2))
    with pytest.raises(AgrpoError, match="returned 2 values for 4 completions"):
        rl.train(small(tiny_dir, tmp_path, name="bad", max_steps=1))


def test_mask_token_id_setting_serves_a_model_that_names_none(tiny_dir, tmp_path):
    import shutil

    from agrpo.errors import AgrpoError

    bare = tmp_path / "bare"
    shutil.copytree(tiny_dir, bare)
    config = json.loads((bare / "config.json").read_text())
    mask = config.pop("mask_token_id")
    (bare / "config.json").write_text(json.dumps(config))
    tok = json.loads((bare / "tokenizer_config.json").read_text())
    tok.pop("mask_token", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(tok))
    with pytest.raises(AgrpoError, match="no mask token"):
        rl.train(small(str(bare), tmp_path / "a", name="a", max_steps=1))
    summary = rl.train(small(str(bare), tmp_path / "b", name="b", max_steps=1, mask_token_id=mask))
    assert summary["steps"] == 1


def test_resuming_a_finished_run_says_why_and_changes_nothing(tiny_dir, tmp_path):
    from agrpo.errors import AgrpoError

    done = rl.train(small(tiny_dir, tmp_path, name="done", max_steps=3))
    run = tmp_path / "done"
    before = (run / "summary.json").read_text(), (run / "metrics.jsonl").read_text()
    with pytest.raises(AgrpoError, match="already ran its 3 planned steps: pass a larger max_steps"):
        rl.train(small(tiny_dir, tmp_path, name="done", max_steps=3, resume=True))
    assert ((run / "summary.json").read_text(), (run / "metrics.jsonl").read_text()) == before
    # more steps: the summary's final accuracy is measured on the final weights, the base one kept
    more = rl.train(small(tiny_dir, tmp_path, name="done", max_steps=4, resume=True))
    last_eval = [line for line in read(run) if "eval_accuracy" in line][-1]
    assert more["steps"] == 4 and last_eval["step"] == 4 and more["final_accuracy"] == last_eval["eval_accuracy"]
    assert more["base_accuracy"] == done["base_accuracy"]


def test_resuming_a_run_whose_budget_is_spent_says_so(tiny_dir, tmp_path):
    from agrpo.errors import AgrpoError

    first = rl.train(small(tiny_dir, tmp_path, name="budget", time_budget_s=1e-6, max_steps=0))
    assert first["steps"] == 1
    with pytest.raises(AgrpoError, match="already spent its time budget .*pass a larger time_budget_s"):
        rl.train(small(tiny_dir, tmp_path, name="budget", time_budget_s=1e-6, max_steps=0, resume=True))
    resumed = rl.train(small(tiny_dir, tmp_path, name="budget", time_budget_s=0, max_steps=2, resume=True))
    assert resumed["steps"] == 2 and resumed["final_accuracy"] is not None


def test_runs_without_a_name_get_distinct_names_and_a_bad_task_leaves_no_folder(tiny_dir, tmp_path):
    from agrpo.errors import AgrpoError

    base = dict(max_steps=1, name="")
    first = small(tiny_dir, tmp_path, **base)
    rl.train(first)
    rl.train(small(tiny_dir, tmp_path, **base))
    rl.train(small(tiny_dir, tmp_path, seed=1, **base))
    rl.train(small(tiny_dir, tmp_path, objective="diffu_grpo", **base))
    made = sorted(p.name for p in tmp_path.iterdir())
    assert made == ["tiny-sudoku-agrpo", "tiny-sudoku-agrpo-2", "tiny-sudoku-agrpo-seed1", "tiny-sudoku-diffu-grpo"]
    # resume=true without a name continues the newest run of its kind
    resumed = rl.train(small(tiny_dir, tmp_path, resume=True, **{**base, "max_steps": 2}))
    assert resumed["steps"] == 2 and len(read(tmp_path / "tiny-sudoku-agrpo-2")) == 3
    with pytest.raises(AgrpoError, match="unknown task"):
        rl.train(small(tiny_dir, tmp_path, task="no-such-task", **base))
    with pytest.raises(AgrpoError, match="does not exist"):
        rl.train(small(tiny_dir, tmp_path, model=str(tmp_path / "missing" / "model"), **base))
    assert sorted(p.name for p in tmp_path.iterdir()) == made  # no empty folder left behind
    # a name given explicitly is never renumbered
    with pytest.raises(AgrpoError, match="exists: pass resume=true"):
        rl.train(small(tiny_dir, tmp_path, max_steps=1, name="tiny-sudoku-agrpo"))


@pytest.mark.parametrize("bad,message", [
    ("lora.r=-3", "lora.r must be >= 0"),
    ("num_samples=40", "num_samples=40 is more than the sampling.steps=4"),
    ("max_steps=-1", "max_steps must be >= 0"),
    ("time_budget_s=-5", "time_budget_s must be >= 0"),
    ("eval_every=-1", "eval_every must be >= 0"),
    ("warmup_steps=-3", "warmup_steps must be >= 0"),
    ("keep_checkpoints=-1", "keep_checkpoints must be >= 0"),
])
def test_impossible_values_are_one_line(bad, message, capsys):
    assert main(["train", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_ctrl_c_before_the_first_checkpoint_leaves_an_honest_summary(tiny_dir, tmp_path, monkeypatch, capsys):
    from agrpo.tasks.tiny_sudoku import TinySudokuTask

    calls = []
    original = TinySudokuTask.reward

    def reward(self, prompts, completions, **cols):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, prompts, completions, **cols)

    monkeypatch.setattr(TinySudokuTask, "reward", reward)
    args = [f"model={tiny_dir}", f"output_dir={tmp_path}", "name=cut", "max_steps=10", "save_every=100",
            "eval_every=0", "prompts_per_step=2", "group_size=2", "sampling.steps=4", "num_samples=2",
            "eval_size=4", "train_pool=16", "progress=false"]
    assert main(["train", *args]) == 130
    err = capsys.readouterr().err
    assert "stopped after step 2: no checkpoint was written yet, so resume=true would start over" in err
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["interrupted"] is True and summary["steps"] == 2 and summary["final_accuracy"] is None
    assert summary["last_eval_step"] == 0 and summary["last_eval_accuracy"] == summary["base_accuracy"]
    assert summary["checkpoint"] is None
    assert (tmp_path / "cut" / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_progress_shows_each_evaluation_as_it_happens(tiny_dir, tmp_path, capsys):
    summary = rl.train(small(tiny_dir, tmp_path, name="watched", max_steps=4, eval_every=2, progress=True))
    err = capsys.readouterr().err
    base = err.index(f"agrpo: base accuracy {summary['base_accuracy']:.3f}")
    assert base < err.index("train:")  # the starting point is known before the bar starts
    evals = [json.loads(x) for x in (tmp_path / "watched/metrics.jsonl").read_text().splitlines()]
    evals = {x["step"]: x["eval_accuracy"] for x in evals if "eval_accuracy" in x and x["step"] > 0}
    assert sorted(evals) == [2, 4]
    for step, acc in evals.items():
        gain = round(100 * (acc - summary["base_accuracy"]), 1) + 0.0
        assert f"step {step}: held-out accuracy {acc:.3f} ({gain:+.1f} points on the base's" in err
    assert "-0.0 points" not in err and rl._eval_line(5, 0.64999, 0.65, 0.0).startswith("step 5: held-out accuracy 0.650 (+0.0 points")
    # beside the accuracy: the share solved whole, and the line a model-free guesser draws
    from agrpo.tasks import get_task
    from agrpo.tasks.tiny_sudoku import model_free_accuracy

    lines = [json.loads(x) for x in (tmp_path / "watched/metrics.jsonl").read_text().splitlines()]
    guess = model_free_accuracy(get_task("tiny-sudoku").eval_examples(4))
    assert lines[0]["model_free_accuracy"] == summary["model_free_accuracy"] == guess
    assert f"a model-free guesser (uniform over the digits the clues allow) scores {guess:.3f}" in err
    assert lines[0]["eval_solved"] == summary["base_solved"] and lines[-1]["eval_solved"] == summary["final_solved"]
    assert f"{100 * summary['final_solved']:.1f}% of problems solved whole" in err


def test_a_time_budgeted_bar_shows_the_time_left(tmp_path):
    cfg = load_config(RLConfig, None, [f"output_dir={tmp_path}", "time_budget_s=540", "max_steps=0"])
    bar = rl._progress_bar(cfg, 0, start_step=0, spent_s=100.0)
    bar.advance_to(300.4)
    bar.set_postfix(rl._postfix(cfg, 0, 12, {"reward_mean": 0.5, "wall_s": 300.4}, 0.61))
    text = str(bar)
    bar.close()
    assert "05:00 of 09:00, 04:00 left" in text and "step=12" in text and "acc=0.610" in text
    assert " 56%" in text
    both = load_config(RLConfig, None, [f"output_dir={tmp_path}", "time_budget_s=540", "max_steps=50"])
    assert rl._postfix(both, 50, 12, {"reward_mean": 0.5, "wall_s": 300.4}, None)["time_left"] == "04:00"


def test_resume_without_a_name_continues_the_newest_unfinished_run_with_its_own_settings(tiny_dir, tmp_path, capsys):
    def args(*extra):
        return [f"model={tiny_dir}", f"output_dir={tmp_path}", "prompts_per_step=2", "group_size=2",
                "sampling.steps=4", "eval_sampling.steps=4", "eval_size=4", "eval_every=0", "save_every=1",
                "time_budget_s=0", "train_pool=16", "progress=false", "num_samples=2", *extra]

    assert main(["train", *args("max_steps=1")]) == 0
    assert main(["train", *args("max_steps=1", "seed=1", "lr=1e-3")]) == 0
    seed1 = tmp_path / "tiny-sudoku-agrpo-seed1"
    (seed1 / "summary.json").write_text(json.dumps({"interrupted": True}))  # as Ctrl-C leaves it
    assert main(["train", *args("max_steps=1", "objective=diffu_grpo")]) == 0  # newer, but finished
    capsys.readouterr()
    # no seed passed: the seed-1 run continues with its own seed and learning rate
    assert main(["train", "resume=true", "max_steps=2", f"output_dir={tmp_path}", "progress=false"]) == 0
    out = capsys.readouterr()
    assert f"agrpo: resuming {seed1} (interrupted)" in out.err
    assert json.loads(out.out.strip().splitlines()[-1])["steps"] == 2 and len(read(seed1)) == 3
    saved = load_config(RLConfig, str(seed1 / "config.yaml"))
    assert (saved.seed, saved.lr, saved.max_steps) == (1, 1e-3, 2)
    # every run has finished: the newest one matching what was passed
    assert main(["train", "resume=true", "objective=diffu_grpo", "max_steps=2", f"output_dir={tmp_path}"]) == 0
    assert f"resuming {tmp_path / 'tiny-sudoku-diffu-grpo'} (finished)" in capsys.readouterr().err
    # a named run resumed with other settings than its own is refused in one line
    assert main(["train", "name=tiny-sudoku-agrpo", "resume=true", "seed=2", f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was run with seed=0 (now 2): resume it with its own settings" in err[0], err
    with pytest.raises(rl.AgrpoError, match=r"was run with lr=0.001 \(now 0.01\)"):
        rl.train(small(tiny_dir, tmp_path, name="tiny-sudoku-agrpo-seed1", seed=1, lr=1e-2, max_steps=3, resume=True))
    # nothing to resume: resume=true is refused in one line naming the runs there, and starts nothing
    assert main(["train", *args("max_steps=1", "seed=5", "resume=true")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no run in" in err[0] and "tiny-sudoku-agrpo-seed1" in err[0] and "resume=auto" in err[0]
    assert not (tmp_path / "tiny-sudoku-agrpo-seed5").exists()
    # resume=auto: a new run when there is none, said so
    assert main(["train", *args("max_steps=1", "seed=5", "resume=auto")]) == 0
    assert "no run in" in capsys.readouterr().err and (tmp_path / "tiny-sudoku-agrpo-seed5").is_dir()


def test_cached_rollouts_train_with_the_gap_logged(tiny_dir, tmp_path):
    """A dual cache on the (bidirectional) tiny model: two updates a batch (the first update's draws and exact old
    log-probs kept for the second), the off-policy gap in every step's log line; exact rollouts log none of it."""
    kw = {"sampling.block_length": 4, "sampling.steps": 16, "sampling.cache": "dual", "inner_steps": 2}
    summary = rl.train(small(tiny_dir, tmp_path, name="dual", max_steps=2, **kw))
    assert summary["skipped_steps"] == 0
    lines = [r for r in read(tmp_path / "dual") if "loss" in r]
    assert len(lines) == 2 and all({"offpolicy_logratio", "offpolicy_outside_clip", "tis_capped"} <= set(r) for r in lines)
    assert any(r["offpolicy_logratio"] != 0 for r in lines)
    rl.train(small(tiny_dir, tmp_path, name="exact", max_steps=1, **{**kw, "sampling.cache": "none"}))
    assert not any("offpolicy_logratio" in r for r in read(tmp_path / "exact"))
