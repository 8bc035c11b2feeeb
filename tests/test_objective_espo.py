"""ESPO against a slow float64 reference of ALGORITHMS.md's formula, and its properties."""

import pytest
import torch

from agrpo.objectives import Part, get_objective
from agrpo.objectives.advantages import loo_advantages
from agrpo.objectives.espo import ESPOSettings
from agrpo.objectives.proxies import copies_logp, elbo_copies, sequence_elbo, valid_tokens
from agrpo.policy import Policy
from agrpo.recipes.rl import RLConfig
from conftest import tiny_model
from test_proxies import assert_same, cols, make_rollout, perturbed, run_update, slow_gradient, slow_token_logp, split_part

REWARDS = [1.0, 0.0, 0.5, None, 1.0, 0.0]


def setup(settings, seed=0, rewards=REWARDS):
    model = tiny_model(11)
    ro = make_rollout(model)
    adv, valid = loo_advantages(rewards, 3)
    part = Part(ro, adv, valid, rewards, torch.Generator().manual_seed(seed))
    eligible = valid_tokens(ro) if settings.tokens == "valid" else torch.ones_like(ro.completion, dtype=torch.bool)
    part.state["masks"] = [elbo_copies(eligible, settings.copies, torch.Generator().manual_seed(seed + 5), settings.complement)]
    return model, part, eligible


def slow_elbo(model, ro, b, masks, eligible, complement):
    """ELBO of row b: pairs (copy, complement) weighted N/x and N/(N-x), or single copies weighted N/x."""
    n = int(eligible[b].sum())
    m = masks["completion"][b]
    est = []
    step = 2 if complement else 1
    for k in range(0, m.shape[0], step):
        first = cols(m[k])
        lp = slow_token_logp(model, ro, b, first)
        a = n / len(first) * sum(lp[j] for j in first)
        if complement and cols(m[k + 1]):
            second = cols(m[k + 1])
            lp2 = slow_token_logp(model, ro, b, second)
            a = 0.5 * a + 0.5 * n / len(second) * sum(lp2[j] for j in second)
        est.append(a)
    return sum(est) / len(est)


def slow_loss(model, old_model, ref_model, part, eligible, settings, eps, beta):
    ro = part.rollout
    L = ro.completion.shape[1]
    masks = part.state["masks"][0]
    rows = [b for b in range(ro.tokens.shape[0]) if part.valid[b]]
    total = 0.0
    for b in rows:
        cur = slow_elbo(model, ro, b, masks, eligible, settings.complement)
        with torch.no_grad():
            old = slow_elbo(old_model, ro, b, masks, eligible, settings.complement)
        rho = torch.exp((cur - old) / L)
        a = float(part.advantages[b])
        term = -torch.minimum(rho * a, rho.clamp(1 - eps, 1 + eps) * a)
        if beta > 0:
            with torch.no_grad():
                ref = slow_elbo(ref_model, ro, b, masks, eligible, settings.complement)
            term = term + beta * 0.5 * (cur - ref) ** 2 / L
        total = total + term
    return total / len(rows)


@pytest.mark.parametrize("complement,tokens,beta", [(True, "all", 0.05), (False, "all", 0.0), (True, "valid", 0.05)])
def test_loss_and_gradient_match_the_formula(complement, tokens, beta):
    settings = ESPOSettings(copies=2, complement=complement, tokens=tokens)
    model, part, eligible = setup(settings)
    old, ref = perturbed(model, 1, 0.3), perturbed(model, 2, 0.3)
    cfg = RLConfig(objective="espo", eps_low=0.02, eps_high=0.02, beta=beta, max_rows_per_forward=4, group_size=3)
    loss, grads = run_update(get_objective("espo"), model, [part], cfg, settings, old_model=old, ref_model=ref if beta else None)
    ref_loss = slow_loss(model, old, ref, part, eligible, settings, 0.02, beta)
    assert_same(loss, grads, ref_loss, slow_gradient(model, ref_loss))


def test_zero_advantages_give_zero_gradient():
    settings = ESPOSettings()
    model, part, _ = setup(settings, rewards=[1.0, 1.0, 1.0, None, 0.0, 0.0])
    assert not part.advantages.any()
    cfg = RLConfig(objective="espo", beta=0.0, group_size=3)
    _, grads = run_update(get_objective("espo"), model, [part], cfg, settings, old_model=perturbed(model))
    assert all(not g.any() for g in grads)


def test_micro_batches_give_the_gradient_of_the_whole_batch():
    settings = ESPOSettings()
    model, part, _ = setup(settings)
    old, ref = perturbed(model, 1, 0.3), perturbed(model, 2, 0.3)
    cfg = RLConfig(objective="espo", eps_low=0.02, eps_high=0.02, beta=0.05, max_rows_per_forward=4, group_size=3)
    obj = get_objective("espo")
    whole = run_update(obj, model, [part], cfg, settings, old_model=old, ref_model=ref)
    split = run_update(obj, model, [split_part(part, slice(0, 3)), split_part(part, slice(3, 6))], cfg, settings, old_model=old, ref_model=ref)
    assert split[0] == pytest.approx(whole[0], rel=1e-9)
    for a, b in zip(split[1], whole[1]):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-13)


def test_the_complement_copy_lowers_the_estimator_variance():
    """Same rollouts, 300 mask draws: Var(ELBO) with the complements < half of without."""
    model = tiny_model(11)
    ro = make_rollout(model)
    policy = Policy(model)
    eligible = torch.ones_like(ro.completion, dtype=torch.bool)

    def variance(complement, copies):
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            draws = []
            for _ in range(300):
                c = elbo_copies(eligible, copies, g, complement)
                draws.append(sequence_elbo(copies_logp(policy, ro, slice(None), c), c))
        return torch.stack(draws).var(0).mean()

    with_complement, without = variance(True, 2), variance(False, 2)  # the same two mask draws a row
    assert with_complement < 0.5 * without, (float(with_complement), float(without))
    assert variance(True, 1) < 0.75 * without  # and still lower at the same number of forwards
