"""BGPO against a slow float64 reference of ALGORITHMS.md's formula, and its properties."""

import pytest
import torch

from agrpo.objectives import Context, Part, get_objective
from agrpo.objectives.advantages import z_advantages
from agrpo.objectives.bgpo import BGPOSettings, copy_terms
from agrpo.objectives.proxies import elbo_copies, valid_tokens
from agrpo.policy import Policy
from agrpo.recipes.rl import RLConfig
from conftest import tiny_model
from test_proxies import accelerator, assert_same, cols, make_rollout, perturbed, run_update, slow_gradient, slow_token_logp, split_part

REWARDS = [1.0, 0.0, 0.5, None, 1.0, 0.0]


def setup(copies=4, rewards=REWARDS):
    model = tiny_model(15)
    ro = make_rollout(model)
    adv, valid = z_advantages(rewards, 3)
    part = Part(ro, adv, valid, rewards, torch.Generator().manual_seed(0))
    part.state["masks"] = [elbo_copies(valid_tokens(ro), copies, torch.Generator().manual_seed(9))]
    cfg = RLConfig(objective="bgpo", group_size=3, max_rows_per_forward=4, eps_low=0.05, eps_high=0.05)
    return model, part, cfg


def slow_loss(model, old_model, part, s, eps):
    ro = part.rollout
    R = ro.completion.shape[1]
    valid = valid_tokens(ro)
    masks = part.state["masks"][0]["completion"]
    rows = [b for b in range(ro.tokens.shape[0]) if part.valid[b]]
    total = 0.0
    for k in range(s.copies):
        for b in rows:
            n = int(valid[b].sum())
            m = cols(masks[b, k])
            assert m and all(valid[b, j] for j in m)
            lp = slow_token_logp(model, ro, b, m)  # one forward of the copy's corrupted sequence
            cur = n / len(m) * sum(lp[j] for j in m) / R
            with torch.no_grad():
                lp_old = slow_token_logp(old_model, ro, b, m)
                old = n / len(m) * sum(lp_old[j] for j in m) / R
            a = float(part.advantages[b])
            r = 1 + (cur - old) if a > 0 else torch.exp(cur - old)
            obj = torch.minimum(r * a, r.clamp(1 - eps, 1 + eps) * a)
            if s.dual_clip and a < 0:
                obj = torch.maximum(obj, torch.tensor(s.dual_clip * a, dtype=obj.dtype))
            total = total - obj / len(rows)
    return total / s.copies


@pytest.mark.parametrize("dual_clip", [0.0, 1.01])
def test_loss_and_gradient_match_the_formula(dual_clip):
    s = BGPOSettings(copies=4, dual_clip=dual_clip)
    model, part, cfg = setup()
    old = perturbed(model, 1, 0.3)
    loss, grads = run_update(get_objective("bgpo"), model, [part], cfg, s, old_model=old)
    ref = slow_loss(model, old, part, s, 0.05)
    assert_same(loss, grads, ref, slow_gradient(model, ref))


def test_per_copy_backward_equals_one_backward_of_the_summed_loss():
    """copies x chunks backwards (memory of one copy) give the gradient of the loss summed at once."""
    s = BGPOSettings(copies=4)
    model, part, cfg = setup()
    old = perturbed(model, 1, 0.3)
    acc = accelerator()
    calls = []
    original = acc.backward
    acc.backward = lambda loss, **kw: (calls.append(1), original(loss, **kw))
    try:
        loss, grads = run_update(get_objective("bgpo"), model, [part], cfg, s, old_model=old)
    finally:
        acc.backward = original
    assert len(calls) == s.copies * 2  # 6 rows in chunks of 4: two chunks a copy
    # one backward of the summed loss, every copy in one forward
    c = part.state["masks"][0]
    cur = copy_terms(Policy(model), part, slice(None), c, s.copies)
    with torch.no_grad():
        prev = copy_terms(Policy(old), part, slice(None), c, s.copies)
    a = part.advantages.double()[:, None]
    r = torch.where(a > 0, 1 + cur - prev, torch.exp(cur - prev))
    obj = torch.minimum(r * a, r.clamp(0.95, 1.05) * a)
    summed = -(obj[part.valid]).sum() / int(part.valid.sum()) / s.copies
    assert_same(loss, grads, summed, slow_gradient(model, summed))


def test_zero_advantages_give_zero_gradient():
    model, part, cfg = setup(rewards=[1.0, 1.0, 1.0, None, 0.0, 0.0])
    _, grads = run_update(get_objective("bgpo"), model, [part], cfg, BGPOSettings(copies=4), old_model=perturbed(model))
    assert all(not g.any() for g in grads)


def test_micro_batches_give_the_gradient_of_the_whole_batch():
    s = BGPOSettings(copies=4)
    model, part, cfg = setup()
    old = perturbed(model, 1, 0.3)
    obj = get_objective("bgpo")
    whole = run_update(obj, model, [part], cfg, s, old_model=old)
    split = run_update(obj, model, [split_part(part, slice(0, 3)), split_part(part, slice(3, 6))], cfg, s, old_model=old)
    assert split[0] == pytest.approx(whole[0], rel=1e-9)
    for a, b in zip(split[1], whole[1]):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-13)
