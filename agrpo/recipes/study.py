"""The paper's claims at small scale, with error bars: one command, one report.

    agrpo study                                  # the default preset, AGRPO and diffu-GRPO, 3 seeds, ~70 minutes on 2 cores
    agrpo study objectives=agrpo,espo seeds=0 time_budget_s=60 out=runs/study-quick   # a quick look at a subset
    agrpo study objectives=agrpo,diffu_grpo,wd1,espo,spg,stabledrl,bgpo,coupled_grpo,unigrpo,dmpo,tracerl rollout_steps=100
    agrpo study report_only=true                 # redraw report.md and the PNGs from study.json

`objectives` takes any registered objective (`dipo` only when the preset's model is a block-diffusion
model); every run is `agrpo train`'s recipe with `objective=<name>`, nothing else.

1. Ordering: the base and each objective, trained from the same base with the same preset and time
   budget, once per seed, then evaluated on the same held-out problems: mean accuracy over seeds with
   a 95% t interval, the fraction solved whole, and paired differences on the same problems (each
   objective against the base, and AGRPO against each other objective). With `rollout_steps=N` the
   same again for a second set of runs at the same number of rollouts (`max_steps=N time_budget_s=0`,
   under runs-<N>steps/). The settings of each objective's runs that differ from the defaults are
   read from their saved config.yaml.
2. Fewer steps at inference: every model evaluated with 1, 2 and 4 tokens a denoising step
   (`agrpo eval`'s recipe).
3. Estimator variance: on one fixed batch of rollouts of the base, the AGRPO gradient estimate
   for K = 1, 2, 4, 8, 16 sampled steps under each step sampler, against the exact every-step
   gradient: relative variance E||g_K - g||^2 / ||g||^2 over repeated draws. When those rollouts
   never stop early (Sudoku), the same on a batch that does (tiny Countdown's base, random
   remasking), where the eos_steps options differ.
4. Cost per objective: seconds per step from the runs' metrics.jsonl (`step_s`), and from a short
   profiling run per objective in a fresh process (`profile_steps` recipe steps): forward passes of the
   policy's backbone per step (forward pre-hooks, split into the sampler's and the loss's) and peak
   memory (the process's peak RSS over the steps, VmHWM reset at the first step; on a GPU
   `torch.cuda.max_memory_allocated`).
5. Gradient quality: on the fixed batch of 3., each objective's own gradient (`prepare` + `update`,
   the parameters' .grad, one process), repeated with fresh draws: its relative variance about its own
   mean as a function of its Monte Carlo knob (`KNOBS`), and the cosine of its mean with the exact
   policy gradient of the trajectory likelihood (AGRPO's every-step gradient).

Writes to `out`: study.json (every number, regenerable into the rest), report.md,
ordering.png, steps.png, variance.png (and variance_eos.png, ordering_rollouts.png, steps_rollouts.png,
quality.png), and the runs, profiles, evaluations and measurements themselves under runs/,
runs-<N>steps/, profile/, eval/ and measured/. A rerun with the same `out` reuses finished training
runs, profiles, evaluations and measurements, so an interrupted study continues where it stopped; a
finished run trained with other settings is refused.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from agrpo.config import config_to_dict, load_config, read_yaml
from agrpo.data import decode_completions, encode_prompts
from agrpo.errors import AgrpoError
from agrpo.fileio import write_atomic
from agrpo.models import load_model_and_tokenizer, shift_logits_of
from agrpo.objectives import (
    OBJECTIVES,
    Context,
    Part,
    agrpo_loss,
    get_objective,
    group_advantages,
    settings_of,
)
from agrpo.objectives.agrpo import StepPlan, every_step_plan, plan_steps
from agrpo.objectives.common import horizon
from agrpo.policy import Policy
from agrpo.runlog import CONFIG, METRICS, new_figure, read_jsonl, save_png
from agrpo.sampling import generate
from agrpo.step_metrics import flat_config
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
# gradient quality: each objective's Monte Carlo knob, the config key that sets how many draws one
# estimate averages (read from the objective's settings class), and what it counts
KNOBS = {
    "agrpo": ("num_samples", "denoising steps sampled per completion (K)"),
    "espo": ("espo.copies", "mask draws per completion, each with its complement"),
    "spg": ("spg.copies", "block-masked copies per completion"),
    "stabledrl": ("stabledrl.copies", "block-masked copies per completion"),
    "bgpo": ("bgpo.copies", "stratified masked copies per completion"),
    "unigrpo": ("unigrpo.copies", "independently masked copies per completion"),
    "dmpo": ("dmpo.rows", "antithetic masked rows per completion in the loss (even)"),
}
# the objectives with nothing to vary: why, and whether an estimate draws anything at all
FIXED = {
    "diffu_grpo": ("nothing to vary: one mean-field forward a completion; only the prompt mask is drawn", True),
    "wd1": ("nothing to vary: one mean-field forward a completion; only the prompt mask is drawn", True),
    "coupled_grpo": ("nothing to vary: three forwards a completion (all masked, U < t, U > t); t and U drawn", True),
    "tracerl": ("nothing to vary, no draw: every step replayed, in groups of tracerl.shrink steps", False),
    "dipo": ("nothing to vary, no draw: every step of every block replayed", False),
}
# the profiling run evaluates this many held-out problems (at its start and end, outside the counts)
PROFILE_EVAL_SIZE = 8
# a run's settings that say where and how it runs, not what it computes: left out of the settings compared
BOOKKEEPING = frozenset({"name", "output_dir", "resume", "progress", "seed", "objective", "report_to",
                         "eval_every", "save_every", "keep_checkpoints", "log_samples_every"})
BUDGET_KEYS = ("max_steps", "epochs", "time_budget_s")


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


def objective_list(text: str) -> list[str]:
    """The objectives of `objectives=` in order, each once; an unknown name is refused in one line."""
    values = list(dict.fromkeys(x.strip() for x in str(text).split(",") if x.strip()))
    unknown = [v for v in values if v not in OBJECTIVES]
    if unknown or not values:
        what = f"unknown objective{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: " if unknown else ""
        raise AgrpoError(f"objectives={text}: {what}choose from {', '.join(OBJECTIVES)} (comma-separated)")
    return values


@dataclass
class StudyConfig:
    preset: str = field(default="", metadata={"help": "training preset every run starts from; empty: the one `agrpo train` runs"})
    objectives: str = field(default="agrpo,diffu_grpo", metadata={
        "help": f"objectives trained, comma-separated: any of {', '.join(OBJECTIVES)} (dipo: block-diffusion models only)"})
    seeds: str = field(default="0,1,2", metadata={"help": "seeds, one run per objective and seed (comma list)"})
    time_budget_s: float = field(default=-1.0, metadata={"help": "training seconds per run; -1: the preset's"})
    rollout_steps: int = field(default=0, metadata={
        "help": "a second set of runs at the same number of rollouts: max_steps=N time_budget_s=0 for every objective "
                "and seed, under out/runs-<N>steps (0: none, no equal-rollouts table)"})
    overrides: list[str] = field(default_factory=list, metadata={"help": "extra key=value settings for every run, e.g. [lr=1e-4]"})
    tokens_per_step: str = field(default="1,2,4", metadata={"help": "evaluation: tokens committed per denoising step (comma list)"})
    variance_k: str = field(default="1,2,4,8,16", metadata={"help": "estimator variance: sampled steps per completion (comma list)"})
    variance_samplers: str = field(default=",".join(SAMPLERS), metadata={"help": "estimator variance: step samplers (comma list of " + ", ".join(SAMPLERS) + ")"})
    variance_prompts: int = field(default=8, metadata={"help": "estimator variance and gradient quality: prompts in the fixed batch (x the preset's group_size)"})
    variance_repeats: int = field(default=40, metadata={"help": "estimator variance: independent draws per (sampler, K)"})
    eos_variance: bool = field(default=True, metadata={"help": "estimator variance also on rollouts that stop early (tiny Countdown's base, random remasking), where eos_steps include and exclude differ, when the study's own rollouts never do"})
    profile_steps: int = field(default=3, metadata={
        "help": "cost: recipe steps of a short profiling run per objective in a fresh process (backbone forwards per "
                "step, peak memory); 0: no profiling"})
    quality_knob: str = field(default="1,2,4,8,16", metadata={
        "help": "gradient quality: values of each objective's Monte Carlo knob (num_samples, <objective>.copies, "
                "dmpo.rows; comma list; the value its runs use is added)"})
    quality_repeats: int = field(default=8, metadata={
        "help": "gradient quality: estimates at the largest knob value, each with fresh draws; a value v gets "
                "repeats x max / v (as many forwards a cell), an objective without a knob as v = 1 (0: no "
                "gradient-quality section)"})
    out: str = field(default="runs/study", metadata={"help": "output directory (reused: finished runs are not redone)"})
    report_only: bool = field(default=False, metadata={"help": "only rewrite report.md and the PNGs from out/study.json"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def validate(self) -> None:
        objective_list(self.objectives)
        if any(s < 0 for s in _ints(self.seeds, "seeds")):
            raise AgrpoError("seeds must be >= 0")
        if any(k < 1 for k in _ints(self.tokens_per_step, "tokens_per_step") + _ints(self.variance_k, "variance_k")):
            raise AgrpoError("tokens_per_step and variance_k take values >= 1")
        _names(self.variance_samplers, "variance_samplers", SAMPLERS)
        if self.variance_prompts < 1 or self.variance_repeats < 2:
            raise AgrpoError("variance_prompts must be >= 1 and variance_repeats >= 2")
        if self.time_budget_s != -1 and self.time_budget_s <= 0:
            raise AgrpoError(f"time_budget_s must be > 0 (or -1 for the preset's), got {self.time_budget_s:g}")
        if self.rollout_steps < 0 or self.profile_steps < 0:
            raise AgrpoError(f"rollout_steps and profile_steps must be >= 0 (0: skip), got {self.rollout_steps}, "
                             f"{self.profile_steps}")
        if any(k < 1 for k in _ints(self.quality_knob, "quality_knob")):
            raise AgrpoError(f"quality_knob={self.quality_knob}: values >= 1")
        if self.quality_repeats == 1 or self.quality_repeats < 0:
            raise AgrpoError(f"quality_repeats must be >= 2 (a variance needs two estimates) or 0 to skip, got "
                             f"{self.quality_repeats}")


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
    seeds, objectives = _ints(cfg.seeds, "seeds"), objective_list(cfg.objectives)
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
    check_block_models(objectives, base_cfg)
    # every setting is checked before the first run starts
    plans = plan_runs(out / "runs", preset, common, objectives, seeds)
    rollout_plans = []
    if cfg.rollout_steps:
        rollout_plans = plan_runs(out / rollouts_dir(cfg.rollout_steps), preset, common + equal_rollouts(cfg.rollout_steps),
                                  objectives, seeds)
    for _, _, run_cfg in plans + rollout_plans:
        reusable_run(Path(run_cfg.output_dir) / run_cfg.name, run_cfg)
    out.mkdir(parents=True, exist_ok=True)

    # 1. training: the RL recipe as `agrpo train` runs it, one run at a time
    runs = _train_runs(cfg, plans, "")
    runs_rollouts = _train_runs(cfg, rollout_plans, f" ({cfg.rollout_steps} steps)")

    # 2. the same held-out problems for every model, at every step count
    steps = [gen // k for k in tokens]
    models = [base_cfg.model] + [r["run_dir"] for r in runs + runs_rollouts]
    evaluation = _evaluate(cfg, base_cfg, models, steps, out / "eval")

    # 3. the estimator's variance on a fixed batch of the base's rollouts (reused when measured before in
    #    `out` with the same settings: kept in measured/ as soon as done, so an interrupted study keeps it)
    batch = None
    previous = _previous_variance(out, cfg, base_cfg)
    if previous is None:
        batch = fixed_batch(base_cfg, cfg.variance_prompts)
        variance = estimator_variance(base_cfg, cfg, batch)
        variance_eos = None
        if cfg.eos_variance and not variance["eos_options_differ"]:
            _say(cfg, "study: estimator variance on rollouts that stop early (tiny Countdown, random remasking)")
            variance_eos = estimator_variance(load_config(RLConfig, str(Path(default_preset()).with_name(EOS_PRESET)),
                                                          EOS_OVERRIDES), cfg)
        _keep(out, "variance", _variance_key(cfg, base_cfg), {"variance": variance, "variance_eos": variance_eos})
    else:
        variance, variance_eos = previous
        _say(cfg, "study: estimator variance: measured before with the same settings, reused")

    # 4. cost: a short profiling run per objective, each in a fresh process
    profile = None
    if cfg.profile_steps:
        profile = {o: profile_objective(cfg, out / "profile", preset, common, o, seeds[0], base_cfg.prompts_per_step)
                   for o in objectives}

    # 5. gradient quality on the fixed batch, per objective (kept in measured/ as each is done)
    quality = None
    if cfg.quality_repeats:
        parts, reused = [], []
        for o in objectives:
            key = _quality_key(cfg, base_cfg, o)
            part = _kept(out, f"quality-{o}", key)
            if part is None:
                if batch is None:
                    batch = fixed_batch(base_cfg, cfg.variance_prompts)
                _say(cfg, f"study: gradient quality of {o}")
                part = gradient_quality(base_cfg, [o], _ints(cfg.quality_knob, "quality_knob"), cfg.quality_repeats,
                                        batch, cfg.progress)
                _keep(out, f"quality-{o}", key, part)
            else:
                reused.append(o)
            parts.append(part)
        if reused:
            _say(cfg, f"study: gradient quality of {', '.join(reused)}: measured before, reused")
        quality = {**{k: v for k, v in parts[0].items() if k != "objectives"},
                   "objectives": [e for part in parts for e in part["objectives"]]}
        key = {"objectives": objectives, **_quality_key(cfg, base_cfg, "")}
        quality["advantage_cosine"] = _kept(out, "advantage-cosine", key)
        if quality["advantage_cosine"] is None:
            if batch is None:
                batch = fixed_batch(base_cfg, cfg.variance_prompts)
            quality["advantage_cosine"] = advantage_cosines(base_cfg, objectives, batch)
            _keep(out, "advantage-cosine", key, quality["advantage_cosine"])

    study = {
        "preset": preset, "overrides": common, "config": config_to_dict(cfg), "train_config": config_to_dict(base_cfg),
        "base_model": base_cfg.model, "task": base_cfg.task, "gen_length": gen, "objectives": objectives,
        "tokens_per_step": tokens, "steps": steps, "runs": runs, "rollout_steps": cfg.rollout_steps,
        "runs_rollouts": runs_rollouts, "eval": evaluation, "variance": variance, "variance_eos": variance_eos,
        "profile": profile, "quality": quality, "wall_s": time.perf_counter() - t0,
    }
    # the time of every finished invocation on this `out` (a later one reuses what the earlier ones computed)
    before = _earlier_invocations(out / STUDY)
    study["invocations"], study["total_wall_s"] = before[0] + 1, before[1] + study["wall_s"]
    write_atomic(out / STUDY, json.dumps(study, indent=1) + "\n")
    return write_report(study, out)


def _earlier_invocations(path: Path) -> tuple[int, float]:
    """(finished invocations, their seconds) recorded in an earlier study.json of the same `out`; (0, 0) when none."""
    try:
        prev = json.loads(path.read_text())
    except (OSError, ValueError):
        return 0, 0.0
    return int(prev.get("invocations", 1)), float(prev.get("total_wall_s", prev.get("wall_s", 0.0)))


VARIANCE_FIELDS = ("variance_k", "variance_samplers", "variance_prompts", "variance_repeats", "eos_variance")
QUALITY_FIELDS = ("quality_knob", "quality_repeats", "variance_prompts")
# rollouts that stop early at different steps: the base of tiny Countdown, random remasking
EOS_PRESET, EOS_OVERRIDES = "tiny_countdown.yaml", ["sampling.remasking=random"]


def rollouts_dir(steps: int) -> str:
    """Where the equal-rollouts runs of `rollout_steps=steps` live, apart from the time-budget runs."""
    return f"runs-{steps}steps"


def equal_rollouts(steps: int) -> list[str]:
    """The overrides of the equal-rollouts runs: `steps` steps, whatever the preset's budget."""
    return [f"max_steps={steps}", "time_budget_s=0", "epochs=0"]


