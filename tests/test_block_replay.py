"""AGRPO on block-diffusion models: the block-diffusion training layout scores a step of every block in
one forward, exactly as the rebuilt states do, and the per-block step draws estimate the same objective."""

import dataclasses

import pytest
import torch

from agrpo.objectives.agrpo import StepPlan, agrpo_loss, every_step_plan, rebuild_states
from agrpo.objectives.block_replay import (
    NOT_SHOWN, block_ranges, block_step_plan, every_block_step_plan, packed_layout,
)
from agrpo.sampling import generate
from test_block_sampling import BS, FIXED, block_policy, eos_prone, padded_prompts

CFG = dataclasses.replace(FIXED, gen_length=12, steps=12, cache="prefix", top_k=6)


def rollout(seed=0, threshold=0.0, double=True, policy=None, top_k=CFG.top_k):
    policy = policy or eos_prone(block_policy(seed, double), 1.5)
    ids, mask = padded_prompts([5, 9, 3, 7, 6, 4], seed)
    cfg = dataclasses.replace(CFG, threshold=threshold, top_k=top_k)
    return policy, generate(policy, ids, mask, cfg, torch.Generator().manual_seed(seed + 1))


def test_packed_layout_scores_each_block_as_its_rebuilt_state():
    policy, ro = rollout(0, threshold=0.1)
    p, gen = ro.prompt_len, ro.completion.shape[1]
    nb = gen // BS
    lo, hi = block_ranges(ro)
    g = torch.Generator().manual_seed(5)
    rows = torch.arange(ro.tokens.shape[0])
    # a random live step of every block (a dead block's copy stays clean)
    t = torch.where(hi > lo, lo + (torch.rand(lo.shape, generator=g) * (hi - lo)).long(), torch.full_like(lo, NOT_SHOWN))
    ids, pos_ids, attn = packed_layout(ro, rows, t)
    packed = policy(ids, (p + gen + torch.arange(gen)).expand(len(rows), gen), attn, position_ids=pos_ids)
    checked = 0
    for b in range(len(rows)):
        for k in range(nb):
            if t[b, k] == NOT_SHOWN:
                continue
            x = rebuild_states(ro, torch.tensor([b]), t[b, k : k + 1])
            cols = torch.arange(k * BS, (k + 1) * BS)
            ref = policy(x, (p + cols)[None], ro.attention_mask[b : b + 1])[0]
            assert torch.allclose(packed[b, cols], ref, rtol=0, atol=1e-12), (b, k)
            checked += 1
    assert checked >= nb * len(rows) // 2


def _loss_and_grad(policy, ro, plan, adv, **kw):
    policy.zero_grad(set_to_none=True)
    loss, m = agrpo_loss(policy, ro, adv, plan=plan, backward=lambda l: l.backward(), **kw)
    grads = [p.grad.clone() for p in policy.parameters() if p.grad is not None]
    return float(loss), grads, m


def _as_step_plan(plan):
    return StepPlan(plan.row, plan.t, plan.weight, plan.coef, plan.positions, plan.valid, plan.count)


@pytest.mark.parametrize("normalization", ["sequence", "token"])
def test_every_block_step_plan_is_every_step_plan(normalization):
    """Round r of every block in one forward: the loss and gradient of the exact objective, per-step."""
    policy, ro = rollout(1, threshold=0.1)
    adv = torch.tensor([1.0, -0.5, 0.25, -1.0, 0.5, 0.0])
    valid = torch.tensor([True, True, False, True, True, True])
    kw = dict(eps_low=0.2, eps_high=0.2)
    packed = every_block_step_plan(ro, normalization, valid)
    step = every_step_plan(ro, normalization, valid)
    a = _loss_and_grad(policy, ro, packed, adv, max_rows_per_forward=3, **kw)
    b = _loss_and_grad(policy, ro, step, adv, max_rows_per_forward=5, **kw)
    assert a[0] == pytest.approx(b[0], rel=1e-10, abs=1e-14)
    for x, y in zip(a[1], b[1]):
        assert torch.allclose(x, y, rtol=1e-9, atol=1e-13)
    assert a[2]["loss_tokens"] == b[2]["loss_tokens"] > 0
    # one forward per round of each row: as many as the row's longest block has steps
    lo, hi = block_ranges(ro)
    assert packed.pack_row.numel() == int((hi - lo).max(1).values[valid].sum())


def test_block_draws_equal_the_same_draws_scored_one_state_a_forward():
    policy, ro = rollout(2)
    adv = torch.tensor([1.0, -0.5, 0.25, -1.0, 0.5, -0.25])
    plan = block_step_plan(ro, 2, "stratified", "entropy", "sequence", None, torch.Generator().manual_seed(0))
    a = _loss_and_grad(policy, ro, plan, adv, max_rows_per_forward=4)
    b = _loss_and_grad(policy, ro, _as_step_plan(plan), adv, max_rows_per_forward=7)
    assert a[0] == pytest.approx(b[0], rel=1e-10, abs=1e-14)
    for x, y in zip(a[1], b[1]):
        assert torch.allclose(x, y, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("importance", ["none", "entropy"])
def test_block_draws_are_unbiased(importance):
    """K = 1 step a block, iid: over many draws the mean gradient (projected on a fixed direction) is the
    exact objective's (5 standard errors)."""
    # sharp distributions: the committed steps' entropies differ a lot, so entropy weights matter
    policy, ro = rollout(3, policy=eos_prone(block_policy(3, logit_scale=150.0), 1.5), top_k=0)
    adv = torch.tensor([1.0, -0.5, 0.25, -1.0, 0.5, -0.25])
    params = [p for p in policy.parameters()]
    direction = [torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(params)]

    def projected(plan):
        _, grads, _ = _loss_and_grad(policy, ro, plan, adv)
        return sum(float((g * d).sum()) for g, d in zip(grads, direction))

    exact = projected(every_block_step_plan(ro))
    values = torch.tensor([
        projected(block_step_plan(ro, 1, "uniform", importance, "sequence", None, torch.Generator().manual_seed(seed)))
        for seed in range(200)
    ], dtype=torch.float64)
    se = values.std() / len(values) ** 0.5
    assert se > 1e-3 * abs(exact)  # the draws do vary
    assert abs(values.mean() - exact) < 5 * se


def test_stratified_with_every_step_of_a_block_is_exact():
    """K = the steps of each block (fixed decoding, stratified): every step drawn once, the exact objective."""
    policy, ro = rollout(4)
    adv = torch.tensor([1.0, -0.5, 0.25, -1.0, 0.5, -0.25])
    spb = CFG.steps_per_block
    with torch.no_grad():
        exact, _ = agrpo_loss(policy, ro, adv, plan=every_block_step_plan(ro))
        drawn, _ = agrpo_loss(policy, ro, adv, plan=block_step_plan(ro, spb, "stratified", "none", "sequence", None,
                                                                    torch.Generator().manual_seed(0)))
    lo, hi = block_ranges(ro)
    assert bool(((hi - lo == spb) | (hi == lo)).all())  # fixed decoding: every live block has its spb steps
    assert float(drawn) == pytest.approx(float(exact), rel=1e-10)
