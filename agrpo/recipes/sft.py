"""Supervised training of a masked diffusion LM with the masked-diffusion (LLaDA) loss.

    agrpo sft                      # rebuilds the shipped tiny Sudoku base from scratch

For each example a noise level t ~ U(eps, 1] is drawn, every completion token is replaced
by [MASK] with probability t, and the model is trained to recover the masked tokens:

    loss = E_t [ (1 / t) * sum_{masked i} -log p(x_i | x_t) ] / C

(the 1/t weight makes it an upper bound on the negative log-likelihood; C = completion
length; EOS padding after the answer is a target too, so the model learns to stop). The
prompt is never masked. The result is saved with `save_pretrained` (model + tokenizer) and
can be passed to `agrpo train model=<dir>`.

With `block_size` > 0 the scratch model is a block-diffusion model (its config records
`block_size`: attention bidirectional inside a block, causal across blocks counted from
position 0) and trains with the block-diffusion loss: the prompt is left-padded to whole
blocks (as the block sampler pads it), every completion block b draws its own noise level
t_b ~ U(eps, 1] and masks each of its tokens with probability t_b, and

    loss = sum_b (1 / t_b) * sum_{masked i in block b} -log p(x_i | prompt, blocks < b, x_{t_b}^b) / C

Block b's tokens are predicted from the clean earlier blocks and its own noisy copy, exactly
the state the block sampler is in while writing block b. One forward scores every block
(`agrpo.objectives.block_replay.block_diffusion_layout`: the clean sequence followed by the
noisy copy of the completion, under a mask that makes each copy see the clean blocks before
it and itself). A model loaded with `block_size` in its config trains the same way.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from accelerate import Accelerator

from agrpo.config import config_to_dict
from agrpo.data import encode_prompts, encode_targets
from agrpo.distributed import (
    collective_free, gather_for_save, launch_line, launch_record, make_accelerator, model_loading, record_launch,
    settle_deepspeed,
)
from agrpo.errors import AgrpoError, say
from agrpo.evaluation import evaluate
from agrpo.models import load_model_and_tokenizer, shift_logits_of
from agrpo.objectives.block_replay import block_diffusion_layout
from agrpo.policy import Policy, unwrap
from agrpo.runlog import RunLog, make_run_dir, save_resolved_config, write_summary
from agrpo.sampling import SamplingConfig, paper_eval_sampling
from agrpo.tasks import get_task
from agrpo.tiny.model import build_tiny_model
from agrpo.tiny.tokenizer import build_tokenizer



@dataclass
class SFTConfig:
    name: str = field(default="sudoku-sft", metadata={"help": "run name: outputs go to <output_dir>/<name>/"})
    output_dir: str = field(default="runs", metadata={"help": "folder holding all runs"})
    seed: int = field(default=0, metadata={"help": "seed of the initialisation, data and masks"})
    task: str = field(default="tiny-sudoku", metadata={"help": "task name (tiny-sudoku, tiny-countdown)"})
    model: str = field(default="scratch", metadata={"help": "'scratch' (a new tiny model) or a model to continue from"})
    hidden_size: int = field(default=64, metadata={"help": "scratch model: hidden size"})
    num_layers: int = field(default=4, metadata={"help": "scratch model: transformer layers"})
    num_heads: int = field(default=4, metadata={"help": "scratch model: attention heads"})
    intermediate_size: int = field(default=128, metadata={"help": "scratch model: MLP width"})
    block_size: int = field(default=0, metadata={"help": "scratch model: tokens per block of a block-diffusion model (attention bidirectional inside a block, causal across blocks; trained with the block-diffusion loss; eval_sampling.block_length must equal it); 0 = bidirectional over the whole sequence"})
    gen_length: int = field(default=16, metadata={"help": "completion length in tokens (EOS-padded targets)"})
    train_pool: int = field(default=5000, metadata={"help": "training problems generated once at start"})
    teacher: str = field(default="solution", metadata={"help": "tiny-sudoku: who writes the demonstrations: solution (the true solution), or a weaker teacher that knows only some rules: rows_columns, rows_boxes, rows (agrpo/tasks/tiny_sudoku.py)"})
    exclude_file: str = field(default="", metadata={"help": "a file in the task's published format (e.g. the paper's test split) whose problems never enter the generated sets"})
    steps: int = field(default=600, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=64, metadata={"help": "examples per step"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (AdamW)"})
    lr_schedule: Literal["constant", "cosine"] = field(default="cosine", metadata={"help": "after warmup"})
    warmup_steps: int = field(default=10, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0: off)"})
    min_mask_rate: float = field(default=1e-3, metadata={"help": "eps: the noise level t is drawn from U(eps, 1]"})
    eval_size: int = field(default=256, metadata={"help": "held-out problems for the final evaluation"})
    eval_sampling: SamplingConfig = field(default_factory=paper_eval_sampling, metadata={"help": "evaluation sampler"})
    export_to: str = field(default="", metadata={"help": "also copy the final model to this directory"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def validate(self) -> None:
        self.eval_sampling.validate()
        if self.eval_sampling.gen_length != self.gen_length:
            raise AgrpoError(
                f"eval_sampling.gen_length={self.eval_sampling.gen_length} differs from gen_length={self.gen_length}"
            )
        for name in ("steps", "batch_size", "train_pool", "eval_size", "hidden_size", "num_layers", "num_heads", "intermediate_size"):
            if getattr(self, name) < 1:
                raise AgrpoError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise AgrpoError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if self.block_size < 0:
            raise AgrpoError(f"block_size must be >= 0 (0 = bidirectional), got {self.block_size}")
        if self.block_size:
            if self.gen_length % self.block_size:
                raise AgrpoError(f"block_size={self.block_size} must divide gen_length={self.gen_length}")
            if self.eval_sampling.block_length != self.block_size:
                raise AgrpoError(
                    f"a block model of block_size={self.block_size} samples in its own blocks: set "
                    f"eval_sampling.block_length={self.block_size} (got {self.eval_sampling.block_length})"
                )
        if not 0 < self.min_mask_rate < 1:
            raise AgrpoError(f"min_mask_rate must be in (0, 1), got {self.min_mask_rate}")
        if self.teacher != "solution" and self.task != "tiny-sudoku":
            raise AgrpoError(f"teacher={self.teacher} is an option of tiny-sudoku's demonstrations; {self.task} has none")


def masked_diffusion_loss(policy, prompt_ids, prompt_mask, targets, generator, eps: float = 1e-3) -> torch.Tensor:
    """LLaDA's SFT loss on one batch (prompt never masked; completion masked at rate t per row).

    On a block-diffusion model (the policy has a `block_size`) it is the block-diffusion loss
    instead: `block_noise` draws the masks, `block_diffusion_loss` scores them."""
    core = unwrap(policy)
    if core.block_size:
        t, masked = block_noise(targets.shape[0], targets.shape[1], core.block_size, generator, eps, targets.device)
        return block_diffusion_loss(policy, prompt_ids, prompt_mask, targets, t, masked)
    bsz, gen = targets.shape
    t = eps + (1 - eps) * torch.rand(bsz, 1, generator=generator, device=targets.device)
    masked = torch.rand(bsz, gen, generator=generator, device=targets.device) < t
    # every row learns something: a row that drew no mask gets one masked position
    none = ~masked.any(1)
    if bool(none.any()):
        pick = torch.randint(gen, (bsz,), generator=generator, device=targets.device)
        masked[none, pick[none]] = True
    x = torch.cat([prompt_ids, targets.masked_fill(masked, core.mask_id)], dim=1)
    attn = torch.cat([prompt_mask, torch.ones_like(targets)], dim=1)
    positions = prompt_ids.shape[1] + torch.arange(gen, device=targets.device).expand(bsz, gen)
    logits = policy(x, positions, attn)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    nll = nll.view(bsz, gen) * masked / t
    return nll.sum() / (bsz * gen)


def block_noise(bsz: int, gen: int, block_size: int, generator, eps: float = 1e-3, device=None):
    """The masks of the block-diffusion loss -> (t [B, C / block_size], masked [B, C] bool).

    t_b = eps + (1 - eps) u_b with u_b ~ U[0, 1) drawn first for every (row, block), then one
    uniform v_i per completion position: position i of block b is masked when v_i < t_b. A block
    that draws no mask contributes nothing (no mask is forced)."""
    if gen % block_size:
        raise AgrpoError(f"the completion ({gen} tokens) must be whole blocks of {block_size}")
    t = eps + (1 - eps) * torch.rand(bsz, gen // block_size, generator=generator, device=device)
    masked = torch.rand(bsz, gen, generator=generator, device=device) < t.repeat_interleave(block_size, dim=1)
    return t, masked


def block_diffusion_loss(policy, prompt_ids, prompt_mask, targets, t, masked) -> torch.Tensor:
    """The block-diffusion SFT loss of one batch with given noise levels t [B, nb] and masks [B, C]:

        loss = (1 / (B C)) sum_rows sum_b (1 / t_b) sum_{masked i in block b} -log p(x_i | prompt, blocks < b, x_t^b)

    The prompt ([B, P'] left-padded, `prompt_mask` 0 on padding) is left-padded further to whole
    blocks with the pad id, as `agrpo.sampling.generate` pads it, so the completion's blocks sit
    on the grid the model counts from position 0. One forward of the block-diffusion layout
    (clean sequence + noisy copy of the completion) gives every block's logits in its own state."""
    core = unwrap(policy)
    bl = core.block_size
    if not bl:
        raise AgrpoError("the block-diffusion loss needs a block model (config.block_size set)")
    bsz, gen = targets.shape
    pad = -prompt_ids.shape[1] % bl
    if pad:
        pad_id = core.pad_id if core.pad_id is not None else core.mask_id
        prompt_ids = torch.cat([prompt_ids.new_full((bsz, pad), pad_id), prompt_ids], dim=1)
        prompt_mask = torch.cat([prompt_mask.new_zeros((bsz, pad)), prompt_mask], dim=1)
    plen = prompt_ids.shape[1]
    tokens = torch.cat([prompt_ids, targets], dim=1)
    attn = torch.cat([prompt_mask.long(), torch.ones_like(targets)], dim=1)
    noisy = targets.masked_fill(masked, core.mask_id)
    ids, position_ids, attention = block_diffusion_layout(tokens, attn, plen, bl, noisy)
    positions = plen + gen + torch.arange(gen, device=targets.device).expand(bsz, gen)
    logits = policy(ids, positions, attention, position_ids=position_ids)
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    nll = nll.view(bsz, gen) * masked / t.repeat_interleave(bl, dim=1)
    return nll.sum() / (bsz * gen)


def train_sft(cfg: SFTConfig, accelerator: Accelerator | None = None) -> dict:
    cfg.validate()
    accelerator = accelerator or make_accelerator()
    device = accelerator.device
    torch.manual_seed(cfg.seed)
    task = get_task(cfg.task, held_out=cfg.exclude_file or None, **({"teacher": cfg.teacher} if cfg.teacher != "solution" else {}))
    if not task.character_level:
        raise AgrpoError(f"agrpo sft trains the tiny tasks (tiny-sudoku, tiny-countdown), not {cfg.task!r}: they have reference completions")
    with model_loading(accelerator):  # whole, or partitioned when a ZeRO-3 config says so
        if cfg.model == "scratch":
            tokenizer = build_tokenizer()
            model = build_tiny_model(
                tokenizer, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                intermediate_size=cfg.intermediate_size, max_position_embeddings=64,
                block_size=cfg.block_size or None,
            )
        else:
            model, tokenizer = load_model_and_tokenizer(cfg.model)
    policy = Policy(model, shift_logits=shift_logits_of(model)).to(device)
    if cfg.block_size and policy.block_size != cfg.block_size:
        raise AgrpoError(
            f"block_size={cfg.block_size} makes a scratch model; {cfg.model} attends in blocks of "
            f"{policy.block_size or 'the whole sequence'}: drop block_size to continue it as it is"
        )
    if policy.block_size and cfg.eval_sampling.block_length != policy.block_size:
        raise AgrpoError(
            f"{cfg.model} is a block model of block_size={policy.block_size}, sampled in its own blocks: set "
            f"eval_sampling.block_length={policy.block_size} (got {cfg.eval_sampling.block_length})"
        )
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            span = max(cfg.steps - cfg.warmup_steps, 1)
            return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup_steps) / span))
        return 1.0

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    settle_deepspeed(accelerator, policy, cfg.grad_clip)
    launch = launch_record(accelerator, policy)
    say(launch_line(launch))  # what runs, first; every process trains on the whole batch
    policy, optimizer = accelerator.prepare(policy, optimizer)
    core = unwrap(policy)
    eos = core.eos_id

    pool = task.train_examples(cfg.train_pool, seed=cfg.seed)
    # the run folder is made once the task, its data and the model are known to load; the first process writes
    main = accelerator.is_main_process
    run_dir = Path(cfg.output_dir) / cfg.name
    if main:
        make_run_dir(cfg.output_dir, cfg.name, resume=False)
        save_resolved_config(run_dir, config_to_dict(cfg))
        record_launch(run_dir, launch)
    accelerator.wait_for_everyone()
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    log = RunLog(run_dir, resume=False) if main else None
    bar = None
    if cfg.progress and main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc="sft", unit="step")
    t_start = time.perf_counter()
    core.train()
    for step in range(cfg.steps):
        # 1. a batch of (prompt, reference completion) pairs
        idx = torch.randint(len(pool), (cfg.batch_size,), generator=gen, device=device).tolist()
        batch = [pool[i] for i in idx]
        prompt_ids, prompt_mask = encode_prompts(tokenizer, [task.prompt(ex) for ex in batch], device=device)
        targets = encode_targets(tokenizer, [task.target(ex) for ex in batch], cfg.gen_length, eos).to(device)
        # 2. masked-diffusion loss -> step
        loss = masked_diffusion_loss(policy, prompt_ids, prompt_mask, targets, gen, cfg.min_mask_rate)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if cfg.grad_clip > 0:
            accelerator.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        if log is not None:
            log.log(step + 1, {"step": step + 1, "loss": float(loss.detach()), "wall_s": time.perf_counter() - t_start})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
    if bar is not None:
        bar.close()
    train_s = time.perf_counter() - t_start

    # 3. held-out accuracy, the paper's way (greedy, low-confidence remasking by default)
    with collective_free(accelerator, policy) as sampler:
        res = evaluate(sampler, tokenizer, task, task.eval_examples(cfg.eval_size), cfg.eval_sampling)
    model_dir = run_dir / "model"
    import transformers

    transformers.utils.logging.disable_progress_bar()  # its "Writing model shards" bar says nothing here
    weights, _ = gather_for_save(accelerator, policy, optimizer)  # whole, from the shards of FSDP / ZeRO-3
    if main:
        core.model.save_pretrained(model_dir, safe_serialization=True, state_dict=weights)
        tokenizer.save_pretrained(model_dir)
    if cfg.export_to and main:
        dest = Path(cfg.export_to)
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(model_dir, dest)
    summary = {
        "accuracy": res["accuracy"],
        "solved": sum(x == 1.0 for x in res["scores"]) / max(len(res["scores"]), 1),
        "teacher": cfg.teacher,
        "block_size": core.block_size or 0,
        "steps": cfg.steps,
        "train_s": train_s,
        "wall_s": time.perf_counter() - t_start,
        "model_dir": str(model_dir),
        "task": cfg.task,
        "seed": cfg.seed,
        "excluded_problems": len(task.excluded),
        "launch": launch,
    }
    if main:
        log.log(cfg.steps, {"step": cfg.steps, "eval_accuracy": res["accuracy"], "wall_s": summary["wall_s"]})
        write_summary(run_dir, summary)
    accelerator.wait_for_everyone()
    return summary
