"""Pieces shared by the objectives: the steps a row learns from, clipped surrogate, k3 KL (AGRPO.md §2)."""

from __future__ import annotations

import torch

from agrpo.errors import AgrpoError
from agrpo.sampling import Rollout

EOS_STEPS = ("include", "exclude")


def horizon(rollout: Rollout, eos_steps: str = "include") -> torch.Tensor:
    """[B] long: the number of leading denoising steps of each row that enter the loss.

    `exclude` is the official code's T_eff: the last step that committed a non-EOS token, + 1.
    EOS tokens the policy sampled after it (its decision to end the answer) then get no
    gradient, and the estimate is unbiased only for that truncated sum (AGRPO.md §5).
    `include` runs to the last step that sampled anything, + 1, so those EOS decisions are
    learned too. The EOS fill after an early stop is never sampled: it is in neither.
    """
    if eos_steps == "exclude":
        return rollout.t_eff
    if eos_steps == "include":
        last = torch.where(rollout.sampled, rollout.step + 1, torch.zeros_like(rollout.step))
        return last.max(1).values
    raise AgrpoError(f"unknown eos_steps {eos_steps!r}: choose one of {', '.join(EOS_STEPS)}")


def clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float,
    log_ratio_clamp: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(-min(rho A, clip(rho) A), rho, clipped) per token; all tensors broadcast together.
    `log_ratio_clamp` = c > 0: rho = exp(clamp(logp - old, -c, c)) (the block-model trainers' guard)."""
    d = logp - old_logp
    ratio = torch.exp(d.clamp(-log_ratio_clamp, log_ratio_clamp) if log_ratio_clamp > 0 else d)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    return loss, ratio, (clipped < unclipped)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, ratio: torch.Tensor | None = None) -> torch.Tensor:
    """k3 estimate of KL(pi || ref) per token, importance-corrected by rho when given."""
    diff = ref_logp - logp
    kl = torch.exp(diff) - diff - 1.0
    return kl if ratio is None else ratio * kl


def truncated_is(old_exact: torch.Tensor, behaviour: torch.Tensor, cap: float) -> torch.Tensor:
    """min(pi_old / mu, C) per token: the weight that makes tokens drawn from a behaviour distribution mu (an
    approximate sampler's) count as draws from pi_old, truncated at C (truncated importance sampling, the
    practice of LLM trainers whose inference engine is not the trainer). Detached: a weight, not a gradient path."""
    return torch.exp((old_exact - behaviour).detach()).clamp(max=cap)


def new_old_store(rollout: Rollout) -> torch.Tensor:
    """[B, C] float64, NaN: the exact old log-probs of a batch's tokens, filled as its first update scores them."""
    return torch.full(rollout.step.shape, float("nan"), dtype=torch.float64, device=rollout.step.device)


def exact_old_log_probs(store: torch.Tensor, row: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor,
                        logp: torch.Tensor) -> torch.Tensor:
    """log pi_old of the tokens at (row, pos): read from `store` ([B, C], NaN = not yet scored), or, for a token
    scored for the first time (the batch's first update, before any optimizer step), the current log-prob
    detached, which is then written to `store` for the batch's later updates."""
    rows = row[:, None].expand_as(pos)
    seen = store[rows, pos]
    old = torch.where(torch.isnan(seen), logp.detach().to(store.dtype), seen)
    store[rows[valid], pos[valid]] = old[valid]
    return old.to(logp.dtype)
