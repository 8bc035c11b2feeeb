"""TraceRL (arXiv 2509.06949; Gen-Verse/dLLM-RL): the recorded trajectory replayed in groups of steps
(ALGORITHMS.md, TraceRL; proxy 5, trajectory replay).

Scored tokens of a completion: its valid tokens (up to and including the first EOS) that the policy
sampled (not the EOS fill after an early stop). Sort the distinct steps tau at which they were committed,
s_1 < s_2 < ... < s_n, and cut them into consecutive groups of `shrink` steps,
g_k = {s_{(k-1) shrink + 1} .. s_{min(k shrink, n)}}, with f_k its first step and v_k its last. Each group
is a row of the loss:

* state: x_{f_k}, the state the sampler was in before the group's first step. Completion position j is
  [MASK] iff tau_j >= f_k (any token, scored or not: EOS padding committed later is masked too); the
  prompt is never masked. ALGORITHMS.md's "masks tokens with tau >= v" reads the steps after the
  official code has mapped every step to its group's last one: a position's mapped step is >= v_k
  exactly when its own step is >= f_k, so the official code rebuilds this same state. With shrink = 1
  the row is the exact conditional of step s_k; with shrink > 1 the later steps of a group are scored
  at the group's first state, with their own group-mates still masked (the paper's approximation).
* scored tokens: T_k = {scored j : f_k <= tau_j <= v_k}.

With l_j = log pi_theta(o_j | x_{f_k}), l_j^old the same under the policy before the batch's first update
(recomputed by the trainer in `prepare`, not the sampler's record), d_j = l_j - l_j^old, rho_j = exp(d_j),
A the completion's advantage and R the rows of the whole batch (every micro-batch and process):

    loss = (1/R) sum_rows [ -(1/N_k) sum_{j in T_k} min(rho_j A, clip(rho_j, 1 - eps_low, 1 + eps_high) A)
                            + beta (1/M_k) sum_{j in T_k} k3_j ]
    k3_j = exp(l_j^old - l_j) - (l_j^old - l_j) - 1

N_k = |T_k| and M_k = 1 by default (the LLaDA / Dream trainer: the surrogate averaged over the row's
tokens, the KL summed over them); `normalize=length` sets N_k = M_k = C, the completion length (the
block-model trainers, TraDo / SDAR). The KL is k3 of the policy against the pre-update snapshot (the
old policy of the batch, not a reference model), not importance-weighted, as the official
`use_kl_estimator_k3`; no reference model is kept. `log_ratio_clamp` = c > 0 (10 for the block models)
clamps d_j to [-c, c] before the exponential of rho_j and l^old - l to [-c, c] inside the exponential
of k3 (the linear term stays unclamped, as the official block trainers).

Distribution: by default l_j is read under the distribution the sampler drew o_j from (logits / T,
[MASK] banned, restricted to the filter recorded for o_j), so the ratio and the KL are those of the
sampling policy itself, as every replay here (proxy 5, AGRPO.md). With shrink > 1 a token is read at
its group's first state under the filter recorded at its own step. `distribution=softmax` reads the
plain softmax over the whole vocabulary at temperature 1, which is what the official trainer computes
(whatever temperature the rollouts used): it is there to reproduce the paper's numbers.

Advantages: z within the group (population std; 0 when the group's rewards are equal). With
`length_limit` (the paper's rule, on in its preset; off by default, since the answers of some tasks fill
the completion, e.g. the tiny Sudoku's 16 digits) a completion holding no stop token in its C positions counts as wrong:
its reward becomes 0 before the z-score and the filter. Groups whose accuracy (the fraction of valid
rewards >= `correct_at`) is above `max_accuracy` or below `min_accuracy` are dropped (their rows get
valid = False). The length rule needs the rollout, which `advantages` does not see: `prepare`
recomputes the advantages with it, and the loss uses those. No random draw: the loss is a function of
the rollout record.

Versus the official code:
* it groups the distinct steps of every completion position, EOS padding included, and then drops the
  rows that score nothing; here the groups are made of the scored tokens' steps, so each holds exactly
  `shrink` of them (the last one fewer).
* its reward is the 0/1 correctness and it counts a completion as wrong when its length (EOS padding
  runs collapsed) is >= max_gen_length - 5; here the reward is the task's, `correct_at` says which
  rewards are right, and a completion hits the limit when none of its C tokens is a stop token.
* it walks the rows of a batch in mini-batches, one optimizer step each (how many depends on the
  number of GPUs), so its later mini-batches see a moved policy; here every update uses every row of
  the batch and `inner_steps` (mu) sets the updates a batch. With mu = 1 rho = 1, so the clip and the
  KL (0, with zero gradient) act only from the second update on.
* its normalisation divides by the rows of each micro-batch and by the accumulation steps, which is
  the mean over rows only when every micro-batch is full; here R counts the rows of the whole batch.
* the optional value model (a token value head, step-level GAE with gamma = lambda = 1, clipped MSE)
  is not implemented.
The recipe's `normalization` and `eos_steps` keys do not apply: rows are normalised as above, and the
EOS tokens after the first are not learned from (the official trainer drops them too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from agrpo.errors import AgrpoError, say
from agrpo.objectives.advantages import accuracy_filter, z_advantages
from agrpo.objectives.agrpo import rebuild_states
from agrpo.objectives.base import Context, Objective, Part, register
from agrpo.objectives.proxies import row_chunks, run_pieces, valid_tokens
from agrpo.sampling import Rollout, token_log_prob

DISTRIBUTIONS = ("sampler", "softmax")
NORMALIZE = ("scored", "length")


@dataclass
class TraceRLSettings:
    shrink: int = field(default=8, metadata={"help": "consecutive denoising steps merged into one row (s); 1 scores every step at its own state"})
    distribution: Literal["sampler", "softmax"] = field(
        default="sampler",
        metadata={"help": "token log-probs under the sampler's tempered, filtered distribution, or the plain softmax at "
                  "temperature 1 (the official trainer's)"},
    )
    length_limit: bool = field(
        default=False, metadata={"help": "a completion with no stop token in its gen_length positions counts as wrong (reward 0)"}
    )
    correct_at: float = field(
        default=1.0, metadata={"help": "a reward >= this counts as correct in a group's accuracy (the paper's reward is 0/1)"}
    )
    min_accuracy: float = field(default=0.2, metadata={"help": "groups whose accuracy is below this are dropped"})
    max_accuracy: float = field(default=0.8, metadata={"help": "groups whose accuracy is above this are dropped"})
    normalize: Literal["scored", "length"] = field(
        default="scored",
        metadata={"help": "a row's surrogate over its scored tokens, KL summed (LLaDA, Dream); length: both over "
                  "gen_length (the block models TraDo / SDAR)"},
    )
    log_ratio_clamp: float = field(
        default=0.0, metadata={"help": "clamp the log-ratio to +-this before exponentials (0: off; the block models: 10)"}
    )


# -- pure pieces -----------------------------------------------------------------------------------

def scored_tokens(rollout: Rollout) -> torch.Tensor:
    """[B, C] bool: the valid tokens (up to and including the first EOS) that the policy sampled."""
    return valid_tokens(rollout) & rollout.sampled


def hit_length_limit(rollout: Rollout) -> torch.Tensor:
    """[B] bool: the completions holding no stop token in their C positions."""
    stops = torch.zeros_like(rollout.completion, dtype=torch.bool)
    for eos in rollout.stop_ids:
        stops |= rollout.completion == int(eos)
    return ~stops.any(1)


def tracerl_advantages(
    rewards, group_size: int, settings: TraceRLSettings, limit_hit: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [N] float32, valid [N] bool): rewards of the completions in `limit_hit` set to 0, then
    z within the group; the rows of groups outside [min_accuracy, max_accuracy] get 0 and valid=False."""
    values = [None if r is None or (isinstance(r, float) and math.isnan(r)) else float(r) for r in rewards]
    if limit_hit is not None:
        values = [None if v is None else (0.0 if bool(hit) else v) for v, hit in zip(values, limit_hit.tolist())]
    adv, valid = z_advantages(values, group_size)
    keep = accuracy_filter(values, group_size, settings.correct_at, settings.min_accuracy, settings.max_accuracy)
    valid = valid & keep
    return torch.where(valid, adv, torch.zeros_like(adv)), valid


