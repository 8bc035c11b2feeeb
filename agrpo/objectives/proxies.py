"""Likelihood proxies: pure tensor functions shared by the objectives (ALGORITHMS.md, "Likelihood
proxies").

Every proxy reads the policy at corrupted copies of (prompt, completion): some completion
positions (and, for some, prompt positions) replaced by the mask id. Masks are drawn from the
micro-batch's generator (`Part.generator`, keyed by seed, step and first prompt), in a fixed
order, once per (update, copy), and kept: the old, reference and current evaluations of one
update then see the same masks, 1 process draws what N processes draw, and a resumed run
draws what the straight run drew.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from agrpo.sampling import Rollout

def token_logp(
    policy: nn.Module,
    rollout: Rollout,
    completion_masked: torch.Tensor,
    prompt_masked: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """[B, C] log p(o_j | x~) at every completion position j, where x~ is (prompt, completion) with
    the completion masked where `completion_masked` [B, C] and the prompt where `prompt_masked`
    [B, P+C] (prompt columns only). Shifted families are read at j - 1 by the policy itself."""
    x = rollout.tokens.clone()
    p = rollout.prompt_len
    x[:, p:] = torch.where(completion_masked, torch.full_like(rollout.completion, rollout.mask_id), rollout.completion)
    if prompt_masked is not None:
        x = x.masked_fill(prompt_masked, rollout.mask_id)
    bsz, gen = rollout.completion.shape
    positions = p + torch.arange(gen, device=x.device).expand(bsz, gen)
    logits = policy(x, positions, rollout.attention_mask)
    logp = torch.log_softmax(logits / temperature, dim=-1)
    return logp.gather(-1, rollout.completion[:, :, None]).squeeze(-1)


def valid_tokens(rollout: Rollout) -> torch.Tensor:
    """[B, C] bool: v_j, the completion up to and including its first EOS (ALGORITHMS.md notation)."""
    stops = torch.zeros_like(rollout.completion, dtype=torch.bool)
    for eos in rollout.stop_ids:
        stops |= rollout.completion == int(eos)
    before = torch.cumsum(stops.long(), dim=1) - stops.long()  # EOS tokens strictly before j
    return before == 0


# -- corrupted copies ------------------------------------------------------------------------------
# A set of K corrupted copies of each row is held as `Copies`: which completion positions are masked
# [B, K, C], which prompt positions are masked [B, K, P+C] (or None: the prompt stays clean), and a
# coefficient per copy [B, K] that turns the copy's summed masked log-probs into its share of the
# row's estimate (proxy 2: the 1/t weight over the number of copies).

class Copies(dict):
    """{"completion": [B, K, C] bool, "prompt": [B, K, P+C] bool | None, "coef": [B, K] float64}."""

    def rows(self, index) -> "Copies":
        """The copies of the rows `index` (a slice or index tensor)."""
        return Copies({k: (None if v is None else v[index]) for k, v in self.items()})


def copies_logp(policy: nn.Module, rollout: Rollout, rows, copies: Copies) -> torch.Tensor:
    """[b, K, C] log p(o_j | x~_k) of the rows `rows` (a slice) of `rollout`, one forward over b*K sequences."""
    masked = copies["completion"]
    b, k, gen = masked.shape
    p = rollout.prompt_len
    tokens = rollout.tokens[rows]
    x = tokens[:, None, :].expand(b, k, tokens.shape[1]).clone()
    x[:, :, p:] = torch.where(masked, torch.full_like(x[:, :, p:], rollout.mask_id), x[:, :, p:])
    if copies.get("prompt") is not None:
        x = x.masked_fill(copies["prompt"], rollout.mask_id)
    x = x.reshape(b * k, -1)
    attention = rollout.attention_mask[rows][:, None, :].expand(b, k, -1).reshape(b * k, -1)
    positions = p + torch.arange(gen, device=x.device).expand(b * k, gen)
    logp = torch.log_softmax(policy(x, positions, attention), dim=-1)
    target = tokens[:, None, p:].expand(b, k, gen).reshape(b * k, gen)
    return logp.gather(-1, target[:, :, None]).squeeze(-1).view(b, k, gen)


def stratified_counts(eligible: torch.Tensor, copies: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, K] long: how many of the N = eligible[b] positions each copy masks, stratified over the copies
    of a row (LLaDA's likelihood estimator): one k ~ U{1..N} a row, x_i = ((round(k + i N / K) - 1) mod N) + 1,
    so every copy masks between 1 and N positions (0 when N = 0)."""
    n = eligible.long()
    k = torch.rand(n.shape, generator=generator, device=n.device, dtype=torch.float64)
    start = torch.floor(k * n).long() + 1  # uniform on 1..N
    i = torch.arange(copies, device=n.device, dtype=torch.float64)
    x = torch.round(start[:, None].double() + i[None, :] * n[:, None].double() / copies).long()
    x = torch.remainder(x - 1, n[:, None].clamp(min=1)) + 1
    return torch.where(n[:, None] > 0, x, torch.zeros_like(x))


