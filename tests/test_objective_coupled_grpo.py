"""coupled-GRPO against a slow float64 reference of ALGORITHMS.md's formula (loops over rows, copies, tokens)."""

import copy

import pytest
import torch
from accelerate import Accelerator

from agrpo.objectives import Context, Part, get_objective
from agrpo.objectives.coupled_grpo import CoupledGRPOSettings, leave_one_out, shared_uniform
from agrpo.policy import Policy
from agrpo.recipes.rl import RLConfig
from agrpo.sampling import SamplingConfig, generate
from conftest import EOS, MASK, full_logits, prompts, tiny_model

SAMPLING = SamplingConfig(gen_length=8, block_length=4, steps=4, temperature=1.0, remasking="random", stop_at_eos=False)
G = 3


# -- helpers shared by the three objective test files -------------------------------------------------

def make_rollout(policy, seed, batch=6, eos_at=((0, 3), (2, 5), (4, 0))):
    """A rollout of `batch` rows (row 1 left-padded by one prompt token) with EOS planted at (row, col):
    the valid tokens then differ from row to row."""
    ids = prompts(batch, 4, seed=seed)
    am = torch.ones_like(ids)
    am[1, 0] = 0
    ids[1, 0] = 0
    ro = generate(policy, ids, am, SAMPLING, torch.Generator().manual_seed(seed))
    for r, c in eos_at:
        if r < batch:
            ro.tokens[r, ro.prompt_len + c] = EOS
    return ro


def perturbed(model, seed=1, scale=0.3):
    new = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale * (p.abs().mean() + 1e-3))
    return new


def make_part(objective, ro, rewards, cfg, gen_seed=0):
    adv, valid = objective.advantages(rewards, cfg.group_size, cfg)
    return Part(ro, adv, valid, rewards, torch.Generator().manual_seed(gen_seed))


def concat_rollouts(a, b):
    fields = {k: (torch.cat([v, getattr(b, k)]) if isinstance(v, torch.Tensor) else v) for k, v in a.__dict__.items()}
    return type(a)(**fields)


