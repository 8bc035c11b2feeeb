"""BGPO, Boundary-Guided Policy Optimization (arXiv 2510.11683; THU-KEG/BGPO) (ALGORITHMS.md, BGPO).

Proxy 2 with `copies` stratified copies restricted to the n valid tokens (never zero masked). For copy
k of row i, with R the padded response length and B the valid rows of the whole batch:

    l_ik = (n_i / |M_k|) sum_{j in M_k} log p_k(o_j) / R,      d_ik = l_ik^theta - l_ik^old
    r_ik = 1 + d_ik if A_i > 0 (first-order lower bound of exp), exp(d_ik) if A_i <= 0
    loss = (1/copies) sum_k -(1/B) sum_i min(r_ik A_i, clip(r_ik, 1 - eps_low, 1 + eps_high) A_i)

A is z-normalised within the group, no KL. Each copy's loss is back-propagated on its own (divided by
`copies`), so memory holds one copy's activations whatever the number of copies: the method's point.
Masks: a set per inner update (the paper runs one), drawn in `prepare`, where l^old is taken.

Versus DARE's port: `dual_clip` (its c = 3 bound on negative-advantage terms) is off by default, as in
the paper's formula; set it to 3 to reproduce the port. 1 + d may be <= 0: it is used as is (no log).
The official repository was not readable: facts from the paper and DARE's port.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from agrpo.errors import AgrpoError
from agrpo.objectives.advantages import z_advantages
from agrpo.objectives.base import Context, Objective, Part, register
from agrpo.objectives.proxies import Copies, copies_logp, elbo_copies, row_chunks, run_pieces, valid_tokens


@dataclass
class BGPOSettings:
    copies: int = field(default=16, metadata={"help": "stratified Monte Carlo copies per completion, each back-propagated on its own"})
    dual_clip: float = field(default=0.0, metadata={"help": "bound negative-advantage terms by c A (DARE's port: 3; 0: off, the paper)"})


def copy_terms(policy, part: Part, rows, copies: Copies, drawn: int) -> torch.Tensor:
    """[b, k] the per-copy estimate (n / |M_k|) sum_{M_k} log p_k / R of the rows `rows`, for copies of a
    set of `drawn` (their coef is (n / |M_k|) / drawn)."""
    logp = copies_logp(policy, part.rollout, rows, copies)
    picked = torch.where(copies["completion"], logp, torch.zeros_like(logp)).sum(-1)
    return picked * (copies["coef"].to(logp.dtype) * drawn) / part.rollout.completion.shape[1]


@register
class BGPO(Objective):
    name = "bgpo"
    settings = BGPOSettings
    summary = "BGPO: per-copy ELBO ratios, linear lower bound for positive advantages, one copy per backward (ALGORITHMS.md)"

    def check(self, cfg) -> None:
        s = getattr(cfg, self.name, None) or BGPOSettings()
        if s.copies < 1 or (s.dual_clip and s.dual_clip <= 1):
            raise AgrpoError(f"bgpo needs copies >= 1 and dual_clip 0 (off) or > 1, got {s.copies}, {s.dual_clip}")

    def advantages(self, rewards, group_size, cfg):
        return z_advantages(rewards, group_size)

    def prepare(self, ctx: Context, parts: list[Part]) -> None:
        cfg, s = ctx.cfg, ctx.settings or BGPOSettings()
        for part in parts:
            if "masks" not in part.state:
                eligible = valid_tokens(part.rollout)
                part.state["masks"] = [elbo_copies(eligible, s.copies, part.generator) for _ in range(cfg.inner_steps)]
            rows = part.rollout.tokens.shape[0]
            with torch.no_grad():
                part.state["olds"] = [
                    torch.cat([copy_terms(ctx.policy, part, r, m.rows(r), s.copies) for r in row_chunks(rows, cfg.max_rows_per_forward // s.copies)])
                    for m in part.state["masks"]
                ]

    def update(self, ctx: Context, parts: list[Part], inner: int) -> dict:
        cfg, s = ctx.cfg, ctx.settings or BGPOSettings()

        def chunks(part):  # one copy of a chunk of rows a backward
            return [(k, r) for k in range(s.copies) for r in row_chunks(part.rollout.tokens.shape[0], cfg.max_rows_per_forward)]

        def loss_of(part, key, total):
            k, rows = key
            one = Copies({n: (None if v is None else v[rows][:, k : k + 1]) for n, v in part.state["masks"][inner].items()})
            cur = copy_terms(ctx.policy, part, rows, one, s.copies)[:, 0]
            d = cur - part.state["olds"][inner][rows, k].to(cur.dtype)
            adv = part.advantages[rows].to(cur.dtype)
            keep = part.valid[rows]
            ratio = torch.where(adv > 0, 1.0 + d, torch.exp(d))
            clipped = ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high)
            objective = torch.minimum(ratio * adv, clipped * adv)
            if s.dual_clip:
                objective = torch.where(adv < 0, torch.maximum(objective, s.dual_clip * adv), objective)
            per_row = torch.where(keep, -objective, torch.zeros_like(objective))
            n = int(keep.sum())
            frac = float(((clipped * adv < ratio * adv) & keep).sum()) / max(n, 1)
            return per_row.sum() / (total * s.copies), {"clip_frac": frac, "kl": 0.0, "loss_tokens": n}

        return run_pieces(ctx, parts, chunks, loss_of, lambda p: int(p.valid.sum()))
