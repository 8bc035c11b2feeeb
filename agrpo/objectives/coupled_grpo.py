"""coupled-GRPO (DiffuCoder, arXiv 2506.20639; apple/ml-diffucoder): ALGORITHMS.md, coupled-GRPO.

Proxy 3, the coupled per-token estimate. For one update, t ~ U(t_min, t_max) shared by the whole batch
and U_j ~ U(0, 1) per completion position; three forwards, the prompt never masked:
all completion positions masked (p_all), those with U_j < t masked (p_<), those with U_j > t masked (p_>):

    l_j = 1/2 [log p_all(o_j) + (log p_<(o_j) / t  if U_j < t  else  log p_>(o_j) / (1 - t))]

With rho_j = exp(l_j^theta - l_j^old), A leave-one-out (no std), V the valid tokens (up to and including
the first EOS) of the rows with a reward, over the whole batch of every micro-batch and process:

    loss = (1/|V|) sum_{(i,j) in V} [ -min(rho_j A_i, clip(rho_j, 1 - eps_low, 1 + eps_high) A_i)
                                      + beta (exp(l^ref_j - l_j) - (l^ref_j - l_j) - 1) ]

(the k3 penalty is not importance-weighted, as in the official code). l^old and l^ref of an update are
taken under that update's masks before the first update. Defaults (configs/objectives/coupled_grpo.yaml):
eps 0.5 both sides, beta 0.01, mu (inner_steps) 2.

Draws. t of update u is drawn from a generator seeded by (cfg.seed, ctx.step, u): every process and a
resumed run agree on it, so it is shared by the batch as in the paper. (The estimate is unbiased for any
fixed t, so a per-micro-batch t would be as sound; the paper shares it, and so do we.) U is drawn from the
micro-batch's generator, all updates in order, in `prepare`. The masks span all C completion positions
(EOS padding included, as the official code): only the loss is restricted to the valid tokens.

Versus the official code: (1) its mask seeds are indexed by micro-batch counters and its t comes from
Python's `random` after `set_seed`; here both are keyed by (seed, step, update, first prompt); (2) its token
mean runs over each device's micro-batch; here over the whole batch; (3) it re-syncs the reference with the
policy every 64 steps (`sync_ref_model`); here the reference is the base (not offered: the recipe keeps one
fixed reference).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from agrpo.errors import AgrpoError
from agrpo.objectives.advantages import group_advantages
from agrpo.objectives.base import Context, Objective, Part, register
from agrpo.objectives.proxies import run_pieces, valid_tokens
from agrpo.sampling import Rollout


# -- pure pieces -----------------------------------------------------------------------------------

def leave_one_out(rewards, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [N] float32, valid [N] bool) with A_i = r_i - mean_{j != i} r_j over the group's valid rewards
    (= n/(n-1) (r_i - mean), 0 for a lone valid row); None rewards are left out as in `group_advantages`."""
    centred, valid = group_advantages(rewards, group_size)
    n = valid.view(-1, group_size).sum(1, keepdim=True).double()
    scale = torch.where(n > 1, n / (n - 1).clamp(min=1), torch.zeros_like(n))
    return (centred.view(-1, group_size).double() * scale).flatten().float(), valid


def masked_copies_logp(policy: nn.Module, rollout: Rollout, rows, masked: torch.Tensor) -> torch.Tensor:
    """[b, K, C] log p(o_j | x~_k) for the rows `rows` (slice or index tensor) of `rollout` and K corrupted
    copies each (masked [b, K, C]: completion positions replaced by [MASK]; the prompt stays clean), in one
    forward over b*K sequences."""
    b, k, gen = masked.shape
    p = rollout.prompt_len
    tokens = rollout.tokens[rows]
    x = tokens[:, None, :].expand(b, k, tokens.shape[1]).clone()
    x[:, :, p:] = x[:, :, p:].masked_fill(masked, rollout.mask_id)
    attention = rollout.attention_mask[rows][:, None, :].expand(b, k, -1).reshape(b * k, -1)
    positions = p + torch.arange(gen, device=x.device).expand(b * k, gen)
    logp = torch.log_softmax(policy(x.reshape(b * k, -1), positions, attention), dim=-1)
    target = tokens[:, None, p:].expand(b, k, gen).reshape(b * k, gen)
    return logp.gather(-1, target[:, :, None]).squeeze(-1).view(b, k, gen)


def coupled_masks(u: torch.Tensor, t: float) -> torch.Tensor:
    """[B, 3, C] bool: the three corruptions of proxy 3 from U [B, C]: everything, {U < t}, {U > t}."""
    return torch.stack([torch.ones_like(u, dtype=torch.bool), u < t, u > t], 1)


def coupled_token_logp(logp3: torch.Tensor, u: torch.Tensor, t: float) -> torch.Tensor:
    """[b, C] proxy 3: 1/2 [log p_all + (log p_< / t if U < t else log p_> / (1 - t))] from logp3 [b, 3, C]
    (the three copies of `coupled_masks`) and U [b, C]."""
    pair = torch.where(u < t, logp3[:, 1] / t, logp3[:, 2] / (1.0 - t))
    return 0.5 * (logp3[:, 0] + pair)


