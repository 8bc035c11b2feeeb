"""The paper's claims at small scale, with error bars: one command, one report.

    agrpo study                                  # the default preset, 3 seeds, ~63 minutes on 2 cores
    agrpo study seeds=0 time_budget_s=60         # a quick look
    agrpo study report_only=true                 # redraw report.md and the PNGs from study.json

1. Ordering: the base, diffu-GRPO and AGRPO, each objective trained from the same base with the
   same preset and time budget, once per seed (`agrpo train`'s recipe, nothing else), then
   evaluated on the same held-out problems: mean accuracy over seeds with a 95% t interval, and
   paired differences on the same problems.
2. Fewer steps at inference: every model evaluated with 1, 2 and 4 tokens a denoising step
   (`agrpo eval`'s recipe).
3. Estimator variance: on one fixed batch of rollouts of the base, the AGRPO gradient estimate
   for K = 1, 2, 4, 8, 16 sampled steps under each step sampler, against the exact every-step
   gradient: relative variance E||g_K - g||^2 / ||g||^2 over repeated draws. When those rollouts
   never stop early (Sudoku), the same on a batch that does (tiny Countdown's base, random
   remasking), where the eos_steps options differ.

Writes to `out`: study.json (every number, regenerable into the rest), report.md,
ordering.png, steps.png, variance.png (and variance_eos.png), and the runs and evaluations themselves under runs/ and
eval/. A rerun with the same `out` reuses finished training runs and evaluations, so an
interrupted study continues where it stopped.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from agrpo.config import config_to_dict, load_config
from agrpo.data import decode_completions, encode_prompts
from agrpo.errors import AgrpoError
from agrpo.fileio import write_atomic
from agrpo.models import load_model_and_tokenizer, shift_logits_of
from agrpo.objectives import agrpo_loss, group_advantages
from agrpo.objectives.agrpo import StepPlan, every_step_plan, plan_steps
from agrpo.objectives.common import horizon
from agrpo.policy import Policy
from agrpo.runlog import new_figure, read_jsonl, save_png
from agrpo.sampling import generate
from agrpo.tasks import get_task

STUDY, REPORT = "study.json", "report.md"
# a relative variance below this is float rounding of an exact estimate (stratified with K = T_eff)
EXACT = 1e-9
# two-sided 95% quantiles of Student's t, by degrees of freedom
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
Z975 = 1.959963984540054
# the step samplers compared: (step_sampling, importance)
SAMPLERS = {
    "uniform": ("uniform", "none"),
    "low_discrepancy": ("low_discrepancy", "none"),
    "stratified": ("stratified", "none"),
    "low_discrepancy+entropy": ("low_discrepancy", "entropy"),
    "stratified+entropy": ("stratified", "entropy"),
}


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise AgrpoError(f"{name}={text}: write whole numbers separated by commas, e.g. {name}=1,2,4") from None
    if not values:
        raise AgrpoError(f"{name} is empty: give at least one value")
    return values


def _names(text: str, name: str, allowed) -> list[str]:
    values = [x.strip() for x in str(text).split(",") if x.strip()]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise AgrpoError(f"{name}={text}: choose from {', '.join(allowed)} (comma-separated)")
    return values


@dataclass
class StudyConfig:
    preset: str = field(default="", metadata={"help": "training preset every run starts from; empty: the one `agrpo train` runs"})
    objectives: str = field(default="agrpo,diffu_grpo", metadata={"help": "objectives trained, comma-separated"})
    seeds: str = field(default="0,1,2", metadata={"help": "seeds, one run per objective and seed (comma list)"})
    time_budget_s: float = field(default=-1.0, metadata={"help": "training seconds per run; -1: the preset's"})
    overrides: list[str] = field(default_factory=list, metadata={"help": "extra key=value settings for every run, e.g. [lr=1e-4]"})
    tokens_per_step: str = field(default="1,2,4", metadata={"help": "evaluation: tokens committed per denoising step (comma list)"})
    variance_k: str = field(default="1,2,4,8,16", metadata={"help": "estimator variance: sampled steps per completion (comma list)"})
    variance_samplers: str = field(default=",".join(SAMPLERS), metadata={"help": "estimator variance: step samplers (comma list of " + ", ".join(SAMPLERS) + ")"})
    variance_prompts: int = field(default=8, metadata={"help": "estimator variance: prompts in the fixed batch (x the preset's group_size)"})
    variance_repeats: int = field(default=40, metadata={"help": "estimator variance: independent draws per (sampler, K)"})
    eos_variance: bool = field(default=True, metadata={"help": "estimator variance also on rollouts that stop early (tiny Countdown's base, random remasking), where eos_steps include and exclude differ, when the study's own rollouts never do"})
    out: str = field(default="runs/study", metadata={"help": "output directory (reused: finished runs are not redone)"})
    report_only: bool = field(default=False, metadata={"help": "only rewrite report.md and the PNGs from out/study.json"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def validate(self) -> None:
        _names(self.objectives, "objectives", ("agrpo", "diffu_grpo"))
        if any(s < 0 for s in _ints(self.seeds, "seeds")):
            raise AgrpoError("seeds must be >= 0")
        if any(k < 1 for k in _ints(self.tokens_per_step, "tokens_per_step") + _ints(self.variance_k, "variance_k")):
            raise AgrpoError("tokens_per_step and variance_k take values >= 1")
        _names(self.variance_samplers, "variance_samplers", SAMPLERS)
        if self.variance_prompts < 1 or self.variance_repeats < 2:
            raise AgrpoError("variance_prompts must be >= 1 and variance_repeats >= 2")
        if self.time_budget_s != -1 and self.time_budget_s <= 0:
            raise AgrpoError(f"time_budget_s must be > 0 (or -1 for the preset's), got {self.time_budget_s:g}")


def run_study(cfg: StudyConfig) -> dict:
    cfg.validate()
    out = Path(cfg.out)
    if cfg.report_only:
        if not (out / STUDY).is_file():
            raise AgrpoError(f"no {STUDY} in {out}: run the study first (without report_only)")
        return write_report(json.loads((out / STUDY).read_text()), out)

    from agrpo.recipes.rl import RLConfig, default_preset

    t0 = time.perf_counter()
    preset = cfg.preset or default_preset()
    seeds, objectives = _ints(cfg.seeds, "seeds"), _names(cfg.objectives, "objectives", ("agrpo", "diffu_grpo"))
    tokens = _ints(cfg.tokens_per_step, "tokens_per_step")
    common = list(cfg.overrides) + ([f"time_budget_s={cfg.time_budget_s:g}"] if cfg.time_budget_s > 0 else [])
    base_cfg = load_config(RLConfig, preset, common)
    gen = base_cfg.eval_sampling.gen_length
    bad = [k for k in tokens if gen % k or base_cfg.eval_sampling.block_length % k]
    if bad:
        raise AgrpoError(f"tokens_per_step={bad[0]} does not divide the completion ({gen} tokens, blocks of "
                         f"{base_cfg.eval_sampling.block_length}): choose divisors")
    if max(_ints(cfg.variance_k, "variance_k")) > base_cfg.sampling.gen_length:
        raise AgrpoError(f"variance_k={cfg.variance_k}: K above the {base_cfg.sampling.gen_length} denoising steps "
                         "of a one-token-a-step rollout")
    # every setting is checked before the first run starts
    plans = [(o, s, load_config(RLConfig, preset, common + [f"objective={o}", f"seed={s}", f"name={o}-seed{s}",
                                                              f"output_dir={out / 'runs'}"])) for o in objectives for s in seeds]
    out.mkdir(parents=True, exist_ok=True)

    # 1. training: the RL recipe as `agrpo train` runs it, one run at a time
    runs = []
    for i, (objective, seed, run_cfg) in enumerate(plans):
        run_dir = out / "runs" / run_cfg.name
        summary = _finished_run(run_dir)
        if summary is None:
            _say(cfg, f"study: run {i + 1}/{len(plans)}: {objective}, seed {seed} -> {run_dir}")
            run_cfg = replace(run_cfg, progress=cfg.progress, resume=run_dir.exists())
            summary = _train(run_cfg)
        else:
            _say(cfg, f"study: run {i + 1}/{len(plans)}: {objective}, seed {seed}: finished before, reused")
        runs.append({"objective": objective, "seed": seed, "run_dir": str(run_dir), "summary": summary})

    # 2. the same held-out problems for every model, at every step count
    steps = [gen // k for k in tokens]
    evaluation = _evaluate(cfg, base_cfg, [base_cfg.model] + [r["run_dir"] for r in runs], steps, out / "eval")

    # 3. the estimator's variance on a fixed batch of the base's rollouts (reused when a
    #    previous study in `out` measured it with the same settings)
    previous = _previous_variance(out, cfg, base_cfg)
    if previous is None:
        variance = estimator_variance(base_cfg, cfg)
        variance_eos = None
        if cfg.eos_variance and not variance["eos_options_differ"]:
            _say(cfg, "study: estimator variance on rollouts that stop early (tiny Countdown, random remasking)")
            variance_eos = estimator_variance(load_config(RLConfig, str(Path(default_preset()).with_name(EOS_PRESET)),
                                                          EOS_OVERRIDES), cfg)
    else:
        variance, variance_eos = previous
        _say(cfg, "study: estimator variance: measured before with the same settings, reused")

    study = {
        "preset": preset, "overrides": common, "config": config_to_dict(cfg), "train_config": config_to_dict(base_cfg),
        "base_model": base_cfg.model, "task": base_cfg.task, "gen_length": gen,
        "tokens_per_step": tokens, "steps": steps, "runs": runs, "eval": evaluation, "variance": variance,
        "variance_eos": variance_eos, "wall_s": time.perf_counter() - t0,
    }
    write_atomic(out / STUDY, json.dumps(study, indent=1) + "\n")
    return write_report(study, out)


VARIANCE_FIELDS = ("variance_k", "variance_samplers", "variance_prompts", "variance_repeats", "eos_variance")
# rollouts that stop early at different steps: the base of tiny Countdown, random remasking
EOS_PRESET, EOS_OVERRIDES = "tiny_countdown.yaml", ["sampling.remasking=random"]


def _previous_variance(out: Path, cfg: StudyConfig, base_cfg) -> tuple[dict, dict | None] | None:
    """The variance sections of the study already in `out`, if they were measured with these settings
    (the variance fields, the base, its training config): the draws are seeded, so they would repeat."""
    try:
        previous = json.loads((out / STUDY).read_text())
        same = (all(previous["config"][k] == getattr(cfg, k) for k in VARIANCE_FIELDS)
                and previous["train_config"] == json.loads(json.dumps(config_to_dict(base_cfg))))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (previous["variance"], previous.get("variance_eos")) if same else None


def _say(cfg: StudyConfig, text: str) -> None:
    if cfg.progress:
        print(text, file=sys.stderr, flush=True)


def _finished_run(run_dir: Path) -> dict | None:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return None if summary.get("interrupted") else summary


def _train(run_cfg) -> dict:
    from agrpo.recipes.rl import train

    return train(run_cfg)


def _evaluate(cfg: StudyConfig, base_cfg, models: list[str], steps: list[int], out: Path) -> dict:
    """Per model and step count: the grade of every held-out problem (from `agrpo eval`)."""
    from agrpo.recipes.evaluate import GENERATIONS, EvalConfig, model_version, run_eval

    s = base_cfg.eval_sampling
    ecfg = EvalConfig(
        model=",".join(models), task=base_cfg.task, data=base_cfg.eval_data, eval_size=base_cfg.eval_size,
        gen_length=str(s.gen_length), block_length=str(s.block_length), steps=",".join(map(str, steps)),
        sampling=s, chat_template=base_cfg.chat_template, out=str(out), progress=cfg.progress,
    )
    run_eval(ecfg)
    versions = {m: model_version(m) for m in models}  # a retrained run's earlier generations are not its own
    grades: dict[str, dict[str, list[float]]] = {m: {} for m in models}
    n = None
    for rec in read_jsonl(out / GENERATIONS):
        if (rec.get("model") in grades and rec.get("model_version") == versions[rec["model"]]
                and rec["setting"].get("steps") in steps):
            row = grades[rec["model"]].setdefault(str(rec["setting"]["steps"]), {})
            row[rec["row"]] = rec["grade"]
    result = {}
    for m, by_steps in grades.items():
        result[m] = {}
        for st, rows in by_steps.items():
            n = len(rows) if n is None else n
            result[m][st] = [rows[i] for i in sorted(rows)]
    return {"models": models, "grades": result, "problems": n}


def estimator_variance(base_cfg, cfg: StudyConfig) -> dict:
    """Relative variance of the AGRPO gradient estimate against the exact every-step gradient.

    One batch of rollouts of the base (the preset's training sampler at one token a denoising
    step, and its rewards), at the base
    weights (so the clipped ratio is 1 and the loss's gradient is the policy gradient). For each
    sampler and K: `variance_repeats` estimates g_K with fresh draws; reported are
    E||g_K - g||^2 / ||g||^2 (its mean over draws, with a standard error) and the bias check
    ||mean g_K - g||^2 / ||g||^2, which for an unbiased estimator is about the variance / repeats.
    """
    torch.manual_seed(base_cfg.seed)
    model, tokenizer = load_model_and_tokenizer(base_cfg.model)
    policy = Policy(model, shift_logits=shift_logits_of(model))
    model.eval()  # no dropout: every difference between estimates is the step sampling's
    task = get_task(base_cfg.task)
    rows = task.train_examples(cfg.variance_prompts, seed=base_cfg.seed)
    g = base_cfg.group_size
    batch = [r for r in rows for _ in range(g)]
    prompts = [task.prompt(r) for r in batch]
    ids, mask = encode_prompts(tokenizer, prompts, base_cfg.chat_template, "cpu")
    gen = torch.Generator().manual_seed(base_cfg.seed)
    # one token a denoising step, whatever the preset trains with: T_eff is then the completion
    # length, and every K of the list up to it is a real choice
    sampling = replace(base_cfg.sampling, steps=base_cfg.sampling.gen_length)
    with torch.no_grad():
        rollout = generate(policy, ids, mask, sampling, gen)
    texts = decode_completions(tokenizer, rollout.completion, rollout.stop_ids)
    columns = {k: [r[k] for r in batch] for k in batch[0] if k != "prompt"}
    rewards = task.reward(prompts, texts, **columns)
    adv, valid = group_advantages(rewards, g, base_cfg.scale_std)
    index, per_draw = draw_gradients(policy, rollout, adv, valid, base_cfg.eps_low, base_cfg.eps_high,
                                     progress=cfg.progress)

    def gradient(plan) -> torch.Tensor:
        return plan_gradient(index, per_draw, plan)

    ks = _ints(cfg.variance_k, "variance_k")
    if max(ks) > sampling.steps:
        raise AgrpoError(f"variance_k={cfg.variance_k}: K above the {sampling.steps} denoising steps of a rollout")
    samplers = _names(cfg.variance_samplers, "variance_samplers", SAMPLERS)
    eos_options = ["include", "exclude"]
    same_horizon = bool(torch.equal(horizon(rollout, "include"), horizon(rollout, "exclude")))
    if same_horizon:  # no row stops early or ends on EOS: both options are one estimator here
        eos_options = ["include"]
    result = {"task": base_cfg.task, "model": base_cfg.model, "remasking": sampling.remasking,
              "temperature": sampling.temperature, "rows": len(batch), "prompts": len(rows), "k": ks, "repeats": cfg.variance_repeats,
              "t_eff_mean": {e: float(horizon(rollout, e).double().mean()) for e in ("include", "exclude")},
              "eos_options_differ": not same_horizon, "reward_mean": float(torch.tensor([float(x) for x in rewards]).mean()),
              "zero_advantage_rows": int((adv == 0).sum()), "curves": []}
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(eos_options) * len(samplers) * len(ks) * cfg.variance_repeats, desc="variance", unit="draw")
    for eos in eos_options:
        exact = gradient(every_step_plan(rollout, row_valid=valid, eos_steps=eos))
        norm2 = float(exact.pow(2).sum())
        if norm2 == 0:
            raise AgrpoError("the exact gradient is zero on this batch (every group's rewards are equal): raise variance_prompts")
        for name in samplers:
            step_sampling, importance = SAMPLERS[name]
            draw = torch.Generator().manual_seed(base_cfg.seed + 1)
            curve = {"sampler": name, "eos_steps": eos, "relative_variance": [], "stderr": [], "relative_bias2": []}
            for k in ks:
                errors, total = [], torch.zeros_like(exact)
                for _ in range(cfg.variance_repeats):
                    est = gradient(plan_steps(rollout, k, step_sampling, importance, "sequence", valid, draw, eos))
                    errors.append(float((est - exact).pow(2).sum()) / norm2)
                    total += est
                    if bar is not None:
                        bar.update(1)
                mean = sum(errors) / len(errors)
                sd = math.sqrt(sum((e - mean) ** 2 for e in errors) / (len(errors) - 1))
                curve["relative_variance"].append(mean)
                curve["stderr"].append(sd / math.sqrt(len(errors)))
                curve["relative_bias2"].append(float((total / cfg.variance_repeats - exact).pow(2).sum()) / norm2)
            result["curves"].append(curve)
    if bar is not None:
        bar.close()
    return result


def _flat_gradient(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(x if x is not None else torch.zeros_like(p)).reshape(-1).double() for x, p in zip(grads, params)])


def direct_gradient(policy, rollout, adv, plan, eps_low: float = 0.2, eps_high: float = 0.2) -> torch.Tensor:
    """The gradient of the AGRPO loss of `plan`, flattened, straight from autograd."""
    params = [p for p in policy.parameters() if p.requires_grad]
    loss, _ = agrpo_loss(policy, rollout, adv, plan=plan, eps_low=eps_low, eps_high=eps_high)
    return _flat_gradient(loss, params)


def draw_gradients(policy, rollout, adv, row_valid, eps_low: float = 0.2, eps_high: float = 0.2,
                   progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(index [B, T], G [N, P] float64): the gradient of the token losses each live (row, step)
    contributes with coefficient 1, computed once, one backward each.

    The loss of any plan is a sum over its draws of coef x that draw's token losses, so its
    gradient is sum_d coef_d G[index[row_d, t_d]] (`plan_gradient`): every estimate of the
    variance study then costs a weighted sum instead of forwards and backwards."""
    full = every_step_plan(rollout, row_valid=row_valid, eos_steps="include")  # exclude's steps are a subset
    params = [p for p in policy.parameters() if p.requires_grad]
    index = torch.full(tuple(rollout.step.shape[:1]) + (rollout.config.steps,), -1, dtype=torch.long)
    index[full.row, full.t] = torch.arange(full.row.numel())
    per_draw = torch.zeros(full.row.numel(), sum(p.numel() for p in params), dtype=torch.float64)
    one = torch.ones(1, dtype=torch.float64)
    todo = [i for i in range(full.row.numel()) if float(adv[full.row[i]]) != 0.0]  # no advantage: no gradient
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="per-step gradients", unit="step")
    for i in todo:
        plan = StepPlan(full.row[i:i + 1], full.t[i:i + 1], full.weight[i:i + 1], one, full.positions[i:i + 1],
                        full.valid[i:i + 1], 1.0)
        loss, _ = agrpo_loss(policy, rollout, adv, plan=plan, eps_low=eps_low, eps_high=eps_high)
        per_draw[i] = _flat_gradient(loss, params)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return index, per_draw


