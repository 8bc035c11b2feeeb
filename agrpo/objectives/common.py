"""Per-token pieces shared by the objectives: clipped surrogate and k3 KL (AGRPO.md §2)."""

from __future__ import annotations

import torch


def clipped_surrogate(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(-min(rho A, clip(rho) A), rho, clipped) per token; all tensors broadcast together."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages
    loss = -torch.minimum(unclipped, clipped)
    return loss, ratio, (clipped < unclipped)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, ratio: torch.Tensor | None = None) -> torch.Tensor:
    """k3 estimate of KL(pi || ref) per token, importance-corrected by rho when given."""
    diff = ref_logp - logp
    kl = torch.exp(diff) - diff - 1.0
    return kl if ratio is None else ratio * kl
