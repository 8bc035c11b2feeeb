"""StableDRL (arXiv 2603.06743) (ALGORITHMS.md, StableDRL): SPG's bounds with self-normalised weights.

SPG's block-wise copies and bounds (see spg.py: ELBO_i, and L^_i = ELBO_i if A_i > 0 else the bound,
mix by default: K 2, beta 1.5, omega 0.5). Per group g of one prompt, over its valid rows:

    log w_i = stopgrad(min(ELBO_theta(o_i) - ELBO_old(o_i), log clip_weight))
    w~_i    = softmax over the group of log w
    loss    = (1/groups) sum_g ( -sum_{i in g} w~_i A_i L^_i )

with `groups` the groups holding a valid row over every micro-batch and process (the paper's sum runs
over one prompt; averaging over prompts makes the loss independent of how a batch is split). A centred.
Each inner update has masks of its own, drawn in `prepare`, where ELBO_old is taken under them.
A forward holds whole groups (group_size x copies sequences at least), since the weights of a group
need all its rows. No official code was available: the formula is from the paper's description.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from agrpo.errors import AgrpoError
from agrpo.objectives.base import Context, Objective, Part, register
from agrpo.objectives.proxies import row_chunks, run_pieces
from agrpo.objectives.spg import draw_block_copies, spg_check, spg_values


@dataclass
class StableDRLSettings:
    bound: Literal["elbo", "eubo", "mix"] = field(default="mix", metadata={"help": "likelihood of negative-advantage rows (SPG's bounds)"})
    copies: int = field(default=2, metadata={"help": "block-masked copies per completion (K)"})
    eubo_beta: float = field(default=1.5, metadata={"help": "EUBO's beta"})
    omega: float = field(default=0.5, metadata={"help": "mix weight of the EUBO"})
    block_length: int = field(default=0, metadata={"help": "mask block length (0: the sampler's block_length)"})
    prompt_mask_p: float = field(default=0.15, metadata={"help": "probability of masking each clean position before the chosen block"})
    clip_weight: float = field(default=5.0, metadata={"help": "importance weights are clamped above at this value before the group softmax"})


def group_weights(log_w: torch.Tensor, keep: torch.Tensor, group_size: int) -> torch.Tensor:
    """[b] softmax of log_w over the valid rows of each consecutive group (0 on invalid rows)."""
    grid = torch.where(keep, log_w, torch.full_like(log_w, -math.inf)).view(-1, group_size)
    any_valid = keep.view(-1, group_size).any(1, keepdim=True)
    w = torch.softmax(torch.where(any_valid, grid, torch.zeros_like(grid)), dim=1)
    return torch.where(keep.view(-1, group_size), w, torch.zeros_like(w)).flatten()


@register
class StableDRL(Objective):
    name = "stabledrl"
    settings = StableDRLSettings
    summary = "StableDRL: SPG's mix bound with clamped, group-self-normalised importance weights (ALGORITHMS.md)"

    def check(self, cfg) -> None:
        s = getattr(cfg, self.name, None) or StableDRLSettings()
        spg_check(s, cfg, self.name)
        if s.clip_weight <= 0:
            raise AgrpoError(f"stabledrl.clip_weight must be > 0, got {s.clip_weight}")

    def prepare(self, ctx: Context, parts: list[Part]) -> None:
        cfg, s = ctx.cfg, ctx.settings or StableDRLSettings()
        for part in parts:
            rows = part.rollout.tokens.shape[0]
            if rows % cfg.group_size:
                raise AgrpoError(f"stabledrl needs whole groups in a micro-batch: {rows} rows, group_size={cfg.group_size}")
            if "masks" not in part.state:
                part.state["masks"] = [draw_block_copies(part, s, cfg) for _ in range(cfg.inner_steps)]
            with torch.no_grad():
                part.state["olds"] = [
                    torch.cat([spg_values(ctx.policy, part, r, m.rows(r), s)[0] for r in self._chunks(cfg, s, rows)])
                    for m in part.state["masks"]
                ]

    @staticmethod
    def _chunks(cfg, s, rows):
        groups = max(cfg.max_rows_per_forward // (s.copies * cfg.group_size), 1)
        return row_chunks(rows, groups * cfg.group_size)

    def update(self, ctx: Context, parts: list[Part], inner: int) -> dict:
        cfg, s = ctx.cfg, ctx.settings or StableDRLSettings()

        def loss_of(part, rows, total):
            elbo, bound, _ = spg_values(ctx.policy, part, rows, part.state["masks"][inner].rows(rows), s)
            adv = part.advantages[rows].to(elbo.dtype)
            keep = part.valid[rows]
            log_w = (elbo.detach() - part.state["olds"][inner][rows].to(elbo.dtype)).clamp(max=math.log(s.clip_weight))
            w = group_weights(log_w, keep, cfg.group_size)
            value = torch.where(adv > 0, elbo, bound)
            per_row = torch.where(keep, -w * adv * value, torch.zeros_like(value))
            clipped = (log_w >= math.log(s.clip_weight)) & keep
            n = int(keep.sum())
            return per_row.sum() / total, {"clip_frac": float(clipped.sum()) / max(n, 1), "kl": 0.0, "loss_tokens": n}

        def count(part):
            return float(part.valid.view(-1, cfg.group_size).any(1).sum())

        return run_pieces(ctx, parts, lambda p: self._chunks(cfg, s, p.rollout.tokens.shape[0]), loss_of, count)