def plan_runs(run_root: Path, preset: str, common: list[str], objectives: list[str], seeds: list[int]) -> list:
    """(objective, seed, the run's RLConfig) for every objective and seed, validated (each objective's
    `check` included), named <objective>-seed<seed> under `run_root`."""
    from agrpo.recipes.rl import RLConfig

    return [(o, s, load_config(RLConfig, preset, common + [f"objective={o}", f"seed={s}", f"name={o}-seed{s}",
                                                           f"output_dir={run_root}"]))
            for o in objectives for s in seeds]


def block_size_of(base_cfg) -> int | None:
    """The block size of the preset's model (None: it attends over the whole sequence), from the model as
    the recipe loads it."""
    model, _ = load_model_and_tokenizer(
        base_cfg.model, trust_remote_code=base_cfg.trust_remote_code, mask_token_id=base_cfg.mask_token_id,
        block_size=base_cfg.block_size, attn_implementation=base_cfg.attn_implementation)
    return getattr(model.config, "block_size", None)


def check_block_models(objectives: list[str], base_cfg) -> None:
    """Refuse, in one line, an objective that runs on block-diffusion models only when the preset's model
    is not one (loads the model only when such an objective is asked for)."""
    only = [o for o in objectives if OBJECTIVES[o].block_models_only]
    if only and block_size_of(base_cfg) is None:
        raise AgrpoError(
            f"objectives={','.join(objectives)}: {', '.join(only)} replay{'s' if len(only) == 1 else ''} block by block "
            f"and need{'s' if len(only) == 1 else ''} a block-diffusion model, but the preset's model {base_cfg.model} "
            "attends over the whole sequence: drop it, or use a block preset (preset=configs/tiny_sudoku_blocks.yaml)")


