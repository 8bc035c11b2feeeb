"""SPG, Sandwiched Policy Gradient (arXiv 2510.09541; facebookresearch/SPG) (ALGORITHMS.md, SPG).

K block-wise masked copies a completion (proxy 4). With M_s the masked valid positions of copy s,
t_s = |M_s| / n and n the valid length:

    ELBO_i = (1/K) sum_s mean_{j in M_s} log p_s(o_j)
    EUBO_i = (1/beta) mean_{j: U_j > 0} log U_j,   U_j = (1/K) sum_s 1[j in M_s] p_s(o_j)^beta / t_s
    Mix_i  = omega EUBO_i + (1 - omega) ELBO_i
    L^_i   = ELBO_i if A_i > 0 else the chosen bound (eubo, mix, or elbo)
    loss   = sum_i (-A_i L^_i n_i) / sum_i n_i        (sums over the valid rows of every micro-batch and process)

A centred (A = 0 falls in the negative branch and adds 0). No ratio, clip, old log-probs or KL. Each
inner update has masks of its own, drawn in `prepare` from the micro-batch's generator.

Versus the official code: its masks are seeded by a per-iteration seed of the trainer (cycled by
micro-batch count under gradient accumulation); here they come from the micro-batch's generator. With
more copies than blocks (the tiny default has one block) further random block orders follow the first
(SPG asserts copies <= blocks). `block_length=0` uses the sampler's block length (the paper: 32, the
sampler's own). Prompt masking (0.15) applies to real prompt tokens only, not to left padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from agrpo.errors import AgrpoError
from agrpo.objectives.base import Context, Objective, Part, register
from agrpo.objectives.proxies import Copies, block_copies, copies_logp, row_chunks, run_pieces, spg_bounds, valid_tokens


@dataclass
class SPGSettings:
    bound: Literal["elbo", "eubo", "mix"] = field(default="mix", metadata={"help": "likelihood of negative-advantage rows: the ELBO, the EUBO, or their mix"})
    copies: int = field(default=2, metadata={"help": "block-masked copies per completion (K)"})
    eubo_beta: float = field(default=1.5, metadata={"help": "EUBO's beta (paper: 1.5 GSM8K/MATH and Countdown with mix, 2.0 Countdown eubo, 1.0 Sudoku)"})
    omega: float = field(default=0.5, metadata={"help": "mix weight of the EUBO"})
    block_length: int = field(default=0, metadata={"help": "mask block length (0: the sampler's block_length)"})
    prompt_mask_p: float = field(default=0.15, metadata={"help": "probability of masking each clean position before the chosen block"})


def spg_check(s, cfg, name: str) -> None:
    if s.copies < 1 or s.eubo_beta <= 0 or not 0 <= s.omega <= 1 or not 0 <= s.prompt_mask_p < 1:
        raise AgrpoError(f"{name} needs copies >= 1, eubo_beta > 0, 0 <= omega <= 1, 0 <= prompt_mask_p < 1")
    block = s.block_length or cfg.sampling.block_length
    if cfg.sampling.gen_length % block:
        raise AgrpoError(f"{name}.block_length={block} must divide sampling.gen_length={cfg.sampling.gen_length}")


def draw_block_copies(part: Part, s, cfg) -> Copies:
    block = s.block_length or part.rollout.config.block_length
    return block_copies(part.rollout, valid_tokens(part.rollout), block, s.copies, s.prompt_mask_p, part.generator)


def spg_values(policy, part: Part, rows, copies: Copies, s) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """([b] ELBO, [b] the negative branch's bound, [b] n) of the rows `rows`."""
    valid = valid_tokens(part.rollout)[rows]
    logp = copies_logp(policy, part.rollout, rows, copies)
    elbo, eubo = spg_bounds(logp, copies, valid, s.eubo_beta)
    bound = {"elbo": elbo, "eubo": eubo, "mix": s.omega * eubo + (1 - s.omega) * elbo}[s.bound]
    return elbo, bound, valid.sum(1).to(logp.dtype)


@register
class SPG(Objective):
    name = "spg"
    settings = SPGSettings
    summary = "SPG: ELBO for positive, EUBO / mix for negative advantages, block-wise masks (ALGORITHMS.md)"

    def check(self, cfg) -> None:
        spg_check(getattr(cfg, self.name, None) or SPGSettings(), cfg, self.name)

    def prepare(self, ctx: Context, parts: list[Part]) -> None:
        s = ctx.settings or SPGSettings()
        for part in parts:
            if "masks" not in part.state:
                part.state["masks"] = [draw_block_copies(part, s, ctx.cfg) for _ in range(ctx.cfg.inner_steps)]

    def update(self, ctx: Context, parts: list[Part], inner: int) -> dict:
        cfg, s = ctx.cfg, ctx.settings or SPGSettings()

        def chunks(part):
            return row_chunks(part.rollout.tokens.shape[0], cfg.max_rows_per_forward // s.copies)

        def loss_of(part, rows, total):
            elbo, bound, n = spg_values(ctx.policy, part, rows, part.state["masks"][inner].rows(rows), s)
            adv = part.advantages[rows].to(elbo.dtype)
            keep = part.valid[rows]
            value = torch.where(adv > 0, elbo, bound)
            per_row = torch.where(keep, -adv * value * n, torch.zeros_like(value))
            return per_row.sum() / total, {"clip_frac": 0.0, "kl": 0.0, "loss_tokens": int(keep.sum())}

        def count(part):
            return float((valid_tokens(part.rollout).sum(1) * part.valid).sum())

        return run_pieces(ctx, parts, chunks, loss_of, count)
