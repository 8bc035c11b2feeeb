"""`agrpo study`: the recipes it reuses give the numbers its report states."""

import json

import pytest

from agrpo.cli import main
from agrpo.errors import AgrpoError
from agrpo.recipes import study as S

SMALL = [
    "seeds=0,1", "tokens_per_step=1,4", "variance_k=1,4,16", "variance_prompts=4", "variance_repeats=12",
    "variance_samplers=uniform,stratified,stratified+entropy", "progress=false",
    "overrides=[max_steps=2,time_budget_s=0,eval_size=24,eval_every=0,save_every=0,prompts_per_step=2,group_size=4,num_samples=4,lr=1e-3]",
]


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    cfg_args = SMALL + [f"out={out}"]
    from agrpo.config import load_config

    result = S.run_study(load_config(S.StudyConfig, None, cfg_args))
    return out, result, json.loads((out / S.STUDY).read_text())


def test_every_model_is_graded_on_the_same_problems_and_matches_its_run(small_study):
    out, result, study = small_study
    assert [(r["objective"], r["seed"]) for r in study["runs"]] == [("agrpo", 0), ("agrpo", 1), ("diffu_grpo", 0), ("diffu_grpo", 1)]
    grades = study["eval"]["grades"]
    assert study["steps"] == [16, 4] and study["eval"]["problems"] == 24
    for run in study["runs"]:
        assert run["summary"]["steps"] == 2
        # the study's one-token-a-step evaluation is the run's own final evaluation, problem for problem
        assert sum(grades[run["run_dir"]]["16"]) / 24 == pytest.approx(run["summary"]["final_accuracy"], abs=1e-12)
    base = grades[study["base_model"]]["16"]
    assert sum(base) / 24 == pytest.approx(study["runs"][0]["summary"]["base_accuracy"], abs=1e-12)
    summary = S.summarize_study(study)
    agrpo = summary["ordering"][0]
    assert agrpo["accuracy"] == [r["summary"]["final_accuracy"] for r in study["runs"][:2]]
    assert result["agrpo"]["mean"] == pytest.approx(sum(agrpo["accuracy"]) / 2)
    for name in ("report.md", "ordering.png", "steps.png", "variance.png", "variance_eos.png"):
        assert (out / name).stat().st_size > 0


def test_the_report_is_regenerated_from_its_json_alone(small_study):
    out, _, _ = small_study
    before = (out / "report.md").read_text()
    (out / "report.md").unlink()
    assert main(["study", f"out={out}", "report_only=true"]) == 0
    assert (out / "report.md").read_text() == before


def test_a_finished_study_reuses_its_runs(small_study, capsys):
    out, result, study = small_study
    again = S.run_study(__import__("agrpo.config", fromlist=["x"]).load_config(
        S.StudyConfig, None, SMALL + [f"out={out}", "progress=true"]))
    err = capsys.readouterr().err
    assert err.count("finished before, reused") == 4
    assert "estimator variance: measured before with the same settings, reused" in err
    assert again["agrpo"] == result["agrpo"]
    again_json = json.loads((out / S.STUDY).read_text())
    assert again_json["variance"] == study["variance"] and again_json["variance_eos"] == study["variance_eos"]


def test_estimator_variance_is_zero_when_exact_and_falls_like_one_over_k(small_study):
    _, _, study = small_study
    v = study["variance"]
    curves = {c["sampler"]: c for c in v["curves"]}
    assert v["k"] == [1, 4, 16] and v["t_eff_mean"]["include"] == 16.0
    # stratified with K = T_eff draws every step once: the exact gradient, no variance at all
    assert curves["stratified"]["relative_variance"][2] < 1e-9 < curves["uniform"]["relative_variance"][2]  # float32 rounding only
    u = curves["uniform"]["relative_variance"]
    assert u[0] > 0 and 2.0 < u[0] / u[1] < 8.0  # independent draws: variance ~ 1/K (4x from K=1 to 4)
    assert curves["stratified"]["relative_variance"][0] == pytest.approx(u[0], rel=0.6)  # K = 1: the same law
    for c in v["curves"]:  # unbiased: the mean of the draws sits within a few standard errors of the exact gradient
        for var, bias2 in zip(c["relative_variance"], c["relative_bias2"]):
            if var > S.EXACT:  # an exact cell differs from g by float rounding alone, on both sides
                assert bias2 <= 6 * var / v["repeats"]