def reusable_run(run_dir: Path, run_cfg) -> dict | None:
    """The summary of a finished run at `run_dir` (None: not finished, or not there), after checking that it
    was trained with the settings planned now; a finished run trained otherwise is refused in one line."""
    summary = _finished_run(run_dir)
    if summary is None or not (run_dir / CONFIG).is_file():
        return summary
    import yaml

    from agrpo.recipes.rl import resume_conflicts

    saved = read_yaml(run_dir / CONFIG)
    conflicts = resume_conflicts(saved, run_cfg)
    then, now = flat_config(saved), flat_config(yaml.safe_load(yaml.safe_dump(config_to_dict(run_cfg))))
    conflicts += [f"{k}={then[k]} (now {now[k]})" for k in BUDGET_KEYS if k in then and then[k] != now[k]]
    if conflicts:
        raise AgrpoError(f"{run_dir} finished with {', '.join(conflicts[:3])}{' ...' if len(conflicts) > 3 else ''}: "
                         "pass another out= for a study with these settings (or remove that run)")
    return summary


def _train_runs(cfg: StudyConfig, plans: list, what: str) -> list[dict]:
    runs = []
    for i, (objective, seed, run_cfg) in enumerate(plans):
        run_dir = Path(run_cfg.output_dir) / run_cfg.name
        summary = reusable_run(run_dir, run_cfg)
        if summary is None:
            _say(cfg, f"study: run {i + 1}/{len(plans)}{what}: {objective}, seed {seed} -> {run_dir}")
            run_cfg = replace(run_cfg, progress=cfg.progress, resume=run_dir.exists())
            summary = _train(run_cfg)
        else:
            _say(cfg, f"study: run {i + 1}/{len(plans)}{what}: {objective}, seed {seed}: finished before, reused")
        runs.append({"objective": objective, "seed": seed, "run_dir": str(run_dir), "summary": summary,
                     "step_s": step_seconds(run_dir), "settings": run_settings(run_dir)})
    return runs


def step_seconds(run_dir: Path) -> dict | None:
    """{"mean", "median", "steps"} of the training seconds of each step in the run's metrics.jsonl (`step_s`:
    rollouts, loss and optimizer step, evaluations left out)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return None
    values = sorted(float(r["step_s"]) for r in read_jsonl(path) if r.get("step_s") is not None)
    if not values:
        return None
    n = len(values)
    return {"mean": sum(values) / n, "median": (values[(n - 1) // 2] + values[n // 2]) / 2, "steps": n}


def owned_keys(objective: str) -> set[str]:
    """The config keys an objective declares: its section's (`espo.copies`) and its top-level ones (`num_samples`)."""
    cls = OBJECTIVES.get(objective)
    if cls is None:
        return set()
    keys = {f"{objective}.{f.name}" for f in fields(cls.settings)} if cls.settings is not None else set()
    return keys | ({f.name for f in fields(cls.top_level)} if cls.top_level is not None else set())


