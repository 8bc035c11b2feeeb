"""ESPO (arXiv 2512.03759; ML-GSAI/ESPO): a sequence-level action scored by its ELBO (ALGORITHMS.md, ESPO).

ELBO(o) is proxy 2 over the completion: `copies` stratified mask counts, each copy weighted 1/t, the
prompt never masked, and with `complement` each copy paired with its complement (weight 1/(1-t)).
With L the fixed generation length, B the valid rows of the whole batch (every micro-batch and process):

    rho_i = exp((ELBO_theta(o_i) - ELBO_old(o_i)) / L)
    loss  = -(1/B) sum_i min(rho_i A_i, clip(rho_i, 1 - eps_low, 1 + eps_high) A_i)
            + beta (1/(B L)) sum_i 1/2 (ELBO_theta(o_i) - ELBO_ref(o_i))^2      (k2 penalty, ref = base)

A is leave-one-out without std. Masks: a fresh set per inner update, all drawn in `prepare` from the
micro-batch's generator (updates in order, copies in order); the old and reference ELBOs of an update
are taken under its masks before the first update.

Versus the official code: `tokens=all` (the default, the paper's) scores all L positions, EOS padding
included; `tokens=valid` restricts the masks to the valid tokens and still divides by L (DARE's port).
A copy that masks every position has an empty complement: it then stands alone for its pair, which keeps
the estimator unbiased (a 1/(1-t) weight on nothing is not defined).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from agrpo.errors import AgrpoError
from agrpo.objectives.advantages import loo_advantages
from agrpo.objectives.base import Context, Objective, Part, register
from agrpo.objectives.proxies import Copies, copies_logp, elbo_copies, row_chunks, run_pieces, sequence_elbo, valid_tokens


@dataclass
class ESPOSettings:
    copies: int = field(default=2, metadata={"help": "Monte Carlo mask draws per completion (each with its complement when complement=true)"})
    complement: bool = field(default=True, metadata={"help": "pair each mask with its complement, weighted 1/(1-t) (antithetic)"})
    tokens: Literal["all", "valid"] = field(
        default="all", metadata={"help": "positions the ELBO masks: all L (the paper) or the valid ones (DARE's port); both divide by L"}
    )


def espo_eligible(part: Part, tokens: str) -> torch.Tensor:
    ro = part.rollout
    if tokens == "valid":
        return valid_tokens(ro)
    return torch.ones_like(ro.completion, dtype=torch.bool)


def elbo_of(policy, part: Part, copies: Copies, max_rows: int) -> torch.Tensor:
    """[B] ELBO of every row of the part under `copies`, in forwards of at most max_rows sequences."""
    rows = part.rollout.tokens.shape[0]
    per = max(max_rows // copies["completion"].shape[1], 1)
    return torch.cat([sequence_elbo(copies_logp(policy, part.rollout, s, copies.rows(s)), copies.rows(s)) for s in row_chunks(rows, per)])


@register
class ESPO(Objective):
    name = "espo"
    settings = ESPOSettings
    summary = "ESPO: sequence ELBO (stratified + complement masks), ratio exp(dELBO / L), k2 penalty (ALGORITHMS.md)"

    def check(self, cfg) -> None:
        s = getattr(cfg, self.name, None) or ESPOSettings()
        if s.copies < 1:
            raise AgrpoError(f"espo.copies must be >= 1, got {s.copies}")

    def advantages(self, rewards, group_size, cfg):
        return loo_advantages(rewards, group_size)

    def prepare(self, ctx: Context, parts: list[Part]) -> None:
        cfg, s = ctx.cfg, ctx.settings or ESPOSettings()
        for part in parts:
            if "masks" not in part.state:
                eligible = espo_eligible(part, s.tokens)
                part.state["masks"] = [elbo_copies(eligible, s.copies, part.generator, s.complement) for _ in range(cfg.inner_steps)]
            with torch.no_grad():
                part.state["olds"] = [elbo_of(ctx.policy, part, m, cfg.max_rows_per_forward) for m in part.state["masks"]]
                part.state["refs"] = [
                    elbo_of(ctx.ref_logits_fn, part, m, cfg.max_rows_per_forward) if cfg.beta > 0 else None
                    for m in part.state["masks"]
                ]

    def update(self, ctx: Context, parts: list[Part], inner: int) -> dict:
        cfg = ctx.cfg

        def chunks(part):
            k = part.state["masks"][inner]["completion"].shape[1]
            return row_chunks(part.rollout.tokens.shape[0], cfg.max_rows_per_forward // k)

        def loss_of(part, rows, total):
            copies = part.state["masks"][inner].rows(rows)
            length = part.rollout.completion.shape[1]
            elbo = sequence_elbo(copies_logp(ctx.policy, part.rollout, rows, copies), copies)
            old = part.state["olds"][inner][rows].to(elbo.dtype)
            adv = part.advantages[rows].to(elbo.dtype)
            keep = part.valid[rows]
            ratio = torch.exp((elbo - old) / length)
            clipped = ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high)
            per_row = -torch.minimum(ratio * adv, clipped * adv)
            kl = torch.zeros_like(per_row)
            if cfg.beta > 0:
                kl = 0.5 * (elbo - part.state["refs"][inner][rows].to(elbo.dtype)) ** 2 / length
                per_row = per_row + cfg.beta * kl
            loss = torch.where(keep, per_row, torch.zeros_like(per_row)).sum() / total
            n = int(keep.sum())
            metrics = {
                "clip_frac": float(((clipped * adv < ratio * adv) & keep).sum()) / max(n, 1),
                "kl": float(kl.detach()[keep].sum()) / max(n, 1),
                "loss_tokens": n,
            }
            return loss, metrics

        return run_pieces(ctx, parts, chunks, loss_of, lambda p: int(p.valid.sum()))
