"""The off-policy gap of rollouts drawn through an approximate cache.

A rollout records, for every token, the log-probability mu of the distribution the sampler drew it
from. Without a cache (or with a block model's exact one) that is the policy's own distribution at the
state the trainer rebuilds, pi; through a prefix or dual cache of a bidirectional model it is not
(`agrpo.sampling.BidirectionalCache`). The trainer's first-update ratio is pi / mu, so the per-token
d = log pi - log mu is the gap an objective faces: its mean, its spread and the fraction of tokens
whose ratio exp(d) is already outside the clip range before any update.
"""

from __future__ import annotations

import torch

from agrpo.sampling import Rollout, token_log_prob

CLIP_EPS = 0.2  # a ratio exp(d) outside [1 - CLIP_EPS, 1 + CLIP_EPS] counts as outside the clip range


def block_first_step(rollout: Rollout) -> torch.Tensor:
    """[B, C] bool: the token was committed at its block's first step in its row."""
    sampled, step = rollout.sampled, rollout.step
    bsz, gen = step.shape
    blen = rollout.config.block_length
    first = step.masked_fill(~sampled, torch.iinfo(torch.long).max).view(bsz, gen // blen, blen).amin(-1)
    return sampled & (step == first.repeat_interleave(blen, dim=1))


@torch.no_grad()
def behaviour_gap(policy, rollout: Rollout, max_states: int = 0, batch: int = 4,
                  generator: torch.Generator | None = None) -> dict:
    """d = log pi(token | x_t) - recorded log-prob for the tokens committed at (row, step) states of `rollout`.

    pi is the policy's forward over the whole rebuilt state x_t, under the recorded filter (what the
    objectives' ratio uses). `max_states` > 0 scores a random subset of that many states (every token each
    committed), `batch` states a forward. Returns {"d": float64 [N], "first": bool [N] (committed at its
    block's first step), "states": scored, "states_total": all states of the rollout}.
    """
    from agrpo.objectives.agrpo import _plan, replay_inputs

    sampled, step = rollout.sampled, rollout.step
    bsz = step.shape[0]
    rows = torch.arange(bsz)[:, None].expand_as(step)
    states = torch.unique(torch.stack([rows[sampled], step[sampled]], 1), dim=0)  # [S, 2] (row, step)
    total = states.shape[0]
    if 0 < max_states < total:
        states = states[torch.randperm(total, generator=generator)[:max_states]]
    first_all = block_first_step(rollout)
    ds, firsts = [], []
    for i in range(0, states.shape[0], batch):
        row, t = states[i : i + batch, 0], states[i : i + batch, 1]
        draws = _plan(rollout, row, t, torch.ones_like(row, dtype=torch.float64), "sequence", 1.0)
        pos, valid = draws.positions, draws.valid  # the tokens each state committed, padded
        x, attn, abs_pos, tokens, filt = replay_inputs(rollout, row, t, pos)
        exact, _ = token_log_prob(policy(x, abs_pos, attn), tokens, rollout.config.temperature, filt, rollout.mask_id)
        d = exact.double() - rollout.logp[row].gather(1, pos).double()
        ds.append(d[valid])
        firsts.append(first_all[row].gather(1, pos)[valid])
    return {"d": torch.cat(ds) if ds else torch.empty(0, dtype=torch.float64),
            "first": torch.cat(firsts) if firsts else torch.empty(0, dtype=torch.bool),
            "states": int(states.shape[0]), "states_total": int(total)}


def gap_summary(gap: dict, eps: float = CLIP_EPS) -> dict:
    """Mean and spread of d, the fraction of ratios exp(d) outside [1 - eps, 1 + eps], the first-step share."""
    d, first = gap["d"], gap["first"]
    out = {"states": gap["states"], "states_total": gap["states_total"], "tokens": int(d.numel())}
    if d.numel() == 0:
        return out
    a = d.abs()
    rho = d.exp()
    later = a[~first]
    out.update({
        "mean": float(d.mean()),
        "mean_abs": float(a.mean()),
        "p50_abs": float(a.quantile(0.5)),
        "p90_abs": float(a.quantile(0.9)),
        "p99_abs": float(a.quantile(0.99)),
        "max_abs": float(a.max()),
        "outside_clip": float(((rho > 1 + eps) | (rho < 1 - eps)).double().mean()),
        "first_step_share": float(first.double().mean()),
        "mean_abs_later_steps": float(later.mean()) if later.numel() else 0.0,
    })
    return out
