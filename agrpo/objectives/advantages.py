"""Group-relative advantages (AGRPO.md §2): A_j = r_j - mean(r over the group)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from agrpo.errors import AgrpoError


def group_advantages(
    rewards: Sequence[float | None] | torch.Tensor,
    group_size: int,
    scale_std: bool = False,
    eps: float = 1e-4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [N] float32, valid [N] bool) for N = groups * group_size rewards.

    Rows are grouped consecutively (prompt 0's completions first). A `None` (or NaN)
    reward means the grader could not judge the completion: the row is left out of its
    group's mean and std and gets advantage 0 with valid=False, so the objectives drop it
    instead of treating it as a zero reward. `scale_std` divides by the group's std + eps
    (the official code leaves it off).
    """
    if group_size < 1:
        raise AgrpoError(f"group_size must be >= 1, got {group_size}")
    if isinstance(rewards, torch.Tensor):
        values = rewards.detach().double().flatten()
    else:
        values = torch.tensor(
            [math.nan if r is None else float(r) for r in rewards], dtype=torch.float64
        )
    n = values.numel()
    if n == 0 or n % group_size:
        raise AgrpoError(
            f"got {n} rewards, not a multiple of group_size={group_size}: a reward function must "
            f"return one value (or None) per completion"
        )
    if bool(torch.isinf(values).any()):
        raise AgrpoError("a reward is infinite: reward functions must return finite floats or None")
    grid = values.view(-1, group_size)
    valid = ~torch.isnan(grid)
    count = valid.sum(1, keepdim=True)
    filled = torch.where(valid, grid, torch.zeros_like(grid))
    mean = filled.sum(1, keepdim=True) / count.clamp(min=1)
    adv = torch.where(valid, grid - mean, torch.zeros_like(grid))
    if scale_std:
        var = (adv**2).sum(1, keepdim=True) / (count - 1).clamp(min=1)
        adv = adv / (var.sqrt() + eps)
    return adv.flatten().float(), valid.flatten()
