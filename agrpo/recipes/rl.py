"""RL post-training of a masked diffusion LM with any registered objective (agrpo/objectives/).

    agrpo train                                   # the tiny Sudoku default, CPU, minutes
    agrpo train -c configs/llada8b/countdown.yaml  # paper scale, accelerate launch ...

One step reads top to bottom: prompts -> rollouts -> rewards -> advantages -> the objective's
loss -> optimizer step -> log. The objective is called through its interface only
(`agrpo/objectives/base.py`): how rewards become advantages, the work done once per batch of
rollouts, the loss of each update and its metrics; its settings are declared in its own file.
Where this departs from textbook GRPO:
* the default objective's loss is a Monte Carlo estimate over denoising steps, rebuilt exactly
  from the rollout record (its file states it), not a one-step mean-field likelihood;
* advantages are r - mean(r) (no std) by default, as the official code; `None` rewards
  drop the completion instead of counting as zero;
* the tiny default trains with a smaller model, fewer steps and a larger learning rate
  than the paper (LLaDA-8B: lr 5e-6, G=8, K=24, 128 steps of 3 tokens); see configs/;
* a step whose loss or gradient is not finite is skipped and counted (`skipped_steps`);
* on N processes the run draws and learns what it does on one (README "Multi-GPU"): one
  optimizer step per batch, the loss normalised over all processes;
* the run stops after its planned steps (`max_steps`, or `epochs` over the training rows) or at
  `time_budget_s` of training wall time, whichever first; the cosine schedule spans the planned
  steps. Only the tiny preset has a time budget (`agrpo train` without -c runs it).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from agrpo.checkpoint import checkpoint_state, latest_checkpoint, save_checkpoint
from agrpo.config import config_to_dict, given_keys, load_config, read_yaml
from agrpo.data import decode_completions, encode_prompts, resolve_chat_template
from agrpo.errors import AgrpoError, say
from agrpo.evaluation import evaluate
from agrpo.models import frozen_copy, load_model_and_tokenizer, shift_logits_of
from agrpo.distributed import (
    GradSyncCounter, check_whole_copy, collective_free, gather_for_save, launch_line, launch_record, load_weights_for_resume,
    make_accelerator, model_loading, record_launch, reduce_sum, resume_training_state, save_engine_state,
    settle_deepspeed,
)
from agrpo.objectives import DEFAULT_OBJECTIVE, OBJECTIVES, Context, Part, get_objective, settings_of
from agrpo.objectives.base import with_objective_settings
from agrpo.policy import Policy, unwrap
from agrpo.runlog import (
    CONFIG, RunLog, append_jsonl, make_run_dir, plot_curves, resolve_run_name, resumable_runs, run_status,
    save_resolved_config, write_summary,
)
from agrpo.sampling import SamplingConfig, check_block_sampling, generate, paper_eval_sampling
from agrpo.step_metrics import (
    RewardRecorder, check_trackers, flat_config, open_samples, samples_of, step_means, step_sums,
)
from agrpo.tasks import check_model_fits, get_task


SAMPLES_PER_LOG = 4  # completions written to samples.jsonl on a sampling step: one group's worth at G = 4


def _train_sampling() -> SamplingConfig:
    return SamplingConfig(gen_length=16, block_length=16, steps=16, temperature=1.0, remasking="low_confidence")



@dataclass
class LoraConfig:
    r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains the full model"})
    alpha: int = field(default=16, metadata={"help": "LoRA scaling alpha"})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "module names that get adapters"},
    )


@dataclass
class RLConfig:
    # run
    name: str = field(
        default="",
        metadata={"help": "run name: outputs go to <output_dir>/<name>/; empty: <task>-<objective>[-seed<N>], numbered -2, -3, ... past earlier runs (with resume: the newest)"},
    )
    output_dir: str = field(default="runs", metadata={"help": "folder holding all runs"})
    seed: int = field(default=0, metadata={"help": "seed of data order, rollouts and step draws"})
    resume: bool | Literal["auto"] = field(default=False, metadata={"help": "true: continue <output_dir>/<name> from its latest checkpoint with its saved settings (no name: the newest unfinished run agreeing with the keys passed), refused when there is none; auto: the same, or a new run when there is none"})
    # model and task
    model: str = field(default="tiny:sudoku", metadata={"help": "base model: tiny:<task>, a local directory or a hub name"})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "parameter dtype; auto: bfloat16 for LLaDA / Dream on a GPU, else float32"}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the hub (LLaDA, Dream)"})
    shift_logits: bool | None = field(
        default=None, metadata={"help": "the model predicts position i from i-1 (unset: the model family's value; Dream: true)"}
    )
    mask_token_id: int | None = field(
        default=None, metadata={"help": "the [MASK] id, for a model whose config and tokenizer name none (unset: theirs)"}
    )
    block_size: int | None = field(
        default=None,
        metadata={"help": "a block-diffusion model's block size, for a checkpoint whose config does not record it "
                  "(unset: the config's, else the family's: SDAR 4, LLaDA2 32)"},
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa, eager or flash_attention_2 (needs flash-attn)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in the backward pass (less memory, slower)"})
    chat_template: bool | None = field(default=None, metadata={"help": "wrap prompts in the tokenizer's chat template (false: plain text, as for a base model); unset: when the tokenizer has one"})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA adapters (r=0: off)"})
    load_in_4bit: bool = field(default=False, metadata={"help": "quantize the frozen base to 4 bits (needs bitsandbytes + GPU)"})
    task: str = field(default="tiny-sudoku", metadata={"help": "task name (tiny-sudoku, tiny-countdown; gsm8k, math, countdown, sudoku)"})
    train_data: str = field(default="", metadata={"help": "a training file in the task's public format; empty: generated (tiny tasks) or the public dataset"})
    eval_data: str = field(default="", metadata={"help": "a test file in the task's public format (its problems also leave the training set); empty: generated or the public test split"})
    train_pool: int = field(default=5000, metadata={"help": "training problems: generated once at start (tiny tasks) or drawn from the training rows"})
    exclude_file: str = field(default="", metadata={"help": "a file in the task's published format (e.g. the paper's test split) whose problems never enter the generated sets"})
    eval_size: int = field(default=256, metadata={"help": "held-out problems for evaluation"})
    # rollouts
    prompts_per_step: int = field(default=16, metadata={"help": "prompts per optimizer step (all processes together)"})
    group_size: int = field(default=8, metadata={"help": "completions per prompt (G)"})
    rollout_batch_size: int = field(
        default=0,
        metadata={"help": "completions generated at a time per process, a multiple of group_size (0: all at once); "
                  "runs with the same value dividing each process's share are identical on 1 or N processes"},
    )
    sampling: SamplingConfig = field(default_factory=_train_sampling, metadata={"help": "training sampler"})
    eval_sampling: SamplingConfig = field(default_factory=paper_eval_sampling, metadata={"help": "evaluation sampler"})
    # objective
    objective: str = field(default=DEFAULT_OBJECTIVE, metadata={"help": f"policy-gradient objective: {', '.join(OBJECTIVES)}"})
    eos_steps: Literal["include", "exclude"] = field(
        default="include",
        metadata={"help": "include: EOS tokens sampled after the answer are learned from (the decision to stop); exclude: the official truncation"},
    )
    normalization: Literal["sequence", "token"] = field(
        default="sequence", metadata={"help": "sequence: each completion's terms summed, over the number of completions (the official codes); token: mean over loss tokens"}
    )
    scale_std: bool = field(default=False, metadata={"help": "divide advantages by the group std"})
    eps_low: float = field(default=0.2, metadata={"help": "PPO clip below: ratio >= 1 - eps_low"})
    eps_high: float = field(default=0.2, metadata={"help": "PPO clip above: ratio <= 1 + eps_high"})
    beta: float = field(default=0.0, metadata={"help": "k3 KL weight against the reference (0: no reference kept)"})
    inner_steps: int = field(default=1, metadata={"help": "optimizer steps per batch of rollouts (mu)"})
    max_rows_per_forward: int = field(default=512, metadata={"help": "sequences per forward in the loss (memory budget)"})
    # optimizer
    lr: float = field(default=3e-5, metadata={"help": "peak learning rate (AdamW)"})
    lr_schedule: Literal["constant", "cosine"] = field(
        default="constant", metadata={"help": "after warmup; cosine decays to 0 over the planned steps (max_steps or epochs)"}
    )
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps (or warmup_ratio, not both)"})
    warmup_ratio: float = field(default=0.0, metadata={"help": "linear warmup over this fraction of the planned steps (the paper: 0.01)"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.99, metadata={"help": "AdamW beta2"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0: off)"})
    # schedule
    max_steps: int = field(
        default=0, metadata={"help": "steps of the run (0: set by epochs, or none under a time budget); with epochs, the smaller"}
    )
    epochs: float = field(
        default=0.0, metadata={"help": "passes over the training rows: max_steps = ceil(epochs x rows / prompts_per_step) (0: unused)"}
    )
    time_budget_s: float = field(default=0.0, metadata={"help": "stop after this much training wall time (0: no limit)"})
    eval_every: int = field(default=50, metadata={"help": "held-out evaluation every N steps (0: start and end only)"})
    save_every: int = field(default=100, metadata={"help": "checkpoint every N steps (0: at the end only)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept on disk (0: every one)"})
    log_samples_every: int = field(
        default=0, metadata={"help": "write a few prompts, completions and rewards to samples.jsonl every N steps (0: never)"}
    )
    report_to: list[Literal["tensorboard", "wandb"]] = field(
        default_factory=list, metadata={"help": "trackers that also receive the metrics, e.g. [tensorboard] (needs the package)"}
    )
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def validate(self) -> None:
        self.sampling.validate()
        self.eval_sampling.validate()
        if self.sampling.temperature <= 0:
            raise AgrpoError("sampling.temperature must be > 0 for RL (greedy rollouts have no policy gradient)")
        if self.lora.r < 0:
            raise AgrpoError(f"lora.r must be >= 0 (0 trains the full model), got {self.lora.r}")
        get_objective(self.objective).check(self)
        for name in ("prompts_per_step", "group_size", "inner_steps", "eval_size", "train_pool"):
            if getattr(self, name) < 1:
                raise AgrpoError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise AgrpoError("group_size must be >= 2: group-relative advantages need at least two completions")
        if self.rollout_batch_size < 0 or self.rollout_batch_size % self.group_size:
            raise AgrpoError(
                f"rollout_batch_size={self.rollout_batch_size} must be 0 or a multiple of group_size={self.group_size}"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise AgrpoError(f"lr must be a positive number, got {self.lr}")
        if not (0 <= self.eps_low < 1) or self.eps_high < 0:
            raise AgrpoError(f"clip range needs 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}")
        if self.beta < 0:
            raise AgrpoError(f"beta must be >= 0, got {self.beta}")
        for name in ("max_steps", "epochs", "time_budget_s", "warmup_steps", "warmup_ratio", "keep_checkpoints",
                     "log_samples_every", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise AgrpoError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.max_steps or self.epochs or self.time_budget_s):
            raise AgrpoError("the run has no end: set max_steps, epochs or time_budget_s")
        planned = self.max_steps or self.epochs
        if self.lr_schedule == "cosine" and not planned:
            raise AgrpoError(
                "lr_schedule=cosine needs the planned length: set max_steps or epochs (a time budget does not say how many steps)"
            )
        if self.warmup_ratio and not planned:
            raise AgrpoError("warmup_ratio needs the planned length: set max_steps or epochs, or use warmup_steps")
        if self.warmup_ratio and self.warmup_steps:
            raise AgrpoError("warmup_steps and warmup_ratio are both set: keep one")
        if self.warmup_ratio >= 1:
            raise AgrpoError(f"warmup_ratio must be below 1 (a fraction of the planned steps), got {self.warmup_ratio}")


RLConfig = with_objective_settings(RLConfig)  # the settings each objective declares in its own file


def default_preset() -> str:
    """What `agrpo train` runs with no -c and no task: the tiny Sudoku preset (agrpo.presets)."""
    from agrpo.presets import tiny_preset
    from agrpo.tasks import DEFAULT_TASK

    return tiny_preset(DEFAULT_TASK)


# what a resumed run may change: how long it goes on and what it reports, never what it computes
RESUME_FREE = frozenset({
    "name", "output_dir", "resume", "max_steps", "epochs", "time_budget_s", "eval_every", "save_every",
    "keep_checkpoints", "log_samples_every", "report_to", "progress",
})


# settings that, left unset, a run resolves once the model is loaded and records resolved
RESOLVED_AT_LOAD = frozenset({"chat_template"})


def resume_conflicts(saved: dict, cfg: RLConfig) -> list[str]:
    """The settings (dotted keys) in which `cfg` differs from a run's saved configuration, as
    "key=saved (now current)"; keys outside RESUME_FREE only, keys both know only."""
    import yaml

    now = flat_config(yaml.safe_load(yaml.safe_dump(config_to_dict(cfg))))  # saved as YAML: compare as YAML
    then = flat_config(saved)
    # left unset, they are the model's to choose: the saved value is what it chose
    unset = {k for k in RESOLVED_AT_LOAD if getattr(cfg, k) is None}
    return [f"{k}={then[k]} (now {now[k]})" for k in now
            if k in then and k not in RESUME_FREE | unset and now[k] != then[k]]


def check_resumable(run_dir: Path, cfg: RLConfig) -> None:
    """Refuse, in one line, to continue a run with settings other than its own."""
    if not (run_dir / CONFIG).is_file():
        return
    conflicts = resume_conflicts(read_yaml(run_dir / CONFIG), cfg)
    if conflicts:
        raise AgrpoError(
            f"{run_dir} was run with {', '.join(conflicts)}: resume it with its own settings (only "
            f"{', '.join(sorted(RESUME_FREE - {'name', 'output_dir', 'resume'}))} may change) or start a new run"
        )




def resume_config(preset: str | None, overrides: list[str]) -> RLConfig:
    """What `agrpo train resume=true [name=...] [key=value ...]` continues: the run's own saved
    configuration with what was passed on top. Without a name, the newest run under output_dir
    that did not finish (else the newest finished one) among those whose saved settings agree
    with every non-budget key passed; none: a new run, said so."""
    given = load_config(RLConfig, preset, overrides, validate=False)  # the run's settings complete it
    keys = given_keys(preset, overrides) - RESUME_FREE
    if given.name:
        chosen = Path(given.output_dir) / given.name
        chosen = chosen if (chosen / CONFIG).is_file() else None
    else:
        chosen = next(
            (d for d in resumable_runs(given.output_dir)
             if not resume_conflicts({k: v for k, v in flat_config(read_yaml(d / CONFIG)).items() if k in keys},
                                     given)),
            None,
        )
    if chosen is None:
        what = f"{Path(given.output_dir) / given.name}" if given.name else f"{given.output_dir}/ with these settings"
        if given.resume != "auto":  # a mistyped name must not start a paper run over from its base
            runs = [d.name for d in resumable_runs(given.output_dir)]
            there = f"runs there: {', '.join(runs[:8])}{' ...' if len(runs) > 8 else ''}" if runs else "none there"
            raise AgrpoError(f"no run in {what} to resume ({there}): check name=, or pass resume=auto to start "
                             "a new run when there is none to continue")
        from agrpo.presets import train_config

        cfg, line = train_config(preset, [*overrides, "resume=false"])
        say(f"agrpo: no run in {what} to resume: starting a new one (resume=auto)")
        say(line)
        return cfg
    cfg = load_config(RLConfig, preset, [*overrides, f"name={chosen.name}"], base=read_yaml(chosen / CONFIG))
    check_resumable(chosen, cfg)
    say(f"agrpo: resuming {chosen} ({run_status(chosen)})")
    return cfg


def planned_steps(cfg: RLConfig, train_rows: int) -> int:
    """Optimizer steps of the run: max_steps, or the epochs over the training rows, the smaller of the
    two when both are set; 0 when only the time budget ends the run."""
    by_epochs = math.ceil(cfg.epochs * train_rows / cfg.prompts_per_step) if cfg.epochs else 0
    if by_epochs and cfg.max_steps:
        return min(by_epochs, cfg.max_steps)
    return by_epochs or cfg.max_steps


def _run_over(cfg: RLConfig, max_steps: int, step: int, wall_s: float) -> bool:
    return bool((max_steps and step >= max_steps) or (cfg.time_budget_s and wall_s >= cfg.time_budget_s))


def _lr_lambda(cfg: RLConfig, total_steps: int):
    """LR factor per optimizer update; `total_steps` counts updates (planned steps x inner_steps)."""
    # warmup by ratio rounds up as transformers' Trainer does: 1% of 150 steps is 2 warmup steps
    warmup = math.ceil(cfg.warmup_ratio * total_steps) if cfg.warmup_ratio else cfg.warmup_steps

    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if cfg.lr_schedule == "cosine":
            # update s (from 0) runs at fn(s): the last one, s = total - 1, is one step short of the floor,
            # and the lr logged after it, fn(total), is the floor 0 (transformers' cosine schedule)
            span = max(total_steps - warmup, 1)
            return 0.5 * (1 + math.cos(math.pi * min(step - warmup, span) / span))
        return 1.0

    return fn


def _draw_generator(seed: int, step: int, first_prompt: int, device) -> torch.Generator:
    # keyed by the step and the micro-batch's first prompt in the global batch, not by the process:
    # a resumed run, or one on another number of processes, draws exactly what the straight run drew
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + step) * 1_000_033 + first_prompt)
    return gen


def _batch_indices(pool_size: int, n: int, step: int, seed: int) -> list[int]:
    """Prompts of a step: consecutive slices of a seeded permutation per epoch (resume-exact)."""
    out = []
    first = step * n
    for i in range(first, first + n):
        epoch, pos = divmod(i, pool_size)
        g = torch.Generator().manual_seed(seed * 7919 + epoch)
        perm = torch.randperm(pool_size, generator=g)
        out.append(int(perm[pos]))
    return out


def train(cfg: RLConfig, accelerator: Accelerator | None = None, origin: str | None = None) -> dict:
    """Run RL as `cfg` says -> the summary. `origin` (which preset and task defaults `cfg` came
    from) goes on the run's first line after the backend, said once the task, data and model
    have loaded."""
    cfg.validate()
    derived = f"{cfg.task}-{cfg.objective.replace('_', '-')}" + (f"-seed{cfg.seed}" if cfg.seed else "")
    cfg = replace(cfg, name=resolve_run_name(cfg.output_dir, cfg.name, derived, cfg.resume))
    accelerator = accelerator or make_accelerator(
        log_with=check_trackers(cfg.report_to), project_dir=str(Path(cfg.output_dir) / cfg.name),
    )
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    if cfg.prompts_per_step % world:
        raise AgrpoError(f"prompts_per_step={cfg.prompts_per_step} must be divisible by the {world} processes")
    torch.manual_seed(cfg.seed)

    # the run directory is created only once the task, the data and the model have loaded: a
    # mistake there leaves no empty folder behind and is not hidden by a name clash
    run_dir = Path(cfg.output_dir) / cfg.name
    if cfg.resume:
        check_resumable(run_dir, cfg)
    task = get_task(cfg.task, held_out=cfg.exclude_file or cfg.eval_data or None)
    check_model_fits(task, cfg.model)
    recorder = RewardRecorder(task)
    # the data first: the planned length (epochs x rows) shapes the schedule, and a bad file fails fast
    train_pool = task.train_examples(cfg.train_pool, seed=cfg.seed, path=cfg.train_data or None)
    max_steps = planned_steps(cfg, len(train_pool))
    lora = asdict(cfg.lora) if cfg.lora.r > 0 else None
    with model_loading(accelerator):  # whole, or partitioned when a ZeRO-3 config says so
        model, tokenizer = load_model_and_tokenizer(
            cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code, lora=lora, load_in_4bit=cfg.load_in_4bit,
            attn_implementation=cfg.attn_implementation, gradient_checkpointing=cfg.gradient_checkpointing,
            mask_token_id=cfg.mask_token_id, block_size=cfg.block_size,
        )
    cfg = replace(cfg, chat_template=resolve_chat_template(cfg.chat_template, tokenizer))  # recorded as used
    shift_logits = shift_logits_of(model, cfg.shift_logits)
    policy = Policy(model, shift_logits=shift_logits).to(device)
    check_block_sampling(policy, ("sampling", cfg.sampling), ("eval_sampling", cfg.eval_sampling))
    objective = get_objective(cfg.objective)
    ref_logits_fn = None
    if objective.needs_reference(cfg):
        if lora is not None:

            def ref_logits_fn(x, pos, attn):  # the frozen base = the model with its adapter off
                with unwrap(policy).disable_adapter():
                    return unwrap(policy)(x, pos, attn)

        else:
            check_whole_copy(accelerator, "beta > 0 without LoRA (the reference is a frozen copy)")
            ref_logits_fn = Policy(frozen_copy(model), shift_logits=shift_logits).to(device)
    resume_from = latest_checkpoint(run_dir) if cfg.resume else None
    if resume_from is not None:  # the weights go in whole before accelerate shards them (DeepSpeed: after)
        load_weights_for_resume(accelerator, resume_from, model, checkpoint_state(resume_from).get("launch"))

    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg, max_steps * cfg.inner_steps))
    if accelerator.gradient_accumulation_steps != 1:
        raise AgrpoError(
            "set gradient_accumulation_steps to 1 in the accelerate config: every batch is one optimizer step "
            "(use rollout_batch_size and max_rows_per_forward to bound memory)"
        )
    settle_deepspeed(accelerator, policy, cfg.grad_clip)
    launch = launch_record(accelerator, policy)  # what runs: said first, kept in config.yaml, summary.json, checkpoints
    policy, optimizer = accelerator.prepare(policy, optimizer)
    core = unwrap(policy)
    params = [p for p in policy.parameters() if p.requires_grad]  # FSDP replaces them with shards
    syncs = GradSyncCounter(policy)

    start_step, counters = 0, {"skipped_steps": 0, "wall_s": 0.0}
    if resume_from is not None:
        state = resume_training_state(accelerator, resume_from, policy, optimizer, scheduler)
        start_step = int(state["step"])
        counters.update(state.get("counters", {}))
        # a resumed run that would do no step must say so, not rewrite its summary with old numbers
        if max_steps and start_step >= max_steps:
            raise AgrpoError(
                f"{run_dir} already ran its {start_step} planned steps: pass a larger max_steps (or epochs) to continue"
            )
        if cfg.time_budget_s and counters["wall_s"] >= cfg.time_budget_s:
            raise AgrpoError(
                f"{run_dir} already spent its time budget ({counters['wall_s']:.0f} s of time_budget_s="
                f"{cfg.time_budget_s:g}): pass a larger time_budget_s (or 0 for none) to continue"
            )
    if accelerator.is_main_process:
        make_run_dir(cfg.output_dir, cfg.name, cfg.resume)
    # the first line: what runs, then where its settings came from (`origin` minus its "agrpo: ")
    say(launch_line(launch) + (f"; {origin.removeprefix('agrpo: ')}" if origin else ""))
    accelerator.wait_for_everyone()
    log = RunLog(run_dir, resume=cfg.resume) if accelerator.is_main_process else None
    if log is not None:
        log.truncate_after(start_step if start_step > 0 else -1)
        save_resolved_config(run_dir, config_to_dict(cfg))
        record_launch(run_dir, launch)
        samples_path = open_samples(run_dir, start_step if start_step > 0 else -1)
    accelerator.init_trackers(cfg.name, config=flat_config(config_to_dict(cfg)))

    eval_set = task.eval_examples(cfg.eval_size, path=cfg.eval_data or None)
    my_eval = eval_set[rank::world]

    def run_eval() -> tuple[float, float]:
        """(accuracy, fraction of problems solved whole) on the held-out set, over every process."""
        with collective_free(accelerator, policy) as sampler:
            res = evaluate(sampler, tokenizer, task, my_eval, cfg.eval_sampling, chat_template=cfg.chat_template)
        total = [sum(res["scores"]), sum(x == 1.0 for x in res["scores"]), len(res["scores"])]
        total = accelerator.reduce(torch.tensor(total, dtype=torch.float64, device=device), reduction="sum")
        return float(total[0] / total[2]), float(total[1] / total[2])

    def save(step: int) -> None:
        """A checkpoint of every process's state (weights gathered whole; DeepSpeed's own partitions)."""
        accelerator.wait_for_everyone()
        weights, optimizer_state = gather_for_save(accelerator, policy, optimizer)
        engine_dir = save_engine_state(accelerator, policy, run_dir, step)
        if accelerator.is_main_process:
            save_checkpoint(
                run_dir, step, core.model, None if engine_dir else optimizer, scheduler,
                extra={"counters": counters, "launch": launch}, keep_last=cfg.keep_checkpoints or None,
                tokenizer=tokenizer, model_state=weights, optimizer_state=optimizer_state, engine_dir=engine_dir,
            )
        accelerator.wait_for_everyone()

    shout = cfg.progress and accelerator.is_main_process  # what a person watching the run reads as it happens
    baselines = task.baselines(eval_set)  # accuracies that need no model, e.g. a guesser's
    if start_step == 0:
        if shout:
            print(f"agrpo: evaluating the base on {len(eval_set)} held-out problems ...", file=sys.stderr, flush=True)
        base_accuracy, counters["base_solved"] = run_eval()
        if shout:
            print(f"agrpo: base accuracy {base_accuracy:.3f}, {_solved(counters['base_solved'])}"
                  + "".join(f"; {BASELINE_LABELS.get(k, k)} {v:.3f}" for k, v in baselines.items()), file=sys.stderr, flush=True)
        if log is not None:
            log.log(0, {"step": 0, "eval_accuracy": base_accuracy, "eval_solved": counters["base_solved"], **baselines,
                        "wall_s": 0.0})
    else:
        base_accuracy = counters.get("base_accuracy")
        if shout and base_accuracy is not None:
            print(f"agrpo: resuming at step {start_step}; base accuracy {base_accuracy:.3f}, last evaluated "
                  f"{counters.get('last_accuracy', base_accuracy):.3f}", file=sys.stderr, flush=True)
    counters["base_accuracy"] = base_accuracy
    # the accuracy of the newest weights evaluated, carried through checkpoints
    last_accuracy = counters.get("last_accuracy", base_accuracy)

    bar = _progress_bar(cfg, max_steps, start_step, counters["wall_s"]) if shout else None
    step = start_step
    t_origin = time.perf_counter() - counters["wall_s"]
    try:
        while not _run_over(cfg, max_steps, step, counters["wall_s"]):
            t0, syncs_before = time.perf_counter(), syncs.count

            # 1-3. this process's prompts -> rollouts -> rewards -> group advantages, in micro-batches
            parts, t_rollout = _rollouts(cfg, task, tokenizer, train_pool, accelerator, policy, objective, step)

            # 4. the objective's loss -> one optimizer step per inner step, whatever the number of
            #    micro-batches, chunks and processes (agrpo/objectives/base.py, agrpo/distributed.py)
            context = Context(accelerator, policy, ref_logits_fn, cfg, settings_of(cfg, cfg.objective), step)
            objective.prepare(context, parts)  # old likelihoods, reference values, fixed weights
            for inner in range(cfg.inner_steps):
                optimizer.zero_grad(set_to_none=True)
                metrics = objective.update(context, parts, inner)
                grad_norm = _grad_norm(params, cfg.grad_clip, accelerator)
                if math.isfinite(metrics["loss"]) and math.isfinite(grad_norm):
                    optimizer.step()
                    scheduler.step()  # once per optimizer step: warmup and decay count updates
                else:  # a non-finite loss or gradient (the same on every process): leave the weights as they were
                    optimizer.zero_grad(set_to_none=True)
                    counters["skipped_steps"] += 1
            step += 1
            # the time budget must stop every process at the same step: they share one clock
            counters["wall_s"] += (dt := reduce_sum(accelerator, {"dt": time.perf_counter() - t0})["dt"] / world)

            # 5. log, evaluate, save
            stats, calls = _rollout_stats(cfg, task, recorder, accelerator, parts)
            line = {"step": step, **stats, **metrics, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": sum(p.rollout.completion.numel() for p in parts) * world / max(t_rollout, 1e-9),
                    "step_s": dt, "skipped_steps": counters["skipped_steps"], "wall_s": counters["wall_s"]}
            if syncs.active:
                line["grad_syncs"] = syncs.count - syncs_before
            final = _run_over(cfg, max_steps, step, counters["wall_s"])
            if (cfg.eval_every and step % cfg.eval_every == 0) or final:
                last_accuracy, counters["last_solved"] = run_eval()
                counters["last_accuracy"], counters["last_eval_step"] = last_accuracy, step
                line["eval_accuracy"], line["eval_solved"] = last_accuracy, counters["last_solved"]
                if bar is not None:
                    bar.write(_eval_line(step, last_accuracy, base_accuracy, counters["last_solved"]), file=sys.stderr)
            if log is not None:
                log.log(step, line)
                if cfg.log_samples_every and step % cfg.log_samples_every == 0:
                    append_jsonl(samples_path, samples_of(step, calls, SAMPLES_PER_LOG))
            accelerator.log({k: v for k, v in line.items() if k != "step"}, step=step)
            if bar is not None:
                _advance(bar, counters["wall_s"], _postfix(cfg, max_steps, step, line, last_accuracy))
            if (cfg.save_every and step % cfg.save_every == 0) or final:
                save(step)
    except KeyboardInterrupt:
        # what the run has done so far stays readable: the summary says it was interrupted and gives
        # the last evaluation with its step, never as the accuracy of weights it was not measured on
        if bar is not None:
            bar.close()
        if accelerator.is_main_process:
            checkpoint = latest_checkpoint(run_dir)
            write_summary(run_dir, {
                "run_dir": str(run_dir), "interrupted": True, "steps": step, "base_accuracy": base_accuracy,
                "final_accuracy": None, "last_eval_accuracy": last_accuracy,
                "last_eval_solved": counters.get("last_solved", counters.get("base_solved")),
                "last_eval_step": counters.get("last_eval_step", 0), "wall_s": counters["wall_s"],
                "checkpoint": str(checkpoint) if checkpoint else None, "launch": launch,
            })
            plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
            where = (f"resume=true continues from {checkpoint.name}" if checkpoint
                     else "no checkpoint was written yet, so resume=true would start over")
            print(f"agrpo: stopped after step {step}: {where}; see {run_dir}/summary.json", file=sys.stderr)
        raise
    if bar is not None:
        bar.close()
    accelerator.end_training()

    summary = {
        "run_dir": str(run_dir),
        "base_accuracy": base_accuracy,
        "final_accuracy": last_accuracy,
        "base_solved": counters.get("base_solved"),
        "final_solved": counters.get("last_solved"),
        **baselines,
        "steps": step,
        "wall_s": counters["wall_s"],
        "total_wall_s": time.perf_counter() - t_origin,
        "skipped_steps": counters["skipped_steps"],
        "objective": cfg.objective,
        "task": cfg.task,
        "seed": cfg.seed,
        "excluded_problems": len(task.excluded),
        "planned_steps": max_steps,
        "train_rows": len(train_pool),
        "eval_problems": len(eval_set),
        "launch": launch,
    }
    if accelerator.is_main_process:
        write_summary(run_dir, summary)
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    return summary


def _rollouts(cfg, task, tokenizer, train_pool, accelerator, policy, objective, step: int) -> tuple[list[Part], float]:
    """This process's share of the step's prompts, each repeated group_size times, as micro-batches
    of rollouts with their rewards and the objective's advantages -> (parts, seconds spent sampling)."""
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    per_rank = cfg.prompts_per_step // world
    per_part = cfg.rollout_batch_size // cfg.group_size or per_rank
    idx = _batch_indices(len(train_pool), cfg.prompts_per_step, step, cfg.seed)[rank * per_rank : (rank + 1) * per_rank]
    core, parts, t_rollout = unwrap(policy), [], 0.0
    for first in range(0, per_rank, per_part):
        gen = _draw_generator(cfg.seed, step, rank * per_rank + first, device)
        batch = [train_pool[i] for i in idx[first : first + per_part] for _ in range(cfg.group_size)]
        prompts = [task.prompt(ex) for ex in batch]
        prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, cfg.chat_template, device)
        t1 = time.perf_counter()
        core.eval()
        with collective_free(accelerator, policy) as sampler:
            rollout = generate(sampler, prompt_ids, prompt_mask, cfg.sampling, gen)
        core.train()
        t_rollout += time.perf_counter() - t1
        # rewards -> group advantages (None rewards are dropped, not zeroed)
        completions = decode_completions(tokenizer, rollout.completion, rollout.stop_ids)
        columns = {k: [ex[k] for ex in batch] for k in batch[0] if k != "prompt"}
        rewards = list(task.reward(prompts, completions, **columns))
        if len(rewards) != len(completions):
            raise AgrpoError(
                f"the {cfg.task} reward returned {len(rewards)} values for {len(completions)} completions: "
                f"return one float (or None) per completion"
            )
        advantages, valid = objective.advantages(rewards, cfg.group_size, cfg)
        parts.append(Part(rollout, advantages.to(device), valid.to(device), rewards, gen))
    return parts, t_rollout


