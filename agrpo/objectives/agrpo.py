"""The AGRPO objective: a Monte Carlo estimate of the per-step PPO loss over the denoising trajectory.

AGRPO.md §2. For each completion (row) K steps t_k are drawn; the state x_t is rebuilt from
the rollout record (completion position i is [MASK] iff it was committed at or after t; the
prompt is never masked), one forward pass scores the tokens committed at t under the same
filter and temperature the sampler used, and

    L_row ~= (1 / K) * sum_k w_k * L_{t_k},     E[L_row] = (1 / T_eff) * sum_t L_t.

Step sampling: `stratified` (the default: a stratified sweep per row; with K = T_eff, or any
multiple of it, every step is drawn equally often and the estimate is the exact average),
`low_discrepancy` (one stratified sweep over all B*K draws of the batch, as the official code)
or `uniform` (iid). `importance="entropy"` draws t with probability
proportional to the entropy committed at t and weights by (1/T_eff)/q(t). All are unbiased:
each draw is marginally uniform (or q) and the weights undo q.

T_eff, the number of steps a row learns from, is `horizon(rollout, eos_steps)`: with
`include` (the default) the EOS tokens sampled after the answer's last token are learned
from too, so the decision to stop gets its gradient; `exclude` is the official truncation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from agrpo.distributed import OneSync, totals
from agrpo.errors import AgrpoError
from agrpo.objectives.base import Context, Objective, Part, add_piece, global_metrics, new_sums, register
from agrpo.objectives.common import (
    clipped_surrogate,
    exact_old_log_probs,
    horizon,
    k3_kl,
    new_old_store,
    truncated_is,
)
from agrpo.policy import unwrap
from agrpo.sampling import Rollout, token_log_prob

STEP_SAMPLING = ("uniform", "low_discrepancy", "stratified")
IMPORTANCE = ("none", "entropy")
NORMALIZATION = ("sequence", "token")
ENTROPY_FLOOR = 1e-3  # fraction of the mean step entropy added to every step, so q(t) > 0


@dataclass
class StepPlan:
    """The sampled steps of one batch, one entry per (row, draw)."""

    row: torch.Tensor  # [S] long: rollout row
    t: torch.Tensor  # [S] long: sampled step
    weight: torch.Tensor  # [S] float64: importance weight w = (1/T_eff) / q(t) (1 for uniform draws)
    coef: torch.Tensor  # [S] float64: multiplier of the sample's token-loss sum in the batch loss
    positions: torch.Tensor  # [S, k] long: completion positions committed at t (padded)
    valid: torch.Tensor  # [S, k] bool: real entries of `positions`
    count: float = 0.0  # what `coef` divides by here: draws (sequence) or loss tokens (token)

    def normalized(self, total: float, scale: float = 1.0) -> "StepPlan":
        """The same draws with coef = scale * weight / total, `total` counted over several plans.

        A batch split into micro-batches or over processes divides by the count of all of
        them (the sum of their `count`s), so the pieces add up to the loss of the whole batch.
        """
        coef = self.weight * scale / max(float(total), 1.0)
        return StepPlan(self.row, self.t, self.weight, coef, self.positions, self.valid, self.count)

    def chunks(self, max_rows_per_forward: int | None) -> int:
        """Forward passes this plan takes in batches of at most `max_rows_per_forward` sequences."""
        n = self.row.numel()
        size = n if not max_rows_per_forward else max(1, int(max_rows_per_forward))
        return -(-n // size) if n else 0


def _uniforms(n_rows: int, k: int, scheme: str, generator, device) -> torch.Tensor:
    """[n_rows, k] draws, each marginally U[0, 1)."""
    if scheme == "uniform":
        return torch.rand(n_rows, k, generator=generator, device=device, dtype=torch.float64)
    if scheme == "low_discrepancy":
        total = n_rows * k
        perm = torch.randperm(total, generator=generator, device=device).double()
        jitter = torch.rand(total, generator=generator, device=device, dtype=torch.float64)
        return ((perm + jitter) / total).view(n_rows, k)
    if scheme == "stratified":
        perm = torch.argsort(torch.rand(n_rows, k, generator=generator, device=device), dim=1).double()
        jitter = torch.rand(n_rows, k, generator=generator, device=device, dtype=torch.float64)
        return (perm + jitter) / k
    raise AgrpoError(f"unknown step_sampling {scheme!r}: choose one of {', '.join(STEP_SAMPLING)}")


def step_distribution(rollout: Rollout, importance: str, eos_steps: str = "include") -> torch.Tensor:
    """q_b(t) [B, T] in float64 over t < T_eff (rows with T_eff = 0 are all zero)."""
    steps = rollout.config.steps
    t_eff = horizon(rollout, eos_steps)
    live = torch.arange(steps, device=t_eff.device)[None] < t_eff[:, None]
    if importance == "none":
        q = live.double()
    elif importance == "entropy":
        h = step_entropy(rollout, steps) * live
        mean = h.sum(1, keepdim=True) / t_eff[:, None].clamp(min=1)
        floor = ENTROPY_FLOOR * mean + 1e-12
        q = (h + floor) * live
    else:
        raise AgrpoError(f"unknown importance {importance!r}: choose one of {', '.join(IMPORTANCE)}")
    return q / q.sum(1, keepdim=True).clamp(min=1e-300)


def learning_rows(rollout: Rollout, normalization: str, row_valid: torch.Tensor | None = None,
                  eos_steps: str = "include", num_samples: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(T_eff [B], the rows that learn: T_eff > 0 and a valid reward), after checking the settings."""
    if num_samples < 1:
        raise AgrpoError(f"num_samples (K) must be >= 1, got {num_samples}")
    if normalization not in NORMALIZATION:
        raise AgrpoError(f"unknown normalization {normalization!r}: choose one of {', '.join(NORMALIZATION)}")
    t_eff = horizon(rollout, eos_steps)  # refuses an unknown eos_steps
    keep = t_eff > 0
    if row_valid is not None:
        keep = keep & row_valid.to(t_eff.device)
    return t_eff, keep.nonzero().squeeze(1)


