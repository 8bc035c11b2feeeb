"""UniGRPO against a slow float64 reference of ALGORITHMS.md's formula (loops over rows, copies, tokens)."""

import pytest
import torch
from accelerate import Accelerator

from agrpo.objectives import Context, Part, get_objective
from agrpo.objectives.unigrpo import UniGRPOSettings, independent_masks
from agrpo.policy import Policy
from agrpo.recipes.rl import RLConfig
from conftest import tiny_model
from test_objective_coupled_grpo import (
    assert_same_grads, concat_rollouts, make_part, make_rollout, objective_grad, perturbed, reference_grad, slow_logp,
    slow_valid,
)

G = 3


def slow_loss(model, old_model, ref_model, parts, inner, eps, beta):
    """Mean over (row, copy) with scored tokens of the copy's token mean of the clipped surrogate (+ k3)."""
    rows, total = 0, 0.0
    for part in parts:
        ro = part.rollout
        masks = part.state["masks"][inner]
        for b in range(ro.tokens.shape[0]):
            if not part.valid[b]:
                continue
            for k in range(masks.shape[1]):
                cols = [c for c in range(ro.completion.shape[1]) if masks[b, k, c]]
                scored = [c for c in slow_valid(ro, b) if c in cols]
                if not scored:
                    continue
                cur = slow_logp(model, ro, b, cols)
                with torch.no_grad():
                    old = slow_logp(old_model, ro, b, cols)
                    ref = slow_logp(ref_model, ro, b, cols) if beta > 0 else None
                a = float(part.advantages[b])
                row = 0.0
                for c in scored:
                    rho = torch.exp(cur[c] - old[c])
                    term = -torch.minimum(rho * a, rho.clamp(1 - eps, 1 + eps) * a)
                    if beta > 0:
                        d = ref[c] - cur[c]
                        term = term + beta * (torch.exp(d) - d - 1)
                    row = row + term
                total = total + row / len(scored)
                rows += 1
    return total / rows


def setup(beta=0.04, rewards=(1.0, 0.0, 0.5, None, 1.0, 0.0), copies=2, seed=11):
    objective = get_objective("unigrpo")
    cfg = RLConfig(objective="unigrpo", inner_steps=2, eps_low=0.2, eps_high=0.2, beta=beta, group_size=G,
                   max_rows_per_forward=4, scale_std=True)
    settings = UniGRPOSettings(copies=copies)
    old_model, ref_model = tiny_model(seed, logit_scale=4.0), tiny_model(seed + 1, logit_scale=4.0)
    part = make_part(objective, make_rollout(Policy(old_model), seed), list(rewards), cfg)
    objective.prepare(Context(Accelerator(cpu=True), Policy(old_model), Policy(ref_model), cfg, settings, 0), [part])
    return objective, cfg, settings, old_model, ref_model, part


def test_independent_masks():
    t, masked = independent_masks((500, 40), 3, 0.1, 0.9, torch.Generator().manual_seed(0))
    assert t.shape == (500, 3) and masked.shape == (500, 3, 40)
    assert float(t.min()) >= 0.1 and float(t.max()) <= 0.9
    # each copy masks about t of the positions, independently of the other copies of its row
    frac = masked.double().mean(-1)
    assert float((frac - t).abs().mean()) < 0.08
    assert not torch.equal(masked[:, 0], masked[:, 1])


@pytest.mark.parametrize("inner", [0, 1])
def test_loss_and_gradient_equal_the_slow_reference(inner):
    objective, cfg, settings, old_model, ref_model, part = setup()
    cur = perturbed(old_model, scale=0.5)
    metrics, grads = objective_grad(objective, cur, Policy(ref_model), cfg, settings, [part], inner)
    slow = slow_loss(cur, old_model, ref_model, [part], inner, 0.2, 0.04)
    assert abs(metrics["loss"] - slow.item()) <= 1e-9 * abs(slow.item())
    assert 0 < metrics["clip_frac"] < 1 and metrics["kl"] > 0
    assert_same_grads(grads, reference_grad(cur, slow))


def test_masks_are_fixed_per_update_and_the_prompt_is_clean():
    objective, cfg, settings, old_model, ref_model, part = setup()
    m = part.state["masks"]
    assert len(m) == 2 and m[0].shape == (6, 2, 8) and not torch.equal(m[0], m[1])
    again = make_part(objective, part.rollout, part.rewards, cfg)
    objective.prepare(Context(Accelerator(cpu=True), Policy(old_model), Policy(ref_model), cfg, settings, 0), [again])
    assert all(torch.equal(a, b) for a, b in zip(again.state["masks"], m))  # one generator, one set of draws
    # the first update sees the old policy: ratios of 1, nothing clipped
    metrics, _ = objective_grad(objective, old_model, Policy(ref_model), cfg, settings, [part], 0)
    assert metrics["clip_frac"] == 0 and metrics["kl"] > 0


def test_equal_rewards_give_no_gradient_without_penalty():
    objective, cfg, settings, old_model, _, part = setup(beta=0.0, rewards=(0.5, 0.5, 0.5, 1.0, None, 1.0))
    _, grads = objective_grad(objective, perturbed(old_model), None, cfg, settings, [part], 1)
    assert all(float(g.abs().max()) == 0 for g in grads.values())


def test_micro_batches_give_the_gradient_of_the_whole_batch():
    objective = get_objective("unigrpo")
    cfg = RLConfig(objective="unigrpo", inner_steps=2, beta=0.04, group_size=G, max_rows_per_forward=3, scale_std=True)
    settings = UniGRPOSettings(copies=2)
    old_model, ref_model = tiny_model(3, logit_scale=4.0), tiny_model(4)
    ctx = Context(Accelerator(cpu=True), Policy(old_model), Policy(ref_model), cfg, settings, 0)
    a = make_part(objective, make_rollout(Policy(old_model), 1), [1.0, 0.0, 0.5, 0.2, 0.9, 0.1], cfg, gen_seed=1)
    b = make_part(objective, make_rollout(Policy(old_model), 2), [None, 1.0, 0.0, None, None, None], cfg, gen_seed=2)
    objective.prepare(ctx, [a, b])
    whole = Part(concat_rollouts(a.rollout, b.rollout), torch.cat([a.advantages, b.advantages]),
                 torch.cat([a.valid, b.valid]), a.rewards + b.rewards, torch.Generator())
    whole.state = {"masks": [torch.cat([x, y]) for x, y in zip(a.state["masks"], b.state["masks"])]}
    objective.prepare(ctx, [whole])
    cur = perturbed(old_model)
    m_split, split = objective_grad(objective, cur, Policy(ref_model), cfg, settings, [a, b], 1)
    m_whole, full = objective_grad(objective, cur, Policy(ref_model), cfg, settings, [whole], 1)
    assert m_split["loss"] == pytest.approx(m_whole["loss"], rel=1e-9)
    assert_same_grads(split, full)
