"""Straightforward versions of the sampler and of the AGRPO loss, the yardstick of the benchmarks.

Both compute exactly what `agrpo.sampling.generate` and `agrpo.objectives.agrpo_loss` compute
(the same filtered, tempered distribution; the same clipped surrogate), the obvious way:

* every step asks the model for the logits of the whole sequence (`model(...).logits`);
* top-k and top-p come from a sort of the full vocabulary;
* the sampling noise is float64 Gumbel noise over the full vocabulary;
* the filter is recorded as a [B, C, V] bool mask;
* the loss runs one forward per sampled step, log-softmax over the full vocabulary.

NOTES.md measured such a sampler at 6.6 tokens/s with a 62 MB record on this config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from agrpo.objectives.common import clipped_surrogate


@dataclass
class NaiveRollout:
    tokens: torch.Tensor  # [B, P+C]
    step: torch.Tensor  # [B, C] long
    logp: torch.Tensor  # [B, C] float32
    entropy: torch.Tensor  # [B, C] float32
    sampled: torch.Tensor  # [B, C] bool
    allowed: torch.Tensor  # [B, C, V] bool: the filter of every committed position
    t_eff: torch.Tensor  # [B] long

    def record_bytes(self) -> int:
        tensors = (self.tokens, self.step, self.logp, self.entropy, self.sampled, self.allowed, self.t_eff)
        return sum(t.numel() * t.element_size() for t in tensors)


def naive_filter(scaled: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Allowed-token mask [..., V] of the top-k / top-p filter, from a full sort.

    The rule of `agrpo.sampling.filter_logits`: keep logits >= the k-th largest (ties kept),
    then the shortest descending prefix of the renormalised distribution whose mass reaches
    top_p, plus every token tied with its last member.
    """
    vocab = scaled.shape[-1]
    sorted_vals, order = scaled.sort(dim=-1, descending=True)
    keep = torch.ones_like(sorted_vals, dtype=torch.bool)
    if 0 < top_k < vocab:
        keep = sorted_vals >= sorted_vals[..., top_k - 1 : top_k]
    if top_p < 1.0:
        probs = torch.softmax(sorted_vals.masked_fill(~keep, float("-inf")), dim=-1)
        need = ((probs.cumsum(-1) < top_p) & keep).sum(-1, keepdim=True) + 1
        need = torch.minimum(need, keep.sum(-1, keepdim=True))
        keep = keep & (probs >= probs.gather(-1, need - 1))
    return torch.zeros_like(keep).scatter(-1, order, keep)


