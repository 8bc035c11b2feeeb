"""`agrpo study`: the recipes it reuses give the numbers its report states."""

import json
import math

import pytest

from agrpo.cli import main
from agrpo.errors import AgrpoError
from agrpo.recipes import study as S

SMALL = [
    "seeds=0,1", "tokens_per_step=1,4", "variance_k=1,4,16", "variance_prompts=4", "variance_repeats=12",
    "variance_samplers=uniform,stratified,stratified+entropy", "progress=false", "profile_steps=0", "quality_repeats=0",
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


CHEAP = ["seeds=0", "objectives=agrpo", "tokens_per_step=1", "variance_k=1", "variance_samplers=uniform", "variance_prompts=1",
         "variance_repeats=2", "eos_variance=false", "profile_steps=0", "quality_repeats=0",
         "overrides=[max_steps=1,time_budget_s=0,train_pool=8,eval_size=4,eval_every=0,save_every=0,prompts_per_step=1,group_size=2]"]


@pytest.mark.parametrize("arg,message", [
    ("objectives=agrpo,ppo", "objectives=agrpo,ppo: unknown objective ppo: choose from agrpo, diffu_grpo, "),
    ("objectives=agrpo,dipo", ("dipo replays block by block and needs a block-diffusion model, but the preset's model "
                               "tiny:sudoku-rows-boxes attends over the whole sequence")),
    ("quality_repeats=1", "quality_repeats must be >= 2"),
    ("seeds=0,x", "seeds=0,x: write whole numbers"),
    ("variance_samplers=sobol", "choose from uniform"),
    ("tokens_per_step=3", "tokens_per_step=3 does not divide the completion"),
    ("time_budget_s=0", "time_budget_s must be > 0"),
    ("variance_k=1,32", "variance_k=1,32: K above the 16 denoising steps"),
])
def test_bad_settings_are_one_line(tmp_path, capsys, arg, message):
    # the setting tested comes last and wins; the others keep a study that wrongly starts down to seconds
    assert main(["study", *CHEAP, arg, f"out={tmp_path / 's'}", "progress=false"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists()


def test_per_step_gradients_give_every_plan_its_autograd_gradient():
    """The variance study sums per-(row, step) gradients instead of back-propagating each estimate:
    for plans of every kind the sum equals autograd on the plan's loss."""
    import torch

    from agrpo.data import encode_prompts
    from agrpo.models import load_model_and_tokenizer
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


# ---- any list of objectives ------------------------------------------------------------------------

SUBSET = [
    "objectives=agrpo,espo", "seeds=0", "time_budget_s=30", "rollout_steps=2", "tokens_per_step=1,4",
    "variance_k=1,2", "variance_samplers=uniform", "variance_prompts=2", "variance_repeats=2", "eos_variance=false",
    "profile_steps=1", "quality_knob=1,16", "quality_repeats=3", "progress=false",
    "overrides=[max_steps=1,train_pool=64,eval_size=16,eval_every=0,save_every=0,prompts_per_step=2,group_size=4,num_samples=4]",
]


@pytest.fixture(scope="module")
def subset_study(tmp_path_factory):
    """A study of two objectives: the same-time runs (1 step under the 30 s budget), the equal-rollouts runs
    (rollout_steps=2), a 1-step profile of each and the gradient quality of each."""
    from agrpo.config import load_config

    out = tmp_path_factory.mktemp("subset")
    result = S.run_study(load_config(S.StudyConfig, None, SUBSET + [f"out={out}"]))
    return out, result, json.loads((out / S.STUDY).read_text())


def test_the_equal_rollouts_runs_are_their_own_set_with_max_steps_set(subset_study):
    out, result, study = subset_study
    from agrpo.config import read_yaml

    assert study["objectives"] == ["agrpo", "espo"] and study["rollout_steps"] == 2
    assert [(r["objective"], r["seed"]) for r in study["runs_rollouts"]] == [("agrpo", 0), ("espo", 0)]
    for run, same_time in zip(study["runs_rollouts"], study["runs"]):
        saved = read_yaml(f"{run['run_dir']}/config.yaml")
        assert (saved["max_steps"], saved["time_budget_s"], saved["epochs"]) == (2, 0, 0)
        assert run["summary"]["steps"] == 2 and same_time["summary"]["steps"] == 1
        assert read_yaml(f"{same_time['run_dir']}/config.yaml")["time_budget_s"] == 30
        assert run["run_dir"] == str(out / "runs-2steps" / f"{run['objective']}-seed0")  # apart from runs/
        assert same_time["run_dir"] == str(out / "runs" / f"{run['objective']}-seed0")
        assert run["step_s"]["steps"] == 2 and run["step_s"]["mean"] > 0
        # every trained model is evaluated at every step count, the equal-rollouts ones too
        assert set(study["eval"]["grades"][run["run_dir"]]) == {"16", "4"}
    assert set(result["rollouts"]) == {"agrpo", "espo"}
    report = (out / "report.md").read_text()
    assert "### At the same number of rollouts: 2 steps (16 rollouts) a run" in report
    assert "`max_steps=2 time_budget_s=0 epochs=0`" in report and "| agrpo - espo |" in report
    assert (out / "ordering_rollouts.png").stat().st_size > 0 and (out / "steps_rollouts.png").stat().st_size > 0


def test_the_plans_of_equal_rollouts_set_max_steps_over_any_budget(tmp_path):
    from agrpo.recipes.rl import default_preset

    plans = S.plan_runs(tmp_path / "r", default_preset(), ["time_budget_s=60", "max_steps=9"] + S.equal_rollouts(7),
                        ["agrpo", "wd1"], [0, 3])
    assert [(o, s) for o, s, _ in plans] == [("agrpo", 0), ("agrpo", 3), ("wd1", 0), ("wd1", 3)]
    assert all((c.max_steps, c.time_budget_s, c.epochs, c.objective) == (7, 0, 0, o) for o, _, c in plans)


def test_cost_and_settings_of_each_objective_come_from_its_runs(subset_study):
    out, _, study = subset_study
    for o in ("agrpo", "espo"):
        p = study["profile"][o]
        assert p["steps"] == 1 and p["forwards_per_step"]["rollout"] == 4  # the preset's 4 denoising steps
        # the peak RSS over the steps, reset at their start: above the RSS then, below the loading's peak + steps
        assert p["memory"] == "VmHWM" and p["peak_mb"] - p["rise_mb"] > 100 and p["rise_mb"] > 0
    agrpo, espo = study["profile"]["agrpo"], study["profile"]["espo"]
    # AGRPO: one forward of 8 rows x K = 4 steps; ESPO: old and new ELBO, 8 rows x 2 copies x 2 (complements) each
    assert (agrpo["forwards_per_step"]["loss"], agrpo["sequences_per_step"]["loss"]) == (1, 32)
    assert (espo["forwards_per_step"]["loss"], espo["sequences_per_step"]["loss"]) == (2, 64)
    settings = S.summarize_settings(study["runs"])
    assert settings["common"]["prompts_per_step"] == 2 and settings["common"]["time_budget_s"] == 30
    assert settings["objectives"]["agrpo"] == {"num_samples": [4]}  # the preset's K; espo runs its defaults
    assert settings["objectives"]["espo"] == {}
    report = (out / "report.md").read_text()
    assert "## 4. Cost per objective" in report
    # each objective's own settings, defaults included; the ones its runs set marked
    assert "| espo | `espo.complement=True`, `espo.copies=2`, `espo.tokens=all` | none |" in report
    assert "| agrpo | `importance=none`, `num_samples=4` (set), `step_sampling=stratified`, `tis_cap=2.0` | none |" in report
    assert "Updates per batch of rollouts (mu, `inner_steps`): 1 unless" in report
    row = next(line for line in report.splitlines() if line.startswith("| espo | ") and "| 64 |" in line)
    assert row.split(" | ")[5:8] == ["2", "64", "4"]  # loss forwards, loss sequences, sampler forwards


def test_gradient_quality_section_of_a_study(subset_study):
    out, _, study = subset_study
    q = study["quality"]
    agrpo, espo = q["objectives"]
    assert (agrpo["knob"], espo["knob"]) == ("num_samples", "espo.copies")
    assert [c["value"] for c in agrpo["cells"]] == [1, 4, 16] and agrpo["configured"] == 4  # the runs' K added
    assert [c["value"] for c in espo["cells"]] == [1, 2, 16] and espo["configured"] == 2
    assert agrpo["cells"][-1]["cosine"] > 0.99
    report = (out / "report.md").read_text()
    assert "## 5. Gradient quality on fixed rollouts" in report and "| agrpo | 4* |" in report
    # the advantages alone: AGRPO's are the reference's, ESPO's leave-one-out ones a multiple of them
    assert q["advantage_cosine"] == pytest.approx({"agrpo": 1.0, "espo": 1.0}, abs=1e-6)
    assert "| espo | `espo.copies` | mask draws per completion, each with its complement | 1.000 |" in report
    assert (out / "quality.png").stat().st_size > 0


def test_a_subset_study_resumes_with_everything_reused(subset_study, capsys):
    from agrpo.config import load_config

    out, result, study = subset_study
    (out / S.STUDY).unlink()  # as if interrupted before the end: every measurement is kept as soon as it is done
    again = S.run_study(load_config(S.StudyConfig, None, SUBSET + [f"out={out}", "progress=true"]))
    err = capsys.readouterr().err
    assert err.count("finished before, reused") == 4  # both sets
    assert err.count("measured before with the same settings, reused") == 3  # variance, two profiles
    assert "gradient quality of agrpo, espo: measured before, reused" in err
    for o in ("agrpo", "espo"):  # one seed: no interval (nan), the means
        assert again[o]["mean"] == result[o]["mean"] and again["rollouts"][o]["mean"] == result["rollouts"][o]["mean"]
    again_json = json.loads((out / S.STUDY).read_text())
    assert again_json["quality"] == study["quality"] and again_json["profile"] == study["profile"]
    assert again_json["invocations"] == 1  # the earlier study.json was gone: its time is not known
    # once more, study.json kept: the report's time is both invocations', not the last's alone
    S.run_study(load_config(S.StudyConfig, None, SUBSET + [f"out={out}"]))
    third = json.loads((out / S.STUDY).read_text())
    assert third["invocations"] == 2
    assert third["total_wall_s"] == pytest.approx(again_json["wall_s"] + third["wall_s"])
    assert f"Study time {third['total_wall_s'] / 60:.1f} min over 2 invocations" in (out / "report.md").read_text()


def test_a_finished_run_trained_otherwise_is_refused_before_any_training(subset_study, capsys):
    out, _, _ = subset_study
    before = sorted(p.name for p in out.iterdir())
    assert main(["study", *[a for a in SUBSET if not a.startswith("time_budget_s")], "time_budget_s=60", f"out={out}"]) == 2
    err = capsys.readouterr().err
    assert "agrpo-seed0 finished with time_budget_s=30.0 (now 60.0): pass another out=" in err and err.count("\n") == 1
    assert sorted(p.name for p in out.iterdir()) == before


def test_dipo_is_accepted_with_a_block_model():
    from agrpo.config import load_config
    from agrpo.presets import CONFIGS
    from agrpo.recipes.rl import RLConfig

    block = load_config(RLConfig, str(CONFIGS / "tiny_sudoku_blocks.yaml"))
    S.check_block_models(["agrpo", "dipo"], block)  # no error
    with pytest.raises(AgrpoError, match="dipo replays block by block"):
        S.check_block_models(["dipo"], load_config(RLConfig, str(CONFIGS / "tiny_sudoku.yaml")))


def test_every_objective_has_a_knob_or_a_reason():
    from agrpo.recipes.rl import RLConfig

    cfg = RLConfig()
    for name in S.OBJECTIVES:
        key, what = S.knob_of(name)
        assert (name in S.KNOBS) != (name in S.FIXED) and what
        if key:
            assert isinstance(S._get(cfg, key), int) and key.split(".")[0] in ({name} | S.owned_keys(name))


@pytest.fixture(scope="module")
def tiny_batch():
    from agrpo.config import load_config
    from agrpo.recipes.rl import RLConfig, default_preset

    base = load_config(RLConfig, default_preset(), ["group_size=4"])
    return base, S.fixed_batch(base, 8)  # 32 rollouts


def test_gradient_quality_exact_at_every_step_and_a_biased_proxy(tiny_batch):
    base, batch = tiny_batch
    q = S.gradient_quality(base, ["agrpo", "diffu_grpo"], [1, 8, 16], 2, batch)
    agrpo, diffu = q["objectives"]
    cells = {c["value"]: c for c in agrpo["cells"]}
    assert set(cells) == {1, 4, 8, 16} and agrpo["configured"] == 4  # the preset's K is added
    assert [cells[k]["repeats"] for k in (1, 4, 8, 16)] == [32, 8, 4, 2]  # 2 x 16 / K: as many forwards a cell
    # K = 16 = every step of a one-token-a-step rollout, stratified: the exact gradient on every draw
    assert cells[16]["cosine"] > 0.99 and cells[16]["relative_variance"] < 1e-9 and cells[16]["draw_cosine"] > 0.99
    var = [cells[k]["relative_variance"] for k in (1, 4, 8, 16)]
    assert all(c["resolved"] for c in cells.values()) and all(math.isfinite(v) for v in var)
    assert var[0] > var[1] > var[2] > var[3]
    assert cells[1]["draw_cosine"] < cells[8]["draw_cosine"] < cells[16]["draw_cosine"]
    (d,) = diffu["cells"]
    assert diffu["knob"] is None and d["value"] is None and d["repeats"] == 32
    # a biased proxy: a cosine in [-1, 1], and far below what the noise of its 32 draws would explain
    assert -1 <= d["cosine"] <= 1 and math.isfinite(d["relative_variance"]) and d["relative_variance"] > 0
    assert 0 < d["noise_cosine"] <= 1 and -1 <= d["draw_cosine"] <= 1 and d["cosine"] < 0.5 * d["noise_cosine"]


def test_the_advantages_alone_turn_the_exact_gradient_by_their_own_cosine(tiny_batch):
    """The exact every-step gradient with an objective's own advantages against the reference's: AGRPO's (the
    preset's) and leave-one-out ones (a multiple of them) give 1; BGPO's z-scores weigh each group by 1/std;
    TraceRL z-scores and drops the groups outside its accuracy band. Checked against the gradient recomputed here
    with z-scores."""
    import torch

    from agrpo.objectives.agrpo import every_step_plan

    base, batch = tiny_batch
    cos = S.advantage_cosines(base, ["agrpo", "espo", "bgpo", "tracerl"], batch)
    assert cos["agrpo"] == pytest.approx(1.0, abs=1e-6) and cos["espo"] == pytest.approx(1.0, abs=1e-6)
    r = torch.tensor(batch.rewards, dtype=torch.float64).view(-1, base.group_size)
    centred, std = r - r.mean(1, keepdim=True), r.std(1, keepdim=True, unbiased=False)
    z = torch.where(std > 0, centred / std.clamp(min=1e-12), torch.zeros_like(r)).flatten().float()
    plan = every_step_plan(batch.rollout, base.normalization, None, base.eos_steps)
    expected = S._cos(S.direct_gradient(batch.policy, batch.rollout, z, plan), S.exact_gradient(base, batch))
    assert cos["bgpo"] == pytest.approx(expected, abs=1e-5) and cos["bgpo"] < 0.999
    assert cos["tracerl"] < 0.99 and abs(cos["tracerl"] - cos["bgpo"]) > 0.01  # its dropped groups count too


def test_every_objective_runs_its_own_update_in_the_quality_section(tiny_batch):
    base, batch = tiny_batch
    names = [o for o in S.OBJECTIVES if not S.OBJECTIVES[o].block_models_only]
    q = S.gradient_quality(S._set(base, "bgpo.copies", 2), names, [2], 2, batch)  # BGPO's 16 copies: slow here
    for e in q["objectives"]:
        for c in e["cells"]:
            assert "refused" not in c, (e["objective"], c)
            if c["cosine"] is None:  # TraceRL's accuracy filter drops every group of this batch: no gradient
                assert e["objective"] == "tracerl" and c["mean_norm"] == 0
                continue
            assert -1 <= c["cosine"] <= 1 and -1 <= c["draw_cosine"] <= 1 and c["repeats"] >= 2, e["objective"]
            # two estimates may not tell a noisy estimator's mean from its noise: then it says so
            assert math.isfinite(c["relative_variance"]) if c["resolved"] else c["relative_variance"] is None
    fixed = {e["objective"]: e["cells"][0]["relative_variance"] for e in q["objectives"] if e["objective"] == "tracerl"}
    assert fixed.get("tracerl") in (None, 0.0)  # no draw: every repeat the same gradient


def test_report_tables_from_a_synthetic_study(tmp_path):
    """Made-up grades of 4 problems, 3 seeds: every number of the ordering tables by hand."""
    base = [0.5, 0.5, 0.0, 1.0]
    runs = {("agrpo", 0): [1.0, 0.5, 0.5, 1.0], ("agrpo", 1): [1.0, 1.0, 0.5, 1.0], ("agrpo", 2): [0.5, 0.5, 0.5, 1.0],
            ("espo", 0): [0.5, 0.5, 0.0, 1.0], ("espo", 1): [1.0, 0.5, 0.0, 1.0], ("espo", 2): [0.5, 0.5, 0.5, 1.0]}
    rollout_runs = {("agrpo", 0): [1.0, 1.0, 1.0, 1.0], ("espo", 0): [0.0, 0.5, 0.0, 1.0]}

    def entry(o, s, where, settings):
        return {"objective": o, "seed": s, "run_dir": f"{where}/{o}-seed{s}", "summary": {"steps": 10 if where == "runs" else 5},
                "step_s": {"mean": 2.0 if o == "agrpo" else 0.5, "median": 1.0, "steps": 10}, "settings": settings}

    own = {"agrpo": {"num_samples": 4}, "espo": {"espo.copies": 4}}
    common = {"model": "tiny:x", "lr": 0.0001}
    grades = {"tiny:x": {"16": base, "4": base}}
    grades.update({f"runs/{o}-seed{s}": {"16": g, "4": g} for (o, s), g in runs.items()})
    grades.update({f"rr/{o}-seed{s}": {"16": g, "4": g} for (o, s), g in rollout_runs.items()})
    curve = {"sampler": "uniform", "eos_steps": "include", "relative_variance": [2.0, 1.0], "stderr": [0.1, 0.1],
             "relative_bias2": [0.01, 0.01]}
    study = {
        "preset": "tiny.yaml", "overrides": [], "train_config": {"time_budget_s": 60, "max_steps": 0, "prompts_per_step": 2,
                                                                  "group_size": 4},
        "base_model": "tiny:x", "task": "tiny-sudoku", "objectives": ["agrpo", "espo"], "tokens_per_step": [1, 4],
        "steps": [16, 4], "rollout_steps": 5, "wall_s": 60.0,
        "runs": [entry(o, s, "runs", {**common, **own[o]}) for (o, s) in runs],
        "runs_rollouts": [entry(o, s, "rr", {**common, **own[o]}) for (o, s) in rollout_runs],
        "eval": {"problems": 4, "grades": grades},
        "variance": {"rows": 8, "prompts": 2, "reward_mean": 0.5, "t_eff_mean": {"include": 16.0, "exclude": 16.0},
                     "repeats": 4, "k": [1, 2], "curves": [curve], "eos_options_differ": False},
        "profile": {o: {"steps": 3, "forwards_per_step": {"rollout": 4.0, "loss": f}, "sequences_per_step": {"rollout": 32.0, "loss": q},
                        "peak_mb": 500.0, "rise_mb": r, "memory": "VmHWM"} for o, f, q, r in (("agrpo", 1.0, 32.0, 30.0), ("espo", 2.0, 64.0, 40.0))},
        "quality": {"model": "tiny:x", "task": "tiny-sudoku", "rows": 8, "prompts": 2, "repeats": 6, "knob_values": [1, 4],
                    "normalization": "sequence",
                    "eos_steps": "include", "objectives": [
                        {"objective": "agrpo", "knob": "num_samples", "knob_help": "K", "configured": 4, "cells": [
                            {"value": 1, "repeats": 24, "relative_variance": None, "resolved": False, "cosine": 0.25,
                             "noise_cosine": None, "expected_cosine": None, "draw_cosine": 0.1, "seconds": 0.01},
                            {"value": 4, "repeats": 6, "relative_variance": 1.5, "resolved": True, "cosine": 0.6,
                             "noise_cosine": 0.8, "expected_cosine": 0.75, "draw_cosine": 0.3, "seconds": 0.02}]},
                        {"objective": "espo", "knob": "espo.copies", "knob_help": "copies", "configured": 4, "cells": [
                            {"value": 1, "refused": "espo.copies must be >= 3"}]}]},
    }
    (tmp_path / S.STUDY).write_text(json.dumps(study))
    assert main(["study", f"out={tmp_path}", "report_only=true"]) == 0
    s = S.summarize_study(study)
    agrpo, espo = s["ordering"]
    half = 4.303 * 0.125 / 3**0.5  # sd of 0.75 / 0.875 / 0.625 is 0.125; t(2) = 4.303
    assert (agrpo["mean"], agrpo["sd"], agrpo["solved_mean"]) == pytest.approx((0.75, 0.125, 0.5))
    assert (agrpo["low"], agrpo["high"]) == pytest.approx((0.75 - half, 0.75 + half))
    assert (agrpo["gain"], espo["mean"], espo["solved_mean"]) == pytest.approx((0.25, 7 / 12, 1 / 3))
    pairs = {(p["a"], p["b"]): p for p in s["paired"]}
    assert list(pairs) == [("agrpo", "base"), ("espo", "base"), ("agrpo", "espo")]
    # per-problem means over seeds: agrpo 5/6, 2/3, 1/2, 1; espo 2/3, 1/2, 1/6, 1 -> d = 1/6, 1/6, 1/3, 0
    d = pairs[("agrpo", "espo")]
    half_d = S.Z975 * (1 / 54) ** 0.5 / 2  # sd of d: sqrt((0 + 0 + 1/36 + 1/36) / 3)
    assert (d["diff"], d["low"], d["high"]) == pytest.approx((1 / 6, 1 / 6 - half_d, 1 / 6 + half_d))
    assert (d["better"], d["worse"], d["n"]) == (3, 0, 4)
    r = s["rollouts"]
    assert [o["mean"] for o in r["ordering"]] == [1.0, 0.375] and math.isnan(r["ordering"][0]["low"])  # one seed
    pr = {(p["a"], p["b"]): p for p in r["paired"]}[("agrpo", "espo")]
    assert (pr["diff"], pr["better"], pr["worse"]) == pytest.approx((0.625, 3, 0))
    report = (tmp_path / "report.md").read_text()
    assert "| agrpo | 1 | 0.750 / 0.875 / 0.625 | 0.750 | 0.125 | [0.439, 1.061] | +25.0 [-6.1, +56.1] points | " \
           "0.500 / 0.750 / 0.250 | 0.500 | 10 / 10 / 10 |" in report
    assert "| agrpo - espo | +16.7 points | [+3.3, +30.0] | 3 / 0 of 4 |" in report
    assert "| agrpo | 1 | 1.000 | 1.000 | n/a | [n/a, n/a] |" in report  # the equal-rollouts table, one seed
    assert "| agrpo - espo | +62.5 points |" in report
    assert "Every run: `lr=0.0001`, `model=tiny:x`." in report and "| espo | `espo.complement=True`, `espo.copies=4` (set), `espo.tokens=all` | none |" in report
    # cost: s / step, steps, rollouts seen (10 x 2 x 4), s / step at 5 steps, forwards, sequences, sampler, memory
    assert "| agrpo | 2 | 10 | 80 | 2 | 1 | 32 | 4 | 500 | 30 |" in report
    assert "| espo | 0.5 | 10 | 80 | 0.5 | 2 | 64 | 4 | 500 | 40 |" in report
    assert "| agrpo | 4* | 6 | 1.5 | 0.600 | 0.800 | 0.750 | 0.300 | 0.02 |" in report
    assert "| agrpo | 1 | 24 | unresolved | 0.250 | n/a | n/a | 0.100 | 0.01 |" in report
    assert "| espo | 1 | | refused: espo.copies must be >= 3 |" in report