def step_entropy(rollout: Rollout, steps: int) -> torch.Tensor:
    """[B, steps] float64: the summed entropy of the sampled tokens each step committed."""
    h = torch.zeros(rollout.step.shape[0], steps + 1, dtype=torch.float64, device=rollout.step.device)
    ent = torch.where(rollout.sampled, rollout.entropy.double(), torch.zeros_like(rollout.entropy, dtype=torch.float64))
    h.scatter_add_(1, rollout.step.clamp(0, steps), ent)
    return h[:, :steps]


def plan_steps(
    rollout: Rollout,
    num_samples: int,
    step_sampling: str = "stratified",
    importance: str = "none",
    normalization: str = "sequence",
    row_valid: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    eos_steps: str = "include",
) -> StepPlan:
    """Draw K steps per row and precompute everything the loss needs but the forward passes."""
    t_eff, rows = learning_rows(rollout, normalization, row_valid, eos_steps, num_samples)
    device = rollout.step.device
    k = num_samples
    q = step_distribution(rollout, importance, eos_steps)[rows]  # [R, T]
    u = _uniforms(rows.numel(), k, step_sampling, generator, device)  # [R, K]
    cdf = q.cumsum(1)
    t = torch.searchsorted(cdf, u, right=True)
    t = torch.minimum(t, (t_eff[rows] - 1)[:, None])
    # w = (1 / T_eff) / q(t); exactly 1 when q is uniform over the live steps
    weight = 1.0 / (t_eff[rows, None].double() * q.gather(1, t))
    if importance == "none":
        weight = torch.ones_like(weight)

    row = rows[:, None].expand(-1, k).reshape(-1)
    # the official normalisation (sequence): sum of the sampled steps' token losses / (K * G),
    # averaged over groups = mean over rows of (1/K) sum_k w_k L_{t_k}
    return _plan(rollout, row, t.reshape(-1), weight.reshape(-1), normalization, float(k * rows.numel()))


def _plan(rollout: Rollout, row: torch.Tensor, t: torch.Tensor, weight: torch.Tensor, normalization: str,
          draws: float) -> StepPlan:
    """The plan of draws (row, t) with importance weights: the positions each draw committed,
    and coefficients weight / count (count: `draws` for sequence, loss tokens for token)."""
    sel = (rollout.step[row] == t[:, None]) & rollout.sampled[row]  # [S, C]
    width = max(int(sel.sum(1).max()) if sel.numel() else 0, 1)
    order = torch.argsort((~sel).to(torch.int8), dim=1, stable=True)[:, :width]
    valid = sel.gather(1, order)
    count = draws if normalization == "sequence" else float(valid.sum())
    # float64: 1 / (K * rows) is rarely a float32 number, and the exact checks compare to 1e-9
    plan = StepPlan(row=row, t=t, weight=weight, coef=weight, positions=order, valid=valid, count=count)
    return plan.normalized(count)


