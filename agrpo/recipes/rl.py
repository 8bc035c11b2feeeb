"""RL post-training of a masked diffusion LM: AGRPO (default) or diffu-GRPO.

    agrpo train                                   # the tiny Sudoku default, CPU, minutes
    agrpo train -c configs/llada8b_countdown.yaml  # paper scale, accelerate launch ...

One step reads top to bottom: prompts -> rollouts -> rewards -> advantages -> loss over
sampled steps -> optimizer step -> log. Where this departs from textbook GRPO / the paper:
* the loss is AGRPO's Monte Carlo estimate over denoising steps (AGRPO.md §2), rebuilt
  exactly from the rollout record, not a one-step mean-field likelihood;
* advantages are r - mean(r) (no std) by default, as the official code; `None` rewards
  drop the completion instead of counting as zero;
* the tiny default trains with a smaller model, fewer steps and a larger learning rate
  than the paper (LLaDA-8B: lr 5e-6, G=8, K=24, 128 steps of 3 tokens); see configs/;
* a step whose loss or gradient is not finite is skipped and counted (`skipped_steps`);
* the run stops at `max_steps` or at `time_budget_s` of training wall time, whichever first.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator

from agrpo.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from agrpo.config import config_to_dict
from agrpo.data import decode_completions, encode_prompts
from agrpo.errors import AgrpoError
from agrpo.evaluation import evaluate
from agrpo.models import frozen_copy, load_model_and_tokenizer, shift_logits_of
from agrpo.objectives import agrpo_loss, diffu_grpo_loss, group_advantages, mean_field_logp, random_prompt_mask
from agrpo.policy import Policy, unwrap
from agrpo.runlog import RunLog, make_run_dir, plot_curves, save_resolved_config, write_summary
from agrpo.sampling import SamplingConfig, generate, paper_eval_sampling
from agrpo.tasks import check_model_fits, get_task


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
    name: str = field(default="sudoku-agrpo", metadata={"help": "run name: outputs go to <output_dir>/<name>/"})
    output_dir: str = field(default="runs", metadata={"help": "folder holding all runs"})
    seed: int = field(default=0, metadata={"help": "seed of data order, rollouts and step draws"})
    resume: bool = field(default=False, metadata={"help": "continue <output_dir>/<name> from its latest checkpoint"})
    # model and task
    model: str = field(default="tiny:sudoku", metadata={"help": "base model: tiny:<task>, a local directory or a hub name"})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "parameter dtype; auto: bfloat16 for LLaDA / Dream on a GPU, else float32"}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the hub (LLaDA, Dream)"})
    shift_logits: bool | None = field(
        default=None, metadata={"help": "the model predicts position i from i-1 (unset: the model family's value; Dream: true)"}
    )
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa, eager or flash_attention_2 (needs flash-attn)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in the backward pass (less memory, slower)"})
    chat_template: bool = field(default=False, metadata={"help": "wrap prompts in the tokenizer's chat template"})
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
    sampling: SamplingConfig = field(default_factory=_train_sampling, metadata={"help": "training sampler"})
    eval_sampling: SamplingConfig = field(default_factory=paper_eval_sampling, metadata={"help": "evaluation sampler"})
    # objective
    objective: Literal["agrpo", "diffu_grpo"] = field(default="agrpo", metadata={"help": "policy-gradient objective"})
    num_samples: int = field(default=16, metadata={"help": "AGRPO: denoising steps sampled per completion (K)"})
    step_sampling: Literal["uniform", "low_discrepancy", "stratified"] = field(
        default="stratified", metadata={"help": "AGRPO: how the K steps are drawn"}
    )
    importance: Literal["none", "entropy"] = field(default="none", metadata={"help": "AGRPO: entropy importance sampling of steps"})
    eos_steps: Literal["include", "exclude"] = field(
        default="include",
        metadata={"help": "include: EOS tokens sampled after the answer are learned from (the decision to stop); exclude: the official truncation"},
    )
    normalization: Literal["sequence", "token"] = field(
        default="sequence", metadata={"help": "sequence: sum/(K*G) as the official code; token: mean over loss tokens"}
    )
    scale_std: bool = field(default=False, metadata={"help": "divide advantages by the group std"})
    eps_low: float = field(default=0.2, metadata={"help": "PPO clip below: ratio >= 1 - eps_low"})
    eps_high: float = field(default=0.2, metadata={"help": "PPO clip above: ratio <= 1 + eps_high"})
    beta: float = field(default=0.0, metadata={"help": "k3 KL weight against the reference (0: no reference kept)"})
    inner_steps: int = field(default=1, metadata={"help": "optimizer steps per batch of rollouts (mu)"})
    prompt_mask_p: float = field(default=0.15, metadata={"help": "diffu-GRPO: prompt-token mask probability"})
    max_rows_per_forward: int = field(default=512, metadata={"help": "sequences per forward in the loss (memory budget)"})
    # optimizer
    lr: float = field(default=3e-5, metadata={"help": "peak learning rate (AdamW)"})
    lr_schedule: Literal["constant", "cosine"] = field(default="constant", metadata={"help": "after warmup"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warmup steps"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.99, metadata={"help": "AdamW beta2"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0: off)"})
    # schedule
    max_steps: int = field(default=100000, metadata={"help": "optimizer steps at most"})
    time_budget_s: float = field(default=540.0, metadata={"help": "stop after this much training wall time (0: no limit)"})
    eval_every: int = field(default=50, metadata={"help": "held-out evaluation every N steps (0: start and end only)"})
    save_every: int = field(default=100, metadata={"help": "checkpoint every N steps (0: at the end only)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept on disk"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def validate(self) -> None:
        self.sampling.validate()
        self.eval_sampling.validate()
        if self.sampling.temperature <= 0:
            raise AgrpoError("sampling.temperature must be > 0 for RL (greedy rollouts have no policy gradient)")
        for name in ("prompts_per_step", "group_size", "num_samples", "inner_steps", "eval_size", "train_pool"):
            if getattr(self, name) < 1:
                raise AgrpoError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise AgrpoError("group_size must be >= 2: group-relative advantages need at least two completions")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise AgrpoError(f"lr must be a positive number, got {self.lr}")
        if not (0 <= self.eps_low < 1) or self.eps_high < 0:
            raise AgrpoError(f"clip range needs 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}")
        if self.beta < 0:
            raise AgrpoError(f"beta must be >= 0, got {self.beta}")
        if self.sampling.gen_length != self.eval_sampling.gen_length:
            raise AgrpoError("sampling.gen_length and eval_sampling.gen_length differ: use the same completion length")


def _lr_lambda(cfg: RLConfig):
    def fn(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            span = max(cfg.max_steps - cfg.warmup_steps, 1)
            return 0.5 * (1 + math.cos(math.pi * min(step - cfg.warmup_steps, span) / span))
        return 1.0

    return fn


def _step_generator(seed: int, step: int, rank: int, device) -> torch.Generator:
    # a generator per (step, rank) makes a resumed run draw exactly what the straight run drew
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + step) * 64 + rank)
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


def train(cfg: RLConfig, accelerator: Accelerator | None = None) -> dict:
    cfg.validate()
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    if cfg.prompts_per_step % world:
        raise AgrpoError(f"prompts_per_step={cfg.prompts_per_step} must be divisible by the {world} processes")
    torch.manual_seed(cfg.seed)

    run_dir = make_run_dir(cfg.output_dir, cfg.name, cfg.resume) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    if run_dir is None:  # other processes: the main one created it
        run_dir = Path(cfg.output_dir) / cfg.name
    task = get_task(cfg.task, held_out=cfg.exclude_file or cfg.eval_data or None)
    check_model_fits(task, cfg.model)
    lora = asdict(cfg.lora) if cfg.lora.r > 0 else None
    model, tokenizer = load_model_and_tokenizer(
        cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code, lora=lora, load_in_4bit=cfg.load_in_4bit,
        attn_implementation=cfg.attn_implementation, gradient_checkpointing=cfg.gradient_checkpointing,
    )
    shift_logits = shift_logits_of(model, cfg.shift_logits)
    policy = Policy(model, shift_logits=shift_logits).to(device)
    ref_logits_fn = None
    if cfg.beta > 0:
        if lora is not None:

            def ref_logits_fn(x, pos, attn):  # the frozen base = the model with its adapter off
                with unwrap(policy).disable_adapter():
                    return unwrap(policy)(x, pos, attn)

        else:
            ref_logits_fn = Policy(frozen_copy(model), shift_logits=shift_logits).to(device)

    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    policy, optimizer = accelerator.prepare(policy, optimizer)
    core = unwrap(policy)

    start_step, counters = 0, {"skipped_steps": 0, "wall_s": 0.0}
    if cfg.resume and latest_checkpoint(run_dir) is not None:
        state = load_checkpoint(latest_checkpoint(run_dir), core.model, optimizer, scheduler)
        start_step = int(state["step"])
        counters.update(state.get("counters", {}))
    log = RunLog(run_dir, resume=cfg.resume) if accelerator.is_main_process else None
    if log is not None:
        log.truncate_after(start_step if start_step > 0 else -1)
        save_resolved_config(run_dir, config_to_dict(cfg))

    train_pool = task.train_examples(cfg.train_pool, seed=cfg.seed, path=cfg.train_data or None)
    eval_set = task.eval_examples(cfg.eval_size, path=cfg.eval_data or None)
    my_eval = eval_set[rank::world]

    def run_eval() -> float:
        res = evaluate(policy, tokenizer, task, my_eval, cfg.eval_sampling, chat_template=cfg.chat_template)
        total = torch.tensor([sum(res["scores"]), len(res["scores"])], dtype=torch.float64, device=device)
        total = accelerator.reduce(total, reduction="sum")
        return float(total[0] / total[1])

    base_accuracy = None
    if start_step == 0:
        base_accuracy = run_eval()
        if log is not None:
            log.log(0, {"step": 0, "eval_accuracy": base_accuracy, "wall_s": 0.0})
    else:
        base_accuracy = counters.get("base_accuracy")
    counters["base_accuracy"] = base_accuracy
    last_accuracy = base_accuracy

    per_rank = cfg.prompts_per_step // world
    bar = None
    if cfg.progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps if cfg.max_steps < 100000 else None, initial=start_step, desc="train", unit="step")
    step = start_step
    t_origin = time.perf_counter() - counters["wall_s"]
    while step < cfg.max_steps and not (cfg.time_budget_s and counters["wall_s"] >= cfg.time_budget_s):
        gen = _step_generator(cfg.seed, step, rank, device)
        t0 = time.perf_counter()

        # 1. prompts: this process's share, each repeated group_size times
        idx = _batch_indices(len(train_pool), cfg.prompts_per_step, step, cfg.seed)[rank * per_rank : (rank + 1) * per_rank]
        batch = [train_pool[i] for i in idx for _ in range(cfg.group_size)]
        prompts = [task.prompt(ex) for ex in batch]
        prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, cfg.chat_template, device)

        # 2. rollouts
        core.eval()
        rollout = generate(policy, prompt_ids, prompt_mask, cfg.sampling, gen)
        core.train()
        t_rollout = time.perf_counter() - t0

        # 3. rewards -> group advantages (None rewards are dropped, not zeroed)
        completions = decode_completions(tokenizer, rollout.completion, core.eos_id)
        columns = {k: [ex[k] for ex in batch] for k in batch[0] if k != "prompt"}
        rewards = list(task.reward(prompts, completions, **columns))
        if len(rewards) != len(completions):
            raise AgrpoError(
                f"the {cfg.task} reward returned {len(rewards)} values for {len(completions)} completions: "
                f"return one float (or None) per completion"
            )
        advantages, valid = group_advantages(rewards, cfg.group_size, cfg.scale_std)
        advantages, valid = advantages.to(device), valid.to(device)

        # 4. loss over sampled denoising steps -> optimizer step(s)
        if cfg.objective == "diffu_grpo":
            masks = [random_prompt_mask(rollout, cfg.prompt_mask_p, gen) for _ in range(cfg.inner_steps)]
            with torch.no_grad():
                olds = [mean_field_logp(policy, rollout, m) for m in masks]
                refs = [None] * len(masks)
                if cfg.beta > 0:
                    refs = [mean_field_logp(ref_logits_fn, rollout, m) for m in masks]
        for inner in range(cfg.inner_steps):
            optimizer.zero_grad(set_to_none=True)
            if cfg.objective == "agrpo":
                _, metrics = agrpo_loss(
                    policy, rollout, advantages,
                    num_samples=cfg.num_samples, step_sampling=cfg.step_sampling, importance=cfg.importance,
                    eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta, ref_logits_fn=ref_logits_fn,
                    normalization=cfg.normalization, row_valid=valid, eos_steps=cfg.eos_steps,
                    max_rows_per_forward=cfg.max_rows_per_forward, backward=accelerator.backward, generator=gen,
                )
            else:
                loss, metrics = diffu_grpo_loss(
                    policy, rollout, advantages, masks[inner], olds[inner],
                    eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta, ref_logp=refs[inner],
                    normalization=cfg.normalization, row_valid=valid, eos_steps=cfg.eos_steps,
                )
                accelerator.backward(loss)
            grad_norm = _grad_norm(params, cfg.grad_clip, accelerator)
            if math.isfinite(metrics["loss"]) and math.isfinite(grad_norm):
                optimizer.step()
                scheduler.step()
            else:  # a non-finite loss or gradient: leave the weights as they were
                optimizer.zero_grad(set_to_none=True)
                counters["skipped_steps"] += 1
        step += 1
        dt = time.perf_counter() - t0
        counters["wall_s"] += dt

        # 5. log
        r = torch.tensor([x if x is not None else float("nan") for x in rewards], dtype=torch.float64, device=device)
        r = accelerator.gather(r)
        r = r[~torch.isnan(r)]
        line = {
            "step": step,
            "reward_mean": float(r.mean()) if r.numel() else float("nan"),
            "reward_std": float(r.std()) if r.numel() > 1 else 0.0,
            "loss": metrics["loss"],
            "clip_frac": metrics["clip_frac"],
            "kl": metrics["kl"],
            "grad_norm": grad_norm,
            "lr": scheduler.get_last_lr()[0],
            "tokens_per_s": rollout.completion.numel() * world / max(t_rollout, 1e-9),
            "step_s": dt,
            "skipped_steps": counters["skipped_steps"],
            "wall_s": counters["wall_s"],
        }
        final = step >= cfg.max_steps or (cfg.time_budget_s and counters["wall_s"] >= cfg.time_budget_s)
        if (cfg.eval_every and step % cfg.eval_every == 0) or final:
            last_accuracy = run_eval()
            line["eval_accuracy"] = last_accuracy
        if log is not None:
            log.log(step, line)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(reward=f"{line['reward_mean']:.3f}", acc=f"{last_accuracy:.3f}", refresh=False)
        if (cfg.save_every and step % cfg.save_every == 0) or final:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(
                    run_dir, step, core.model, optimizer, scheduler,
                    extra={"counters": counters}, keep_last=cfg.keep_checkpoints, tokenizer=tokenizer,
                )
            accelerator.wait_for_everyone()
    if bar is not None:
        bar.close()

    summary = {
        "base_accuracy": base_accuracy,
        "final_accuracy": last_accuracy,
        "steps": step,
        "wall_s": counters["wall_s"],
        "total_wall_s": time.perf_counter() - t_origin,
        "skipped_steps": counters["skipped_steps"],
        "objective": cfg.objective,
        "task": cfg.task,
        "seed": cfg.seed,
        "excluded_problems": len(task.excluded),
    }
    if accelerator.is_main_process:
        write_summary(run_dir, summary)
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    return summary


def _grad_norm(params, clip: float, accelerator: Accelerator) -> float:
    if clip and clip > 0:
        norm = accelerator.clip_grad_norm_(params, clip)
    else:
        grads = [p.grad.detach().norm() for p in params if p.grad is not None]
        norm = torch.stack(grads).norm() if grads else torch.tensor(0.0)
    return float(norm)