def _rollout_stats(cfg, task, recorder, accelerator, parts) -> tuple[dict, list]:
    """The step's reward and rollout statistics over every process -> (stats, this process's reward calls)."""
    rewards = [x for part in parts for x in part.rewards]
    r = torch.tensor([x if x is not None else float("nan") for x in rewards], dtype=torch.float64, device=accelerator.device)
    all_r = accelerator.gather(r)  # whole groups per process: group g is rows g*G .. g*G+G-1
    calls = recorder.take()
    summed = reduce_sum(accelerator, step_sums(task, calls, [p.rollout for p in parts]))
    r = all_r[~torch.isnan(all_r)]
    return {
        "reward_mean": float(r.mean()) if r.numel() else float("nan"),
        "reward_std": float(r.std()) if r.numel() > 1 else 0.0,
        **step_means(summed, all_r, cfg.group_size),
    }, calls


# how the start of a run names the accuracies a task gives without a model
BASELINE_LABELS = {"model_free_accuracy": "a model-free guesser (uniform over the digits the clues allow) scores"}


def _progress_bar(cfg: RLConfig, max_steps: int, start_step: int, spent_s: float):
    """A bar over the planned steps; a run bounded only by its time budget counts seconds instead."""
    if max_steps:
        return tqdm(total=max_steps, initial=start_step, desc="train", unit="step", file=sys.stderr)
    if cfg.time_budget_s:  # the bar moves with the time the steps spend (evaluations are not counted)
        return _TimeBar(cfg.time_budget_s, spent_s)
    return tqdm(initial=start_step, desc="train", unit="step", file=sys.stderr)