def random_subsets(eligible: torch.Tensor, counts: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """[B, K, C] bool: for each row and copy, counts[b, k] positions drawn uniformly among eligible[b] ([B, C])."""
    b, c = eligible.shape
    k = counts.shape[1]
    keys = torch.rand((b, k, c), generator=generator, device=eligible.device, dtype=torch.float64)
    keys = keys.masked_fill(~eligible[:, None, :], 2.0)  # ineligible positions sort last
    rank = keys.argsort(-1).argsort(-1)
    return rank < counts[:, :, None]


def elbo_copies(
    eligible: torch.Tensor, copies: int, generator: torch.Generator | None = None, complement: bool = False
) -> Copies:
    """Proxy 2: K stratified copies masking x_i of the N eligible positions ([B, C] bool), each weighted
    N / x_i (= 1/t) over K. With `complement` each copy is followed by its complement within the eligible
    positions, weighted N / (N - x_i) (= 1/(1-t)), and a pair's estimate is the mean of its two members;
    a copy that masks all N positions has an empty complement and stands alone for its pair (its pair's
    estimate is then the copy itself, which keeps the complement's mask count uniform on 1..N: unbiased)."""
    n = eligible.sum(1)
    counts = stratified_counts(n, copies, generator)
    masked = random_subsets(eligible, counts, generator)
    nf = n.double()[:, None]
    weight = torch.where(counts > 0, nf / counts.clamp(min=1).double(), torch.zeros_like(nf).expand_as(counts))
    if not complement:
        return Copies(completion=masked, prompt=None, coef=weight / copies)
    other = eligible[:, None, :] & ~masked
    rest = n[:, None] - counts
    weight_c = torch.where(rest > 0, nf / rest.clamp(min=1).double(), torch.zeros_like(weight))
    share = torch.where(rest > 0, 0.5, 1.0).double()
    pair_masks = torch.stack([masked, other], 2).flatten(1, 2)  # [B, 2K, C]: copy, its complement, ...
    coef = torch.stack([weight * share, weight_c * 0.5], 2).flatten(1, 2) / copies
    return Copies(completion=pair_masks, prompt=None, coef=coef)


def sequence_elbo(logp: torch.Tensor, copies: Copies) -> torch.Tensor:
    """[b] the proxy-2 estimate sum_k coef_k sum_{j masked in k} log p_k(o_j) (logp [b, K, C])."""
    picked = torch.where(copies["completion"], logp, torch.zeros_like(logp))
    return (picked.sum(-1) * copies["coef"].to(logp.dtype)).sum(-1)


def block_copies(
    rollout: Rollout,
    valid: torch.Tensor,
    block_length: int,
    copies: int,
    prompt_p: float = 0.15,
    generator: torch.Generator | None = None,
) -> Copies:
    """Proxy 4 (SPG's block-wise masks), K copies a row. Each copy picks a block k among the blocks that
    hold valid tokens (a random order of all blocks, folded onto the valid ones: SPG's draw); earlier
    blocks stay clean, block k masks m ~ U{1..its valid tokens} of its valid tokens, later blocks and
    every position after EOS are masked, and each still-clean position before block k (real prompt tokens
    and earlier completion blocks) is masked with probability `prompt_p`. coef is unused (zeros)."""
    bsz, gen = valid.shape
    if gen % block_length:
        raise ValueError(f"the completion length {gen} is not a multiple of block_length={block_length}")
    blocks = gen // block_length
    n = valid.sum(1)
    valid_blocks = ((n - 1).clamp(min=0) // block_length + 1).long()
    rounds = -(-copies // blocks)  # more copies than blocks: further random orders follow the first
    order = torch.rand((bsz, rounds, blocks), generator=generator, device=valid.device, dtype=torch.float64).argsort(-1)
    chosen = torch.remainder(order.flatten(1)[:, :copies], valid_blocks[:, None])  # [B, K]
    col = torch.arange(gen, device=valid.device)
    start = chosen * block_length  # [B, K]
    in_block = (col[None, None, :] >= start[:, :, None]) & (col[None, None, :] < start[:, :, None] + block_length)
    block_valid = in_block & valid[:, None, :]
    size = block_valid.sum(-1)  # [B, K]
    u = torch.rand((bsz, copies), generator=generator, device=valid.device, dtype=torch.float64)
    count = torch.floor(u * size).long() + 1
    partial = random_subsets(block_valid.flatten(0, 1), count.flatten()[:, None], generator).view(bsz, copies, gen)
    later = col[None, None, :] >= (start + block_length)[:, :, None]
    masked = partial | (later | ~valid[:, None, :])
    before = col[None, None, :] < start[:, :, None]
    coin = torch.rand((bsz, copies, rollout.tokens.shape[1]), generator=generator, device=valid.device) < prompt_p
    p = rollout.prompt_len
    prompt = coin.clone()
    prompt[:, :, :p] &= rollout.attention_mask[:, None, :p].bool()
    prompt[:, :, p:] &= before
    completion = masked | prompt[:, :, p:]
    prompt[:, :, p:] = False
    return Copies(completion=completion, prompt=prompt, coef=torch.zeros((bsz, copies), dtype=torch.float64))


def spg_bounds(logp: torch.Tensor, copies: Copies, valid: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """([b] ELBO, [b] EUBO) of SPG from logp [b, K, C] under block copies, over the valid tokens [b, C]:
    ELBO = (1/K) sum_s mean_{j in M_s} log p_s(o_j), M_s the masked valid positions of copy s;
    EUBO = (1/beta) mean_{j: U_j > 0} log U_j, U_j = (1/K) sum_s 1[j in M_s] p_s(o_j)^beta / t_s, t_s = |M_s| / n."""
    k = logp.shape[1]
    member = copies["completion"] & valid[:, None, :]
    size = member.sum(-1)  # [b, K]
    picked = torch.where(member, logp, torch.zeros_like(logp))
    elbo = (picked.sum(-1) / size.clamp(min=1)).sum(-1) / k
    t = size.to(logp.dtype) / valid.sum(1, keepdim=True).clamp(min=1).to(logp.dtype)
    # p^beta / t in log space: beta log p - log t, summed over the copies that mask j
    terms = torch.where(member, beta * logp - torch.log(t.clamp(min=1e-300))[:, :, None], torch.full_like(logp, -math.inf))
    log_u = torch.logsumexp(terms, 1) - math.log(k)  # [b, C], -inf where no copy masks j
    present = member.any(1)
    log_u = torch.where(present, log_u, torch.zeros_like(log_u))
    eubo = log_u.sum(-1) / present.sum(-1).clamp(min=1) / beta
    return elbo, eubo


# -- running an objective's pieces ----------------------------------------------------------------

def row_chunks(rows: int, per_chunk: int) -> list[slice]:
    """Consecutive slices of at most `per_chunk` rows covering `rows`."""
    per_chunk = max(int(per_chunk), 1)
    return [slice(i, min(i + per_chunk, rows)) for i in range(0, rows, per_chunk)]


def zero_piece(policy: nn.Module, rollout: Rollout) -> torch.Tensor:
    """A loss of 0 that still runs the policy's forward (a padding piece: every process backs as many)."""
    gen = rollout.completion.shape[1]
    positions = rollout.prompt_len + torch.arange(gen, device=rollout.tokens.device)[None]
    return policy(rollout.tokens[:1], positions, rollout.attention_mask[:1]).sum() * 0.0


def run_pieces(ctx, parts: list, chunks_of, loss_of, count_of) -> dict:
    """Back-propagate an objective's pieces with one gradient sync -> the step's global metrics.

    chunks_of(part) -> the part's piece keys (a backward each); count_of(part) -> this part's share of
    the normaliser, summed over micro-batches and processes into `total`; loss_of(part, key, total) ->
    (loss of the piece already divided by total, metrics with clip_frac, kl, loss_tokens). Every process
    backs the same number of pieces (the largest; the others add zero pieces), and each loss is scaled
    by the number of processes because they average their gradients.
    """
    from agrpo.distributed import OneSync, totals
    from agrpo.objectives.base import add_piece, global_metrics, new_sums

    accelerator = ctx.accelerator
    keys = [list(chunks_of(p)) for p in parts]
    total, pieces = totals(accelerator, sum(float(count_of(p)) for p in parts), sum(len(k) for k in keys))
    pieces = max(pieces, 1)  # nothing to learn anywhere: one zero backward still steps every backend alike
    sync = OneSync(accelerator, ctx.policy, pieces)
    sums, used = new_sums(), 0
    for part, part_keys in zip(parts, keys):
        for key in part_keys:
            with sync.piece():
                loss, m = loss_of(part, key, max(total, 1.0))
                accelerator.backward(loss * accelerator.num_processes)
            add_piece(sums, {**m, "loss": float(loss.detach()) * accelerator.num_processes})
            used += 1
    while used < pieces:
        with sync.piece():
            accelerator.backward(zero_piece(ctx.policy, parts[-1].rollout))
        used += 1
    sync.check()
    return global_metrics(accelerator, sums)