def every_step_plan(
    rollout: Rollout,
    normalization: str = "sequence",
    row_valid: torch.Tensor | None = None,
    eos_steps: str = "include",
) -> StepPlan:
    """Every live step of every row once: the exact objective that `plan_steps` estimates.

    Row b's steps get coefficient 1 / (T_eff_b * rows) (sequence) or 1 / tokens (token), so the
    loss is the mean over rows of the average over its T_eff steps, with no sampling noise."""
    t_eff, rows = learning_rows(rollout, normalization, row_valid, eos_steps)
    device = rollout.step.device
    row = torch.repeat_interleave(rows, t_eff[rows])
    t = torch.cat([torch.arange(int(n), device=device) for n in t_eff[rows]]) if rows.numel() else row
    if normalization == "sequence":
        weight = 1.0 / t_eff[row].double()  # the K = T_eff average, with K folded into the weight
    else:
        weight = torch.ones(row.numel(), dtype=torch.float64, device=device)
    return _plan(rollout, row, t, weight, normalization, float(rows.numel()))


def padding_plan(rollout: Rollout) -> StepPlan:
    """One draw with coefficient 0: a forward and backward that changes no gradient.

    A process with fewer draws than another runs these so that every process makes the same
    number of forward and backward calls (DDP's and FSDP's collectives pair up call by call).
    The draw is a real record (row 0 at its first step) so that every value on the way is
    finite and the zero gradient stays exactly zero.
    """
    device = rollout.step.device
    sel = (rollout.step[0] == 0) & rollout.sampled[0]
    width = max(int(sel.sum()), 1)
    order = torch.argsort((~sel).to(torch.int8), stable=True)[:width]
    zero = torch.zeros(1, dtype=torch.float64, device=device)
    first = torch.zeros(1, dtype=torch.long, device=device)
    return StepPlan(row=first, t=first, weight=zero, coef=zero, positions=order[None], valid=sel[order][None])


