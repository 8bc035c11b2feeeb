"""SPG against a slow float64 reference of ALGORITHMS.md's formula, and its properties."""

import pytest
import torch

from agrpo.objectives import Part, get_objective
from agrpo.objectives.advantages import centred_advantages
from agrpo.objectives.proxies import valid_tokens
from agrpo.objectives.spg import SPGSettings, draw_block_copies
from agrpo.recipes.rl import RLConfig
from conftest import tiny_model
from test_proxies import assert_same, cols, make_rollout, run_update, slow_gradient, slow_token_logp, split_part

REWARDS = [1.0, 0.0, 0.5, None, 1.0, 0.0]


def setup(settings, rewards=REWARDS, inner_steps=1):
    model = tiny_model(12, logit_scale=3.0)
    ro = make_rollout(model)
    adv, valid = centred_advantages(rewards, 3)
    part = Part(ro, adv, valid, rewards, torch.Generator().manual_seed(0))
    cfg = RLConfig(objective="spg", group_size=3, max_rows_per_forward=4, inner_steps=inner_steps)
    part.state["masks"] = [draw_block_copies(part, settings, cfg) for _ in range(inner_steps)]
    return model, part, cfg


def slow_bounds(model, ro, b, copies, beta):
    valid = valid_tokens(ro)[b]
    n = int(valid.sum())
    k = copies["completion"].shape[1]
    elbo, u = 0.0, {}
    for s in range(k):
        masked = cols(copies["completion"][b, s])
        lp = slow_token_logp(model, ro, b, masked, cols(copies["prompt"][b, s]))
        m = [j for j in masked if valid[j]]
        elbo = elbo + sum(lp[j] for j in m) / len(m) / k
        for j in m:
            u[j] = u.get(j, 0.0) + torch.exp(beta * lp[j]) / (len(m) / n) / k
    eubo = sum(torch.log(v) for v in u.values()) / len(u) / beta
    return elbo, eubo, n


def slow_loss(model, part, s):
    ro = part.rollout
    copies = part.state["masks"][0]
    num, den = 0.0, 0
    for b in range(ro.tokens.shape[0]):
        if not part.valid[b]:
            continue
        elbo, eubo, n = slow_bounds(model, ro, b, copies, s.eubo_beta)
        a = float(part.advantages[b])
        if a > 0:
            value = elbo
        else:
            value = {"elbo": elbo, "eubo": eubo, "mix": s.omega * eubo + (1 - s.omega) * elbo}[s.bound]
        num = num - a * value * n
        den += n
    return num / den


@pytest.mark.parametrize("bound", ["elbo", "eubo", "mix"])
def test_loss_and_gradient_match_the_formula(bound):
    s = SPGSettings(bound=bound, copies=3, block_length=4, prompt_mask_p=0.3)
    model, part, cfg = setup(s)
    loss, grads = run_update(get_objective("spg"), model, [part], cfg, s)
    ref = slow_loss(model, part, s)
    assert_same(loss, grads, ref, slow_gradient(model, ref))


def test_mix_with_omega_zero_is_the_elbo():
    mix, elbo = SPGSettings(bound="mix", omega=0.0, block_length=4), SPGSettings(bound="elbo", block_length=4)
    model, part, cfg = setup(mix)
    a = run_update(get_objective("spg"), model, [part], cfg, mix)
    b = run_update(get_objective("spg"), model, [part], cfg, elbo)
    assert a[0] == pytest.approx(b[0], rel=1e-12)
    assert all(torch.allclose(x, y, rtol=1e-12, atol=0) for x, y in zip(a[1], b[1]))
    c = run_update(get_objective("spg"), model, [part], cfg, SPGSettings(bound="mix", omega=0.5, block_length=4))
    assert c[0] != pytest.approx(b[0], rel=1e-6)


def test_zero_advantages_give_zero_gradient():
    s = SPGSettings(block_length=4)
    model, part, cfg = setup(s, rewards=[1.0, 1.0, 1.0, None, 0.0, 0.0])
    _, grads = run_update(get_objective("spg"), model, [part], cfg, s)
    assert all(not g.any() for g in grads)


def test_micro_batches_give_the_gradient_of_the_whole_batch():
    s = SPGSettings(block_length=4)
    model, part, cfg = setup(s)
    obj = get_objective("spg")
    whole = run_update(obj, model, [part], cfg, s)
    split = run_update(obj, model, [split_part(part, slice(0, 3)), split_part(part, slice(3, 6))], cfg, s)
    assert split[0] == pytest.approx(whole[0], rel=1e-9)
    for a, b in zip(split[1], whole[1]):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-13)


def test_each_update_has_masks_of_its_own_drawn_in_order():
    s = SPGSettings(block_length=4)
    _, part, _ = setup(s, inner_steps=2)
    first, second = part.state["masks"]
    assert not torch.equal(first["completion"], second["completion"])
    _, again, _ = setup(s, inner_steps=2)
    assert torch.equal(again.state["masks"][1]["completion"], second["completion"])