def run_settings(run_dir: Path) -> dict | None:
    """The settings of a run's saved config.yaml that differ from `agrpo train`'s defaults, flat (dotted keys),
    without where it ran, its seed and the keys other objectives declare."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        return None
    saved = flat_config(read_yaml(path))
    defaults = default_settings()
    objective = saved.get("objective", "")
    others = set().union(*(owned_keys(o) for o in OBJECTIVES if o != objective))
    return {k: v for k, v in saved.items()
            if k not in BOOKKEEPING and k not in others and (k not in defaults or defaults[k] != v)}


MEASURED = "measured"  # under `out`: each measurement of sections 3 and 5 as soon as it is done, with its settings


def _variance_key(cfg: StudyConfig, base_cfg) -> dict:
    return {"config": {k: getattr(cfg, k) for k in VARIANCE_FIELDS}, "train_config": config_to_dict(base_cfg)}


def _quality_key(cfg: StudyConfig, base_cfg, objective: str) -> dict:
    return {"config": {k: getattr(cfg, k) for k in QUALITY_FIELDS}, "train_config": config_to_dict(base_cfg),
            "objective": objective}


def _keep(out: Path, name: str, key: dict, value) -> None:
    (out / MEASURED).mkdir(parents=True, exist_ok=True)
    write_atomic(out / MEASURED / f"{name}.json", json.dumps({"key": key, "value": value}, indent=1) + "\n")


def _kept(out: Path, name: str, key: dict):
    """What `_keep` kept under `name`, if it was measured with the settings `key` (the draws are seeded, so they
    would repeat), else None."""
    try:
        kept = json.loads((out / MEASURED / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    return kept["value"] if kept.get("key") == json.loads(json.dumps(key)) else None


def _previous_variance(out: Path, cfg: StudyConfig, base_cfg) -> tuple[dict, dict | None] | None:
    """The variance sections measured before in `out` with these settings (the variance fields, the base, its
    training config): kept in measured/, or in the study.json of a study from before measured/ existed."""
    kept = _kept(out, "variance", _variance_key(cfg, base_cfg))
    if kept is not None:
        return kept["variance"], kept["variance_eos"]
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


# ---- cost: a short profiling run per objective, in a fresh process ----------------------------

def profile_overrides(common: list[str], objective: str, seed: int, steps: int, prompts: int, root: Path) -> list[str]:
    """The profiling run of `objective`: the study's settings, `steps` steps of `prompts` prompts from a training
    pool of that many (generating the usual thousands costs more than the steps and changes no step), a small
    evaluation at its start and end (outside the counts), no intermediate evaluation or checkpoint."""
    return common + [f"objective={objective}", f"seed={seed}", f"max_steps={steps}", "time_budget_s=0", "epochs=0",
                     f"train_pool={steps * prompts}", f"eval_size={PROFILE_EVAL_SIZE}", "eval_every=0", "save_every=0",
                     "log_samples_every=0", f"name={objective}", f"output_dir={root}", "progress=false"]


def profile_objective(cfg: StudyConfig, root: Path, preset: str, common: list[str], objective: str, seed: int,
                      prompts: int) -> dict:
    """Forwards per step and peak memory of `cfg.profile_steps` recipe steps of `objective` (`prompts` prompts a
    step), measured in a fresh process (so that its peak memory is its own), with as many torch threads as this
    one; reused when measured before with the same settings."""
    spec = {"preset": preset, "overrides": profile_overrides(common, objective, seed, cfg.profile_steps, prompts, root),
            "threads": torch.get_num_threads()}
    result_path, spec_path = root / f"{objective}.json", root / f"{objective}.spec.json"
    try:
        previous = json.loads(result_path.read_text())
        if previous.get("spec") == spec:
            _say(cfg, f"study: profile of {objective}: measured before with the same settings, reused")
            return previous
    except (OSError, ValueError):
        pass
    _say(cfg, f"study: profiling {objective} ({cfg.profile_steps} steps in a fresh process)")
    if (root / objective).exists():  # an earlier profile with other settings, or an interrupted one
        shutil.rmtree(root / objective)
    root.mkdir(parents=True, exist_ok=True)
    write_atomic(spec_path, json.dumps(spec, indent=1))
    import agrpo

    env = dict(os.environ)  # the child imports the agrpo this process runs
    env["PYTHONPATH"] = os.pathsep.join([str(Path(agrpo.__file__).resolve().parents[1])]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    code = f"from agrpo.recipes.study import profile_main; profile_main({str(spec_path)!r}, {str(result_path)!r})"
    done = subprocess.run([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                          stderr=None if cfg.progress else subprocess.PIPE, text=True, check=False)
    if done.returncode != 0 or not result_path.is_file():
        last = [line for line in (done.stderr or "").splitlines() if line.strip()]
        raise AgrpoError(f"profiling {objective} failed (exit {done.returncode})"
                         + (f": {last[-1].strip()}" if last else ": see the lines above"))
    return json.loads(result_path.read_text())


def _status_mb(key: str) -> float | None:
    """A memory line of /proc/self/status in MB (VmRSS: resident now; VmHWM: its peak), None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Set this process's peak RSS (VmHWM) back to its current RSS (Linux >= 4.0: 5 > /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class ForwardMeter:
    """Counts the forward passes of every policy's backbone (the network under `Policy`'s LM head: what one
    forward costs), by phase: `rollout` (inside the sampler), `eval` (inside the evaluations), `loss` (the rest
    of a step: the objective's prepare and updates, reference forwards included). Also measures the peak memory
    of the steps: from the start of the first step to the start of the evaluation after the last, the peak
    resident set size (VmHWM, reset to the current RSS at the start; ru_maxrss, which a child process inherits
    from its parent, cannot be reset) or on a GPU `torch.cuda.max_memory_allocated` (its peak stats reset).

    A global forward pre-hook spots each `Policy` when it is first called and hooks its backbone then; the
    recipe's sampler and evaluation are wrapped (`installed`) to say which phase runs."""

    def __init__(self):
        self.calls: dict[str, int] = {}
        self.sequences: dict[str, int] = {}
        self.tokens: dict[str, int] = {}
        self.watched: dict[int, object] = {}
        self.inside: list[str] = []
        self.started = False
        self.cuda = torch.cuda.is_available()
        self.memory = "torch.cuda.max_memory_allocated" if self.cuda else "VmHWM"
        self.before_mb = self.after_mb = self.setup_peak_mb = None

    @property
    def phase(self) -> str:
        return self.inside[-1] if self.inside else ("loss" if self.started else "setup")

    def _spot(self, module, args):
        if isinstance(module, Policy):
            backbone = module._backbone if module._backbone is not None else module.model
            if id(backbone) not in self.watched:
                self.watched[id(backbone)] = backbone.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        phase = self.phase
        self.calls[phase] = self.calls.get(phase, 0) + 1
        if isinstance(ids, torch.Tensor):
            self.sequences[phase] = self.sequences.get(phase, 0) + int(ids.shape[0])
            self.tokens[phase] = self.tokens.get(phase, 0) + int(ids.numel())

    def _begin_steps(self) -> None:
        self.started = True
        if self.cuda:
            self.setup_peak_mb = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
            self.before_mb = torch.cuda.memory_allocated() / 2**20
        elif _status_mb("VmHWM") is not None:
            self.setup_peak_mb, self.before_mb = _status_mb("VmHWM"), _status_mb("VmRSS")
            if not _reset_peak_rss():  # the peak then includes what came before the steps
                self.memory = "VmHWM (not reset: since the process started)"
        else:
            self.memory = "ru_maxrss (since the process started)"
            self.before_mb = self.setup_peak_mb = _ru_maxrss_mb()

    def _peak(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        hwm = _status_mb("VmHWM")
        return hwm if hwm is not None else _ru_maxrss_mb()

    def _wrap(self, fn, phase: str):
        def run(*args, **kwargs):
            if phase == "rollout" and not self.started:  # the first step begins
                self._begin_steps()
            if phase == "eval" and self.started and self.after_mb is None:  # the steps are over
                self.after_mb = self._peak()
            self.inside.append(phase)
            try:
                return fn(*args, **kwargs)
            finally:
                self.inside.pop()

        return run

    @contextlib.contextmanager
    def installed(self, rl_module):
        """Hooks in, and the recipe's `generate` and `evaluate` wrapped, for the duration."""
        saved = rl_module.generate, rl_module.evaluate
        rl_module.generate, rl_module.evaluate = self._wrap(saved[0], "rollout"), self._wrap(saved[1], "eval")
        handle = torch.nn.modules.module.register_module_forward_pre_hook(self._spot)
        try:
            yield self
        finally:
            handle.remove()
            for h in self.watched.values():
                h.remove()
            rl_module.generate, rl_module.evaluate = saved

    def result(self, steps: int) -> dict:
        per = max(steps, 1)
        after = self.after_mb if self.after_mb is not None else self._peak()
        return {
            "steps": steps,
            "forwards_per_step": {p: self.calls.get(p, 0) / per for p in ("rollout", "loss")},
            "sequences_per_step": {p: self.sequences.get(p, 0) / per for p in ("rollout", "loss")},
            "tokens_per_step": {p: self.tokens.get(p, 0) / per for p in ("rollout", "loss")},
            "eval_forwards": self.calls.get("eval", 0),
            "peak_mb": after,
            "rise_mb": None if self.before_mb is None else after - self.before_mb,
            "setup_peak_mb": self.setup_peak_mb,
            "memory": self.memory,
        }


def _ru_maxrss_mb() -> float:
    """The process's peak resident set size so far, in MB (ru_maxrss: kB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def profile_main(spec_path: str, result_path: str) -> None:
    """The profiling process: the recipe run as the spec says, its backbone forwards counted."""
    from agrpo.recipes import rl

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(int(spec["threads"]))
    cfg = load_config(rl.RLConfig, spec["preset"], spec["overrides"])
    t0 = time.perf_counter()
    meter = ForwardMeter()
    with meter.installed(rl):
        summary = rl.train(cfg)
    result = {"spec": spec, **meter.result(int(summary["steps"])), "wall_s": time.perf_counter() - t0,
              "train_s": summary.get("wall_s")}
    write_atomic(result_path, json.dumps(result, indent=1) + "\n")


# ---- the fixed batch of the base's rollouts, and the estimator's variance -----------------------

@dataclass
class FixedBatch:
    """One batch of rollouts of the base at one token a denoising step (the preset's sampler otherwise),
    with its rewards: what sections 3 and 5 measure gradients on."""

    policy: Policy
    rollout: object
    rewards: list
    prompts: int
    rows: int
    sampling: object
    task: str
    model: str


def fixed_batch(base_cfg, prompts: int) -> FixedBatch:
    """`prompts` training prompts x the preset's group size, sampled by the base at its weights (eval mode:
    no dropout, so every difference between two gradient estimates is the estimator's own)."""
    torch.manual_seed(base_cfg.seed)
    model, tokenizer = load_model_and_tokenizer(base_cfg.model, block_size=base_cfg.block_size)
    policy = Policy(model, shift_logits=shift_logits_of(model))
    model.eval()
    task = get_task(base_cfg.task)
    rows = task.train_examples(prompts, seed=base_cfg.seed)
    batch = [r for r in rows for _ in range(base_cfg.group_size)]
    texts_in = [task.prompt(r) for r in batch]
    ids, mask = encode_prompts(tokenizer, texts_in, base_cfg.chat_template, "cpu")
    gen = torch.Generator().manual_seed(base_cfg.seed)
    # one token a denoising step, whatever the preset trains with: T_eff is then the completion
    # length, and every K of the list up to it is a real choice
    sampling = replace(base_cfg.sampling, steps=base_cfg.sampling.gen_length)
    with torch.no_grad():
        rollout = generate(policy, ids, mask, sampling, gen)
    texts = decode_completions(tokenizer, rollout.completion, rollout.stop_ids)
    columns = {k: [r[k] for r in batch] for k in batch[0] if k != "prompt"}
    rewards = list(task.reward(texts_in, texts, **columns))
    return FixedBatch(policy, rollout, rewards, len(rows), len(batch), sampling, base_cfg.task, base_cfg.model)


def estimator_variance(base_cfg, cfg: StudyConfig, batch: FixedBatch | None = None) -> dict:
    """Relative variance of the AGRPO gradient estimate against the exact every-step gradient.

    One batch of rollouts of the base (`fixed_batch`: the preset's training sampler at one token a
    denoising step, and its rewards), at the base
    weights (so the clipped ratio is 1 and the loss's gradient is the policy gradient). For each
    sampler and K: `variance_repeats` estimates g_K with fresh draws; reported are
    E||g_K - g||^2 / ||g||^2 (its mean over draws, with a standard error) and the bias check
    ||mean g_K - g||^2 / ||g||^2, which for an unbiased estimator is about the variance / repeats.
    """
    batch = batch if batch is not None else fixed_batch(base_cfg, cfg.variance_prompts)
    policy, rollout, rewards, sampling = batch.policy, batch.rollout, batch.rewards, batch.sampling
    adv, valid = group_advantages(rewards, base_cfg.group_size, base_cfg.scale_std)
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
              "temperature": sampling.temperature, "rows": batch.rows, "prompts": batch.prompts, "k": ks, "repeats": cfg.variance_repeats,
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




# ---- gradient quality: each objective's own gradient on the fixed batch --------------------------

class OneProcess:
    """accelerate's Accelerator as it is on one process without mixed precision, for calling an objective's
    `update` outside the recipe: backward is loss.backward(), there is nothing to synchronise. (A real
    Accelerator shares one state per process, which the study's training runs have already set.)"""

    num_processes, process_index, is_main_process = 1, 0, True
    device = torch.device("cpu")
    distributed_type, mixed_precision = "NO", "no"
    sync_gradients = True

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def no_sync(self, model):
        return contextlib.nullcontext()

    def gather(self, tensor):
        return tensor

    def reduce(self, tensor, reduction: str = "sum"):
        return tensor

    def wait_for_everyone(self) -> None:
        pass


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _set(cfg, key: str, value):
    head, _, rest = key.partition(".")
    return replace(cfg, **{head: _set(getattr(cfg, head), rest, value) if rest else value})


def knob_of(objective: str) -> tuple[str | None, str]:
    """(the config key of the objective's Monte Carlo knob or None, what it counts or why there is none)."""
    if objective in KNOBS:
        return KNOBS[objective]
    return None, FIXED.get(objective, ("nothing to vary: no knob named for it (study.KNOBS)", True))[0]


def _flat_grad(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).double() for p in params])