def test_the_eos_steps_options_are_compared_on_rollouts_that_stop_early(small_study):
    out, _, study = small_study
    assert not study["variance"]["eos_options_differ"]  # Sudoku never stops early: one estimator
    v = study["variance_eos"]
    assert (v["task"], v["remasking"]) == ("tiny-countdown", "random") and v["eos_options_differ"]
    # include learns from the EOS decisions after the answer: longer horizons than the truncation
    assert v["t_eff_mean"]["include"] > v["t_eff_mean"]["exclude"]
    curves = {(c["sampler"], c["eos_steps"]): c for c in v["curves"]}
    assert set(curves) == {(s, e) for s in ("uniform", "stratified", "stratified+entropy") for e in ("include", "exclude")}
    for c in v["curves"]:
        assert all(x > 0 for x in c["relative_variance"][:2])  # K = 1, 4 < T_eff: sampling noise
        for var, bias2 in zip(c["relative_variance"], c["relative_bias2"]):
            if var > S.EXACT:
                assert bias2 <= 6 * var / v["repeats"]
    report = (out / "report.md").read_text()
    assert "### On rollouts that stop early" in report and report.count("| stratified | exclude |") == 1


def test_t_interval_and_paired_differences_by_hand():
    mean, sd, lo, hi = S.t_interval([0.70, 0.74, 0.72])
    assert mean == pytest.approx(0.72) and sd == pytest.approx(0.02)
    assert (lo, hi) == pytest.approx((0.72 - 4.303 * 0.02 / 3**0.5, 0.72 + 4.303 * 0.02 / 3**0.5))
    p = S.paired([1.0, 0.5, 0.0, 1.0], [0.5, 0.5, 0.5, 0.0])
    assert p["diff"] == pytest.approx(0.25) and (p["better"], p["worse"], p["n"]) == (2, 1, 4)


@pytest.mark.parametrize("arg,message", [
    ("objectives=agrpo,ppo", "objectives=agrpo,ppo: choose from agrpo, diffu_grpo"),
    ("seeds=0,x", "seeds=0,x: write whole numbers"),
    ("variance_samplers=sobol", "choose from uniform"),
    ("tokens_per_step=3", "tokens_per_step=3 does not divide the completion"),
    ("time_budget_s=0", "time_budget_s must be > 0"),
    ("variance_k=1,32", "variance_k=1,32: K above the 16 denoising steps"),
])
def test_bad_settings_are_one_line(tmp_path, capsys, arg, message):
    assert main(["study", arg, f"out={tmp_path / 's'}", "progress=false"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists()


def test_per_step_gradients_give_every_plan_its_autograd_gradient():
    """The variance study sums per-(row, step) gradients instead of back-propagating each estimate:
    for plans of every kind the sum equals autograd on the plan's loss."""
    import torch

    from agrpo.data import encode_prompts
    from agrpo.models import load_model_and_tokenizer
    from agrpo.objectives import group_advantages
    from agrpo.objectives.agrpo import every_step_plan, plan_steps
    from agrpo.policy import Policy
    from agrpo.sampling import SamplingConfig, generate
    from agrpo.tasks import get_task

    torch.manual_seed(0)
    model, tok = load_model_and_tokenizer("tiny:countdown")
    model.eval()
    policy, task = Policy(model), get_task("tiny-countdown")
    rows = [r for r in task.train_examples(3, seed=0) for _ in range(4)]
    ids, mask = encode_prompts(tok, [task.prompt(r) for r in rows])
    sampling = SamplingConfig(gen_length=16, block_length=16, steps=16, temperature=1.0, remasking="random")
    with torch.no_grad():
        ro = generate(policy, ids, mask, sampling, torch.Generator().manual_seed(1))
    adv = torch.tensor([0.5, -0.5, 1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 2.0, -1.0, -1.0, 0.0])  # a group with no signal
    valid = torch.ones(12, dtype=torch.bool)
    valid[3] = False  # a dropped row
    index, per_draw = S.draw_gradients(policy, ro, adv, valid)
    gen = torch.Generator().manual_seed(2)
    plans = [every_step_plan(ro, row_valid=valid, eos_steps=e) for e in ("include", "exclude")]
    plans += [plan_steps(ro, 3, s, i, "sequence", valid, gen, e) for s, i, e in
              [("uniform", "none", "include"), ("low_discrepancy", "entropy", "exclude"), ("stratified", "entropy", "include")]]
    for plan in plans:
        direct = S.direct_gradient(policy, ro, adv, plan)
        fast = S.plan_gradient(index, per_draw, plan)
        assert float(direct.norm()) > 0
        assert float((fast - direct).norm() / direct.norm()) < 1e-5