def plan_gradient(index: torch.Tensor, per_draw: torch.Tensor, plan) -> torch.Tensor:
    """The gradient of the AGRPO loss of `plan` from the per-step gradients of `draw_gradients`."""
    where = index[plan.row.cpu(), plan.t.cpu()]
    if bool((where < 0).any()):
        raise AgrpoError("the plan draws a step that is not live in the rollout")
    c = torch.zeros(per_draw.shape[0], dtype=torch.float64)
    c.index_add_(0, where, plan.coef.detach().cpu().double())
    return c @ per_draw


# ---- statistics --------------------------------------------------------------------------

def t_interval(values: list[float]) -> tuple[float, float, float, float]:
    """(mean, sample sd, low, high): the 95% Student t interval of the mean (nan bounds for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan"), float("nan"), float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    q = T975.get(n - 1, Z975 + (Z975**3 + Z975) / (4 * (n - 1)))
    half = q * sd / math.sqrt(n)
    return mean, sd, mean - half, mean + half


def paired(a: list[float], b: list[float]) -> dict:
    """Mean of a_i - b_i over the same problems, with a 95% normal interval and the counts of
    problems where a is better and where b is."""
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else float("nan")
    half = Z975 * sd / math.sqrt(n)
    return {"diff": mean, "low": mean - half, "high": mean + half, "better": sum(x > 0 for x in d),
            "worse": sum(x < 0 for x in d), "n": n}


def _mean_rows(lists: list[list[float]]) -> list[float]:
    return [sum(col) / len(col) for col in zip(*lists)]


def summarize_study(study: dict) -> dict:
    """The report's numbers, from study.json alone."""
    grades, base = study["eval"]["grades"], study["base_model"]
    first = str(study["steps"][0])  # one token a step: the training evaluation's setting
    objectives = list(dict.fromkeys(r["objective"] for r in study["runs"]))
    out = {"ordering": [], "paired": [], "steps": []}
    base_scores = grades[base][first]
    base_acc = sum(base_scores) / len(base_scores)
    out["base"] = {"accuracy": base_acc, "solved": sum(x == 1.0 for x in base_scores) / len(base_scores)}
    per_obj = {}
    for o in objectives:
        runs = [r for r in study["runs"] if r["objective"] == o]
        accs = [sum(grades[r["run_dir"]][first]) / len(grades[r["run_dir"]][first]) for r in runs]
        solved = [sum(x == 1.0 for x in grades[r["run_dir"]][first]) / len(grades[r["run_dir"]][first]) for r in runs]
        mean, sd, lo, hi = t_interval(accs)
        gain = t_interval([a - base_acc for a in accs])
        per_obj[o] = _mean_rows([grades[r["run_dir"]][first] for r in runs])
        out["ordering"].append({"objective": o, "seeds": [r["seed"] for r in runs], "accuracy": accs, "mean": mean,
                                "sd": sd, "low": lo, "high": hi, "gain": gain[0], "gain_low": gain[2],
                                "gain_high": gain[3], "solved": solved, "steps": [r["summary"].get("steps") for r in runs]})
    for o in objectives:
        out["paired"].append({"a": o, "b": "base", **paired(per_obj[o], base_scores)})
    if "agrpo" in per_obj and "diffu_grpo" in per_obj:
        out["paired"].append({"a": "agrpo", "b": "diffu_grpo", **paired(per_obj["agrpo"], per_obj["diffu_grpo"])})
    for k, st in zip(study["tokens_per_step"], study["steps"]):
        row = {"tokens_per_step": k, "steps": st, "base": sum(grades[base][str(st)]) / len(grades[base][str(st)])}
        for o in objectives:
            accs = [sum(grades[r["run_dir"]][str(st)]) / len(grades[r["run_dir"]][str(st)])
                    for r in study["runs"] if r["objective"] == o]
            m, sd, lo, hi = t_interval(accs)
            row[o] = {"mean": m, "low": lo, "high": hi, "gain": m - row["base"]}
        out["steps"].append(row)
    return out