def shared_uniform(seed: int, step: int, inner: int, low: float, high: float) -> float:
    """A draw U(low, high) that every process and a resumed run agree on: keyed by (seed, step, update)."""
    gen = torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_000_033 + inner) * 7 + 5)
    return low + (high - low) * float(torch.rand((), generator=gen, dtype=torch.float64))


# -- running pieces with one gradient sync ---------------------------------------------------------

def row_chunks(rows: torch.Tensor, per_chunk: int) -> list[torch.Tensor]:
    """The row indices `rows` in consecutive chunks of at most `per_chunk`."""
    per_chunk = max(int(per_chunk), 1)
    return [rows[i : i + per_chunk] for i in range(0, rows.numel(), per_chunk)]


# the pieces of an update, with one gradient sync and padding pieces (shared with the other objectives)
backward_pieces = run_pieces


def learned_tokens(part: Part) -> torch.Tensor:
    """[B, C] bool: the valid tokens of the rows with a reward."""
    return valid_tokens(part.rollout) & part.valid.to(part.rollout.tokens.device)[:, None]


# -- the objective ---------------------------------------------------------------------------------

@dataclass
class CoupledGRPOSettings:
    t_min: float = field(default=0.2, metadata={"help": "lower end of the mask ratio t ~ U(t_min, t_max), one t per update shared by the batch"})
    t_max: float = field(default=0.8, metadata={"help": "upper end of the mask ratio t"})


@register
class CoupledGRPO(Objective):
    name = "coupled_grpo"
    settings = CoupledGRPOSettings
    summary = "coupled-GRPO (DiffuCoder): coupled per-token likelihood (3 forwards), token ratio, k3 KL, LOO (ALGORITHMS.md)"

    def check(self, cfg) -> None:
        s = getattr(cfg, self.name, None) or CoupledGRPOSettings()
        if not 0 < s.t_min <= s.t_max < 1:
            raise AgrpoError(f"coupled_grpo needs 0 < t_min <= t_max < 1, got t_min={s.t_min}, t_max={s.t_max}")

    def advantages(self, rewards, group_size, cfg):
        return leave_one_out(rewards, group_size)

    def _logp(self, policy, part: Part, inner: int, rows) -> torch.Tensor:
        u, t = part.state["u"][inner][rows], part.state["t"][inner]
        return coupled_token_logp(masked_copies_logp(policy, part.rollout, rows, coupled_masks(u, t)), u, t)

    def _all_rows(self, policy, part: Part, inner: int, max_rows: int) -> torch.Tensor:
        rows = torch.arange(part.rollout.tokens.shape[0], device=part.rollout.tokens.device)
        return torch.cat([self._logp(policy, part, inner, r) for r in row_chunks(rows, max_rows // 3)])

    def prepare(self, ctx: Context, parts: list[Part]) -> None:
        """t of every update (shared), U of every update (per micro-batch), then old and reference estimates."""
        cfg, s = ctx.cfg, ctx.settings or CoupledGRPOSettings()
        ts = [shared_uniform(cfg.seed, ctx.step, u, s.t_min, s.t_max) for u in range(cfg.inner_steps)]
        for part in parts:
            ro = part.rollout
            if "u" not in part.state:
                part.state["t"] = ts
                part.state["u"] = [
                    torch.rand(ro.completion.shape, generator=part.generator, device=ro.tokens.device, dtype=torch.float64)
                    for _ in range(cfg.inner_steps)
                ]
            with torch.no_grad():
                n = range(cfg.inner_steps)
                part.state["olds"] = [self._all_rows(ctx.policy, part, i, cfg.max_rows_per_forward) for i in n]
                part.state["refs"] = [
                    self._all_rows(ctx.ref_logits_fn, part, i, cfg.max_rows_per_forward) if cfg.beta > 0 else None for i in n
                ]

    def update(self, ctx: Context, parts: list[Part], inner: int) -> dict:
        cfg = ctx.cfg

        def chunks(part):
            return row_chunks(torch.nonzero(learned_tokens(part).any(1)).flatten(), cfg.max_rows_per_forward // 3)

        def loss_of(part, rows, total):
            keep = learned_tokens(part)[rows]
            logp = self._logp(ctx.policy, part, inner, rows)
            old = part.state["olds"][inner][rows].to(logp.dtype)
            adv = part.advantages[rows].to(logp.dtype)[:, None]
            ratio = torch.exp(logp - old)
            clipped = ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high) * adv
            per_tok = -torch.minimum(ratio * adv, clipped)
            kl = torch.zeros_like(per_tok)
            if cfg.beta > 0:
                diff = part.state["refs"][inner][rows].to(logp.dtype) - logp
                kl = torch.exp(diff) - diff - 1.0
                per_tok = per_tok + cfg.beta * kl
            loss = torch.where(keep, per_tok, torch.zeros_like(per_tok)).sum() / total
            n = int(keep.sum())
            return loss, {
                "clip_frac": float(((clipped < ratio * adv) & keep).sum()) / max(n, 1),
                "kl": float(kl.detach()[keep].sum()) / max(n, 1),
                "loss_tokens": n,
            }

        return backward_pieces(ctx, parts, chunks, loss_of, lambda p: int(learned_tokens(p).sum()))
