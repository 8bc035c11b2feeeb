"""wd1 (arXiv 2507.08838; xiaohangt/wd1): weighted likelihood, no ratio (ALGORITHMS.md, wd1).

l_i is proxy 1 (d1's one-step mean-field estimate: every completion position masked, each real prompt
token masked with probability `prompt_mask_p`), summed over the valid tokens (no length normalisation).
Per group g of one prompt, A centred, over its valid rows:

    loss_g = -sum_i softmax(A)_i l_i + sum_i softmax(-A)_i l_i          (variant wll_P: the first term alone)
    loss   = (1/groups) sum_g loss_g

`groups` counts the groups holding a valid row over every micro-batch and process. No old log-probs,
clip or KL. Each inner update has a prompt mask of its own, drawn in `prepare`.

Versus the official code: its softmax runs over the per-device batch, right only when that batch is one
group (ALGORITHMS.md lists it as a defect); here it runs per group. Averaging over groups rather than
summing makes the loss scale independent of how many prompts a step holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from agrpo.errors import AgrpoError
from agrpo.objectives.base import Context, Objective, Part, register
from agrpo.objectives.diffu_grpo import random_prompt_mask
from agrpo.objectives.proxies import row_chunks, run_pieces, token_logp, valid_tokens


@dataclass
class WD1Settings:
    positive_only: bool = field(default=False, metadata={"help": "wll_P: keep only the positive term -softmax(A) l"})
    prompt_mask_p: float = field(default=0.15, metadata={"help": "probability of masking each prompt token in the one-step estimate"})


def group_softmax(values: torch.Tensor, keep: torch.Tensor, group_size: int) -> torch.Tensor:
    """[b] softmax of `values` over the valid rows of each consecutive group (0 on invalid rows)."""
    grid = torch.where(keep, values, torch.full_like(values, -math.inf)).view(-1, group_size)
    ok = keep.view(-1, group_size)
    w = torch.softmax(torch.where(ok.any(1, keepdim=True), grid, torch.zeros_like(grid)), dim=1)
    return torch.where(ok, w, torch.zeros_like(w)).flatten()


def wd1_weights(advantages: torch.Tensor, keep: torch.Tensor, group_size: int, positive_only: bool) -> torch.Tensor:
    """[B] the coefficient of -l_i: softmax(A)_i - softmax(-A)_i (wll_P: softmax(A)_i)."""
    adv = advantages.double()
    w = group_softmax(adv, keep, group_size)
    return w if positive_only else w - group_softmax(-adv, keep, group_size)


@register
class WD1(Objective):
    name = "wd1"
    settings = WD1Settings
    summary = "wd1: likelihood weighted by softmax(A) - softmax(-A) per group, no ratio (ALGORITHMS.md)"

    def check(self, cfg) -> None:
        s = getattr(cfg, self.name, None) or WD1Settings()
        if not 0 <= s.prompt_mask_p < 1:
            raise AgrpoError(f"wd1.prompt_mask_p must be in [0, 1), got {s.prompt_mask_p}")

    def prepare(self, ctx: Context, parts: list[Part]) -> None:
        cfg, s = ctx.cfg, ctx.settings or WD1Settings()
        for part in parts:
            rows = part.rollout.tokens.shape[0]
            if rows % cfg.group_size:
                raise AgrpoError(f"wd1 needs whole groups in a micro-batch: {rows} rows, group_size={cfg.group_size}")
            if "prompt_masks" not in part.state:
                part.state["prompt_masks"] = [random_prompt_mask(part.rollout, s.prompt_mask_p, part.generator) for _ in range(cfg.inner_steps)]
            part.state["weights"] = wd1_weights(part.advantages, part.valid, cfg.group_size, s.positive_only)

    def update(self, ctx: Context, parts: list[Part], inner: int) -> dict:
        cfg = ctx.cfg

        def loss_of(part, rows, total):
            ro = part.rollout
            sub = type(ro)(**{k: (v[rows] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == ro.tokens.shape[0] else v)
                              for k, v in ro.__dict__.items()})
            everything = torch.ones_like(sub.completion, dtype=torch.bool)
            logp = token_logp(ctx.policy, sub, everything, part.state["prompt_masks"][inner][rows])
            l = torch.where(valid_tokens(sub), logp, torch.zeros_like(logp)).sum(1)
            w = part.state["weights"][rows].to(l.dtype)
            keep = part.valid[rows]
            return -(w * l).sum() / total, {"clip_frac": 0.0, "kl": 0.0, "loss_tokens": int(keep.sum())}

        def count(part):
            return float(part.valid.view(-1, cfg.group_size).any(1).sum())

        return run_pieces(ctx, parts, lambda p: row_chunks(p.rollout.tokens.shape[0], cfg.max_rows_per_forward), loss_of, count)
