"""wd1 against a slow float64 reference of ALGORITHMS.md's formula, and its properties."""

import math

import pytest
import torch

from agrpo.objectives import Part, get_objective
from agrpo.objectives.advantages import centred_advantages
from agrpo.objectives.diffu_grpo import random_prompt_mask
from agrpo.objectives.proxies import valid_tokens
from agrpo.objectives.wd1 import WD1Settings, wd1_weights
from agrpo.recipes.rl import RLConfig
from conftest import tiny_model
from test_proxies import assert_same, cols, make_rollout, run_update, slow_gradient, slow_token_logp, split_part

REWARDS = [1.0, 0.0, 0.5, None, 1.0, 0.0]


def setup(rewards=REWARDS):
    model = tiny_model(14)
    ro = make_rollout(model)
    adv, valid = centred_advantages(rewards, 3)
    part = Part(ro, adv, valid, rewards, torch.Generator().manual_seed(0))
    part.state["prompt_masks"] = [random_prompt_mask(ro, 0.4, torch.Generator().manual_seed(3))]
    cfg = RLConfig(objective="wd1", group_size=3, max_rows_per_forward=4)
    return model, part, cfg


def slow_loss(model, part, positive_only):
    ro = part.rollout
    valid = valid_tokens(ro)
    C = ro.completion.shape[1]
    total, groups = 0.0, 0
    for g in range(ro.tokens.shape[0] // 3):
        rows = [b for b in range(3 * g, 3 * g + 3) if part.valid[b]]
        if not rows:
            continue
        groups += 1
        a = [float(part.advantages[b]) for b in rows]
        pos = [math.exp(x) / sum(math.exp(y) for y in a) for x in a]
        neg = [math.exp(-x) / sum(math.exp(-y) for y in a) for x in a]
        for b, wp, wn in zip(rows, pos, neg):
            lp = slow_token_logp(model, ro, b, list(range(C)), cols(part.state["prompt_masks"][0][b]))
            l = sum(lp[j] for j in range(C) if valid[b, j])
            total = total - wp * l + (0.0 if positive_only else wn * l)
    return total / groups


@pytest.mark.parametrize("positive_only", [False, True])
def test_loss_and_gradient_match_the_formula(positive_only):
    s = WD1Settings(positive_only=positive_only)
    model, part, cfg = setup()
    loss, grads = run_update(get_objective("wd1"), model, [part], cfg, s)
    ref = slow_loss(model, part, positive_only)
    assert_same(loss, grads, ref, slow_gradient(model, ref))


def test_weights_sum_to_one_per_group():
    adv, valid = centred_advantages([1.0, 0.0, 0.5, None, 1.0, 0.0, 2.0, 2.0, 2.0], 3)
    pos = wd1_weights(adv, valid, 3, positive_only=True).view(-1, 3)
    assert pos.sum(1).tolist() == pytest.approx([1.0, 1.0, 1.0]) and pos[1, 0] == 0
    both = wd1_weights(adv, valid, 3, positive_only=False).view(-1, 3)
    assert both.sum(1).tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-12)


def test_zero_advantages_give_zero_gradient():
    model, part, cfg = setup(rewards=[1.0, 1.0, 1.0, None, 0.0, 0.0])
    _, grads = run_update(get_objective("wd1"), model, [part], cfg, WD1Settings())
    assert all(not g.any() for g in grads)


def test_micro_batches_give_the_gradient_of_the_whole_batch():
    model, part, cfg = setup()
    obj = get_objective("wd1")
    whole = run_update(obj, model, [part], cfg, WD1Settings())
    split = run_update(obj, model, [split_part(part, slice(0, 3)), split_part(part, slice(3, 6))], cfg, WD1Settings())
    assert split[0] == pytest.approx(whole[0], rel=1e-9)
    for a, b in zip(split[1], whole[1]):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-13)
