"""DiPO (DiRL, arXiv 2512.22234; OpenMOSS/DiRL) on block-diffusion models (ALGORITHMS.md, DiPO).

Trajectory replay (proxy 5) in the block-diffusion training layout: round r scores, in every block of a
completion at once, the tokens that block committed at its r-th denoising step, in the state before that
step (the block's tokens committed at or after it are [MASK], earlier blocks clean, later blocks unseen),
one forward per round (`block_replay.every_block_step_plan`). Every step of every block is scored once.
With l_j the log-probability of o_j under the sampler's filtered, tempered distribution at that state,
l_j^old the sampler's record (the policy that drew the rollout, which is the policy before the update: the
same numbers the trainer would recompute), d_j = clamp(l_j - l_j^old, -c, c) with c = `log_ratio_clamp`
(10), rho_j = exp(d_j) and T the target tokens of the whole batch (every process; the token mean is the
formula's, whatever `normalization` says):

    loss = (1/|T|) sum_{j in T} [ -min(rho_j A, clip(rho_j, 1 - eps_low, 1 + eps_high) A) + beta k3_j ]

with eps_low 0.2 and eps_high 0.28 (the preset's), and k3_j = exp(l^ref - l) - (l^ref - l) - 1 against
the reference (the base: the adapter switched off, or a frozen copy), importance-weighted by rho_j as in
AGRPO. A: z within the group, after DAPO's filter: groups whose valid rewards are all equal are dropped
(for 0/1 rewards, the paper's 0 < group accuracy < 1; for graded rewards, the same condition on the
rewards themselves), so they do not dilute the token mean.

Versus the official code: rollouts there come from an inference server whose probabilities are not the
trainer's; here the sampler records the exact probabilities of the policy it samples, so the first
update's ratio is exactly 1. It runs only on block-diffusion models (on others there is no block layout).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from agrpo.errors import AgrpoError
from agrpo.objectives.advantages import z_advantages
from agrpo.objectives.agrpo import replay_update
from agrpo.objectives.base import Context, Objective, Part, register
from agrpo.objectives.block_replay import every_block_step_plan
from agrpo.policy import unwrap


@dataclass
class DiPOSettings:
    log_ratio_clamp: float = field(default=10.0, metadata={"help": "the log-ratio is clamped to [-c, c] before the exponential (0: off)"})
    filter_groups: bool = field(default=True, metadata={"help": "drop groups whose rewards are all equal (DAPO's filter)"})


def dipo_advantages(rewards, group_size: int, filter_groups: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """z advantages; with the filter, rows of groups whose valid rewards are all equal are not valid."""
    adv, valid = z_advantages(rewards, group_size)
    if filter_groups:
        grid = torch.tensor([float("nan") if r is None else float(r) for r in rewards], dtype=torch.float64)
        grid = grid.view(-1, group_size)
        ok = ~torch.isnan(grid)
        hi = torch.where(ok, grid, torch.full_like(grid, -float("inf"))).amax(1)
        lo = torch.where(ok, grid, torch.full_like(grid, float("inf"))).amin(1)
        spread = (hi > lo)[:, None].expand_as(grid).flatten()
        valid = valid & spread
    return adv, valid


@register
class DiPO(Objective):
    name = "dipo"
    settings = DiPOSettings
    summary = "DiPO (DiRL): every step of every block replayed, a step of each block a forward; token-mean clipped ratio (block models)"
    block_models_only = True

    def check(self, cfg) -> None:
        s = getattr(cfg, self.name, None) or DiPOSettings()
        if s.log_ratio_clamp < 0:
            raise AgrpoError(f"dipo.log_ratio_clamp must be >= 0 (0: off), got {s.log_ratio_clamp}")

    def advantages(self, rewards, group_size, cfg):
        s = getattr(cfg, self.name, None) or DiPOSettings()
        return dipo_advantages(rewards, group_size, s.filter_groups)

    def update(self, ctx: Context, parts: list[Part], inner: int) -> dict:
        if unwrap(ctx.policy).block_size is None:
            raise AgrpoError("dipo replays block by block: it needs a block-diffusion model (SDAR, TraDo, LLaDA2)")
        cfg, s = ctx.cfg, ctx.settings or DiPOSettings()
        plans = [every_block_step_plan(p.rollout, "token", p.valid, cfg.eos_steps) for p in parts]
        return replay_update(ctx, parts, plans, s.log_ratio_clamp)
