import copy
import math

import numpy as np
import pytest
import torch

from agrpo.errors import AgrpoError
from agrpo.objectives import (
    agrpo_loss, diffu_grpo_loss, group_advantages, mean_field_logp, plan_steps, random_prompt_mask,
)
from agrpo.objectives.agrpo import step_distribution
from agrpo.policy import Policy
from agrpo.sampling import Rollout, SamplingConfig, generate
from conftest import EOS, MASK, BiasedLM, full_logits, prompts, tiny_model

TEMP = 0.7
CFG = SamplingConfig(gen_length=8, block_length=4, steps=4, temperature=TEMP, top_k=5, top_p=0.95,
                     remasking="random", stop_at_eos=False)
ADV = torch.tensor([1.0, -0.5, 0.7, -1.2])


def make_rollout(seed=0, cfg=CFG, batch=4, model=None):
    model = model if model is not None else tiny_model(21, logit_scale=6.0)
    ro = generate(Policy(model), prompts(batch, 4, seed=seed), None, cfg, generator=torch.Generator().manual_seed(seed))
    return model, ro


def perturbed(model, seed=1, scale=0.5):
    """A copy with every parameter moved: the rollout becomes off-policy and ratios leave [0.8, 1.2]."""
    new = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale * (p.abs().mean() + 1e-3))
    return new


def slow_step_losses(model, ro, adv, eps_low=0.2, eps_high=0.2, beta=0.0, ref_model=None):
    """{(row, t): (sum of token losses L_t, number of tokens)} from whole-sequence logits at the rebuilt x_t."""
    P = ro.prompt_len
    out = {}
    for b in range(ro.tokens.shape[0]):
        for t in range(int(ro.t_eff[b])):
            x = ro.tokens[b : b + 1].clone()
            for c in range(ro.step.shape[1]):
                if ro.step[b, c] >= t:
                    x[0, P + c] = MASK
            cols = [c for c in range(ro.step.shape[1]) if ro.step[b, c] == t and ro.sampled[b, c]]
            lg = full_logits(model, x)[0]
            lref = full_logits(ref_model, x)[0] if beta > 0 else None
            total = 0.0
            for c in cols:
                ids = [i for i in ro.filter_ids[b, c].tolist() if i >= 0 and i != MASK]
                tok = int(ro.completion[b, c])
                row = lg[P + c, ids] / ro.config.temperature
                logp = row[ids.index(tok)] - torch.logsumexp(row, 0)
                rho = torch.exp(logp - ro.logp[b, c].double())
                a = float(adv[b])
                term = -torch.minimum(rho * a, rho.clamp(1 - eps_low, 1 + eps_high) * a)
                if beta > 0:
                    rrow = lref[P + c, ids].detach() / ro.config.temperature
                    d = rrow[ids.index(tok)] - torch.logsumexp(rrow, 0) - logp
                    term = term + beta * rho * (torch.exp(d) - d - 1)
                total = total + term
            out[(b, t)] = (total, len(cols))
    return out


def exact_sequence(losses, ro, rows=None):
    rows = range(ro.tokens.shape[0]) if rows is None else rows
    per_row = [sum(losses[(b, t)][0] for t in range(int(ro.t_eff[b]))) / int(ro.t_eff[b]) for b in rows]
    return sum(per_row) / len(per_row)


# -- (8a) K = T_eff, stratified: the estimate is the exact objective ------------------------------
def test_stratified_full_cover_equals_exact_objective():
    model, ro = make_rollout(0)
    assert ro.t_eff.tolist() == [4] * 4
    cur = perturbed(model)
    exact = exact_sequence(slow_step_losses(cur, ro, ADV), ro)
    loss, m = agrpo_loss(Policy(cur), ro, ADV, num_samples=4, step_sampling="stratified",
                         generator=torch.Generator().manual_seed(0))
    assert 0 < m["clip_frac"] < 1  # off-policy enough that clipping is exercised on some tokens only
    assert m["loss_tokens"] == 32 and m["samples"] == 16
    # float32 rounding alone is ~1e-8 at this loss size: 1e-9 needs the float64 path end to end
    assert loss.dtype == torch.float64
    assert abs(float(loss.detach()) - float(exact.detach())) < 1e-9


