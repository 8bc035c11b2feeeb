"""DMPO against a slow float64 reference of ALGORITHMS.md's formula (loops over rows, masked rows, tokens)."""

import math

import pytest
import torch
from accelerate import Accelerator

from agrpo.objectives import Context, Part, get_objective
from agrpo.objectives.dmpo import DMPOSettings, antithetic_masks
from agrpo.policy import Policy
from agrpo.recipes.rl import RLConfig
from conftest import tiny_model
from test_objective_coupled_grpo import (
    assert_same_grads, concat_rollouts, make_part, make_rollout, objective_grad, perturbed, reference_grad, slow_logp,
)

G = 3


def slow_estimate(model, ro, b, masks):
    """log p^ of row b: mean over the masked rows of (C / |M|) sum_{j in M} log p(o_j), a model call per row."""
    C = ro.completion.shape[1]
    total = 0.0
    for k in range(masks.shape[0]):
        cols = [c for c in range(C) if masks[k, c]]
        lp = slow_logp(model, ro, b, cols)
        total += sum(float(lp[c]) for c in cols) * C / len(cols) if cols else 0.0
    return total / masks.shape[0]


def slow_weights(model, ref_model, part, alpha):
    """(w+, w-) per row: a softmax over each group's valid rows, written out with exp and sums."""
    ro = part.rollout
    n = ro.tokens.shape[0]
    with torch.no_grad():
        z = [slow_estimate(ref_model, ro, b, part.state["estimate_masks"][b]) - slow_estimate(model, ro, b, part.state["estimate_masks"][b])
             for b in range(n)]
    w_pos, w_neg = [0.0] * n, [0.0] * n
    for g in range(n // G):
        rows = [b for b in range(g * G, (g + 1) * G) if part.valid[b]]
        for sign, out in ((1, w_pos), (-1, w_neg)):
            e = {b: math.exp(z[b] + sign * part.rewards[b] / alpha) for b in rows}
            for b in rows:
                out[b] = e[b] / sum(e.values())
    return w_pos, w_neg


def slow_loss(model, parts, inner, weights):
    total = 0.0
    for part, (w_pos, w_neg) in zip(parts, weights):
        ro = part.rollout
        masks = part.state["masks"][inner]
        C = ro.completion.shape[1]
        for b in range(ro.tokens.shape[0]):
            if not part.valid[b]:
                continue
            row_sum = 0.0
            for k in range(masks.shape[1]):
                cols = [c for c in range(C) if masks[b, k, c]]
                if not cols:
                    continue
                lp = slow_logp(model, ro, b, cols)
                row_sum = row_sum + sum(-lp[c] for c in cols) / len(cols)
            total = total + (w_pos[b] - w_neg[b]) * row_sum / masks.shape[1]
    return total


def setup(rewards=(1.0, 0.0, 0.5, None, 1.0, 0.0), seed=11, alpha=0.5, lambda_max=0.9):
    objective = get_objective("dmpo")
    cfg = RLConfig(objective="dmpo", inner_steps=3, group_size=G, max_rows_per_forward=8)
    settings = DMPOSettings(alpha=alpha, lambda_max=lambda_max)
    old_model, ref_model = tiny_model(seed, logit_scale=4.0), tiny_model(seed + 1, logit_scale=4.0)
    part = make_part(objective, make_rollout(Policy(old_model), seed), list(rewards), cfg)
    objective.prepare(Context(Accelerator(cpu=True), Policy(old_model), Policy(ref_model), cfg, settings, 0), [part])
    return objective, cfg, settings, old_model, ref_model, part


def test_antithetic_masks():
    m = antithetic_masks((400, 30), 4, 0.1, 0.9, torch.Generator().manual_seed(0))
    assert m.shape == (400, 4, 30)
    assert torch.equal(m[:, 1], ~m[:, 0]) and torch.equal(m[:, 3], ~m[:, 2])
    frac = m[:, 0].double().mean(-1)
    assert abs(float(frac.mean()) - 0.5) < 0.03 and float(frac.max()) < 1  # lambda <= 0.9: never all of 30
    with pytest.raises(Exception):
        antithetic_masks((2, 3), 3, 0.1, 0.9)


def test_reference_is_needed():
    assert get_objective("dmpo").needs_reference(RLConfig(objective="dmpo", beta=0.0))


@pytest.mark.parametrize("inner", [0, 2])
def test_weights_loss_and_gradient_equal_the_slow_reference(inner):
    objective, cfg, settings, old_model, ref_model, part = setup()
    w_pos, w_neg = slow_weights(old_model, ref_model, part, settings.alpha)
    got_pos, got_neg = part.state["weights"]
    assert torch.allclose(got_pos, torch.tensor(w_pos, dtype=torch.float64), rtol=1e-9, atol=1e-15)
    assert torch.allclose(got_neg, torch.tensor(w_neg, dtype=torch.float64), rtol=1e-9, atol=1e-15)
    assert float(got_pos[3]) == 0 and float(got_pos[:3].sum()) == pytest.approx(1.0)
    cur = perturbed(old_model, scale=0.5)
    metrics, grads = objective_grad(objective, cur, Policy(ref_model), cfg, settings, [part], inner)
    slow = slow_loss(cur, [part], inner, [(w_pos, w_neg)])
    assert abs(metrics["loss"] - slow.item()) <= 1e-9 * abs(slow.item())
    assert_same_grads(grads, reference_grad(cur, slow))


def test_weights_stay_fixed_when_the_parameters_change():
    objective, cfg, settings, old_model, ref_model, part = setup()
    before = [w.clone() for w in part.state["weights"]]
    cur = perturbed(old_model, scale=0.5)
    ctx = Context(Accelerator(cpu=True), Policy(cur), Policy(ref_model), cfg, settings, 0)
    objective.update(ctx, [part], 0)
    objective.prepare(ctx, [part])  # a second prepare on the batch keeps them too
    objective.update(ctx, [part], 1)
    assert all(torch.equal(a, b) for a, b in zip(before, part.state["weights"]))
    # under the moved parameters the weights would differ: they are not recomputed from the current policy
    fresh = make_part(objective, part.rollout, part.rewards, cfg)
    objective.prepare(ctx, [fresh])
    assert not torch.allclose(fresh.state["weights"][0], before[0])


def test_equal_rewards_give_no_gradient():
    objective, cfg, settings, old_model, ref_model, part = setup(rewards=(0.5, 0.5, 0.5, 1.0, None, 1.0))
    w_pos, w_neg = part.state["weights"]
    assert torch.equal(w_pos, w_neg)
    _, grads = objective_grad(objective, perturbed(old_model), Policy(ref_model), cfg, settings, [part], 1)
    assert all(float(g.abs().max()) == 0 for g in grads.values())


def test_micro_batches_give_the_gradient_of_the_whole_batch():
    objective = get_objective("dmpo")
    cfg = RLConfig(objective="dmpo", inner_steps=2, group_size=G, max_rows_per_forward=4)
    settings = DMPOSettings(alpha=0.5)
    old_model, ref_model = tiny_model(3, logit_scale=4.0), tiny_model(4)
    ctx = Context(Accelerator(cpu=True), Policy(old_model), Policy(ref_model), cfg, settings, 0)
    a = make_part(objective, make_rollout(Policy(old_model), 1), [1.0, 0.0, 0.5, 0.2, 0.9, 0.1], cfg, gen_seed=1)
    b = make_part(objective, make_rollout(Policy(old_model), 2), [None, 1.0, 0.0, None, None, None], cfg, gen_seed=2)
    objective.prepare(ctx, [a, b])
    whole = Part(concat_rollouts(a.rollout, b.rollout), torch.cat([a.advantages, b.advantages]),
                 torch.cat([a.valid, b.valid]), a.rewards + b.rewards, torch.Generator())
    whole.state = {
        "masks": [torch.cat([x, y]) for x, y in zip(a.state["masks"], b.state["masks"])],
        "weights": tuple(torch.cat([x, y]) for x, y in zip(a.state["weights"], b.state["weights"])),
    }
    cur = perturbed(old_model)
    m_split, split = objective_grad(objective, cur, Policy(ref_model), cfg, settings, [a, b], 1)
    m_whole, full = objective_grad(objective, cur, Policy(ref_model), cfg, settings, [whole], 1)
    assert m_split["loss"] == pytest.approx(m_whole["loss"], rel=1e-9)
    assert_same_grads(split, full)
