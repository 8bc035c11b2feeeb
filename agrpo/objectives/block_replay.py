"""Trajectory replay on block-diffusion models: one forward scores a step of every block.

A block-diffusion model (SDAR, TraDo, LLaDA2) writes its completion block by block, and a
position attends to every earlier block and to its own block only. The state of block b at any
of its denoising steps therefore depends on the clean earlier blocks and on block b itself,
never on later blocks. The block-diffusion training layout uses this: beside the clean sequence
(prompt + completion) it places a noisy copy of every completion block, under one attention
mask in which

* a clean position sees the clean positions of its own and earlier blocks (the model's mask),
* a noisy copy of block b sees the clean blocks before b and its own copy (bidirectionally),
* no clean position sees a noisy copy,

with each copy at the position ids of the block it copies. Block b's copy shows the block as it
was at a chosen step t_b of block b (tokens committed at t_b or later are [MASK]), so its logits
are exactly those of the full rebuilt state x_{t_b}: one forward of length P + 2C scores one step
of every block, the work of as many forwards as there are blocks.

`block_step_plan` draws the steps: K per (row, block) among the steps that committed tokens of
that block (stratified, low-discrepancy or iid, optionally entropy-weighted as AGRPO's per-step
plan), each with weight (1 / T_eff) / q_b(t). Since the blocks partition the steps,
sum_b E_{t ~ q_b}[(1 / T_eff) L_t / q_b(t)] = (1 / T_eff) sum_t L_t: the estimate stays unbiased
for the same objective as AGRPO's per-step plan (the K per block average folded into the
normaliser, K x rows draws per batch).

Blocks are counted from position 0 of the (left-padded) sequence, whose prompt part the block
sampler pads to a whole number of blocks (`agrpo.sampling.generate`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from agrpo.errors import AgrpoError
from agrpo.objectives.agrpo import ENTROPY_FLOOR, StepPlan, _plan, _uniforms, learning_rows, step_entropy
from agrpo.objectives.common import clipped_surrogate, horizon, k3_kl
from agrpo.sampling import Rollout, token_log_prob

NOT_SHOWN = torch.iinfo(torch.long).max  # t of a block whose copy is left clean (nothing scored there)


@dataclass
class BlockPlan(StepPlan):
    """A StepPlan whose draws are grouped into packs: draw k of every block of a row, one forward each."""

    pack: torch.Tensor = None  # [S] long: the pack (forward row) of each draw, packs numbered from 0
    block: torch.Tensor = None  # [S] long: the completion block of each draw
    pack_row: torch.Tensor = None  # [N] long: the rollout row of each pack

    def normalized(self, total: float, scale: float = 1.0) -> "BlockPlan":
        base = super().normalized(total, scale)
        return BlockPlan(base.row, base.t, base.weight, base.coef, base.positions, base.valid, base.count,
                         pack=self.pack, block=self.block, pack_row=self.pack_row)

    def chunks(self, max_rows_per_forward: int | None) -> int:
        n = self.pack_row.numel()
        size = n if not max_rows_per_forward else max(1, int(max_rows_per_forward))
        return -(-n // size) if n else 0


def block_ranges(rollout: Rollout, eos_steps: str = "include") -> tuple[torch.Tensor, torch.Tensor]:
    """([B, nb], [B, nb]) long: the first step and one past the last step that committed (sampled)
    tokens of each completion block and enter the loss (steps < T_eff); lo == hi for a block with none."""
    bl = rollout.config.block_length
    bsz, gen = rollout.step.shape
    nb = gen // bl
    t_eff = horizon(rollout, eos_steps)
    live = rollout.sampled & (rollout.step < t_eff[:, None])
    step = rollout.step.view(bsz, nb, bl)
    live = live.view(bsz, nb, bl)
    big = torch.iinfo(torch.long).max
    lo = torch.where(live, step, torch.full_like(step, big)).amin(-1)
    hi = torch.where(live, step + 1, torch.zeros_like(step)).amax(-1)
    lo = torch.where(hi > 0, lo, hi)
    return lo, hi


def block_step_plan(
    rollout: Rollout,
    num_samples: int,
    step_sampling: str = "stratified",
    importance: str = "none",
    normalization: str = "sequence",
    row_valid: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    eos_steps: str = "include",
) -> BlockPlan:
    """Draw K steps in every block of every row, packed so that draw k of all blocks of a row share a forward."""
    t_eff, rows = learning_rows(rollout, normalization, row_valid, eos_steps, num_samples)
    device = rollout.step.device
    lo, hi = block_ranges(rollout, eos_steps)
    lo, hi = lo[rows], hi[rows]  # [R, nb]
    n_rows, nb = lo.shape
    k = num_samples
    steps = int(t_eff.max()) if t_eff.numel() else 0
    span = torch.arange(max(steps, 1), device=device)
    inside = (span >= lo[..., None]) & (span < hi[..., None])  # [R, nb, T]
    if importance == "none":
        q = inside.double()
    elif importance == "entropy":
        h = step_entropy(rollout, max(steps, 1))[rows][:, None, :] * inside
        mean = h.sum(-1, keepdim=True) / inside.sum(-1, keepdim=True).clamp(min=1)
        q = (h + ENTROPY_FLOOR * mean + 1e-12) * inside
    else:
        raise AgrpoError(f"unknown importance {importance!r}: choose one of none, entropy")
    q = q / q.sum(-1, keepdim=True).clamp(min=1e-300)
    u = _uniforms(n_rows * nb, k, step_sampling, generator, device).view(n_rows, nb, k)
    t = torch.searchsorted(q.cumsum(-1), u, right=True)
    t = torch.minimum(torch.maximum(t, lo[..., None]), (hi - 1).clamp(min=0)[..., None])
    weight = 1.0 / (t_eff[rows][:, None, None].double() * q.gather(-1, t))
    live = (hi > lo)[..., None].expand(-1, -1, k)  # [R, nb, K]
    return _packed(rollout, rows, t, weight, live, normalization, float(k * n_rows))


def _packed(rollout: Rollout, rows, t, weight, live, normalization: str, draws: float) -> BlockPlan:
    """The plan of the live draws (t, weight: [R, nb, K]) in pack-major order (row, then draw k, then
    block), draw k of every block of a row being one pack (one forward row)."""
    k = t.shape[-1]
    r_idx, k_idx, b_idx = live.permute(0, 2, 1).nonzero(as_tuple=True)
    packs, pack = torch.unique(r_idx * k + k_idx, return_inverse=True)
    plan = _plan(rollout, rows[r_idx], t[r_idx, b_idx, k_idx], weight[r_idx, b_idx, k_idx], normalization, draws)
    return BlockPlan(plan.row, plan.t, plan.weight, plan.coef, plan.positions, plan.valid, plan.count,
                     pack=pack, block=b_idx, pack_row=rows[packs // k])


def every_block_step_plan(rollout: Rollout, normalization: str = "sequence", row_valid: torch.Tensor | None = None,
                          eos_steps: str = "include") -> BlockPlan:
    """Every live step of every block once, packed round by round (the r-th step of every block in
    one forward): the exact objective `block_step_plan` estimates, by as many forwards as the longest
    block has steps."""
    t_eff, rows = learning_rows(rollout, normalization, row_valid, eos_steps)
    lo, hi = block_ranges(rollout, eos_steps)
    lo, hi = lo[rows], hi[rows]
    rounds = max(int((hi - lo).max()) if rows.numel() else 0, 1)
    t = lo[..., None] + torch.arange(rounds, device=lo.device)  # [R, nb, rounds]
    live = t < hi[..., None]
    if normalization == "sequence":  # the every-step average of each row, K folded into the weight
        weight = (1.0 / t_eff[rows].double())[:, None, None].expand(t.shape)
    else:
        weight = torch.ones(t.shape, dtype=torch.float64, device=t.device)
    return _packed(rollout, rows, t, weight, live, normalization, float(rows.numel()))


def packed_layout(rollout: Rollout, row: torch.Tensor, t_blocks: torch.Tensor):
    """The block-diffusion training layout of rows `row` with block b's copy at step t_blocks[:, b]
    -> (input ids [N, P+2C], position ids [N, P+2C], attention [N, 1, P+2C, P+2C] bool, True = may attend)."""
    p, gen = rollout.prompt_len, rollout.completion.shape[1]
    bl = rollout.config.block_length
    blk = torch.arange(gen, device=rollout.tokens.device) // bl
    shown = t_blocks.gather(1, blk.expand(row.numel(), gen))
    noisy = rollout.tokens[row, p:].masked_fill(rollout.step[row] >= shown, rollout.mask_id)
    return block_diffusion_layout(rollout.tokens[row], rollout.attention_mask[row], p, bl, noisy)


def block_diffusion_layout(tokens: torch.Tensor, attention_mask: torch.Tensor, prompt_len: int, block_length: int,
                           noisy: torch.Tensor):
    """The block-diffusion training layout: the clean sequence `tokens` [N, P+C] (left-padded prompt,
    P a whole number of blocks; `attention_mask` 0 on the padding) followed by `noisy` [N, C], a noisy
    copy of the completion -> (input ids [N, P+2C], position ids [N, P+2C], attention [N, 1, P+2C, P+2C]
    bool, True = may attend). The logits at P + C + j are those of completion position j in the state
    where its block is as in `noisy` and every earlier block is clean (what the model's own inference sees)."""
    p, bl = prompt_len, block_length
    gen = tokens.shape[1] - p
    if p % bl or gen % bl:
        raise AgrpoError(f"the prompt part ({p} positions) and the completion ({gen}) must be whole blocks of {bl}: "
                         "block-model rollouts come from agrpo.sampling.generate, which aligns them")
    device = tokens.device
    n = tokens.shape[0]
    ids = torch.cat([tokens, noisy], 1)
    pos_clean = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    positions = torch.cat([pos_clean, pos_clean[:, p:]], 1)
    length = p + 2 * gen
    index = torch.arange(length, device=device)
    is_noisy = index >= p + gen
    qb = torch.where(is_noisy, (index - gen) // bl, index // bl)  # a copy is in its block's place
    allowed = torch.where(
        is_noisy[:, None],
        torch.where(is_noisy[None, :], qb[None, :] == qb[:, None], qb[None, :] < qb[:, None]),
        ~is_noisy[None, :] & (qb[None, :] <= qb[:, None]),
    )
    real = torch.cat([attention_mask.bool(), torch.ones(n, gen, dtype=torch.bool, device=device)], 1)
    visible = allowed[None] & real[:, None, :]
    itself = torch.eye(length, dtype=torch.bool, device=device)[None]
    return ids, positions, torch.where(real[:, :, None], visible, itself)[:, None]


def pack_chunks(plan: BlockPlan, max_rows_per_forward: int | None):
    """Index tensors of the draws of each forward (at most `max_rows_per_forward` packs)."""
    n = plan.pack_row.numel()
    size = n if not max_rows_per_forward else max(1, int(max_rows_per_forward))
    for first in range(0, n, size):
        last = min(n, first + size)
        yield ((plan.pack >= first) & (plan.pack < last)).nonzero().squeeze(1), first, last


def packed_inputs(rollout: Rollout, plan: BlockPlan, idx: torch.Tensor, first: int, last: int):
    """What one forward over packs first..last-1 needs: (ids, position ids, attention, scored positions
    [N, W'] in the packed sequence, completion positions [N, W'], valid [N, W'], coef [N, W'] float64,
    pack rows [N])."""
    bl = rollout.config.block_length
    gen = rollout.completion.shape[1]
    nb = gen // bl
    n = last - first
    rows = plan.pack_row[first:last]
    local = plan.pack[idx] - first
    blocks = plan.block[idx]
    t_blocks = torch.full((n, nb), NOT_SHOWN, dtype=torch.long, device=rows.device)
    t_blocks[local, blocks] = plan.t[idx]
    ids, position_ids, attention = packed_layout(rollout, rows, t_blocks)
    width = plan.positions.shape[1]
    pos = torch.zeros(n, nb * width, dtype=torch.long, device=rows.device)
    valid = torch.zeros(n, nb * width, dtype=torch.bool, device=rows.device)
    coef = torch.zeros(n, nb * width, dtype=torch.float64, device=rows.device)
    slots = blocks[:, None] * width + torch.arange(width, device=rows.device)[None]
    pos[local[:, None], slots] = plan.positions[idx]
    valid[local[:, None], slots] = plan.valid[idx]
    coef[local[:, None], slots] = plan.coef[idx][:, None].expand(-1, width)
    scored = rollout.prompt_len + gen + pos
    return ids, position_ids, attention, scored, pos, valid, coef, rows


def packed_chunk_loss(policy, rollout: Rollout, plan: BlockPlan, idx, first: int, last: int, advantages,
                      eps_low: float, eps_high: float, beta: float, ref_logits_fn, log_ratio_clamp: float = 0.0):
    """(loss, stats) of the draws of packs first..last-1, one forward: AGRPO's clipped surrogate (and k3
    KL) on every token a drawn step committed, each draw's tokens times its coefficient."""
    ids, position_ids, attention, scored, pos, valid, coef, rows = packed_inputs(rollout, plan, idx, first, last)
    tokens = rollout.completion[rows].gather(1, pos)
    filt = None
    if rollout.filter_ids is not None:
        f = rollout.filter_ids[rows]
        filt = f.gather(1, pos[:, :, None].expand(-1, -1, f.shape[-1]))
    temperature = rollout.config.temperature
    logits = policy(ids, scored, attention, position_ids=position_ids)
    logp, _ = token_log_prob(logits, tokens, temperature, filt, rollout.mask_id)
    old = rollout.logp[rows].gather(1, pos)
    adv = advantages[rows][:, None]
    per_tok, ratio, clipped = clipped_surrogate(logp, old, adv, eps_low, eps_high, log_ratio_clamp)
    kl = torch.zeros_like(per_tok)
    if beta > 0:
        with torch.no_grad():
            ref_logits = ref_logits_fn(ids, scored, attention, position_ids=position_ids)
            ref_logp, _ = token_log_prob(ref_logits, tokens, temperature, filt, rollout.mask_id)
        kl = k3_kl(logp, ref_logp, ratio)
        per_tok = per_tok + beta * kl
    per_tok = per_tok.masked_fill(~valid, 0.0)
    loss = (coef.to(per_tok.dtype) * per_tok).sum()
    stats = {
        "tokens": valid.sum().item(),
        "clipped": (clipped & valid).sum().item(),
        "ratio_sum": ratio.detach().masked_fill(~valid, 0.0).sum().item(),
        "kl_sum": kl.detach().masked_fill(~valid, 0.0).sum().item(),
    }
    return loss, stats