@dataclass
class TraceRows:
    """The rows of the loss of one micro-batch: one per (completion, group of steps)."""

    row: torch.Tensor  # [R] long: completion (rollout row)
    start: torch.Tensor  # [R] long: the group's first step f; the state rebuilt is x_f
    last: torch.Tensor  # [R] long: the group's last step v
    positions: torch.Tensor  # [R, W] long: completion positions scored (padded with the row's first)
    scored: torch.Tensor  # [R, W] bool: real entries of `positions`

    def __len__(self) -> int:
        return int(self.row.numel())

    def take(self, idx) -> TraceRows:
        return TraceRows(self.row[idx], self.start[idx], self.last[idx], self.positions[idx], self.scored[idx])


def trace_rows(rollout: Rollout, keep: torch.Tensor, shrink: int) -> TraceRows:
    """The rows of the completions `keep` [B]: their scored tokens' distinct steps in groups of `shrink`."""
    if shrink < 1:
        raise AgrpoError(f"tracerl.shrink must be >= 1, got {shrink}")
    device = rollout.step.device
    scored = scored_tokens(rollout) & keep.to(device)[:, None]
    rows, starts, lasts = [], [], []
    for b in scored.any(1).nonzero().flatten().tolist():
        steps = torch.unique(rollout.step[b][scored[b]]).tolist()  # sorted
        for first in range(0, len(steps), shrink):
            rows.append(b)
            starts.append(steps[first])
            lasts.append(steps[min(first + shrink, len(steps)) - 1])
    row = torch.tensor(rows, dtype=torch.long, device=device)
    start = torch.tensor(starts, dtype=torch.long, device=device)
    last = torch.tensor(lasts, dtype=torch.long, device=device)
    step = rollout.step[row]
    sel = scored[row] & (step >= start[:, None]) & (step <= last[:, None])  # [R, C]
    width = max(int(sel.sum(1).max()) if len(rows) else 0, 1)
    order = torch.argsort((~sel).to(torch.int8), dim=1, stable=True)[:, :width]
    real = sel.gather(1, order)
    # padding slots repeat the row's first scored position: every value read stays finite
    positions = torch.where(real, order, order[:, :1])
    return TraceRows(row, start, last, positions, real)


