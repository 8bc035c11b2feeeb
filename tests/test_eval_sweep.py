"""`agrpo eval` sweeps: results.json, generations.jsonl and the plot; resuming; two processes as one."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import agrpo.evaluation as evaluation
from agrpo.cli import main
from agrpo.config import load_config
from agrpo.errors import AgrpoError
from agrpo.evaluation import mean_interval, summarize, wilson_interval
from agrpo.recipes import evaluate as recipe
from agrpo.recipes.evaluate import EvalConfig, default_out, sweep_settings
from agrpo.runlog import sweep_series

TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
# 36 rows in batches of 8: four full batches and a short one per setting, 15 batches in all,
# so the second of two processes sits out the last round
SWEEP = ["model=tiny:sudoku", "task=tiny-sudoku", "eval_size=36", "batch_size=8", "steps=4,8,16", "progress=false"]
BATCHES = 15


@pytest.fixture
def count_generate(monkeypatch):
    """Counts sampler calls; `fail_after=n` interrupts the n+1-th one as Ctrl-C would."""
    state = {"calls": 0, "fail_after": None}
    real = evaluation.generate

    def counted(*args, **kwargs):
        if state["fail_after"] is not None and state["calls"] >= state["fail_after"]:
            raise KeyboardInterrupt
        state["calls"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "generate", counted)
    return state


def _run(out: Path, capsys, extra=()) -> dict:
    assert main(["eval", *SWEEP, f"out={out}", *extra]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted sweep on one process."""
    out = tmp_path_factory.mktemp("sweep") / "eval"
    assert main(["eval", *SWEEP, f"out={out}"]) == 0
    return out


def test_sweep_writes_the_three_files(reference, tmp_path, capsys, count_generate):
    out = tmp_path / "eval"
    summary = _run(out, capsys)
    assert count_generate["calls"] == BATCHES and summary["generated"] == 36 * 3 and summary["reused"] == 0
    results = json.loads((out / "results.json").read_text())
    assert results == json.loads((reference / "results.json").read_text())
    settings = results["settings"]
    assert [s["steps"] for s in settings] == [4, 8, 16] and {s["gen_length"] for s in settings} == {16}
    lines = _lines(out)
    assert len(lines) == 36 * 3
    assert set(lines[0]) >= {"setting", "model", "row", "prompt", "completion", "rewards", "grade"}
    for s in settings:
        grades = [g["grade"] for g in lines if g["setting"]["steps"] == s["steps"]]
        assert sorted(g["row"] for g in lines if g["setting"]["steps"] == s["steps"]) == list(range(36))
        assert s["accuracy"] == pytest.approx(sum(grades) / 36) and s["n"] == 36
        assert s["ci_method"].startswith("normal")  # Sudoku grades are fractions of cells
        assert s["ci95"][0] < s["accuracy"] < s["ci95"][1]
        assert s["reward_means"]["reward"] == pytest.approx(s["accuracy"])  # tiny Sudoku: reward = grade
    assert [s["accuracy"] for s in summary["settings"]] == [s["accuracy"] for s in settings]

    from PIL import Image

    with Image.open(out / "accuracy_vs_steps.png") as image:
        assert image.size[0] > 300 and image.size[1] > 200
    (line,) = sweep_series(settings)
    assert line["steps"] == [4, 8, 16] and line["accuracy"] == [s["accuracy"] for s in settings]
    assert line["low"] == [s["ci95"][0] for s in settings]


def test_rerun_after_a_torn_file_redoes_only_unfinished_batches(reference, tmp_path, capsys, count_generate):
    out = tmp_path / "eval"
    shutil.copytree(reference, out)
    (out / "results.json").unlink()
    data = (out / "generations.jsonl").read_text().splitlines(keepends=True)
    # two whole batches, half of the third, then a line cut mid-way (a crash during a write)
    (out / "generations.jsonl").write_text("".join(data[:20]) + data[20][:30])
    summary = _run(out, capsys)
    assert count_generate["calls"] == BATCHES - 2
    assert summary["reused"] == 16 and summary["generated"] == 36 * 3 - 16
    assert len(_lines(out)) == 20 + 36 * 3 - 16  # the torn line gone, whole lines appended after it
    assert json.loads((out / "results.json").read_text()) == json.loads((reference / "results.json").read_text())


def test_interrupted_evaluation_resumes_with_the_same_results(reference, tmp_path, capsys, count_generate):
    out = tmp_path / "eval"
    count_generate["fail_after"] = 7
    assert main(["eval", *SWEEP, f"out={out}"]) == 130
    assert len(_lines(out)) == 7 * 8 - 4  # seven batches written, one of them the short one
    assert not (out / "results.json").exists()
    count_generate.update(calls=0, fail_after=None)
    summary = _run(out, capsys)
    assert count_generate["calls"] == BATCHES - 7 and summary["reused"] == 52
    assert json.loads((out / "results.json").read_text()) == json.loads((reference / "results.json").read_text())
    # a finished evaluation run again samples nothing
    count_generate["calls"] = 0
    assert _run(out, capsys)["generated"] == 0 and count_generate["calls"] == 0