@torch.no_grad()
def naive_generate(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    cfg,
    mask_id: int,
    eos_id: int | None,
    generator: torch.Generator | None = None,
) -> NaiveRollout:
    """Sample like `agrpo.sampling.generate` (temperature > 0, any remasking rule), slowly."""
    if cfg.temperature <= 0:
        raise ValueError("the baseline sampler draws with temperature > 0")
    bsz, plen = prompt_ids.shape
    gen, blen, spb, kps = cfg.gen_length, cfg.block_length, cfg.steps_per_block, cfg.tokens_per_step
    x = torch.cat([prompt_ids, prompt_ids.new_full((bsz, gen), mask_id)], dim=1)
    step = torch.full((bsz, gen), -1, dtype=torch.long)
    logp = torch.zeros(bsz, gen)
    entropy = torch.zeros(bsz, gen)
    sampled = torch.zeros(bsz, gen, dtype=torch.bool)
    allowed_rec = None
    done = torch.zeros(bsz, dtype=torch.bool)
    for block in range(gen // blen):
        start = plen + block * blen
        if cfg.stop_at_eos and eos_id is not None and block > 0:
            ended = ~done & (x[:, start - blen : start] == eos_id).all(1)
            x[ended, start:] = eos_id
            step[ended, block * blen :] = block * spb
            done |= ended
        for s in range(spb):
            t = block * spb + s
            logits = model(input_ids=x).logits.float()  # [B, L, V]
            logits[..., mask_id] = float("-inf")
            scaled = logits[:, start : start + blen] / cfg.temperature  # [B, BL, V]
            allowed = naive_filter(scaled, cfg.top_k, cfg.top_p) & torch.isfinite(scaled)
            logp_all = torch.log_softmax(scaled.masked_fill(~allowed, float("-inf")), dim=-1)
            u = torch.rand(logp_all.shape, dtype=torch.float64, generator=generator)
            gumbel = -torch.log(-torch.log(u.clamp(min=1e-300)))
            tok = (logp_all.double() + gumbel).argmax(-1)  # [B, BL]
            lp = logp_all.gather(-1, tok[..., None]).squeeze(-1)
            p = logp_all.exp()
            ent = -(p * logp_all.masked_fill(~allowed, 0.0)).sum(-1)
            masked = x[:, start : start + blen] == mask_id
            if cfg.remasking == "random":
                score = torch.rand(masked.shape, generator=generator)
            elif cfg.remasking == "low_confidence":
                score = lp
            elif cfg.remasking == "entropy":
                score = -ent
            else:
                top2 = p.topk(2, dim=-1).values
                score = top2[..., 0] - top2[..., 1]
            score = score.masked_fill(~masked, float("-inf"))
            chosen = score.topk(kps, dim=-1).indices  # [B, kps] block-relative
            live = ~done[:, None].expand_as(chosen)
            r = torch.arange(bsz)[:, None].expand_as(chosen)[live]
            pos = chosen[live]
            col = block * blen + pos
            x[r, start + pos] = tok[r, pos]
            step[r, col] = t
            logp[r, col] = lp[r, pos]
            entropy[r, col] = ent[r, pos]
            sampled[r, col] = True
            if allowed_rec is None:
                allowed_rec = torch.zeros(bsz, gen, allowed.shape[-1], dtype=torch.bool)
            allowed_rec[r, col] = allowed[r, pos]
    real = sampled & ((x[:, plen:] != eos_id) if eos_id is not None else torch.ones_like(sampled))
    t_eff = torch.where(real, step + 1, torch.zeros_like(step)).max(1).values
    return NaiveRollout(x, step, logp, entropy, sampled, allowed_rec, t_eff)


def naive_agrpo_loss(
    model: nn.Module,
    rollout,
    advantages: torch.Tensor,
    plan,
    num_samples: int,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    backward: bool = True,
) -> float:
    """The AGRPO surrogate of `plan` (an `agrpo.objectives.agrpo.StepPlan`), one sampled step at a time.

    For draw j of every row: rebuild x_t, run the whole model, log-softmax over the full
    vocabulary under the recorded filter (expanded to a [R, C, V] mask), gather the tokens,
    clipped surrogate over the tokens committed at t, backward. Returns the summed loss.
    """
    k = num_samples  # plan_steps lays the draws out row-major: entry r * K + j
    rows_all, t_all, coef_all = (v.view(-1, k) for v in (plan.row, plan.t, plan.coef))
    plen, mask_id, temp = rollout.prompt_len, rollout.mask_id, rollout.config.temperature
    vocab = model.get_output_embeddings().weight.shape[0]
    total = 0.0
    for j in range(k):
        rows, t, coef = rows_all[:, j], t_all[:, j], coef_all[:, j]
        x = rollout.tokens[rows].clone()
        step = rollout.step[rows]
        x[:, plen:] = x[:, plen:].masked_fill(step >= t[:, None], mask_id)
        attn = rollout.attention_mask[rows]
        kwargs = {} if bool(attn.all()) else {"attention_mask": attn}
        logits = model(input_ids=x, **kwargs).logits.float()[:, plen:]  # [R, C, V]
        if rollout.filter_ids is None:
            allowed = torch.ones(logits.shape, dtype=torch.bool)
        else:
            ids = rollout.filter_ids[rows].long()
            ids = ids.masked_fill(ids < 0, vocab)  # unused slots land in a spare column
            allowed = torch.zeros(*ids.shape[:2], vocab + 1, dtype=torch.bool)
            allowed.scatter_(-1, ids, True)
            allowed = allowed[..., :vocab]
        allowed[..., mask_id] = False
        logp_all = torch.log_softmax((logits / temp).masked_fill(~allowed, float("-inf")), dim=-1)
        logp = logp_all.gather(-1, rollout.completion[rows][..., None]).squeeze(-1)  # [R, C]
        sel = (step == t[:, None]) & rollout.sampled[rows]
        old = rollout.logp[rows]
        # tokens not committed at t take ratio 1 before being zeroed: a far-off ratio there
        # could overflow exp() and turn the masked gradient into NaN
        logp = torch.where(sel, logp, old)
        per_tok, _, _ = clipped_surrogate(logp, old, advantages[rows][:, None], eps_low, eps_high)
        loss = (coef * torch.where(sel, per_tok, torch.zeros_like(per_tok)).sum(1)).sum()
        if backward:
            loss.backward()
        total += float(loss.detach())
    return total