def _grad_params(model):
    # the final norm scales every logit; an attention projection sits deep in the network
    return [model.model.norm.weight, model.model.layers[0].self_attn.q_proj.weight]


def _coords(grads):
    return torch.cat([grads[0][:6].flatten(), grads[1][:2, :2].flatten()])


def _estimates(policy, ro, n, **kw):
    params = _grad_params(policy.model)
    vals, grads = [], []
    for i in range(n):
        loss, _ = agrpo_loss(policy, ro, ADV, num_samples=2, generator=torch.Generator().manual_seed(1000 + i), **kw)
        vals.append(float(loss.detach()))
        grads.append(_coords(torch.autograd.grad(loss, params)).double())
    return np.array(vals), torch.stack(grads).numpy()


# -- (8b) K = 2 < T_eff: unbiased for every step sampler ------------------------------------------
@pytest.mark.parametrize(
    "sampling,importance,beta",
    [("uniform", "none", 0.0), ("low_discrepancy", "none", 0.0), ("stratified", "none", 0.0),
     ("low_discrepancy", "entropy", 0.0), ("uniform", "none", 0.1)],
)
def test_small_k_estimates_are_unbiased(sampling, importance, beta):
    model, ro = make_rollout(3)
    cur = perturbed(model, seed=4)
    ref = perturbed(model, seed=5, scale=0.3)
    losses = slow_step_losses(cur, ro, ADV, beta=beta, ref_model=ref)
    exact = exact_sequence(losses, ro)
    exact_grad = _coords(torch.autograd.grad(exact, _grad_params(cur))).numpy()
    kw = dict(step_sampling=sampling, importance=importance, beta=beta)
    if beta > 0:
        kw["ref_logits_fn"] = Policy(ref)
    n = 250
    vals, grads = _estimates(Policy(cur), ro, n, **kw)
    # mean of n iid estimates: |mean - E| / (sd / sqrt n) is ~N(0, 1); 4.5 sigma = 7e-6 false-alarm rate
    se = vals.std(ddof=1) / math.sqrt(n)
    assert se > 0
    assert abs(vals.mean() - float(exact.detach())) < 4.5 * se
    gse = grads.std(0, ddof=1) / math.sqrt(n)
    assert (gse > 0).all()
    # max over 10 coordinates of a standard normal: 5 sigma keeps the family-wise false alarm < 1e-5
    assert (np.abs(grads.mean(0) - exact_grad) / gse).max() < 5


def test_reference_model_changes_the_loss():
    model, ro = make_rollout(3)
    cur, ref = perturbed(model, seed=4), perturbed(model, seed=5, scale=0.3)
    kw = dict(num_samples=4, step_sampling="stratified", generator=torch.Generator().manual_seed(0))
    l0, _ = agrpo_loss(Policy(cur), ro, ADV, **kw)
    kw["generator"] = torch.Generator().manual_seed(0)
    l1, m1 = agrpo_loss(Policy(cur), ro, ADV, beta=0.1, ref_logits_fn=Policy(ref), **kw)
    exact = exact_sequence(slow_step_losses(cur, ro, ADV, beta=0.1, ref_model=ref), ro)
    assert m1["kl"] > 0 and float(l1.detach()) > float(l0.detach())
    assert abs(float(l1.detach()) - float(exact.detach())) < 1e-6
    with pytest.raises(AgrpoError, match="ref"):
        agrpo_loss(Policy(cur), ro, ADV, beta=0.1)


