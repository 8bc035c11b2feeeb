"""diffu-GRPO (d1), the baseline AGRPO is compared with (AGRPO.md §3).

Per-token log-probs come from ONE forward pass in which every completion token is [MASK]
and each real prompt token is masked independently with probability p: a mean-field,
one-step estimate of the sequence likelihood (biased; cheap). The recipe runs `mu` inner
iterations on one batch of rollouts, each with a fresh prompt mask, and the "old" log-probs
of each iteration are taken with that iteration's mask before any update.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from agrpo.distributed import OneSync, totals
from agrpo.errors import AgrpoError
from agrpo.objectives.base import Context, Objective, Part, add_piece, global_metrics, new_sums, register
from agrpo.objectives.common import clipped_surrogate, horizon, k3_kl
from agrpo.sampling import Rollout


def random_prompt_mask(rollout: Rollout, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, P+C] bool: True on real prompt tokens chosen (each with probability p) to be masked."""
    if not 0 <= p < 1:
        raise AgrpoError(f"prompt mask probability must be in [0, 1), got {p}")
    tokens = rollout.tokens
    draw = torch.rand(tokens.shape, generator=generator, device=tokens.device) < p
    draw[:, rollout.prompt_len :] = False
    return draw & rollout.attention_mask.bool()


def loss_mask(rollout: Rollout, eos_steps: str = "include") -> torch.Tensor:
    """[B, C] bool: tokens the objectives learn from (drawn by the policy, before T_eff)."""
    return rollout.sampled & (rollout.step < horizon(rollout, eos_steps)[:, None])


def _kept_tokens(rollout: Rollout, row_valid: torch.Tensor | None, eos_steps: str) -> torch.Tensor:
    mask = loss_mask(rollout, eos_steps)
    return mask if row_valid is None else mask & row_valid.to(mask.device)[:, None]


def loss_count(
    rollout: Rollout,
    normalization: str = "sequence",
    row_valid: torch.Tensor | None = None,
    eos_steps: str = "include",
) -> int:
    """What `diffu_grpo_loss` divides by: rows with a loss token (sequence) or loss tokens (token).

    Summed over micro-batches and processes, it is the `denominator` that makes their losses add
    up to the loss of the whole batch.
    """
    mask = _kept_tokens(rollout, row_valid, eos_steps)
    return int(mask.any(1).sum()) if normalization == "sequence" else int(mask.sum())


def mean_field_logp(
    policy: nn.Module, rollout: Rollout, prompt_mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """[B, C] log p(x_i) with the whole completion masked and the prompt masked where prompt_mask."""
    x = rollout.tokens.clone()
    x[:, rollout.prompt_len :] = rollout.mask_id
    x = x.masked_fill(prompt_mask, rollout.mask_id)
    bsz, gen = rollout.completion.shape
    positions = rollout.prompt_len + torch.arange(gen, device=x.device).expand(bsz, gen)
    logits = policy(x, positions, rollout.attention_mask)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, rollout.completion[:, :, None]).squeeze(-1)