def _advance(bar, spent_s: float, postfix: dict) -> None:
    """Move the bar past the step just done (a time bar: to the training time spent)."""
    if isinstance(bar, _TimeBar):
        bar.advance_to(spent_s)
    else:
        bar.update(1)
    bar.set_postfix(postfix, refresh=False)


class _TimeBar(tqdm):
    """tqdm over the seconds of a time budget, moved by the training time spent so far."""

    def __init__(self, budget_s: float, spent_s: float):
        super().__init__(total=budget_s, initial=min(spent_s, budget_s), desc="train", file=sys.stderr,
                         bar_format="{desc}: {percentage:3.0f}%|{bar}| {clock}{postfix}")

    @property
    def format_dict(self):
        d = super().format_dict
        d["clock"] = f"{_clock(d['n'])} of {_clock(d['total'])}, {_clock(d['total'] - d['n'])} left"
        return d

    def advance_to(self, spent_s: float) -> None:
        done = min(spent_s, self.total) - self.n
        if done > 0:
            self.update(done)


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m:02d}:{s:02d}" if m < 60 else f"{m // 60}:{m % 60:02d}:{s:02d}"


def _postfix(cfg: RLConfig, max_steps: int, step: int, line: dict, accuracy) -> dict:
    post = {"reward": f"{line['reward_mean']:.3f}", "acc": "-" if accuracy is None else f"{accuracy:.3f}"}
    if not max_steps and cfg.time_budget_s:
        post = {"step": step, **post}
    elif max_steps and cfg.time_budget_s:  # whichever comes first ends the run
        post["time_left"] = _clock(max(cfg.time_budget_s - line["wall_s"], 0.0))
    return post


def _eval_line(step: int, accuracy: float, base, solved: float) -> str:
    # + 0.0 turns the -0.0 of a tiny loss into 0.0: "+0.0 points", never "-0.0"
    gain = "" if base is None else f" ({round(100 * (accuracy - base), 1) + 0.0:+.1f} points on the base's {base:.3f})"
    return f"step {step}: held-out accuracy {accuracy:.3f}{gain}, {_solved(solved)}"


def _solved(fraction: float) -> str:
    return f"{100 * fraction:.1f}% of problems solved whole"


def _grad_norm(params, clip: float, accelerator: Accelerator) -> float:
    """The global gradient norm (over every process and shard), clipped to `clip` when it is > 0."""
    # max_norm = inf measures without clipping; accelerate computes it over FSDP shards and DeepSpeed too
    norm = accelerator.clip_grad_norm_(params, clip if clip and clip > 0 else float("inf"))
    return float(norm) if norm is not None else float("nan")