# -- (8c) entropy importance weights --------------------------------------------------------------
def test_entropy_importance_weights_match_slow_q():
    base = tiny_model(22, logit_scale=6.0)
    # half the rows emit EOS from block 1 on and stop: several T_eff in one batch
    model = BiasedLM(base, {EOS: 20.0}, start=4 + 4, row_pred=lambda ids: ids[:, 0] < 20)
    cfg = SamplingConfig(gen_length=12, block_length=4, steps=6, temperature=TEMP, top_k=5, top_p=0.95)
    x0 = prompts(4, 4, seed=2)
    x0[:2, 0] = 5
    x0[2:, 0] = 30
    ro = generate(Policy(model), x0, None, cfg, generator=torch.Generator().manual_seed(2))
    assert ro.t_eff[:2].max() <= 4 and ro.t_eff[2:].min() > 4
    q_slow = np.zeros((4, 6))
    for b in range(4):
        te = int(ro.t_eff[b])
        h = np.zeros(te)
        for c in range(12):
            if ro.sampled[b, c] and ro.step[b, c] < te:
                h[int(ro.step[b, c])] += float(ro.entropy[b, c])
        h = h + 1e-3 * h.mean() + 1e-12
        q_slow[b, :te] = h / h.sum()
    np.testing.assert_allclose(step_distribution(ro, "entropy").numpy(), q_slow, rtol=1e-10, atol=1e-15)
    plan = plan_steps(ro, 5, "low_discrepancy", "entropy", generator=torch.Generator().manual_seed(0))
    for i in range(plan.row.numel()):
        b, t = int(plan.row[i]), int(plan.t[i])
        assert t < int(ro.t_eff[b])
        assert abs(float(plan.weight[i]) - (1 / int(ro.t_eff[b])) / q_slow[b, t]) < 1e-6 * float(plan.weight[i])
        # the sample's positions are exactly the sampled tokens committed at t
        want = sorted(c for c in range(12) if ro.step[b, c] == t and ro.sampled[b, c])
        assert sorted(plan.positions[i][plan.valid[i]].tolist()) == want
    uni = plan_steps(ro, 5, "uniform", "none", generator=torch.Generator().manual_seed(0))
    assert bool((uni.weight == 1).all())


# -- (9) normalisation, chunking, early backward ---------------------------------------------------
def test_token_normalization_chunking_and_backward_path():
    model, ro = make_rollout(0)
    cur = perturbed(model)
    losses = slow_step_losses(cur, ro, ADV)
    exact_tok = sum(v[0] for v in losses.values()) / sum(v[1] for v in losses.values())
    pol = Policy(cur)
    params = _grad_params(cur)

    def run(**kw):
        loss, _ = agrpo_loss(pol, ro, ADV, num_samples=3, step_sampling="uniform",
                             generator=torch.Generator().manual_seed(7), **kw)
        return loss

    loss_t, _ = agrpo_loss(pol, ro, ADV, num_samples=4, step_sampling="stratified", normalization="token",
                           generator=torch.Generator().manual_seed(0))
    assert abs(float(loss_t.detach()) - float(exact_tok.detach())) < 1e-9
    one = run()
    g_one = torch.autograd.grad(one, params)
    for chunk in (1, 3):
        part = run(max_rows_per_forward=chunk)
        assert abs(float(part.detach()) - float(one.detach())) < 1e-9
        for a, b in zip(torch.autograd.grad(part, params), g_one):
            torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)
    for p in cur.parameters():
        p.grad = None
    back = run(max_rows_per_forward=3, backward=lambda l: l.backward())
    assert not back.requires_grad and abs(float(back) - float(one.detach())) < 1e-9
    for p, b in zip(params, g_one):
        torch.testing.assert_close(p.grad, b, atol=1e-9, rtol=1e-7)