def diffu_grpo_loss(
    policy: nn.Module,
    rollout: Rollout,
    advantages: torch.Tensor,
    prompt_mask: torch.Tensor,
    old_logp: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    normalization: Literal["sequence", "token"] = "sequence",
    row_valid: torch.Tensor | None = None,
    temperature: float = 1.0,
    eos_steps: Literal["include", "exclude"] = "include",
    denominator: float | None = None,
) -> tuple[torch.Tensor, dict]:
    """One inner iteration of diffu-GRPO -> (loss, metrics).

    old_logp / ref_logp [B, C] are `mean_field_logp` under the same prompt mask, taken before
    the update (old) and with the reference model (ref). normalization "sequence" averages
    each row's tokens then the rows (as d1); "token" averages all loss tokens of the batch.
    `eos_steps` chooses which sampled EOS tokens are learned from, as in AGRPO (`horizon`).
    `denominator` replaces this batch's own count (`loss_count`) by that of a larger batch
    this one is a part of.
    """
    bsz = rollout.tokens.shape[0]
    if advantages.shape[0] != bsz:
        raise AgrpoError(f"got {advantages.shape[0]} advantages for {bsz} rollouts: one per completion")
    if beta > 0 and ref_logp is None:
        raise AgrpoError("beta > 0 needs ref_logp from the reference model")
    if normalization not in ("sequence", "token"):
        raise AgrpoError(f"unknown normalization {normalization!r}: choose one of sequence, token")
    mask = _kept_tokens(rollout, row_valid, eos_steps)
    logp = mean_field_logp(policy, rollout, prompt_mask, temperature)
    adv = advantages.to(logp.device, torch.float32)[:, None]
    per_tok, ratio, clipped = clipped_surrogate(logp, old_logp, adv, eps_low, eps_high)
    kl = torch.zeros_like(per_tok)
    if beta > 0:
        kl = k3_kl(logp, ref_logp, ratio)
        per_tok = per_tok + beta * kl
    per_tok = per_tok.masked_fill(~mask, 0.0)
    maskf = mask.float()
    if denominator is None:
        denominator = loss_count(rollout, normalization, row_valid, eos_steps)
    if normalization == "sequence":
        per_row = per_tok.sum(1) / maskf.sum(1).clamp(min=1)
        loss = per_row.sum() / max(float(denominator), 1.0)
    else:
        loss = per_tok.sum() / max(float(denominator), 1.0)
    tokens = max(int(mask.sum()), 1)
    metrics = {
        "loss": float(loss.detach()),
        "clip_frac": float((clipped & mask).sum()) / tokens,
        "ratio_mean": float(ratio.detach().masked_fill(~mask, 0.0).sum()) / tokens,
        "kl": float(kl.detach().masked_fill(~mask, 0.0).sum()) / tokens,
        "loss_tokens": int(mask.sum()),
    }
    return loss, metrics


@dataclass
class DiffuGRPOKeys:
    """diffu-GRPO's own setting, a top-level key of the run's config (every preset has it)."""

    prompt_mask_p: float = field(default=0.15, metadata={"help": "prompt-token mask probability"})


@register
class DiffuGRPO(Objective):
    """d1's diffu-GRPO. Its settings are top-level keys of the run's config: `prompt_mask_p`
    (declared here), with the recipe's `inner_steps` (mu), `eos_steps`, `normalization`."""

    name = "diffu_grpo"
    summary = "diffu-GRPO (d1): one-step mean-field token likelihoods, mu updates a batch (AGRPO.md §3)"
    top_level = DiffuGRPOKeys

    def check(self, cfg) -> None:
        if not 0 <= cfg.prompt_mask_p < 1:
            raise AgrpoError(f"prompt_mask_p must be in [0, 1), got {cfg.prompt_mask_p}")

    def prepare(self, ctx: Context, parts: list[Part]) -> None:
        """A prompt mask per inner update, and under it the old (and reference) log-probs."""
        cfg = ctx.cfg
        for part in parts:
            masks = [random_prompt_mask(part.rollout, cfg.prompt_mask_p, part.generator) for _ in range(cfg.inner_steps)]
            with torch.no_grad():
                olds = [mean_field_logp(ctx.policy, part.rollout, m) for m in masks]
                refs = [mean_field_logp(ctx.ref_logits_fn, part.rollout, m) if cfg.beta > 0 else None for m in masks]
            part.state.update(masks=masks, olds=olds, refs=refs)

    def update(self, ctx: Context, parts: list[Part], inner: int) -> dict:
        """Back-propagate the diffu-GRPO loss of every micro-batch with one gradient sync -> global metrics."""
        cfg, accelerator = ctx.cfg, ctx.accelerator
        local = sum(loss_count(p.rollout, cfg.normalization, p.valid, cfg.eos_steps) for p in parts)
        total, _ = totals(accelerator, local, len(parts))  # every process has as many micro-batches
        sync = OneSync(accelerator, ctx.policy, len(parts))
        sums = new_sums()
        for p in parts:
            with sync.piece():
                loss, m = diffu_grpo_loss(
                    ctx.policy, p.rollout, p.advantages, p.state["masks"][inner], p.state["olds"][inner],
                    eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta, ref_logp=p.state["refs"][inner],
                    normalization=cfg.normalization, row_valid=p.valid, eos_steps=cfg.eos_steps, denominator=total,
                )
                # processes average their gradients: scale so that the average is the global sum / total
                accelerator.backward(loss * accelerator.num_processes)
            add_piece(sums, {**m, "loss": m["loss"] * accelerator.num_processes})
        sync.check()
        return global_metrics(accelerator, sums)