def test_sampled_decoding_resumes_to_the_same_completions(tmp_path, capsys, count_generate):
    sampled = ["eval_size=24", "batch_size=8", "sampling.temperature=1.5", "seed=3", "progress=false"]
    assert main(["eval", *sampled, f"out={tmp_path / 'straight'}"]) == 0
    count_generate.update(calls=0, fail_after=1)
    assert main(["eval", *sampled, f"out={tmp_path / 'resumed'}"]) == 130
    count_generate.update(calls=0, fail_after=None)
    assert main(["eval", *sampled, f"out={tmp_path / 'resumed'}"]) == 0
    assert count_generate["calls"] == 2
    straight, resumed = _lines(tmp_path / "straight"), _lines(tmp_path / "resumed")
    assert [r["completion"] for r in resumed] == [r["completion"] for r in straight]
    # the draws are random: a greedy run would write other completions
    greedy = tmp_path / "greedy"
    assert main(["eval", *sampled, "sampling.temperature=0", f"out={greedy}"]) == 0
    assert [r["completion"] for r in _lines(greedy)] != [r["completion"] for r in straight]


def test_new_weights_are_evaluated_again(tmp_path, capsys, count_generate):
    from agrpo.models import TINY_DIR

    model = tmp_path / "model"
    shutil.copytree(TINY_DIR / "sudoku", model)
    args = ["eval", f"model={model}", "eval_size=8", "batch_size=8", "progress=false", f"out={tmp_path / 'eval'}"]
    for expected in (1, 0):
        count_generate["calls"] = 0
        assert main(args) == 0 and count_generate["calls"] == expected
    weights = next(model.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # a new save
    assert main(args) == 0 and count_generate["calls"] == 1
    capsys.readouterr()


def test_generations_of_other_data_are_refused(reference, tmp_path, capsys):
    out = tmp_path / "eval"
    shutil.copytree(reference, out)
    lines = _lines(out)
    lines[3]["prompt"] = "1234123412341234="
    (out / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert main(["eval", *SWEEP, f"out={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "row 3" in err[0] and "out=" in err[0]


def test_paper_decoding_is_the_default_for_natural_language_tasks():
    paper = sweep_settings(load_config(EvalConfig, None, ["task=countdown"]), character_level=False)
    assert [(s.gen_length, s.block_length, s.steps, s.temperature, s.remasking) for s in paper] == [
        (256, 32, 128, 0.0, "low_confidence")
    ]
    tiny = sweep_settings(load_config(EvalConfig, None, []), character_level=True)
    assert [(s.gen_length, s.block_length, s.steps) for s in tiny] == [(16, 16, 16)]
    swept = sweep_settings(load_config(EvalConfig, None, ["gen_length=128,256,512"]), character_level=False)
    assert [(s.gen_length, s.block_length, s.steps) for s in swept] == [(128, 32, 64), (256, 32, 128), (512, 32, 256)]
    both = sweep_settings(load_config(EvalConfig, None, ["gen_length=256,512", "steps=128,256"]), character_level=False)
    assert [(s.gen_length, s.steps) for s in both] == [(256, 128), (256, 256), (512, 128), (512, 256)]
    # a length set in the sampling section (older commands) still applies
    old = sweep_settings(load_config(EvalConfig, None, ["sampling.gen_length=64", "sampling.block_length=64",
                                                        "sampling.steps=32"]), character_level=False)
    assert [(s.gen_length, s.block_length, s.steps) for s in old] == [(64, 64, 32)]


def test_an_impossible_setting_is_one_line_before_any_model_loads(monkeypatch, capsys):
    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the sweep was checked")

    monkeypatch.setattr(recipe, "load_model_and_tokenizer", no_loading)
    assert main(["eval", "gen_length=16", "steps=32,64", "eval_size=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gen_length=16 block_length=16 steps=32" in err[0] and "none of the 2" in err[0]
    # the paper's cross product holds impossible pairs: they are left out, the rest runs
    cfg = load_config(EvalConfig, None, ["task=countdown", "gen_length=128,256,512", "steps=64,128,256"])
    kept = sweep_settings(cfg, character_level=False)
    err = capsys.readouterr().err.strip().splitlines()  # one line, no Python source line after it
    assert err == ["agrpo: warning: 1 of the 9 settings cannot run and are left out: gen_length=128 steps=256"]
    assert [(s.gen_length, s.steps) for s in kept] == [
        (128, 64), (128, 128), (256, 64), (256, 128), (256, 256), (512, 64), (512, 128), (512, 256)]
    assert main(["eval", "steps=8,x"]) == 2
    assert "'x' is not an integer" in capsys.readouterr().err
    with pytest.raises(AgrpoError, match="output="):
        recipe.run_eval(load_config(EvalConfig, None, ["steps=8,16", "output=x.json"]))


def test_default_output_directory(tmp_path):
    run = tmp_path / "runs" / "cd"
    (run / "checkpoints" / "step_000010").mkdir(parents=True)
    assert default_out([str(run)]) == run.resolve() / "eval"
    assert default_out([str(run / "checkpoints" / "step_000010")]) == run.resolve() / "eval"
    assert default_out(["GSAI-ML/LLaDA-8B-Instruct"]) == Path("evals/GSAI-ML-LLaDA-8B-Instruct")
    assert default_out([str(run), "tiny:countdown"]) == Path("evals/cd+tiny-countdown")


def test_intervals_against_hand_worked_values():
    # Wilson, z = 1.96: 0/10 -> [0, 0.2775]; 5/10 -> [0.2366, 0.7634]
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    # mean 0.5, sample sd sqrt(0.125 / 3) = 0.20412, half-width 1.96 * 0.20412 / 2 = 0.20004
    assert mean_interval([0.25, 0.5, 0.75, 0.5]) == pytest.approx((0.29996, 0.70004), abs=1e-5)
    binary = summarize([1.0, 0.0, 1.0, 1.0], [{"a": 1.0, "b": None}] * 4)
    assert binary["ci_method"] == "wilson" and binary["ci95"] == list(wilson_interval(3, 4))
    assert (binary["correct"], binary["wrong"], binary["partial"]) == (3, 1, 0)
    assert binary["reward_means"] == {"a": 1.0, "b": None}
    assert summarize([0.5, 1.0], [{}, {}])["ci_method"].startswith("normal")


def test_one_line_per_model_and_length():
    settings = [
        {"model": m, "gen_length": g, "block_length": 32, "steps": t, "accuracy": 0.1 * t / g, "ci95": [0.0, 1.0]}
        for m in ("runs/cd", "base") for g in (256, 128) for t in (g, g // 4, g // 2)
    ]
    lines = sweep_series(settings)
    assert [line["label"] for line in lines] == [
        "runs/cd, length 256", "runs/cd, length 128", "base, length 256", "base, length 128"
    ]
    assert lines[1]["steps"] == [32, 64, 128] and lines[1]["accuracy"] == pytest.approx([0.025, 0.05, 0.1])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="torchrun missing")
def test_two_processes_evaluate_as_one(reference, tmp_path):
    out = tmp_path / "eval"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "agrpo.cli", "eval", *SWEEP, f"out={out}"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("two-process evaluation did not finish in 90 s (processes waiting on each other?)")
    assert proc.returncode == 0, stderr[-3000:]
    key = lambda r: (r["setting"]["steps"], r["row"])  # noqa: E731
    one, two = sorted(_lines(reference), key=key), sorted(_lines(out), key=key)
    assert [(key(r), r["completion"], r["grade"]) for r in two] == [(key(r), r["completion"], r["grade"]) for r in one]
    assert json.loads((out / "results.json").read_text()) == json.loads((reference / "results.json").read_text())


def test_the_task_follows_the_model_and_a_mismatch_is_one_line(tmp_path, capsys):
    from agrpo.tasks import trained_task

    assert trained_task("tiny:countdown") == "tiny-countdown" and trained_task("org/model") is None
    assert trained_task("tiny:sudoku-rows-boxes") == "tiny-sudoku" and trained_task("tiny:sudokus") is None
    run = tmp_path / "runs" / "cd"
    (run / "checkpoints" / "step_000004").mkdir(parents=True)
    (run / "config.yaml").write_text("task: tiny-countdown\nseed: 0\n")
    assert trained_task(str(run / "checkpoints" / "step_000004")) == "tiny-countdown"
    assert main(["eval", "model=tiny:countdown", "eval_size=4", "progress=false", f"out={tmp_path / 'e'}"]) == 0
    assert json.loads((tmp_path / "e" / "results.json").read_text())["task"] == "tiny-countdown"
    capsys.readouterr()
    assert main(["eval", "task=tiny-countdown", "eval_size=4", f"out={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tiny:sudoku-rows-boxes was made for task 'tiny-sudoku', not 'tiny-countdown'" in err[0]
    countdown_file = tmp_path / "cd.jsonl"
    countdown_file.write_text('{"input": "1,2,3", "output": "6"}\n')
    assert main(["eval", f"data={countdown_file}", "eval_size=1", f"out={tmp_path / 'y'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a tiny-sudoku file" in err[0]
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
