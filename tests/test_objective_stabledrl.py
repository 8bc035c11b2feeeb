"""StableDRL against a slow float64 reference of ALGORITHMS.md's formula, and its properties."""

import math

import pytest
import torch

from agrpo.objectives import Part, get_objective
from agrpo.objectives.advantages import centred_advantages
from agrpo.objectives.spg import draw_block_copies
from agrpo.objectives.stabledrl import StableDRLSettings
from agrpo.recipes.rl import RLConfig
from conftest import tiny_model
from test_objective_spg import slow_bounds
from test_proxies import assert_same, make_rollout, perturbed, run_update, slow_gradient, split_part

REWARDS = [1.0, 0.0, 0.5, None, 1.0, 0.0]


def setup(settings, rewards=REWARDS):
    model = tiny_model(13, logit_scale=3.0)
    ro = make_rollout(model)
    adv, valid = centred_advantages(rewards, 3)
    part = Part(ro, adv, valid, rewards, torch.Generator().manual_seed(0))
    cfg = RLConfig(objective="stabledrl", group_size=3, max_rows_per_forward=6)
    part.state["masks"] = [draw_block_copies(part, settings, cfg)]
    return model, part, cfg


def slow_loss(model, old_model, part, s):
    ro = part.rollout
    copies = part.state["masks"][0]
    total, groups = 0.0, 0
    for g in range(ro.tokens.shape[0] // 3):
        rows = [b for b in range(3 * g, 3 * g + 3) if part.valid[b]]
        if not rows:
            continue
        groups += 1
        values, log_w = [], []
        for b in rows:
            elbo, eubo, _ = slow_bounds(model, ro, b, copies, s.eubo_beta)
            with torch.no_grad():
                old = slow_bounds(old_model, ro, b, copies, s.eubo_beta)[0]
            log_w.append(min(float((elbo - old).detach()), math.log(s.clip_weight)))
            a = float(part.advantages[b])
            value = elbo if a > 0 else {"elbo": elbo, "eubo": eubo, "mix": s.omega * eubo + (1 - s.omega) * elbo}[s.bound]
            values.append((a, value))
        z = sum(math.exp(x) for x in log_w)
        for (a, value), lw in zip(values, log_w):
            total = total - math.exp(lw) / z * a * value
    return total / groups


@pytest.mark.parametrize("bound,clip_weight", [("mix", 5.0), ("eubo", 1.02), ("elbo", 5.0)])
def test_loss_and_gradient_match_the_formula(bound, clip_weight):
    s = StableDRLSettings(bound=bound, copies=2, block_length=4, prompt_mask_p=0.3, clip_weight=clip_weight)
    model, part, cfg = setup(s)
    old = perturbed(model, 1, 0.3)
    loss, grads = run_update(get_objective("stabledrl"), model, [part], cfg, s, old_model=old)
    ref = slow_loss(model, old, part, s)
    assert_same(loss, grads, ref, slow_gradient(model, ref))


def test_zero_advantages_give_zero_gradient():
    s = StableDRLSettings(block_length=4)
    model, part, cfg = setup(s, rewards=[1.0, 1.0, 1.0, None, 0.0, 0.0])
    _, grads = run_update(get_objective("stabledrl"), model, [part], cfg, s, old_model=perturbed(model))
    assert all(not g.any() for g in grads)


def test_micro_batches_give_the_gradient_of_the_whole_batch():
    s = StableDRLSettings(block_length=4)
    model, part, cfg = setup(s)
    part.valid[4] = False  # uneven valid rows over the two parts
    old = perturbed(model, 1, 0.3)
    obj = get_objective("stabledrl")
    whole = run_update(obj, model, [part], cfg, s, old_model=old)
    split = run_update(obj, model, [split_part(part, slice(0, 3)), split_part(part, slice(3, 6))], cfg, s, old_model=old)
    assert split[0] == pytest.approx(whole[0], rel=1e-9)
    for a, b in zip(split[1], whole[1]):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-13)


def test_weights_are_a_softmax_over_each_group():
    from agrpo.objectives.stabledrl import group_weights

    w = group_weights(torch.tensor([0.0, 1.0, 2.0, 5.0, 0.0, 0.0]), torch.tensor([True, True, True, False, False, False]), 3)
    assert w[:3].sum() == pytest.approx(1.0) and w[3:].tolist() == [0.0, 0.0, 0.0]