# -- (10) advantages --------------------------------------------------------------------------------
def test_group_advantages_values():
    adv, valid = group_advantages([1.0, 2.0, 3.0, None, 0.0, 0.0, 4.0, 2.0], 4)
    assert adv.tolist() == [-1.0, 0.0, 1.0, 0.0, -1.5, -1.5, 2.5, 0.5]
    assert valid.tolist() == [True, True, True, False, True, True, True, True]
    adv, _ = group_advantages(torch.tensor([1.0, 2.0, 3.0, float("nan"), 0.0, 0.0, 4.0, 2.0]), 4, scale_std=True)
    # group 1: deviations (-1, 0, 1), sample std 1; group 2: deviations (-1.5,-1.5,2.5,.5), var 11/3
    s2 = math.sqrt(11 / 3)
    np.testing.assert_allclose(adv.numpy(), [-1 / 1.0001, 0, 1 / 1.0001, 0] + [d / (s2 + 1e-4) for d in (-1.5, -1.5, 2.5, 0.5)], rtol=1e-6)
    adv, valid = group_advantages([None, None], 2)
    assert adv.tolist() == [0.0, 0.0] and not bool(valid.any())
    with pytest.raises(AgrpoError):
        group_advantages([1.0, 2.0, 3.0], 2)
    with pytest.raises(AgrpoError):
        group_advantages([1.0, float("inf")], 2)


def _subset(ro, rows):
    kw = {k: (v[rows] if isinstance(v, torch.Tensor) else v) for k, v in ro.__dict__.items()}
    return Rollout(**kw)


def test_invalid_rows_contribute_nothing():
    model, ro = make_rollout(0)
    cur = perturbed(model)
    valid = torch.tensor([True, False, True, False])
    kw = dict(num_samples=4, step_sampling="stratified")
    with_invalid, m = agrpo_loss(Policy(cur), ro, ADV * 100, row_valid=valid, generator=torch.Generator().manual_seed(0), **kw)
    alone, _ = agrpo_loss(Policy(cur), _subset(ro, valid), (ADV * 100)[valid], generator=torch.Generator().manual_seed(0), **kw)
    assert m["samples"] == 8
    assert abs(float(with_invalid.detach()) - float(alone.detach())) < 1e-9 * max(1.0, abs(float(alone.detach())))
    exact = exact_sequence(slow_step_losses(cur, ro, ADV * 100), ro, rows=[0, 2])
    assert abs(float(with_invalid.detach()) - float(exact.detach())) < 1e-6 * abs(float(exact.detach()))


# -- (11) diffu-GRPO --------------------------------------------------------------------------------
def _manual_rollout(B, P, C, pad):
    tokens = prompts(B, P + C, seed=3)
    attn = torch.ones(B, P + C, dtype=torch.long)
    for b in range(B):
        attn[b, : pad[b]] = 0
        tokens[b, : pad[b]] = 0
    cfg = SamplingConfig(gen_length=C, block_length=C, steps=C, temperature=TEMP)
    step = torch.arange(C).expand(B, C).clone()
    sampled = torch.ones(B, C, dtype=torch.bool)
    return Rollout(tokens=tokens, attention_mask=attn, prompt_len=P, step=step, logp=torch.zeros(B, C),
                   entropy=torch.zeros(B, C), sampled=sampled, filter_ids=None, t_eff=torch.full((B,), C),
                   config=cfg, mask_id=MASK, eos_id=EOS)


def test_random_prompt_mask_rate_and_support():
    B, P, C = 300, 10, 4
    pad = [b % 5 for b in range(B)]
    ro = _manual_rollout(B, P, C, pad)
    p = 0.15
    m = random_prompt_mask(ro, p, generator=torch.Generator().manual_seed(0))
    assert not bool(m[:, P:].any())
    assert not bool(m[ro.attention_mask == 0].any())
    n = int(ro.attention_mask[:, :P].sum())
    rate = float(m.sum()) / n
    # binomial(n, p): rate has sd sqrt(p(1-p)/n); 4.5 sd bound
    assert abs(rate - p) < 4.5 * math.sqrt(p * (1 - p) / n)
    assert not bool(random_prompt_mask(ro, 0.0).any())
    with pytest.raises(AgrpoError):
        random_prompt_mask(ro, 1.0)


