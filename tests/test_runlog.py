import json

import pytest
import yaml

from agrpo.errors import AgrpoError
from agrpo.runlog import RunLog, make_run_dir, plot_curves, read_metrics, save_resolved_config, write_summary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_log_appends_durable_lines(tmp_path):
    log = RunLog(tmp_path, resume=False)
    log.log(0, {"step": 0, "eval_accuracy": 0.25})
    # readable straight away, without closing or flushing anything: a crash loses nothing
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 0, "eval_accuracy": 0.25}]
    log.log(1, {"reward_mean": float("nan"), "loss": 0.5})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[1]) == {"step": 1, "reward_mean": None, "loss": 0.5}  # strict JSON: NaN -> null
    assert "NaN" not in lines[1]


def test_log_rejects_disagreeing_step_and_unserialisable_values(tmp_path):
    log = RunLog(tmp_path, resume=False)
    with pytest.raises(AgrpoError, match="step"):
        log.log(3, {"step": 4})
    with pytest.raises(AgrpoError, match="JSON"):
        log.log(3, {"x": object()})
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_resume_truncates_later_steps_and_never_duplicates(tmp_path):
    log = RunLog(tmp_path, resume=False)
    for s in range(6):
        log.log(s, {"reward_mean": s / 10})
    resumed = RunLog(tmp_path, resume=True)
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 6  # resume alone keeps everything
    assert resumed.truncate_after(3) == 2
    for s in (4, 5):
        resumed.log(s, {"reward_mean": 1.0})
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert steps == [0, 1, 2, 3, 4, 5]
    assert read_metrics(tmp_path / "metrics.jsonl")[-1]["reward_mean"] == 1.0


def test_fresh_log_replaces_an_old_file(tmp_path):
    RunLog(tmp_path, resume=False).log(1, {"a": 1})
    RunLog(tmp_path, resume=False).log(1, {"a": 2})
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "a": 2}]


def test_torn_last_line_is_dropped_on_read_and_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a"')
    assert read_metrics(path) == [{"step": 1, "a": 1}]
    log = RunLog(tmp_path, resume=True)
    log.log(2, {"a": 3})
    assert read_metrics(path) == [{"step": 1, "a": 1}, {"step": 2, "a": 3}]
    assert path.read_text().endswith("\n")


def test_corrupt_middle_line_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(AgrpoError, match="metrics.jsonl line 2"):
        read_metrics(path)
    with pytest.raises(AgrpoError, match="no metrics file"):
        read_metrics(tmp_path / "missing.jsonl")


def test_summary_and_config_are_written_atomically(tmp_path):
    write_summary(tmp_path, {"accuracy": 0.5, "bad": float("inf")})
    write_summary(tmp_path, {"accuracy": 0.75, "steps": 3})
    assert json.loads((tmp_path / "summary.json").read_text()) == {"accuracy": 0.75, "steps": 3}
    cfg = {"name": "x", "lr": 1e-5, "lora": {"r": 8, "target_modules": ("q_proj", "v_proj")}, "a_last": True}
    save_resolved_config(tmp_path, cfg)
    text = (tmp_path / "config.yaml").read_text()
    loaded = yaml.safe_load(text)
    assert loaded == {"name": "x", "lr": 1e-5, "lora": {"r": 8, "target_modules": ["q_proj", "v_proj"]}, "a_last": True}
    assert list(loaded) == ["name", "lr", "lora", "a_last"]  # order kept, not sorted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "summary.json"]  # no temp files left
    with pytest.raises(AgrpoError, match="JSON"):
        write_summary(tmp_path, {"x": object()})
    assert json.loads((tmp_path / "summary.json").read_text())["accuracy"] == 0.75  # old one intact


def _is_png(path):
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