# ---- the report --------------------------------------------------------------------------

def _f(x, digits=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def write_report(study: dict, out: Path) -> dict:
    s = summarize_study(study)
    _plot_ordering(study, s, out / "ordering.png")
    _plot_steps(study, s, out / "steps.png")
    _plot_variance(study["variance"], out / "variance.png")
    if study.get("variance_eos"):
        _plot_variance(study["variance_eos"], out / "variance_eos.png")
    tc = study["train_config"]
    budget = f"{tc['time_budget_s']:g} s of training a run" if tc["time_budget_s"] else f"{tc['max_steps']} steps a run"
    lines = [
        "# AGRPO at small scale",
        "",
        f"Task `{study['task']}`, base `{study['base_model']}`, preset `{Path(study['preset']).name}`"
        + (f" with {' '.join(study['overrides'])}" if study["overrides"] else "") + f"; {budget}, "
        f"{study['eval']['problems']} held-out problems, greedy decoding. Study time {study['wall_s'] / 60:.1f} min. "
        "Regenerate with `agrpo study report_only=true out=...`.",
        "",
        "## 1. Ordering (one token a step)",
        "",
        "| model | accuracy per seed | mean | sd | 95% CI (t) | gain on base (95% CI) | solved whole | steps |",
        "|---|---|---|---|---|---|---|---|",
        f"| base | {_f(s['base']['accuracy'])} | {_f(s['base']['accuracy'])} | | | | {_f(s['base']['solved'])} | |",
    ]
    for o in s["ordering"]:
        lines.append(
            f"| {o['objective']} | {' / '.join(_f(a) for a in o['accuracy'])} | {_f(o['mean'])} | {_f(o['sd'])} | "
            f"[{_f(o['low'])}, {_f(o['high'])}] | {100 * o['gain']:+.1f} [{100 * o['gain_low']:+.1f}, {100 * o['gain_high']:+.1f}] points | "
            f"{' / '.join(_f(x) for x in o['solved'])} | {' / '.join(str(x) for x in o['steps'])} |"
        )
    baselines = {k: v for k, v in study["runs"][0]["summary"].items() if k == "model_free_accuracy"} if study["runs"] else {}
    if baselines:
        lines += ["", f"A model-free guesser (uniform over the digits the clues allow in each cell) scores "
                      f"{_f(baselines['model_free_accuracy'])}."]
    lines += ["", "Paired on the same problems (per-problem score averaged over seeds; 95% normal interval):", "",
              "| comparison | mean difference | 95% CI | problems better / worse |", "|---|---|---|---|"]
    for p in s["paired"]:
        lines.append(f"| {p['a']} - {p['b']} | {100 * p['diff']:+.1f} points | [{100 * p['low']:+.1f}, {100 * p['high']:+.1f}] | "
                     f"{p['better']} / {p['worse']} of {p['n']} |")
    lines += ["", "![ordering](ordering.png)", "", "## 2. Fewer denoising steps at inference", "",
              "| tokens a step | steps | base | " + " | ".join(o["objective"] + " (mean, 95% CI; gain)" for o in s["ordering"]) + " |",
              "|---|---|---|" + "---|" * len(s["ordering"])]
    for row in s["steps"]:
        cells = [f"{_f(row[o['objective']]['mean'])} [{_f(row[o['objective']]['low'])}, {_f(row[o['objective']]['high'])}]; "
                 f"{100 * row[o['objective']]['gain']:+.1f}" for o in s["ordering"]]
        lines.append(f"| {row['tokens_per_step']} | {row['steps']} | {_f(row['base'])} | " + " | ".join(cells) + " |")
    lines += ["", "![steps](steps.png)", "", "## 3. Variance of the AGRPO gradient estimate", ""]
    lines += _variance_lines(study["variance"], "variance.png")
    if study.get("variance_eos"):
        lines += ["### On rollouts that stop early", "",
                  "The study's rollouts never end on EOS early, so here the same measurement on a batch whose rows stop "
                  "at different steps, where `eos_steps=include` (the EOS decisions are learned from) and `exclude` "
                  "(the official truncation) are different estimators of different objectives.", ""]
        lines += _variance_lines(study["variance_eos"], "variance_eos.png")
    write_atomic(out / REPORT, "\n".join(lines))
    return {"report": str(out / REPORT), "wall_s": study["wall_s"], **{
        o["objective"]: {"mean": o["mean"], "low": o["low"], "high": o["high"], "gain": o["gain"]} for o in s["ordering"]},
        "base": s["base"]["accuracy"]}


def _variance_lines(v: dict, png: str) -> list[str]:
    lines = [f"One batch of {v['rows']} rollouts of `{v.get('model', 'the base')}` on `{v.get('task', '')}` ({v['prompts']} prompts, "
             f"one token a denoising step, {v.get('remasking', '')} remasking), mean reward {_f(v['reward_mean'])}; "
             f"mean T_eff {_f(v['t_eff_mean']['include'], 2)} (include) / {_f(v['t_eff_mean']['exclude'], 2)} (exclude). "
             f"Relative variance E||g_K - g||^2 / ||g||^2 over {v['repeats']} draws per cell (g: the exact every-step gradient "
             "of the same eos_steps choice):",
             "", "| sampler | eos_steps | " + " | ".join(f"K={k}" for k in v["k"]) + " |", "|---|---|" + "---|" * len(v["k"])]
    for c in v["curves"]:
        lines.append(f"| {c['sampler']} | {c['eos_steps']} | " + " | ".join(
            f"{x:.3g} ± {e:.2g}" for x, e in zip(c["relative_variance"], c["stderr"])) + " |")
    if not v["eos_options_differ"]:
        lines += ["", "No rollout in the batch ends on EOS early, so `eos_steps=include` and `exclude` are the same "
                      "estimator here (one row each)."]
    lines += ["", "Bias check: ||mean of the draws - g||^2 / ||g||^2 should be about the variance / draws for an "
                  "unbiased estimator; largest ratio of the two over all cells: "
              + _f(max([b * v["repeats"] / x for c in v["curves"] for x, b in zip(c["relative_variance"], c["relative_bias2"])
                        if x > EXACT] or [float("nan")]), 2) + " (cells with no variance, the exact ones, left out).",
              "", f"![variance]({png})", ""]
    return lines


def _plot_ordering(study: dict, s: dict, path: Path) -> None:
    fig = new_figure((6, 4))
    ax = fig.subplots()
    names = ["base"] + [o["objective"] for o in s["ordering"]]
    ax.axhline(s["base"]["accuracy"], color="gray", linestyle="--", linewidth=1)
    for i, o in enumerate(s["ordering"], start=1):
        ax.scatter([i] * len(o["accuracy"]), o["accuracy"], color="tab:blue", alpha=0.5, zorder=3)
        if not math.isnan(o["low"]):
            ax.errorbar([i], [o["mean"]], yerr=[[o["mean"] - o["low"]], [o["high"] - o["mean"]]], fmt="o",
                        color="black", capsize=6, zorder=4)
    ax.scatter([0], [s["base"]["accuracy"]], color="gray", zorder=3)
    runs = study["runs"]
    if runs and "model_free_accuracy" in runs[0]["summary"]:
        ax.axhline(runs[0]["summary"]["model_free_accuracy"], color="tab:red", linestyle=":", linewidth=1,
                   label="model-free guesser")
        ax.legend(loc="best")
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_title("seeds (dots), mean and 95% t interval")
    save_png(fig, path)


def _plot_steps(study: dict, s: dict, path: Path) -> None:
    fig = new_figure((6, 4))
    ax = fig.subplots()
    ks = [row["tokens_per_step"] for row in s["steps"]]
    ax.plot(ks, [row["base"] for row in s["steps"]], marker="o", color="gray", label="base")
    for o in s["ordering"]:
        name = o["objective"]
        means = [row[name]["mean"] for row in s["steps"]]
        ax.plot(ks, means, marker="o", label=name)
        lows = [row[name]["low"] for row in s["steps"]]
        if not any(math.isnan(x) for x in lows):
            ax.fill_between(ks, lows, [row[name]["high"] for row in s["steps"]], alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("tokens per denoising step")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.legend(loc="best")
    save_png(fig, path)


def _plot_variance(v: dict, path: Path) -> None:
    fig = new_figure((6, 4))
    ax = fig.subplots()
    for c in v["curves"]:
        style = "-" if c["eos_steps"] == "include" else "--"
        # a cell with no variance but float rounding is the exact gradient: named, not drawn at 1e-13
        pos = [(k, x) for k, x in zip(v["k"], c["relative_variance"]) if x > EXACT]
        exact = [str(k) for k, x in zip(v["k"], c["relative_variance"]) if x <= EXACT]
        label = c["sampler"] + ("" if c["eos_steps"] == "include" else " (exclude)")
        label += f" (exact at K={', '.join(exact)})" if exact else ""
        if pos:
            ax.plot([p[0] for p in pos], [p[1] for p in pos], style, marker="o", label=label)
    ks = v["k"]
    first = next((c["relative_variance"][0] for c in v["curves"] if c["sampler"] == "uniform"), None)
    if first:
        ax.plot(ks, [first / k for k in ks], color="gray", linestyle=":", label="1/K from K=1")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("K (sampled denoising steps per completion)")
    ax.set_ylabel("E||g_K - g||² / ||g||²")
    ax.legend(loc="best", fontsize=8)
    save_png(fig, path)