def objective_grad(objective, model, ref_fn, cfg, settings, parts, inner, step=0):
    model.zero_grad(set_to_none=True)
    ctx = Context(Accelerator(cpu=True), Policy(model), ref_fn, cfg, settings, step)
    metrics = objective.update(ctx, parts, inner)
    return metrics, {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def reference_grad(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def assert_same_grads(a, b, rtol=1e-9):
    scale = max(float(g.abs().max()) for g in b.values())
    assert scale > 0
    for name in b:
        err = float((a[name] - b[name]).abs().max())
        assert err <= rtol * scale, (name, err, scale)


def slow_valid(ro, b):
    """Valid completion positions of row b: up to and including the first EOS (a loop)."""
    out = []
    for c in range(ro.completion.shape[1]):
        out.append(c)
        if int(ro.completion[b, c]) == EOS:
            break
    return out


def slow_logp(model, ro, b, masked_cols):
    """[C] log p(o_c | x~) for row b with the completion columns `masked_cols` masked: one model call."""
    P = ro.prompt_len
    x = ro.tokens[b].clone()
    for c in masked_cols:
        x[P + c] = MASK
    lg = full_logits(model, x[None], ro.attention_mask[b : b + 1])[0]
    return torch.stack([torch.log_softmax(lg[P + c], -1)[int(ro.completion[b, c])] for c in range(ro.completion.shape[1])])


# -- the slow reference ---------------------------------------------------------------------------------

def slow_coupled(model, ro, b, u, t):
    """[C] l_c of row b from three model calls: all masked, {U < t}, {U > t}."""
    C = ro.completion.shape[1]
    lp_all = slow_logp(model, ro, b, range(C))
    lp_lo = slow_logp(model, ro, b, [c for c in range(C) if u[c] < t])
    lp_hi = slow_logp(model, ro, b, [c for c in range(C) if u[c] > t])
    out = []
    for c in range(C):
        if u[c] < t:
            out.append(0.5 * (lp_all[c] + lp_lo[c] / t))
        else:
            out.append(0.5 * (lp_all[c] + lp_hi[c] / (1 - t)))
    return out


def slow_loss(model, old_model, ref_model, parts, inner, eps, beta):
    terms, count = 0.0, 0
    for part in parts:
        ro, t = part.rollout, part.state["t"][inner]
        for b in range(ro.tokens.shape[0]):
            if not part.valid[b]:
                continue
            u = part.state["u"][inner][b].tolist()
            cur = slow_coupled(model, ro, b, u, t)
            with torch.no_grad():
                old = slow_coupled(old_model, ro, b, u, t)
                ref = slow_coupled(ref_model, ro, b, u, t) if beta > 0 else None
            a = float(part.advantages[b])
            for c in slow_valid(ro, b):
                rho = torch.exp(cur[c] - old[c])
                term = -torch.minimum(rho * a, rho.clamp(1 - eps, 1 + eps) * a)
                if beta > 0:
                    d = ref[c] - cur[c]
                    term = term + beta * (torch.exp(d) - d - 1)
                terms = terms + term
                count += 1
    return terms / count


def setup(beta=0.01, rewards=(1.0, 0.0, 0.5, None, 1.0, 0.0), seed=11):
    objective = get_objective("coupled_grpo")
    cfg = RLConfig(objective="coupled_grpo", inner_steps=2, eps_low=0.5, eps_high=0.5, beta=beta, group_size=G,
                   max_rows_per_forward=4, seed=5)
    settings = CoupledGRPOSettings()
    old_model = tiny_model(seed, logit_scale=4.0)
    ref_model = tiny_model(seed + 1, logit_scale=4.0)
    ro = make_rollout(Policy(old_model), seed)
    part = make_part(objective, ro, list(rewards), cfg)
    objective.prepare(Context(Accelerator(cpu=True), Policy(old_model), Policy(ref_model), cfg, settings, 3), [part])
    return objective, cfg, settings, old_model, ref_model, part


def test_leave_one_out():
    adv, valid = leave_one_out([1.0, 0.0, 0.5, None, 1.0, 0.0], 3)
    assert valid.tolist() == [True, True, True, False, True, True]
    assert torch.allclose(adv, torch.tensor([1 - 0.25, 0 - 0.75, 0.5 - 0.5, 0.0, 1.0, -1.0]))


@pytest.mark.parametrize("inner", [0, 1])
def test_loss_and_gradient_equal_the_slow_reference(inner):
    objective, cfg, settings, old_model, ref_model, part = setup()
    cur = perturbed(old_model, scale=1.0)
    metrics, grads = objective_grad(objective, cur, Policy(ref_model), cfg, settings, [part], inner, step=3)
    slow = slow_loss(cur, old_model, ref_model, [part], inner, 0.5, 0.01)
    assert abs(metrics["loss"] - slow.item()) <= 1e-9 * abs(slow.item())
    assert 0 < metrics["clip_frac"] < 1 and metrics["kl"] > 0  # clipping and the penalty are exercised
    assert_same_grads(grads, reference_grad(cur, slow))


def test_masks_t_and_olds_are_fixed_per_update():
    objective, cfg, settings, old_model, ref_model, part = setup()
    t = part.state["t"]
    assert len(t) == 2 and t[0] != t[1] and all(0.2 <= x <= 0.8 for x in t)
    assert t == [shared_uniform(5, 3, u, 0.2, 0.8) for u in range(2)]
    # another micro-batch (another generator) of the same step shares t but not U; a rerun redraws the same U
    other = make_part(objective, part.rollout, part.rewards, cfg, gen_seed=9)
    again = make_part(objective, part.rollout, part.rewards, cfg, gen_seed=0)
    ctx = Context(Accelerator(cpu=True), Policy(old_model), Policy(ref_model), cfg, settings, 3)
    objective.prepare(ctx, [other, again])
    assert other.state["t"] == t and not torch.equal(other.state["u"][0], part.state["u"][0])
    assert all(torch.equal(a, b) for a, b in zip(again.state["u"], part.state["u"]))
    # at the first update the policy is the old one: every ratio is 1, nothing is clipped
    m, _ = objective_grad(objective, old_model, Policy(ref_model), cfg, settings, [part], 0, step=3)
    assert m["clip_frac"] == 0


def test_equal_rewards_give_no_gradient_without_penalty():
    objective, cfg, settings, old_model, ref_model, part = setup(beta=0.0, rewards=(0.5, 0.5, 0.5, 1.0, None, 1.0))
    cur = perturbed(old_model)
    _, grads = objective_grad(objective, cur, None, cfg, settings, [part], 1)
    assert all(float(g.abs().max()) == 0 for g in grads.values())


def test_micro_batches_give_the_gradient_of_the_whole_batch():
    objective = get_objective("coupled_grpo")
    cfg = RLConfig(objective="coupled_grpo", inner_steps=2, eps_low=0.5, eps_high=0.5, beta=0.01, group_size=G,
                   max_rows_per_forward=4, seed=5)
    settings = CoupledGRPOSettings()
    old_model, ref_model = tiny_model(3, logit_scale=4.0), tiny_model(4)
    ctx = Context(Accelerator(cpu=True), Policy(old_model), Policy(ref_model), cfg, settings, 7)
    a = make_part(objective, make_rollout(Policy(old_model), 1), [1.0, 0.0, 0.5, 0.2, 0.9, 0.1], cfg, gen_seed=1)
    b = make_part(objective, make_rollout(Policy(old_model), 2), [None, 1.0, 0.0, None, None, None], cfg, gen_seed=2)
    objective.prepare(ctx, [a, b])
    whole = Part(concat_rollouts(a.rollout, b.rollout), torch.cat([a.advantages, b.advantages]),
                 torch.cat([a.valid, b.valid]), a.rewards + b.rewards, torch.Generator())
    whole.state = {"t": a.state["t"], "u": [torch.cat([x, y]) for x, y in zip(a.state["u"], b.state["u"])]}
    objective.prepare(ctx, [whole])  # keeps the masks, recomputes old and reference estimates
    cur = perturbed(old_model)
    m_split, split = objective_grad(objective, cur, Policy(ref_model), cfg, settings, [a, b], 1)
    m_whole, full = objective_grad(objective, cur, Policy(ref_model), cfg, settings, [whole], 1)
    assert m_split["loss"] == pytest.approx(m_whole["loss"], rel=1e-9)
    assert_same_grads(split, full)