def rebuild_states(rollout: Rollout, row: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t for each (row, t): completion positions committed at or after t are [MASK] (AGRPO.md §1, check 3)."""
    x = rollout.tokens[row].clone()
    hidden = rollout.step[row] >= t[:, None]
    x[:, rollout.prompt_len :] = x[:, rollout.prompt_len :].masked_fill(hidden, rollout.mask_id)
    return x


def replay_inputs(rollout: Rollout, row: torch.Tensor, t: torch.Tensor, pos: torch.Tensor):
    """What scoring the tokens at completion positions `pos` [S, k] of rows `row` at steps `t` takes:
    (x_t, attention mask, absolute positions, the tokens, their recorded filters [S, k, W] or None)."""
    filt = None
    if rollout.filter_ids is not None:
        f = rollout.filter_ids[row]
        filt = f.gather(1, pos[:, :, None].expand(-1, -1, f.shape[-1]))
    return (rebuild_states(rollout, row, t), rollout.attention_mask[row], rollout.prompt_len + pos,
            rollout.completion[row].gather(1, pos), filt)


def _chunk_loss(policy, rollout, plan, idx, advantages, eps_low, eps_high, beta, ref_logits_fn, log_ratio_clamp=0.0,
                tis_cap=0.0, old_exact=None):
    row, t = plan.row[idx], plan.t[idx]
    pos, valid = plan.positions[idx], plan.valid[idx]
    x, attn, abs_pos, tokens, filt = replay_inputs(rollout, row, t, pos)
    temperature = rollout.config.temperature
    logits = policy(x, abs_pos, attn)
    logp, _ = token_log_prob(logits, tokens, temperature, filt, rollout.mask_id)
    behaviour = rollout.logp[row].gather(1, pos)  # what the sampler drew from
    old, weight = behaviour, None
    if rollout.approximate and tis_cap > 0:  # ratio against the exact policy before the update, tokens reweighted
        old = exact_old_log_probs(old_exact, row, pos, valid, logp)
        weight = truncated_is(old, behaviour, tis_cap)
    adv = advantages[row][:, None]
    per_tok, ratio, clipped = clipped_surrogate(logp, old, adv, eps_low, eps_high, log_ratio_clamp)
    kl = torch.zeros_like(per_tok)
    if beta > 0:
        with torch.no_grad():
            ref_logp, _ = token_log_prob(ref_logits_fn(x, abs_pos, attn), tokens, temperature, filt, rollout.mask_id)
        kl = k3_kl(logp, ref_logp, ratio)
        per_tok = per_tok + beta * kl
    if weight is not None:
        per_tok = weight * per_tok
    per_tok = per_tok.masked_fill(~valid, 0.0)
    loss = (plan.coef[idx].to(per_tok.dtype) * per_tok.sum(1)).sum()
    stats = {
        "tokens": valid.sum().item(),
        "clipped": (clipped & valid).sum().item(),
        "ratio_sum": ratio.detach().masked_fill(~valid, 0.0).sum().item(),
        "kl_sum": kl.detach().masked_fill(~valid, 0.0).sum().item(),
    }
    if rollout.approximate:  # the off-policy gap: log pi_old / mu (pi_old: the current policy when not stored)
        gap = ((old if weight is not None else logp).detach() - behaviour)[valid]
        stats["gap_sum"] = gap.sum().item()
        rho = gap.exp()
        stats["gap_outside"] = ((rho > 1 + eps_high) | (rho < 1 - eps_low)).sum().item()
        stats["capped"] = 0 if weight is None else (weight[valid] >= tis_cap).sum().item()
    return loss, stats


def loss_chunks(
    policy: nn.Module,
    rollout: Rollout,
    plan: StepPlan,
    advantages: torch.Tensor,
    max_rows_per_forward: int | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    ref_logits_fn: Callable | None = None,
    log_ratio_clamp: float = 0.0,
    tis_cap: float = 0.0,
    old_exact: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, dict]]:
    """(loss, stats) of each batch of at most `max_rows_per_forward` draws, in order; `plan.chunks` of them.

    Lazy: a chunk's forward pass runs when it is asked for, so a caller can run it (and its
    backward) inside a context such as `accelerator.no_sync`.
    """
    advantages = advantages.to(rollout.logp.device, torch.float32)
    if getattr(plan, "pack_row", None) is not None:  # a block model's plan: a step of every block a forward
        from agrpo.objectives.block_replay import pack_chunks, packed_chunk_loss

        for idx, first, last in pack_chunks(plan, max_rows_per_forward):
            yield packed_chunk_loss(policy, rollout, plan, idx, first, last, advantages, eps_low, eps_high, beta,
                                    ref_logits_fn, log_ratio_clamp)
        return
    n = plan.row.numel()
    chunk = n if not max_rows_per_forward else max(1, int(max_rows_per_forward))
    for start in range(0, n, chunk):
        idx = torch.arange(start, min(n, start + chunk), device=plan.row.device)
        yield _chunk_loss(policy, rollout, plan, idx, advantages, eps_low, eps_high, beta, ref_logits_fn, log_ratio_clamp,
                          tis_cap, old_exact)


def agrpo_loss(
    policy: nn.Module,
    rollout: Rollout,
    advantages: torch.Tensor,
    *,
    num_samples: int = 8,
    step_sampling: Literal["uniform", "low_discrepancy", "stratified"] = "stratified",
    importance: Literal["none", "entropy"] = "none",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    ref_logits_fn: Callable | None = None,
    normalization: Literal["sequence", "token"] = "sequence",
    row_valid: torch.Tensor | None = None,
    max_rows_per_forward: int | None = None,
    backward: Callable[[torch.Tensor], None] | None = None,
    generator: torch.Generator | None = None,
    plan: StepPlan | None = None,
    eos_steps: Literal["include", "exclude"] = "include",
    chunk_context: Callable[[], AbstractContextManager] | None = None,
    log_ratio_clamp: float = 0.0,
    tis_cap: float = 0.0,
    old_exact: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """AGRPO loss of a batch of rollouts -> (loss, metrics).

    advantages [B] (from `group_advantages`), row_valid [B] drops rows whose reward was None.
    The K draws of all rows run as batched forwards of at most `max_rows_per_forward`
    sequences. With `backward` (e.g. `accelerator.backward`) each chunk is back-propagated as
    soon as it is computed, so memory holds one chunk's activations; the returned loss is then
    detached. `ref_logits_fn(x, positions, attention_mask)` gives the reference logits for the
    KL term (required when beta > 0). `eos_steps` sets T_eff (see `horizon`); a given `plan`
    already carries it. `chunk_context()` is entered around each chunk's forward and backward
    (e.g. `agrpo.distributed.OneSync.piece`, which syncs gradients in the last chunk only).

    Rollouts drawn through an approximate cache (`rollout.approximate`) record the behaviour policy mu.
    With `tis_cap` = C > 0 each token's ratio is then taken against the exact policy before the update,
    pi_old (the current one at the batch's first update, kept in `old_exact` [B, C], NaN-filled, for the
    later ones), and its loss weighted by min(pi_old / mu, C); with 0 the ratio is pi / mu. Exact rollouts
    ignore both (their record is pi_old).
    """
    if rollout.config.temperature <= 0:
        raise AgrpoError("rollouts sampled greedily (temperature 0) have no policy gradient: sample with temperature > 0")
    if advantages.shape[0] != rollout.tokens.shape[0]:
        raise AgrpoError(
            f"got {advantages.shape[0]} advantages for {rollout.tokens.shape[0]} rollouts: one per completion"
        )
    if beta > 0 and ref_logits_fn is None:
        raise AgrpoError("beta > 0 needs a reference: pass ref_logits_fn (a frozen copy or the adapter disabled)")
    if tis_cap < 0:
        raise AgrpoError(f"tis_cap must be >= 0 (0 = off), got {tis_cap}")
    if plan is None:
        plan = plan_steps(
            rollout, num_samples, step_sampling, importance, normalization, row_valid, generator, eos_steps
        )
    if rollout.approximate and tis_cap > 0 and old_exact is None:
        old_exact = new_old_store(rollout)
    n = plan.row.numel()
    total = None
    agg = {"tokens": 0, "clipped": 0, "ratio_sum": 0.0, "kl_sum": 0.0, "gap_sum": 0.0, "gap_outside": 0, "capped": 0}
    chunks = loss_chunks(policy, rollout, plan, advantages, max_rows_per_forward, eps_low, eps_high, beta, ref_logits_fn,
                         log_ratio_clamp, tis_cap, old_exact)
    for _ in range(plan.chunks(max_rows_per_forward)):
        with chunk_context() if chunk_context is not None else contextlib.nullcontext():
            loss, stats = next(chunks)
            if backward is not None:
                backward(loss)
                loss = loss.detach()
        total = loss if total is None else total + loss
        for key in agg:
            agg[key] += stats.get(key, 0)
    if total is None:  # nothing to learn from (every reward None, or empty completions)
        core = unwrap(policy)
        total = sum(p.sum() * 0.0 for p in core.parameters() if p.requires_grad)
        if backward is not None and isinstance(total, torch.Tensor) and total.requires_grad:
            backward(total)
            total = total.detach()
    tokens = max(agg["tokens"], 1)
    metrics = {
        "loss": float(total.detach()),
        "clip_frac": agg["clipped"] / tokens,
        "ratio_mean": agg["ratio_sum"] / tokens if agg["tokens"] else 1.0,
        "kl": agg["kl_sum"] / tokens,
        "loss_tokens": agg["tokens"],
        "samples": n,
    }
    if rollout.approximate:
        metrics["offpolicy_logratio"] = agg["gap_sum"] / tokens
        metrics["offpolicy_outside_clip"] = agg["gap_outside"] / tokens
        if tis_cap > 0:
            metrics["tis_capped"] = agg["capped"] / tokens
    return total, metrics


def _block_step_plan(*args):
    from agrpo.objectives.block_replay import block_step_plan

    return block_step_plan(*args)


@dataclass
class AGRPOKeys:
    """AGRPO's settings, top-level keys of the run's config (every preset has them)."""

    num_samples: int = field(default=16, metadata={"help": "denoising steps sampled per completion (K)"})
    step_sampling: Literal["uniform", "low_discrepancy", "stratified"] = field(
        default="stratified", metadata={"help": "how the K steps are drawn"}
    )
    importance: Literal["none", "entropy"] = field(default="none", metadata={"help": "entropy importance sampling of steps"})
    tis_cap: float = field(
        default=2.0,
        metadata={"help": "rollouts from an approximate cache (sampling.cache=prefix|dual on a bidirectional model): "
                  "ratio against the exact policy before the update, each token weighted by min(pi_old/mu, C) "
                  "(truncated importance sampling; the batch's steps are drawn once for all its updates); "
                  "0 = ratio against the sampler's mu. Exact rollouts ignore it"},
    )


@register
class AGRPO(Objective):
    """The recipe's default: K denoising steps a completion, each scored exactly at its rebuilt state.

    Its settings are top-level keys of the run's config: `num_samples` (K), `step_sampling`,
    `importance` (declared here), with the recipe's `eos_steps`, `normalization`, `max_rows_per_forward`.
    """

    name = "agrpo"
    summary = "AGRPO: Monte Carlo over denoising steps, each step's exact conditional (AGRPO.md)"
    top_level = AGRPOKeys

    def check(self, cfg) -> None:
        if cfg.tis_cap < 0:
            raise AgrpoError(f"tis_cap must be >= 0 (0 = off), got {cfg.tis_cap}")
        if cfg.num_samples < 1:
            raise AgrpoError(f"num_samples must be >= 1, got {cfg.num_samples}")
        if cfg.num_samples > cfg.sampling.steps:
            raise AgrpoError(
                f"num_samples={cfg.num_samples} is more than the sampling.steps={cfg.sampling.steps} denoising steps: "
                f"num_samples={cfg.sampling.steps} already scores every step once (step_sampling=stratified)"
            )

    def update(self, ctx: Context, parts: list[Part], inner: int) -> dict:
        """Back-propagate the AGRPO loss of every micro-batch with one gradient sync -> global metrics."""
        cfg = ctx.cfg
        # a block-diffusion model: K steps in every block, one forward scoring a step of each block
        draw = plan_steps if unwrap(ctx.policy).block_size is None else _block_step_plan
        fixed = cfg.tis_cap > 0 and any(p.rollout.approximate for p in parts)
        if inner > 0 and fixed:  # the exact old log-probs are known for the first update's draws: keep them
            return replay_update(ctx, parts, [p.state["plan"] for p in parts], tis_cap=cfg.tis_cap)
        plans = [
            draw(p.rollout, cfg.num_samples, cfg.step_sampling, cfg.importance, cfg.normalization, p.valid,
                 p.generator, cfg.eos_steps)
            for p in parts
        ]
        for p, plan in zip(parts, plans):
            p.state["plan"] = plan
        return replay_update(ctx, parts, plans, tis_cap=cfg.tis_cap)


def _old_exact(part: Part, tis_cap: float) -> torch.Tensor | None:
    if not (part.rollout.approximate and tis_cap > 0):
        return None
    if "old_exact" not in part.state:
        part.state["old_exact"] = new_old_store(part.rollout)
    return part.state["old_exact"]


def replay_update(ctx: Context, parts: list[Part], plans: list[StepPlan], log_ratio_clamp: float = 0.0,
                  tis_cap: float = 0.0) -> dict:
    """Back-propagate the replayed-trajectory loss of each part's plan (its draws normalised over the whole
    batch of every process) with one gradient sync -> the step's global metrics. Rollouts of an approximate
    sampler keep the exact old log-probs of their tokens on `part.state["old_exact"]` (see `agrpo_loss`)."""
    cfg, accelerator, policy = ctx.cfg, ctx.accelerator, ctx.policy
    chunks = [plan.chunks(cfg.max_rows_per_forward) for plan in plans]
    total, count = totals(accelerator, sum(plan.count for plan in plans), sum(chunks))
    count = max(count, 1)  # nothing to learn anywhere: one zero backward still steps every backend alike
    sync = OneSync(accelerator, policy, count)
    pieces = [(p, plan.normalized(total, accelerator.num_processes), True)
              for p, plan, n in zip(parts, plans, chunks) if n]
    pieces += [(parts[-1], padding_plan(parts[-1].rollout), False)] * (count - sum(chunks))
    sums = new_sums()
    for part, plan, real in pieces:
        _, m = agrpo_loss(
            policy, part.rollout, part.advantages, plan=plan,
            eps_low=cfg.eps_low, eps_high=cfg.eps_high, beta=cfg.beta, ref_logits_fn=ctx.ref_logits_fn,
            max_rows_per_forward=cfg.max_rows_per_forward, backward=accelerator.backward, chunk_context=sync.piece,
            log_ratio_clamp=log_ratio_clamp, tis_cap=tis_cap, old_exact=_old_exact(part, tis_cap),
        )
        if real:  # a padding piece's tokens weigh nothing in the loss and count in no metric
            add_piece(sums, m)
    sync.check()
    return global_metrics(accelerator, sums)
