"""UniGRPO (MMaDA, arXiv 2505.15809): ALGORITHMS.md, UniGRPO.

MMaDA publishes no text-RL code; this is the version built here from the paper. Each completion o_i gets
m independent corrupted copies per update: copy k draws t_ik ~ U[t_min, t_max] and masks each completion
position with probability t_ik (the prompt is never masked). Copy k scores the tokens
T_ik = {masked} & {valid} (valid: up to and including the first EOS) by log p_theta(o_j | x~_ik), with no
1/t weight. Each copy is a row of a per-token clipped surrogate (as TraceRL's rows): with R the rows with a
reward and a non-empty T_ik over the whole batch (every micro-batch and process),

    loss = (1/R) sum_{(i,k)} (1/|T_ik|) sum_{j in T_ik} [ -min(rho_ikj A_i, clip(rho_ikj, 1 - eps_low, 1 + eps_high) A_i)
                                                       + beta k3(log p_ref, log p_theta) ]

rho_ikj = exp(log p_theta(o_j | x~_ik) - log p_old(o_j | x~_ik)); old and reference log-probs are taken under
the update's masks before the first update. The k3 penalty is GRPO's (not importance-weighted); it is on
only when beta > 0. Advantages are the recipe's group advantages (the preset sets scale_std: the paper
normalises by the group's std).

Draws: every update's masks are drawn in `prepare` from the micro-batch's generator, updates in order,
for each update first t [B, m] and then the coins [B, m, C]. A copy with no masked valid token has no
row (it would be an empty mean). The masks span all C completion positions, EOS padding included; only
valid tokens are scored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from agrpo.errors import AgrpoError
from agrpo.objectives.base import Context, Objective, Part, register
from agrpo.objectives.coupled_grpo import backward_pieces, learned_tokens, masked_copies_logp, row_chunks


def independent_masks(
    shape: tuple[int, int], copies: int, t_min: float, t_max: float, generator: torch.Generator | None = None,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t [B, m] float64, masked [B, m, C] bool): per (row, copy) a ratio t ~ U[t_min, t_max] and each of
    the C completion positions masked with probability t, independently."""
    b, c = shape
    t = t_min + (t_max - t_min) * torch.rand((b, copies), generator=generator, device=device, dtype=torch.float64)
    coins = torch.rand((b, copies, c), generator=generator, device=device, dtype=torch.float64)
    return t, coins < t[:, :, None]


def copy_rows(masked: torch.Tensor, learned: torch.Tensor) -> torch.Tensor:
    """[B, m, C] bool: the scored tokens T_ik = masked & learned (learned [B, C])."""
    return masked & learned[:, None, :]


@dataclass
class UniGRPOSettings:
    copies: int = field(default=1, metadata={"help": "independently masked copies per completion and update (m); each is a row of the loss"})
    t_min: float = field(default=0.1, metadata={"help": "lower end of each copy's mask ratio t ~ U[t_min, t_max]"})
    t_max: float = field(default=0.9, metadata={"help": "upper end of the mask ratio"})


@register
class UniGRPO(Objective):
    name = "unigrpo"
    settings = UniGRPOSettings
    summary = "UniGRPO (MMaDA): m independently masked copies per completion, each a row of a token-clipped surrogate (ALGORITHMS.md)"

    def check(self, cfg) -> None:
        s = getattr(cfg, self.name, None) or UniGRPOSettings()
        if s.copies < 1:
            raise AgrpoError(f"unigrpo.copies must be >= 1, got {s.copies}")
        if not 0 < s.t_min <= s.t_max <= 1:
            raise AgrpoError(f"unigrpo needs 0 < t_min <= t_max <= 1, got t_min={s.t_min}, t_max={s.t_max}")

    def _all_rows(self, policy, part: Part, masked: torch.Tensor, max_rows: int) -> torch.Tensor:
        rows = torch.arange(part.rollout.tokens.shape[0], device=part.rollout.tokens.device)
        per = max_rows // masked.shape[1]
        return torch.cat([masked_copies_logp(policy, part.rollout, r, masked[r]) for r in row_chunks(rows, per)])

    def prepare(self, ctx: Context, parts: list[Part]) -> None:
        cfg, s = ctx.cfg, ctx.settings or UniGRPOSettings()
        for part in parts:
            ro = part.rollout
            if "masks" not in part.state:
                draws = [
                    independent_masks(tuple(ro.completion.shape), s.copies, s.t_min, s.t_max, part.generator, ro.tokens.device)
                    for _ in range(cfg.inner_steps)
                ]
                part.state["t"] = [t for t, _ in draws]
                part.state["masks"] = [m for _, m in draws]
            with torch.no_grad():
                masks = part.state["masks"]
                part.state["olds"] = [self._all_rows(ctx.policy, part, m, cfg.max_rows_per_forward) for m in masks]
                part.state["refs"] = [
                    self._all_rows(ctx.ref_logits_fn, part, m, cfg.max_rows_per_forward) if cfg.beta > 0 else None for m in masks
                ]

    def update(self, ctx: Context, parts: list[Part], inner: int) -> dict:
        cfg = ctx.cfg

        def scored(part):
            return copy_rows(part.state["masks"][inner], learned_tokens(part))  # [B, m, C]

        def chunks(part):
            rows = torch.nonzero(scored(part).any(-1).any(-1)).flatten()
            return row_chunks(rows, cfg.max_rows_per_forward // part.state["masks"][inner].shape[1])

        def loss_of(part, rows, total):
            masked = part.state["masks"][inner][rows]
            keep = scored(part)[rows]  # [b, m, C]
            logp = masked_copies_logp(ctx.policy, part.rollout, rows, masked)
            old = part.state["olds"][inner][rows].to(logp.dtype)
            adv = part.advantages[rows].to(logp.dtype)[:, None, None]
            ratio = torch.exp(logp - old)
            clipped = ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high) * adv
            per_tok = -torch.minimum(ratio * adv, clipped)
            kl = torch.zeros_like(per_tok)
            if cfg.beta > 0:
                diff = part.state["refs"][inner][rows].to(logp.dtype) - logp
                kl = torch.exp(diff) - diff - 1.0
                per_tok = per_tok + cfg.beta * kl
            size = keep.sum(-1)  # [b, m]
            per_row = torch.where(keep, per_tok, torch.zeros_like(per_tok)).sum(-1) / size.clamp(min=1)
            loss = per_row.sum() / total
            n = int(keep.sum())
            return loss, {
                "clip_frac": float(((clipped < ratio * adv) & keep).sum()) / max(n, 1),
                "kl": float(kl.detach()[keep].sum()) / max(n, 1),
                "loss_tokens": n,
            }

        return backward_pieces(ctx, parts, chunks, loss_of, lambda p: int(scored(p).any(-1).sum()))
