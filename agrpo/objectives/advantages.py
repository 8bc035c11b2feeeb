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


# -- estimators an objective may choose (ALGORITHMS.md, Notation) -----------------------------------
# Each returns (advantages [N] float32, valid [N] bool) as `group_advantages` does: a None (or NaN)
# reward leaves its row out of its group's statistics, with advantage 0 and valid=False.

def _grid(rewards, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """([groups, G] float64 rewards with 0 where invalid, [groups, G] valid), checked as group_advantages does."""
    _, valid = group_advantages(rewards, group_size)  # its checks and its reading of None / NaN
    if isinstance(rewards, torch.Tensor):
        values = rewards.detach().double().flatten()
    else:
        values = torch.tensor([math.nan if r is None else float(r) for r in rewards], dtype=torch.float64)
    grid, ok = values.view(-1, group_size), valid.view(-1, group_size)
    return torch.where(ok, grid, torch.zeros_like(grid)), ok


def centred_advantages(rewards, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A = r - mean of the group's valid rewards."""
    grid, ok = _grid(rewards, group_size)
    mean = grid.sum(1, keepdim=True) / ok.sum(1, keepdim=True).clamp(min=1)
    return torch.where(ok, grid - mean, torch.zeros_like(grid)).flatten().float(), ok.flatten()


def loo_advantages(rewards, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Leave-one-out: A_i = r_i - mean_{j != i} r_j over the group's valid rewards (0 for a lone valid row)."""
    grid, ok = _grid(rewards, group_size)
    count = ok.sum(1, keepdim=True)
    others = (grid.sum(1, keepdim=True) - grid) / (count - 1).clamp(min=1)
    adv = torch.where(ok & (count > 1), grid - others, torch.zeros_like(grid))
    return adv.flatten().float(), ok.flatten()


def z_advantages(rewards, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """z: (r - mean) / std with the population std of the group's valid rewards; 0 when that std is 0."""
    grid, ok = _grid(rewards, group_size)
    count = ok.sum(1, keepdim=True).clamp(min=1)
    centred = torch.where(ok, grid - grid.sum(1, keepdim=True) / count, torch.zeros_like(grid))
    std = ((centred**2).sum(1, keepdim=True) / count).sqrt()
    adv = torch.where(std > 0, centred / torch.where(std > 0, std, torch.ones_like(std)), torch.zeros_like(centred))
    return adv.flatten().float(), ok.flatten()


def accuracy_filter(rewards, group_size: int, correct_at: float, low: float, high: float) -> torch.Tensor:
    """[N] bool: the rows of the groups whose accuracy lies in [low, high] (a group filter).

    A group's accuracy is the fraction of its valid rewards that are >= `correct_at`; a group with
    no valid reward has none and is left out. TraceRL keeps 0.2 <= accuracy <= 0.8 (it drops the
    groups above 0.8 or below 0.2).
    """
    grid, ok = _grid(rewards, group_size)
    count = ok.sum(1)
    right = ((grid >= correct_at) & ok).sum(1)
    accuracy = right.double() / count.clamp(min=1).double()  # one rounding: k/n equals the literal k/n
    keep = (count > 0) & (accuracy >= low) & (accuracy <= high)
    return keep[:, None].expand_as(ok).flatten()