def test_plot_curves_writes_png_for_full_sparse_and_empty_logs(tmp_path):
    log = RunLog(tmp_path, resume=False)
    log.log(0, {"eval_accuracy": 0.1})
    for s in range(1, 6):
        log.log(s, {"reward_mean": s / 10, "reward_std": 0.05, **({"eval_accuracy": 0.3} if s == 5 else {})})
    out = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert out == tmp_path / "curves.png" and _is_png(out)

    one = tmp_path / "one"
    RunLog(one, resume=False).log(1, {"reward_mean": 0.2})  # a single line, no eval, no std
    assert _is_png(plot_curves(one / "metrics.jsonl", one / "plots" / "c.png"))

    empty = tmp_path / "empty"
    RunLog(empty, resume=False)  # empty metrics: a placeholder figure, not an error
    assert _is_png(plot_curves(empty / "metrics.jsonl", empty / "c.png"))

    with pytest.raises(AgrpoError, match="no metrics file"):
        plot_curves(tmp_path / "nothing.jsonl", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_make_run_dir_refuses_to_overwrite_a_started_run(tmp_path):
    run = make_run_dir(tmp_path / "runs", "x", resume=False)
    assert run == tmp_path / "runs" / "x" and run.is_dir()
    assert make_run_dir(tmp_path / "runs", "x", resume=False) == run  # nothing logged yet: reusable
    RunLog(run, resume=False).log(1, {"a": 1})
    with pytest.raises(AgrpoError, match="resume=true.*name="):
        make_run_dir(tmp_path / "runs", "x", resume=False)
    assert make_run_dir(tmp_path / "runs", "x", resume=True) == run
    assert make_run_dir(tmp_path / "runs", "new", resume=True).is_dir()  # resuming nothing starts fresh
    with pytest.raises(AgrpoError, match="name"):
        make_run_dir(tmp_path / "runs", "", resume=False)


def test_curve_data_smooths_the_reward_and_zooms_on_the_accuracy(tmp_path):
    from agrpo.runlog import curve_data, smooth

    assert smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    # a noisy reward that rises by 0.2 over 100 steps; accuracy 0.647 -> 0.668
    records = [{"step": 0, "eval_accuracy": 0.647}]
    for s in range(1, 101):
        line = {"step": s, "reward_mean": 0.5 + 0.002 * s + (0.3 if s % 2 else -0.3)}
        if s % 50 == 0:
            line["eval_accuracy"] = 0.647 + 0.021 * s / 100
        records.append(line)
    data = curve_data(records)
    assert data["smooth_window"] == 10
    raw, sm = data["reward_raw"], data["reward_smooth"]
    assert len(sm) == len(raw) == 100
    assert max(raw) - min(raw) > 0.6  # the raw swing hides the trend ...
    assert all(b >= a - 1e-12 for a, b in zip(sm[10:], sm[11:]))  # ... the smoothed line shows it
    assert data["base_accuracy"] == 0.647 and data["accuracy_steps"] == [0, 50, 100]
    lo, hi = data["accuracy_ylim"]
    assert 0.6 < lo < 0.647 and 0.668 < hi < 0.72  # zoomed to the data, not 0-1
    flat = curve_data([{"step": 0, "eval_accuracy": 0.5}, {"step": 5, "eval_accuracy": 0.5}])
    assert flat["accuracy_ylim"] == (0.475, 0.525)
    assert data["model_free_accuracy"] is None
    # a model-free line logged with the base is drawn and kept in view
    guessed = curve_data([{"step": 0, "eval_accuracy": 0.60, "model_free_accuracy": 0.708}, {"step": 5, "eval_accuracy": 0.65}])
    assert guessed["model_free_accuracy"] == 0.708
    lo, hi = guessed["accuracy_ylim"]
    assert lo < 0.60 and 0.708 < hi < 0.75


def test_agrpo_plot_redraws_curves(tmp_path):
    from agrpo.cli import main

    run = tmp_path / "r"
    log = RunLog(run, resume=False)
    log.log(0, {"eval_accuracy": 0.5})
    log.log(1, {"reward_mean": 0.3})
    assert main(["plot", str(run)]) == 0
    assert _is_png(run / "curves.png")
    assert main(["plot", str(tmp_path / "missing")]) == 2