def _cos(a: torch.Tensor, b: torch.Tensor) -> float | None:
    na, nb = float(a.norm()), float(b.norm())
    return float(a @ b) / (na * nb) if na > 0 and nb > 0 else None


def objective_gradient(objective: str, cfg, batch: FixedBatch, repeat: int) -> torch.Tensor:
    """The flattened gradient of one update of `objective` on the fixed batch (at the base's weights: the
    old policy is the current one), its draws from a generator of its own for `repeat`."""
    obj = get_objective(objective)
    policy = batch.policy
    adv, valid = obj.advantages(batch.rewards, cfg.group_size, cfg)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 * repeat + 17)
    part = Part(batch.rollout, adv, valid, batch.rewards, gen)

    def reference(x, positions, attention):  # the base = the current weights, never a gradient path
        with torch.no_grad():
            return policy(x, positions, attention)

    ctx = Context(OneProcess(), policy, reference, cfg, settings_of(cfg, objective), step=repeat)
    params = [p for p in policy.parameters() if p.requires_grad]
    policy.zero_grad(set_to_none=True)
    obj.prepare(ctx, [part])
    obj.update(ctx, [part], 0)
    g = _flat_grad(params)
    policy.zero_grad(set_to_none=True)
    return g


def exact_gradient(base_cfg, batch: FixedBatch) -> torch.Tensor:
    """The exact policy gradient of the trajectory likelihood: AGRPO's loss over every step of every row
    (`every_step_plan`), with the preset's advantages, normalisation and eos_steps, at ratio 1."""
    adv, valid = group_advantages(batch.rewards, base_cfg.group_size, base_cfg.scale_std)
    plan = every_step_plan(batch.rollout, base_cfg.normalization, valid, base_cfg.eos_steps)
    return direct_gradient(batch.policy, batch.rollout, adv, plan, base_cfg.eps_low, base_cfg.eps_high)


def advantage_cosines(base_cfg, objectives: list[str], batch: FixedBatch) -> dict:
    """Per objective, the cosine of the exact trajectory-likelihood gradient taken with the objective's own
    advantages (and the rows it keeps) with `exact_gradient`'s (the preset's advantages): how far the choice of
    advantages alone turns the gradient, apart from how the likelihood is estimated (None: no row kept)."""
    exact = exact_gradient(base_cfg, batch)
    result = {}
    for o in objectives:
        own = replace(base_cfg, objective=o)
        adv, valid = get_objective(o).advantages(batch.rewards, own.group_size, own)
        plan = every_step_plan(batch.rollout, base_cfg.normalization, valid, base_cfg.eos_steps)
        g = direct_gradient(batch.policy, batch.rollout, adv, plan, base_cfg.eps_low, base_cfg.eps_high)
        result[o] = _cos(g, exact) if float(g.norm()) > 0 else None
    return result