def trace_logp(policy, rollout: Rollout, rows: TraceRows, distribution: str) -> torch.Tensor:
    """[r, W] log pi(o_j | x_f) of each row's scored positions, one forward over the r rebuilt states."""
    x = rebuild_states(rollout, rows.row, rows.start)
    pos = rows.positions
    tokens = rollout.completion[rows.row].gather(1, pos)
    logits = policy(x, rollout.prompt_len + pos, rollout.attention_mask[rows.row])
    if distribution == "softmax":
        return torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, :, None]).squeeze(-1)
    if distribution != "sampler":
        raise AgrpoError(f"unknown tracerl.distribution {distribution!r}: choose one of {', '.join(DISTRIBUTIONS)}")
    filt = None
    if rollout.filter_ids is not None:
        f = rollout.filter_ids[rows.row]
        filt = f.gather(1, pos[:, :, None].expand(-1, -1, f.shape[-1]))
    logp, _ = token_log_prob(logits, tokens, rollout.config.temperature, filt, rollout.mask_id)
    return logp


def row_terms(
    logp: torch.Tensor, old: torch.Tensor, adv: torch.Tensor, scored: torch.Tensor, settings: TraceRLSettings,
    length: int, eps_low: float, eps_high: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(policy term [r], KL term [r], k3 [r, W], clipped [r, W]) of rows with log-probs [r, W] and advantages
    [r]: -(1/N) sum min(rho A, clip(rho) A) and (1/M) sum k3 over the scored entries (0 elsewhere)."""
    d = logp - old
    c = settings.log_ratio_clamp
    ratio = torch.exp(d.clamp(-c, c) if c > 0 else d)
    a = adv[:, None]
    unclipped, clipped = ratio * a, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * a
    surrogate = torch.where(scored, torch.minimum(unclipped, clipped), torch.zeros_like(d))
    back = old - logp
    k3 = torch.exp(back.clamp(-c, c) if c > 0 else back) - back - 1.0
    k3 = torch.where(scored, k3, torch.zeros_like(k3))
    if settings.normalize == "length":
        n = m = torch.full_like(d[:, 0], float(length))
    else:
        n, m = scored.sum(1).to(d.dtype).clamp(min=1), torch.ones_like(d[:, 0])
    return -surrogate.sum(1) / n, k3.sum(1) / m, k3, (clipped < unclipped) & scored


# -- the objective ---------------------------------------------------------------------------------

@register
class TraceRL(Objective):
    name = "tracerl"
    settings = TraceRLSettings
    summary = "TraceRL: the recorded trajectory replayed in groups of `shrink` steps, a clipped row each, KL vs the snapshot (ALGORITHMS.md)"

    def needs_reference(self, cfg) -> bool:
        return False  # the KL is taken against the policy before the batch's first update

    def check(self, cfg) -> None:
        s = getattr(cfg, self.name, None) or TraceRLSettings()
        if s.shrink < 1:
            raise AgrpoError(f"tracerl.shrink must be >= 1, got {s.shrink}")
        if s.distribution not in DISTRIBUTIONS:
            raise AgrpoError(f"unknown tracerl.distribution {s.distribution!r}: choose one of {', '.join(DISTRIBUTIONS)}")
        if s.normalize not in NORMALIZE:
            raise AgrpoError(f"unknown tracerl.normalize {s.normalize!r}: choose one of {', '.join(NORMALIZE)}")
        if not 0 <= s.min_accuracy <= s.max_accuracy <= 1:
            raise AgrpoError(
                f"tracerl needs 0 <= min_accuracy <= max_accuracy <= 1, got {s.min_accuracy}, {s.max_accuracy}: "
                f"other values drop every group"
            )
        if not (s.log_ratio_clamp >= 0 and math.isfinite(s.log_ratio_clamp)):
            raise AgrpoError(f"tracerl.log_ratio_clamp must be >= 0 (0: off), got {s.log_ratio_clamp}")
        if not math.isfinite(s.correct_at):
            raise AgrpoError(f"tracerl.correct_at must be a finite reward, got {s.correct_at}")

    def advantages(self, rewards, group_size, cfg):
        """z and the group filter from the rewards alone; `prepare` adds the length rule."""
        return tracerl_advantages(rewards, group_size, getattr(cfg, self.name, None) or TraceRLSettings())

    def prepare(self, ctx: Context, parts: list[Part]) -> None:
        """Advantages with the length rule, the rows, and the old log-probs under the policy before any update."""
        cfg, s = ctx.cfg, ctx.settings or TraceRLSettings()
        for part in parts:
            ro = part.rollout
            if "rows" not in part.state:
                limit = hit_length_limit(ro) if s.length_limit else None
                if limit is not None and bool(limit.all()) and not getattr(self, "_warned", False):
                    self._warned = True  # a task whose answers fill the completion learns nothing so
                    say(f"agrpo: warning: tracerl: every completion hit the length limit (no stop token in its "
                        f"{ro.completion.shape[1]} positions) and counts as wrong, so its group is dropped; for a "
                        f"task whose answers fill the completion pass tracerl.length_limit=false")
                adv, valid = tracerl_advantages(part.rewards, cfg.group_size, s, limit)
                part.state["advantages"] = adv.to(ro.tokens.device)
                part.state["valid"] = valid.to(ro.tokens.device)
                part.state["rows"] = trace_rows(ro, part.state["valid"], s.shrink)
            rows = part.state["rows"]
            with torch.no_grad():
                olds = [trace_logp(ctx.policy, ro, rows.take(c), s.distribution)
                        for c in row_chunks(len(rows), cfg.max_rows_per_forward)]
            part.state["old"] = torch.cat(olds) if olds else torch.zeros(0, rows.positions.shape[1], device=ro.tokens.device)

    def update(self, ctx: Context, parts: list[Part], inner: int) -> dict:
        cfg, s = ctx.cfg, ctx.settings or TraceRLSettings()

        def loss_of(part, chunk, total):
            rows = part.state["rows"].take(chunk)
            logp = trace_logp(ctx.policy, part.rollout, rows, s.distribution)
            old = part.state["old"][chunk].to(logp.dtype)
            adv = part.state["advantages"][rows.row].to(logp.dtype)
            policy_term, kl, k3, clipped = row_terms(
                logp, old, adv, rows.scored, s, part.rollout.completion.shape[1], cfg.eps_low, cfg.eps_high
            )
            per_row = policy_term + cfg.beta * kl if cfg.beta > 0 else policy_term
            n = int(rows.scored.sum())
            metrics = {  # per scored token, as the other objectives
                "clip_frac": float(clipped.sum()) / max(n, 1),
                "kl": float(k3.detach().sum()) / max(n, 1),
                "loss_tokens": n,
            }
            return per_row.sum() / total, metrics

        return run_pieces(
            ctx, parts,
            lambda p: row_chunks(len(p.state["rows"]), cfg.max_rows_per_forward),
            loss_of,
            lambda p: len(p.state["rows"]),
        )