def _slow_mean_field(model, ro, pm, temperature):
    x = ro.tokens.clone()
    x[:, ro.prompt_len :] = MASK
    x[pm] = MASK
    lg = full_logits(model, x, ro.attention_mask)[:, ro.prompt_len :] / temperature
    return torch.log_softmax(lg, -1).gather(-1, ro.completion[:, :, None]).squeeze(-1)


@pytest.mark.parametrize("normalization", ["sequence", "token"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_diffu_grpo_matches_slow_reference(normalization, beta):
    base = tiny_model(23, logit_scale=6.0)
    model = BiasedLM(base, {EOS: 20.0}, start=3 + 4, row_pred=lambda ids: ids[:, 2] < 20)
    cfg = SamplingConfig(gen_length=12, block_length=4, steps=6, temperature=TEMP, top_k=5, top_p=0.95)
    x0 = prompts(4, 3, seed=4)
    x0[0, 2], x0[1, 2], x0[2, 2], x0[3, 2] = 5, 30, 30, 30
    x0[3, 0] = 0
    pmask = torch.ones_like(x0)
    pmask[3, 0] = 0
    ro = generate(Policy(model), x0, pmask, cfg, generator=torch.Generator().manual_seed(0))
    assert not bool(ro.sampled[0].all())  # row 0 stopped: its EOS fill is not learned from
    old_model, cur, ref = base, perturbed(base, seed=6), perturbed(base, seed=7, scale=0.1)
    pm = random_prompt_mask(ro, 0.3, generator=torch.Generator().manual_seed(1))
    old = _slow_mean_field(old_model, ro, pm, 1.0).detach()
    torch.testing.assert_close(mean_field_logp(Policy(old_model), ro, pm).double(), old, atol=1e-6, rtol=0)
    reflp = _slow_mean_field(ref, ro, pm, 1.0).detach()
    adv = torch.tensor([0.5, -1.0, 1.5, -0.2])
    loss, m = diffu_grpo_loss(Policy(cur), ro, adv, pm, old.float(), beta=beta, ref_logp=reflp.float(),
                              normalization=normalization)
    new = _slow_mean_field(cur, ro, pm, 1.0)
    mask = ro.sampled & (ro.step < ro.t_eff[:, None])
    per_row, num, den = [], 0.0, 0
    for b in range(4):
        tot, cnt = 0.0, 0
        for c in range(12):
            if not mask[b, c]:
                continue
            rho = torch.exp(new[b, c] - old[b, c].float().double())
            a = float(adv[b])
            term = -torch.minimum(rho * a, rho.clamp(0.8, 1.2) * a)
            d = reflp[b, c].float().double() - new[b, c]
            term = term + beta * rho * (torch.exp(d) - d - 1)
            tot, cnt = tot + term, cnt + 1
        if cnt:
            per_row.append(tot / cnt)
        num, den = num + tot, den + cnt
    exact = sum(per_row) / len(per_row) if normalization == "sequence" else num / den
    assert m["loss_tokens"] == int(mask.sum())
    assert abs(float(loss.detach()) - float(exact.detach())) < 1e-6


def test_objective_argument_errors():
    model, ro = make_rollout(0)
    pol = Policy(model)
    with pytest.raises(AgrpoError, match="advantages"):
        agrpo_loss(pol, ro, ADV[:3])
    pm = random_prompt_mask(ro, 0.1)
    with pytest.raises(AgrpoError, match="advantages"):
        diffu_grpo_loss(pol, ro, ADV[:3], pm, ro.logp)
    greedy = SamplingConfig(gen_length=8, block_length=4, steps=4, temperature=0.0)
    _, ro0 = make_rollout(0, cfg=greedy, model=model)
    with pytest.raises(AgrpoError, match="temperature"):
        agrpo_loss(pol, ro0, ADV)
    with pytest.raises(AgrpoError):
        plan_steps(ro, 0)
    with pytest.raises(AgrpoError):
        agrpo_loss(pol, ro, ADV, step_sampling="bogus")
