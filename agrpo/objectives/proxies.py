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