def gradient_quality(base_cfg, objectives: list[str], knob_values: list[int], repeats: int, batch: FixedBatch,
                     progress: bool = False) -> dict:
    """Per objective and value of its knob: n gradients g of its own update on the fixed batch (n below), each
    with fresh draws. With m their mean and V = sum ||g - m||^2 / (n - 1) (the trace of their covariance),
    ||E g||^2 is estimated without the noise of the mean as S = ||m||^2 - V / n (E||m||^2 = ||E g||^2 + V / n),
    and reported are:

    * relative_variance V / S, the variance of one estimate about the estimator's own expectation, relative to
      its squared norm (None, `resolved` false, when S <= 0: the repeats cannot tell the mean from noise);
    * cosine: of m with the exact policy gradient (`exact_gradient`);
    * noise_cosine sqrt(S / ||m||^2): what that cosine would be from the noise of n draws alone if the
      estimator were unbiased (a cosine well below it is bias);
    * expected_cosine <m, exact> / (sqrt(S) ||exact||): the cosine of E g itself with the exact gradient, the
      noise taken off (an estimate: it may leave [-1, 1] when n is small against the variance);
    * draw_cosine: the mean cosine of one estimate with the exact gradient; seconds an estimate took.

    A cell of knob value v gets n = repeats x ceil(max(knob_values) / v) estimates (an objective without a knob: as
    v = 1), so that every cell costs about as many forwards and the noisier cells of few draws get the repeats
    their variance needs; an objective with no draw at all gets two (a variance of 0 confirms it). A knob value
    the objective refuses is noted, not run."""
    exact = exact_gradient(base_cfg, batch)
    if float(exact.norm()) == 0:
        raise AgrpoError("the exact gradient is zero on this batch (every group's rewards are equal): raise variance_prompts")
    plans = []
    for o in objectives:
        key, what = knob_of(o)
        own = replace(base_cfg, objective=o, sampling=batch.sampling)
        configured = _get(own, key) if key else None
        values = sorted(set(knob_values) | {configured}) if key else [None]
        plans.append((o, key, what, own, configured, values, FIXED.get(o, (None, True))[1]))
    top = max(knob_values)

    def count(value, draws: bool) -> int:  # as many draws a cell: repeats x (the largest value / this one)
        return repeats * max(1, -(-top // (value or 1))) if draws else min(repeats, 2)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(count(v, d) for p in plans for v in p[5] for d in [p[6]]), desc="gradient quality",
                   unit="estimate")
    entries = []
    for o, key, what, own, configured, values, draws in plans:
        cells = []
        for value in values:
            n = count(value, draws)
            cfg = _set(own, key, value) if key else own
            try:
                cfg.validate()
            except AgrpoError as e:
                cells.append({"value": value, "refused": str(e)})
                if bar is not None:
                    bar.update(n)
                continue
            mean, m2, cos_sum, t0 = None, 0.0, 0.0, time.perf_counter()
            for r in range(n):  # Welford: the variance without holding every estimate
                g = objective_gradient(o, cfg, batch, r)
                if mean is None:
                    mean = g.clone()
                else:
                    delta = g - mean
                    mean += delta / (r + 1)
                    m2 += float(delta @ (g - mean))
                cos_sum += _cos(g, exact) or 0.0
                if bar is not None:
                    bar.update(1)
            norm2, spread = float(mean @ mean), m2 / (n - 1)  # ||mean||^2, and tr Cov unbiased
            # E||mean||^2 = ||E g||^2 + tr Cov / n: the norm of the estimator's expectation, its noise taken off
            signal = norm2 - spread / n
            resolved = signal > 0 and norm2 > 0
            cells.append({
                "value": value, "repeats": n, "relative_variance": spread / signal if resolved else None,
                "cosine": _cos(mean, exact),
                "noise_cosine": math.sqrt(signal / norm2) if resolved else None,
                "expected_cosine": float(mean @ exact) / (math.sqrt(signal) * float(exact.norm())) if resolved else None,
                "draw_cosine": cos_sum / n if norm2 > 0 else None, "mean_norm": math.sqrt(norm2),
                "resolved": resolved or spread == 0 == norm2, "seconds": (time.perf_counter() - t0) / n,
            })
        entries.append({"objective": o, "knob": key, "knob_help": what, "configured": configured, "cells": cells})
    if bar is not None:
        bar.close()
    return {"model": batch.model, "task": batch.task, "rows": batch.rows, "prompts": batch.prompts,
            "repeats": repeats, "knob_values": list(knob_values), "exact_norm": float(exact.norm()),
            "normalization": base_cfg.normalization, "eos_steps": base_cfg.eos_steps, "objectives": entries}


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


def summarize_runs(study: dict, runs: list[dict]) -> dict:
    """The ordering, paired differences and fewer-steps numbers of one set of runs, from study.json alone."""
    grades, base = study["eval"]["grades"], study["base_model"]
    first = str(study["steps"][0])  # one token a step: the training evaluation's setting
    objectives = list(dict.fromkeys(r["objective"] for r in runs))
    out = {"ordering": [], "paired": [], "steps": []}
    base_scores = grades[base][first]
    base_acc = sum(base_scores) / len(base_scores)
    out["base"] = {"accuracy": base_acc, "solved": sum(x == 1.0 for x in base_scores) / len(base_scores)}
    per_obj = {}
    for o in objectives:
        mine = [r for r in runs if r["objective"] == o]
        accs = [sum(grades[r["run_dir"]][first]) / len(grades[r["run_dir"]][first]) for r in mine]
        solved = [sum(x == 1.0 for x in grades[r["run_dir"]][first]) / len(grades[r["run_dir"]][first]) for r in mine]
        mean, sd, lo, hi = t_interval(accs)
        gain = t_interval([a - base_acc for a in accs])
        per_obj[o] = _mean_rows([grades[r["run_dir"]][first] for r in mine])
        out["ordering"].append({"objective": o, "seeds": [r["seed"] for r in mine], "accuracy": accs, "mean": mean,
                                "sd": sd, "low": lo, "high": hi, "gain": gain[0], "gain_low": gain[2],
                                "gain_high": gain[3], "solved": solved, "solved_mean": sum(solved) / len(solved),
                                "steps": [r["summary"].get("steps") for r in mine]})
    for o in objectives:
        out["paired"].append({"a": o, "b": "base", **paired(per_obj[o], base_scores)})
    if "agrpo" in per_obj:  # AGRPO against every other objective, on the same problems
        for o in objectives:
            if o != "agrpo":
                out["paired"].append({"a": "agrpo", "b": o, **paired(per_obj["agrpo"], per_obj[o])})
    for k, st in zip(study["tokens_per_step"], study["steps"]):
        row = {"tokens_per_step": k, "steps": st, "base": sum(grades[base][str(st)]) / len(grades[base][str(st)])}
        for o in objectives:
            accs = [sum(grades[r["run_dir"]][str(st)]) / len(grades[r["run_dir"]][str(st)])
                    for r in runs if r["objective"] == o]
            m, sd, lo, hi = t_interval(accs)
            row[o] = {"mean": m, "low": lo, "high": hi, "gain": m - row["base"]}
        out["steps"].append(row)
    return out


def summarize_settings(runs: list[dict]) -> dict | None:
    """{"common": the settings every run shares that differ from the defaults, "objectives": {objective:
    {key: [values over its runs]}}: its own settings (`owned_keys`) and any other that differs from the common}."""
    have = [(r["objective"], r["settings"]) for r in runs if r.get("settings") is not None]
    if not have:
        return None
    owned = set().union(*(owned_keys(o) for o in OBJECTIVES), *(owned_keys(o) for o, _ in have))
    shared = [{(k, json.dumps(v)) for k, v in s.items() if k not in owned} for _, s in have]
    common = set.intersection(*shared)
    per: dict[str, dict[str, list]] = {}
    for o, s in have:
        mine = per.setdefault(o, {})
        for k, v in s.items():
            if (k, json.dumps(v)) not in common and v not in mine.setdefault(k, []):
                mine[k].append(v)
    return {"common": {k: json.loads(v) for k, v in sorted(common)}, "objectives": per}


def summarize_cost(study: dict) -> list[dict]:
    """Per objective: seconds per step of its runs (mean over seeds of each run's mean `step_s`), steps made,
    and what its profiling run measured."""
    rows = []
    profile = study.get("profile") or {}
    for o in study.get("objectives") or list(dict.fromkeys(r["objective"] for r in study["runs"])):
        row = {"objective": o}
        for name, runs in (("time", study["runs"]), ("rollouts", study.get("runs_rollouts") or [])):
            times = [r["step_s"]["mean"] for r in runs if r["objective"] == o and r.get("step_s")]
            steps = [r["summary"].get("steps") for r in runs if r["objective"] == o]
            row[name] = {"step_s": sum(times) / len(times) if times else None,
                         "steps": sum(steps) / len(steps) if steps and None not in steps else None}
        row["profile"] = profile.get(o)
        rows.append(row)
    return rows


def summarize_study(study: dict) -> dict:
    """The report's numbers, from study.json alone: the time-budget set's at the top level, the
    equal-rollouts set's under "rollouts" (None without one)."""
    out = summarize_runs(study, study["runs"])
    rollouts = study.get("runs_rollouts") or []
    out["rollouts"] = summarize_runs(study, rollouts) if rollouts else None
    out["settings"] = summarize_settings(study["runs"])
    out["cost"] = summarize_cost(study)
    return out


# ---- the report --------------------------------------------------------------------------

def _f(x, digits=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _g(x, digits=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def _pts(x) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x + 0.0:+.1f}"


def _ordering_lines(s: dict, runs: list[dict], png: str) -> list[str]:
    lines = [
        "| model | rank | accuracy per seed | mean | sd | 95% CI (t) | gain on base (95% CI) | solved whole per seed | solved (mean) | steps |",
        "|---|---|---|---|---|---|---|---|---|---|",
        (f"| base | | {_f(s['base']['accuracy'])} | {_f(s['base']['accuracy'])} | | | | {_f(s['base']['solved'])} | "
         f"{_f(s['base']['solved'])} | |"),
    ]
    ranked = sorted(s["ordering"], key=lambda o: -o["mean"])
    for rank, o in enumerate(ranked, start=1):
        lines.append(
            f"| {o['objective']} | {rank} | {' / '.join(_f(a) for a in o['accuracy'])} | {_f(o['mean'])} | {_f(o['sd'])} | "
            f"[{_f(o['low'])}, {_f(o['high'])}] | {_pts(o['gain'])} [{_pts(o['gain_low'])}, {_pts(o['gain_high'])}] points | "
            f"{' / '.join(_f(x) for x in o['solved'])} | {_f(o.get('solved_mean'))} | {' / '.join(str(x) for x in o['steps'])} |"
        )
    baselines = {k: v for k, v in runs[0]["summary"].items() if k == "model_free_accuracy"} if runs else {}
    if baselines:
        lines += ["", f"A model-free guesser (uniform over the digits the clues allow in each cell) scores "
                      f"{_f(baselines['model_free_accuracy'])}."]
    lines += ["", "Paired on the same problems (per-problem score averaged over seeds; 95% normal interval):", "",
              "| comparison | mean difference | 95% CI | problems better / worse |", "|---|---|---|---|"]
    for p in s["paired"]:
        lines.append(f"| {p['a']} - {p['b']} | {_pts(p['diff'])} points | [{_pts(p['low'])}, {_pts(p['high'])}] | "
                     f"{p['better']} / {p['worse']} of {p['n']} |")
    return lines + ["", f"![ordering]({png})", ""]


def _steps_lines(s: dict) -> list[str]:
    head = [f"{row['tokens_per_step']} a step ({row['steps']} steps)" for row in s["steps"]]
    lines = ["| model | " + " | ".join(head) + " |", "|---|" + "---|" * len(head),
             "| base | " + " | ".join(_f(row["base"]) for row in s["steps"]) + " |"]
    for o in s["ordering"]:
        name = o["objective"]
        lines.append(f"| {name} | " + " | ".join(
            f"{_f(row[name]['mean'])} [{_f(row[name]['low'])}, {_f(row[name]['high'])}]; {_pts(row[name]['gain'])}"
            for row in s["steps"]) + " |")
    return lines


def _value(v) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def _settings_lines(settings: dict | None, rollout_steps: int) -> list[str]:
    if not settings:
        return []
    lines = ["### Settings of the runs", "",
             "Read from each run's saved config.yaml; only what differs from `agrpo config train`'s defaults "
             "(the run's name, directory and seed left out). Every run: "
             + (", ".join(f"`{k}={_value(v)}`" for k, v in settings["common"].items()) or "the defaults") + ".", ""]
    if rollout_steps:
        lines += [f"The equal-rollouts runs differ from these by `{' '.join(equal_rollouts(rollout_steps))}` alone.", ""]
    defaults = default_settings()
    mu = settings["common"].get("inner_steps", defaults["inner_steps"])
    lines += ["Each objective's own settings are its defaults (its paper's Monte Carlo copies; `agrpo config train`) "
              "unless marked (set). Updates per batch of rollouts (mu, `inner_steps`): "
              f"{mu} unless listed in the last column; the papers' recipes for the 8B models, their mu included, "
              "are `configs/objectives/<name>.yaml`.", "",
              "| objective | its own settings in these runs | other settings that differ from the defaults |",
              "|---|---|---|"]
    for o, keys in settings["objectives"].items():
        own = {k: [defaults[k]] for k in sorted(owned_keys(o)) if k in defaults}
        own.update({k: v for k, v in keys.items() if k in own})
        text = ", ".join(f"`{k}={' / '.join(_value(v) for v in values)}`" for k, values in sorted(keys.items())
                         if k not in own)
        mine = ", ".join(f"`{k}={' / '.join(_value(v) for v in values)}`" + ("" if values == [defaults[k]] else " (set)")
                         for k, values in own.items())
        lines.append(f"| {o} | {mine or 'none'} | {text or 'none'} |")
    return lines + [""]


def default_settings() -> dict:
    """`agrpo train`'s defaults, flat (dotted keys), as a saved config.yaml holds them."""
    import yaml

    from agrpo.recipes.rl import RLConfig

    return flat_config(yaml.safe_load(yaml.safe_dump(config_to_dict(RLConfig()))))


def _cost_lines(study: dict, s: dict) -> list[str]:
    rows = s["cost"]
    if not any(r["time"]["step_s"] is not None or r["profile"] for r in rows):  # a study.json from before section 4
        return []
    tc = study["train_config"]
    per_step = tc["prompts_per_step"] * tc["group_size"]
    n = study.get("rollout_steps") or 0
    profiled = [r["profile"] for r in rows if r["profile"]]
    memory = profiled[0]["memory"] if profiled else ""
    how = {
        "VmHWM": "peak memory is the profiling process's peak resident set size over its steps (VmHWM of "
                 "/proc/self/status, reset to the current RSS at the start of the first step, read at the start of the "
                 "evaluation after the last: the model, the optimizer state and the steps' activations), the rise its "
                 "growth over the RSS at the start of the first step.",
        "torch.cuda.max_memory_allocated": "peak memory is `torch.cuda.max_memory_allocated` over the steps (peak "
                                           "statistics reset at the start of the first step), the rise its growth "
                                           "over the memory allocated then.",
    }.get(memory, f"peak memory is the profiling process's peak resident set size since it started (`{memory}`: "
                  "loading and the first evaluation included), the rise its growth from the start of the first step.")
    head = ("| objective | s / step (same time) | steps in the budget | rollouts seen |"
            + (f" s / step ({n} steps) |" if n else "")
            + " loss forwards / step | loss sequences / step | sampler forwards / step | peak memory (MB) | rise (MB) |")
    lines = ["## 4. Cost per objective", "",
             f"A step is {tc['prompts_per_step']} prompts x {tc['group_size']} completions = {per_step} rollouts. "
             "Seconds per step: `step_s` of every step in the runs' metrics.jsonl (the step's rollouts, loss and "
             "optimizer step; evaluations left out), averaged over the steps of a run, then over seeds. "
             + (f"Forwards and memory: a separate profiling run per objective, {profiled[0]['steps']} recipe steps in a "
                "fresh process (same preset and settings, the first seed, "
                f"{PROFILE_EVAL_SIZE} held-out problems evaluated at its start and end, outside the counts): every call "
                "of the policy's backbone (the network under the LM head) counted by a forward pre-hook, as the "
                "sampler's (rollouts) or the loss's (the objective's prepare and updates, reference forwards included), "
                "with the sequences they ran; " + how
                if profiled else "No profiling run (`profile_steps=0`)."),
             "", head, "|---|" + "---|" * (head.count("|") - 2)]
    for r in rows:
        p = r["profile"] or {}
        f, q = p.get("forwards_per_step") or {}, p.get("sequences_per_step") or {}
        steps = r["time"]["steps"]
        cells = [r["objective"], _g(r["time"]["step_s"], 3), _f(steps, 0) if steps is not None else "n/a",
                 f"{steps * per_step:,.0f}" if steps is not None else "n/a"]
        if n:
            cells.append(_g(r["rollouts"]["step_s"], 3))
        cells += [_g(f.get("loss"), 4), _g(q.get("loss"), 4), _g(f.get("rollout"), 4),
                  _f(p.get("peak_mb"), 0), _f(p.get("rise_mb"), 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _quality_lines(q: dict | None) -> list[str]:
    if not q:
        return []
    top = max(q["knob_values"]) if q.get("knob_values") else 1
    lines = ["## 5. Gradient quality on fixed rollouts", "",
             (f"The batch of section 3 ({q['rows']} rollouts of `{q['model']}` on `{q['task']}`, one token a denoising step) "
              "at the base's weights. Each objective's gradient g is the parameters' .grad after its own `prepare` and "
              "one `update` (one process; the old policy is the current one, the reference the base), with its own "
              f"advantages, repeated with fresh draws: {q['repeats']} x ({top} / knob value) times a cell, so that every cell "
              "costs about as many forwards (no knob: as knob 1; objectives that draw nothing: twice). "
              "With m the mean of the repeats and V their variance (the trace of their covariance), S = ||m||^2 - V / repeats "
              "estimates ||E g||^2 without the noise of m. Relative variance: V / S, one estimate's variance about the "
              "estimator's own expectation (unresolved when S <= 0: more repeats needed). Cosine: of m with the exact "
              "policy gradient of the trajectory likelihood (AGRPO's loss over every step of every row, the preset's "
              f"advantages, normalization={q['normalization']}, eos_steps={q['eos_steps']}). Noise-only: sqrt(S / ||m||^2), "
              "the cosine an unbiased estimator would show from the noise of as many repeats alone; a cosine well below "
              "it is bias. cos(E g): <m, exact> / (sqrt(S) ||exact||), the cosine of the estimator's expectation with "
              "the exact gradient, noise removed (an estimate: it can leave [-1, 1] when the noise is large). Per draw: "
              "the mean cosine of one estimate, what one step's gradient points along. * marks the value the runs use. "
              "At the base's weights every ratio is 1, so objectives that differ only in how they weigh or clip ratios "
              "give the same gradient here (StableDRL's group weights are 1/G: SPG's gradient)."),
             ""]
    alone = q.get("advantage_cosine")
    if alone:
        lines += [("Advantages alone: the objectives also differ from the reference in their advantages (z-scores, "
                   "groups dropped); the last column is the cosine of the exact gradient taken with the objective's own "
                   "advantages and rows with the reference, so a cos(E g) near it is the advantages' doing, and the rest "
                   "is the likelihood's estimate."), ""]
    lines += ["| objective | knob | what it counts |" + (" exact gradient with its advantages: cosine |" if alone else ""),
              "|---|---|---|" + ("---|" if alone else "")]
    for e in q["objectives"]:
        extra = ""
        if alone:
            c = alone.get(e["objective"])
            extra = f" {_f(c) if c is not None else 'no row kept'} |"
        lines.append(f"| {e['objective']} | {('`' + e['knob'] + '`') if e['knob'] else '-'} | {e['knob_help']} |{extra}")
    lines += ["", ("| objective | knob value | estimates | relative variance | cosine of the mean | noise-only cosine | "
                   "cos(E g) | per-draw cosine | s / estimate |"),
              "|---|---|---|---|---|---|---|---|---|"]
    for e in q["objectives"]:
        for c in e["cells"]:
            value = "-" if c["value"] is None else f"{c['value']}{'*' if c['value'] == e['configured'] else ''}"
            if "refused" in c:
                lines.append(f"| {e['objective']} | {value} | | refused: {c['refused']} | | | | | |")
                continue
            if c.get("mean_norm") == 0:
                lines.append(f"| {e['objective']} | {value} | {c['repeats']} | no gradient on this batch | | | | | "
                             f"{_g(c['seconds'], 2)} |")
                continue
            variance = _g(c["relative_variance"]) if c.get("resolved", True) else "unresolved"
            lines.append(f"| {e['objective']} | {value} | {c['repeats']} | {variance} | {_f(c['cosine'])} | "
                         f"{_f(c['noise_cosine'])} | {_f(c.get('expected_cosine'))} | {_f(c['draw_cosine'])} | "
                         f"{_g(c['seconds'], 2)} |")
    return lines + ["", "![quality](quality.png)", ""]


def write_report(study: dict, out: Path) -> dict:
    s = summarize_study(study)
    runs_r = study.get("runs_rollouts") or []
    _plot_ordering(study["runs"], s, out / "ordering.png")
    _plot_steps(s, out / "steps.png")
    if s["rollouts"]:
        _plot_ordering(runs_r, s["rollouts"], out / "ordering_rollouts.png")
        _plot_steps(s["rollouts"], out / "steps_rollouts.png")
    _plot_variance(study["variance"], out / "variance.png")
    if study.get("variance_eos"):
        _plot_variance(study["variance_eos"], out / "variance_eos.png")
    if study.get("quality"):
        _plot_quality(study["quality"], out / "quality.png")
    tc = study["train_config"]
    budget = f"{tc['time_budget_s']:g} s of training a run" if tc["time_budget_s"] else f"{tc['max_steps']} steps a run"
    names = study.get("objectives") or [o["objective"] for o in s["ordering"]]
    lines = [
        "# AGRPO at small scale",
        "",
        f"Task `{study['task']}`, base `{study['base_model']}`, preset `{Path(study['preset']).name}`"
        + (f" with {' '.join(study['overrides'])}" if study["overrides"] else "") + f"; objectives {', '.join(names)}; {budget}, "
        f"{study['eval']['problems']} held-out problems, greedy decoding. Study time {_study_time(study)}. "
        "Regenerate with `agrpo study report_only=true out=...`.",
        "",
        "## 1. Ordering at the same training time (one token a step)",
        "",
    ]
    lines += _ordering_lines(s, study["runs"], "ordering.png")
    if s["rollouts"]:
        n = study["rollout_steps"]
        lines += [(f"### At the same number of rollouts: {n} steps ({n * tc['prompts_per_step'] * tc['group_size']:,} "
                   "rollouts) a run"), "",
                  f"A second set of runs with `{' '.join(equal_rollouts(n))}` (under `{rollouts_dir(n)}/`), else the same.", ""]
        lines += _ordering_lines(s["rollouts"], runs_r, "ordering_rollouts.png")
    lines += _settings_lines(s["settings"], study.get("rollout_steps") or 0)
    lines += ["## 2. Fewer denoising steps at inference", "",
              "Mean accuracy over seeds [95% t interval]; gain on the base in points.", ""]
    lines += _steps_lines(s) + ["", "![steps](steps.png)", ""]
    if s["rollouts"]:
        lines += [f"The equal-rollouts runs ({study['rollout_steps']} steps):", ""] + _steps_lines(s["rollouts"])
        lines += ["", "![steps](steps_rollouts.png)", ""]
    lines += ["## 3. Variance of the AGRPO gradient estimate", ""]
    lines += _variance_lines(study["variance"], "variance.png")
    if study.get("variance_eos"):
        lines += ["### On rollouts that stop early", "",
                  "The study's rollouts never end on EOS early, so here the same measurement on a batch whose rows stop "
                  "at different steps, where `eos_steps=include` (the EOS decisions are learned from) and `exclude` "
                  "(the official truncation) are different estimators of different objectives.", ""]
        lines += _variance_lines(study["variance_eos"], "variance_eos.png")
    lines += _cost_lines(study, s)
    lines += _quality_lines(study.get("quality"))
    write_atomic(out / REPORT, "\n".join(lines))
    result = {"report": str(out / REPORT), "wall_s": study["wall_s"], **{
        o["objective"]: {"mean": o["mean"], "low": o["low"], "high": o["high"], "gain": o["gain"]} for o in s["ordering"]},
        "base": s["base"]["accuracy"]}
    if s["rollouts"]:
        result["rollouts"] = {o["objective"]: {"mean": o["mean"], "low": o["low"], "high": o["high"], "gain": o["gain"]}
                              for o in s["rollouts"]["ordering"]}
    return result


def _study_time(study: dict) -> str:
    n = study.get("invocations", 1)
    if n <= 1:
        return f"{study['wall_s'] / 60:.1f} min"
    return (f"{study['total_wall_s'] / 60:.1f} min over {n} invocations on this directory (the last, which reused "
            f"the earlier ones' work, {study['wall_s'] / 60:.1f} min)")


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


def _plot_ordering(runs: list[dict], s: dict, path: Path) -> None:
    fig = new_figure((max(6, 1.1 * (len(s["ordering"]) + 1)), 4))
    ax = fig.subplots()
    names = ["base"] + [o["objective"] for o in s["ordering"]]
    ax.axhline(s["base"]["accuracy"], color="gray", linestyle="--", linewidth=1)
    for i, o in enumerate(s["ordering"], start=1):
        ax.scatter([i] * len(o["accuracy"]), o["accuracy"], color="tab:blue", alpha=0.5, zorder=3)
        if not math.isnan(o["low"]):
            ax.errorbar([i], [o["mean"]], yerr=[[o["mean"] - o["low"]], [o["high"] - o["mean"]]], fmt="o",
                        color="black", capsize=6, zorder=4)
    ax.scatter([0], [s["base"]["accuracy"]], color="gray", zorder=3)
    if runs and "model_free_accuracy" in runs[0]["summary"]:
        ax.axhline(runs[0]["summary"]["model_free_accuracy"], color="tab:red", linestyle=":", linewidth=1,
                   label="model-free guesser")
        ax.legend(loc="best")
    ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 4 else 0)
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.set_title("seeds (dots), mean and 95% t interval")
    save_png(fig, path)


def _plot_steps(s: dict, path: Path) -> None:
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
    ax.legend(loc="best", fontsize=8)
    save_png(fig, path)


def _plot_quality(q: dict, path: Path) -> None:
    fig = new_figure((11, 4))
    left, right = fig.subplots(1, 2)
    for e in q["objectives"]:
        cells = [c for c in e["cells"] if "refused" not in c and c["value"] is not None]
        if not cells:
            continue
        var = [(c["value"], c["relative_variance"]) for c in cells if c["relative_variance"] and c["relative_variance"] > EXACT]
        if var:
            left.plot([v for v, _ in var], [x for _, x in var], marker="o", label=e["objective"])
        cos = [(c["value"], c["cosine"]) for c in cells if c["cosine"] is not None]
        if cos:
            right.plot([v for v, _ in cos], [x for _, x in cos], marker="o", label=e["objective"])
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("knob (draws per completion)")
    left.set_yscale("log")
    left.set_ylabel("E||g - mean||² / ||mean||²")
    right.set_ylabel("cosine of the mean with the exact gradient")
    right.set_ylim(-1.05, 1.05)
    if left.get_legend_handles_labels()[0]:
        left.legend(loc="best", fontsize=8)
    if right.get_legend_handles_labels()[0]:
        right.legend(loc="best", fontsize=8)
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
