import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from agrpo.errors import AgrpoError
from agrpo.objectives import (
    agrpo_loss, diffu_grpo_loss, group_advantages, mean_field_logp, plan_steps, random_prompt_mask,
)
from agrpo.objectives.agrpo import rebuild_states, step_distribution
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


def slow_horizon(ro, eos_steps="include"):
    """T_eff per row, from the record by loops: last step that sampled a token (include) or a non-EOS one (exclude), + 1."""
    out = []
    for b in range(ro.tokens.shape[0]):
        last = 0
        for c in range(ro.step.shape[1]):
            if ro.sampled[b, c] and (eos_steps == "include" or int(ro.completion[b, c]) != EOS):
                last = max(last, int(ro.step[b, c]) + 1)
        out.append(last)
    return out


def slow_step_losses(model, ro, adv, eps_low=0.2, eps_high=0.2, beta=0.0, ref_model=None, eos_steps="include"):
    """{(row, t): (sum of token losses L_t, number of tokens)} from whole-sequence logits at the rebuilt x_t.

    Honours left padding (attention mask and positions from the mask); every t < T_eff of the row.
    """
    P = ro.prompt_len
    out = {}
    for b, t_eff in enumerate(slow_horizon(ro, eos_steps)):
        am = ro.attention_mask[b : b + 1]
        for t in range(t_eff):
            x = ro.tokens[b : b + 1].clone()
            for c in range(ro.step.shape[1]):
                if ro.step[b, c] >= t:
                    x[0, P + c] = MASK
            cols = [c for c in range(ro.step.shape[1]) if ro.step[b, c] == t and ro.sampled[b, c]]
            lg = full_logits(model, x, am)[0]
            lref = full_logits(ref_model, x, am)[0] if beta > 0 else None
            total = 0.0
            for c in cols:
                if ro.filter_ids is None:
                    ids = [i for i in range(lg.shape[-1]) if i != MASK]
                else:
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


def exact_sequence(losses, ro, rows=None, eos_steps="include"):
    """Mean over rows with T_eff > 0 of (1 / T_eff) sum_t L_t: what every step sampler estimates."""
    horizon = slow_horizon(ro, eos_steps)
    rows = range(ro.tokens.shape[0]) if rows is None else rows
    rows = [b for b in rows if horizon[b] > 0]
    per_row = [sum(losses[(b, t)][0] for t in range(horizon[b])) / horizon[b] for b in rows]
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


def _estimates(policy, ro, n, adv=ADV, params=None, **kw):
    """n independent K = 2 estimates: (loss values [n], gradient coordinates [n, 10])."""
    params = params if params is not None else _grad_params(policy.model)
    vals, grads = [], []
    for i in range(n):
        loss, _ = agrpo_loss(policy, ro, adv, num_samples=2, generator=torch.Generator().manual_seed(1000 + i), **kw)
        vals.append(float(loss.detach()))
        grads.append(_coords(torch.autograd.grad(loss, params)).double())
    return np.array(vals), torch.stack(grads).numpy()


def _assert_unbiased(vals, grads, exact, exact_grad, check_value=True):
    n = len(vals)
    # mean of n iid estimates: |mean - E| / (sd / sqrt n) is ~N(0, 1); 4.5 sigma = 7e-6 false-alarm rate
    se = vals.std(ddof=1) / math.sqrt(n)
    assert se > 0
    if check_value:
        assert abs(vals.mean() - float(exact.detach())) < 4.5 * se
    gse = grads.std(0, ddof=1) / math.sqrt(n)
    assert (gse > 0).all()
    # max over 10 coordinates of a standard normal: 5 sigma keeps the family-wise false alarm < 1e-5
    assert (np.abs(grads.mean(0) - exact_grad) / gse).max() < 5


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
    vals, grads = _estimates(Policy(cur), ro, 250, **kw)
    _assert_unbiased(vals, grads, exact, exact_grad)


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


def slow_q(ro, importance, eos_steps):
    """q_b(t) by loops: uniform over t < T_eff, or the entropy committed at t plus a floor of 1e-3 x its mean."""
    B, T = ro.tokens.shape[0], ro.config.steps
    q = np.zeros((B, T))
    for b, te in enumerate(slow_horizon(ro, eos_steps)):
        if te == 0:
            continue
        h = np.ones(te)
        if importance == "entropy":
            h = np.zeros(te)
            for c in range(ro.step.shape[1]):
                if ro.sampled[b, c] and ro.step[b, c] < te:
                    h[int(ro.step[b, c])] += float(ro.entropy[b, c])
            h = h + 1e-3 * h.mean() + 1e-12
        q[b, :te] = h / h.sum()
    return q


# -- (8c) entropy importance weights --------------------------------------------------------------
@pytest.mark.parametrize("eos_steps", ["include", "exclude"])
def test_entropy_importance_weights_match_slow_q(eos_steps):
    base = tiny_model(22, logit_scale=6.0)
    # half the rows emit EOS from block 1 on and stop: several T_eff in one batch
    model = BiasedLM(base, {EOS: 20.0}, start=4 + 4, row_pred=lambda ids: ids[:, 0] < 20)
    cfg = SamplingConfig(gen_length=12, block_length=4, steps=6, temperature=TEMP, top_k=5, top_p=0.95)
    x0 = prompts(4, 4, seed=2)
    x0[:2, 0] = 5
    x0[2:, 0] = 30
    ro = generate(Policy(model), x0, None, cfg, generator=torch.Generator().manual_seed(2))
    assert ro.t_eff[:2].max() <= 4 and ro.t_eff[2:].min() > 4
    q_slow = slow_q(ro, "entropy", eos_steps)
    horizon = slow_horizon(ro, eos_steps)
    np.testing.assert_allclose(step_distribution(ro, "entropy", eos_steps).numpy(), q_slow, rtol=1e-10, atol=1e-15)
    plan = plan_steps(ro, 5, "low_discrepancy", "entropy", generator=torch.Generator().manual_seed(0), eos_steps=eos_steps)
    for i in range(plan.row.numel()):
        b, t = int(plan.row[i]), int(plan.t[i])
        assert t < horizon[b]
        assert abs(float(plan.weight[i]) - (1 / horizon[b]) / q_slow[b, t]) < 1e-6 * float(plan.weight[i])
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
@pytest.mark.parametrize("beta,eos_steps", [(0.0, "include"), (0.05, "include"), (0.0, "exclude")])
def test_diffu_grpo_matches_slow_reference(normalization, beta, eos_steps):
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
                              normalization=normalization, eos_steps=eos_steps)
    new = _slow_mean_field(cur, ro, pm, 1.0)
    mask = ro.sampled & (ro.step < torch.tensor(slow_horizon(ro, eos_steps))[:, None])
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


# -- rows of every length: early EOS stops, a row that is all EOS, left-padded prompts ------------
class RowEos(torch.nn.Module):
    """EOS gets +20 from completion column `starts[first real prompt token]` on, per row; other rows untouched.

    Gives one batch rows that stop after block 0, 1 or 2, a row whose whole completion is EOS, and
    rows that run to the end: T_eff differs from row to row.
    """

    def __init__(self, model, starts: dict, prompt_len: int):
        super().__init__()
        self.inner, self.starts, self.prompt_len, self.config = model, starts, prompt_len, model.config

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        logits = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits.clone()
        am = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        first = input_ids.gather(1, am.argmax(1, keepdim=True)).squeeze(1)
        for b in range(input_ids.shape[0]):
            start = self.starts.get(int(first[b]))
            if start is not None:
                logits[b, self.prompt_len + start :, EOS] += 20.0
        return SimpleNamespace(logits=logits)


MIXED_CFG = SamplingConfig(gen_length=12, block_length=4, steps=6, temperature=TEMP, top_k=5, top_p=0.95,
                           remasking="random")
MIXED_ADV = torch.tensor([0.9, -1.3, 0.4, 1.6, -0.8, 0.6])


def mixed_rollout(seed=0, cfg=MIXED_CFG):
    """(base model, policy model, rollout): 6 rows, prompts of 3-6 real tokens left-padded to 6."""
    P = 6
    base = tiny_model(31, logit_scale=6.0)
    model = RowEos(base, {3: 0, 4: 2, 5: 4, 6: 6}, P)
    x0 = prompts(6, P, seed=seed + 11, vocab=40).clamp(min=7)
    pm = torch.ones_like(x0)
    for b, (real, first) in enumerate([(6, 3), (3, 4), (5, 5), (4, 6), (6, 8), (5, 9)]):
        x0[b, : P - real] = 0
        pm[b, : P - real] = 0
        x0[b, P - real] = first
    ro = generate(Policy(model), x0, pm, cfg, generator=torch.Generator().manual_seed(seed))
    return base, model, ro


def test_mixed_rollout_has_rows_of_every_kind():
    _, _, ro = mixed_rollout()
    inc, exc = slow_horizon(ro, "include"), slow_horizon(ro, "exclude")
    assert bool((ro.completion[0] == EOS).all()) and exc[0] == 0 and inc[0] == 2  # all EOS: only block 0 sampled
    assert len(set(exc)) >= 4 and inc != exc  # several T_eff, and the two choices differ
    assert inc[4] == inc[5] == 6 and min(inc[1:4]) < 6  # full rows and early stops
    assert int(ro.attention_mask[:, :6].sum(1).min()) == 3  # left padding up to 3 tokens
    assert ro.t_eff.tolist() == exc
    from agrpo.objectives.common import horizon

    assert horizon(ro, "include").tolist() == inc and horizon(ro, "exclude").tolist() == exc


def test_padded_rollout_is_on_policy():
    """Recorded log-probs equal the slow reference under the attention mask; the loss sees ratio 1."""
    _, model, ro = mixed_rollout()
    P = ro.prompt_len
    checked = 0
    for b in range(6):
        am = ro.attention_mask[b : b + 1]
        for c in range(12):
            if not ro.sampled[b, c]:
                continue
            x = ro.tokens[b : b + 1].clone()
            x[0, P:] = x[0, P:].masked_fill(ro.step[b] >= ro.step[b, c], MASK)
            lg = full_logits(model, x, am)[0, P + c]
            ids = [i for i in ro.filter_ids[b, c].tolist() if i >= 0 and i != MASK]
            row = lg[ids] / TEMP
            ref = row[ids.index(int(ro.completion[b, c]))] - torch.logsumexp(row, 0)
            assert abs(float(ref.detach()) - float(ro.logp[b, c])) < 1e-5
            checked += 1
    assert checked == int(ro.sampled.sum()) > 30
    for eos_steps in ("include", "exclude"):
        horizon = slow_horizon(ro, eos_steps)
        k = math.lcm(*[h for h in horizon if h > 0])
        loss, m = agrpo_loss(Policy(model), ro, MIXED_ADV, num_samples=k, eos_steps=eos_steps,
                             generator=torch.Generator().manual_seed(0))
        assert abs(m["ratio_mean"] - 1) < 1e-6 and m["clip_frac"] == 0
        # ratio 1: L_t = -A * (tokens committed at t), so the loss is known without a model
        want = 0.0
        rows = [b for b in range(6) if horizon[b] > 0]
        for b in rows:
            n = sum(1 for c in range(12) if ro.sampled[b, c] and ro.step[b, c] < horizon[b])
            want += -float(MIXED_ADV[b]) * n / horizon[b]
        assert abs(float(loss.detach()) - want / len(rows)) < 1e-6


@pytest.mark.parametrize("eos_steps", ["include", "exclude"])
@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.2), (0.05, 0.3), (0.3, 0.05)])
def test_exact_objective_on_rows_of_every_length(eos_steps, eps_low, eps_high):
    """Stratified with K a multiple of every T_eff draws each step equally often: the exact average."""
    base, model, ro = mixed_rollout()
    cur = RowEos(perturbed(base), model.starts, ro.prompt_len)
    horizon = slow_horizon(ro, eos_steps)
    k = math.lcm(*[h for h in horizon if h > 0])
    exact = exact_sequence(slow_step_losses(cur, ro, MIXED_ADV, eps_low, eps_high, eos_steps=eos_steps), ro,
                           eos_steps=eos_steps)
    loss, m = agrpo_loss(Policy(cur), ro, MIXED_ADV, num_samples=k, eps_low=eps_low, eps_high=eps_high,
                         eos_steps=eos_steps, generator=torch.Generator().manual_seed(0))
    assert 0 < m["clip_frac"] < 1
    assert loss.dtype == torch.float64
    assert abs(float(loss.detach()) - float(exact.detach())) < 1e-9


def test_asymmetric_clip_bounds_are_not_interchangeable():
    base, model, ro = mixed_rollout()
    cur = RowEos(perturbed(base), model.starts, ro.prompt_len)
    kw = dict(num_samples=12, generator=None)
    a, _ = agrpo_loss(Policy(cur), ro, MIXED_ADV, eps_low=0.05, eps_high=0.3, **kw)
    b, _ = agrpo_loss(Policy(cur), ro, MIXED_ADV, eps_low=0.3, eps_high=0.05, **kw)
    assert abs(float(a.detach()) - float(b.detach())) > 1e-3


@pytest.mark.parametrize("eos_steps", ["include", "exclude"])
@pytest.mark.parametrize(
    "sampling,importance",
    [("uniform", "none"), ("low_discrepancy", "none"), ("stratified", "none"), ("low_discrepancy", "entropy"),
     ("stratified", "entropy")],
)
def test_small_k_unbiased_on_rows_of_every_length(sampling, importance, eos_steps):
    base, model, ro = mixed_rollout(1)
    cur = RowEos(perturbed(base, seed=8), model.starts, ro.prompt_len)
    exact = exact_sequence(slow_step_losses(cur, ro, MIXED_ADV, eos_steps=eos_steps), ro, eos_steps=eos_steps)
    exact_grad = _coords(torch.autograd.grad(exact, _grad_params(cur.inner))).numpy()
    vals, grads = _estimates(Policy(cur), ro, 250, adv=MIXED_ADV, params=_grad_params(cur.inner),
                             step_sampling=sampling, importance=importance, eos_steps=eos_steps)
    # With include, the steps that commit forced EOS (entropy ~1e-7) get q ~ 2e-4 and weight ~1e3:
    # the loss VALUE stays unbiased (the plan and frequency tests prove both halves) but its
    # tail is beyond 250 draws. The gradient there is ~0 (p = 1), so the gradient check stands.
    _assert_unbiased(vals, grads, exact, exact_grad, check_value=importance == "none" or eos_steps == "exclude")


def _rollout_with_horizons(t_effs, steps=6, gen=12):
    """A hand-made record: row b commits non-EOS tokens up to step t_effs[b] - 1, EOS after (sampled)."""
    B = len(t_effs)
    kps = gen // steps
    step = torch.arange(gen).div(kps, rounding_mode="floor").expand(B, gen).clone()
    comp = torch.full((B, gen), 9)
    for b, te in enumerate(t_effs):
        comp[b, step[b] >= te] = EOS
    tokens = torch.cat([torch.full((B, 2), 5), comp], 1)
    cfg = SamplingConfig(gen_length=gen, block_length=gen, steps=steps, temperature=TEMP, stop_at_eos=False)
    t_eff = torch.tensor(t_effs)
    return Rollout(tokens=tokens, attention_mask=torch.ones_like(tokens), prompt_len=2, step=step,
                   logp=torch.zeros(B, gen), entropy=torch.rand(B, gen, generator=torch.Generator().manual_seed(0)),
                   sampled=torch.ones(B, gen, dtype=torch.bool), filter_ids=None, t_eff=t_eff, config=cfg,
                   mask_id=MASK, eos_id=EOS)


@pytest.mark.parametrize("eos_steps", ["include", "exclude"])
@pytest.mark.parametrize(
    "sampling,importance",
    [("uniform", "none"), ("low_discrepancy", "none"), ("stratified", "none"), ("low_discrepancy", "entropy"),
     ("uniform", "entropy")],
)
def test_each_draw_follows_q_over_the_live_steps(sampling, importance, eos_steps):
    """P(t_k = t | row) = q_b(t) (1 / T_eff without importance) for t < T_eff, also when B*K is not a multiple of T_eff."""
    ro = _rollout_with_horizons([3, 5, 1, 4, 6])
    assert slow_horizon(ro, "exclude") == [3, 5, 1, 4, 6] and slow_horizon(ro, "include") == [6] * 5
    q = slow_q(ro, importance, eos_steps)
    k, n = 3, 1500
    counts = np.zeros((5, 6))
    for i in range(n):
        plan = plan_steps(ro, k, sampling, importance, generator=torch.Generator().manual_seed(i), eos_steps=eos_steps)
        np.add.at(counts, (plan.row.numpy(), plan.t.numpy()), 1)
    freq = counts / (n * k)
    # binomial bound per cell (stratified draws vary less, so it is conservative); 5 sigma
    assert (np.abs(freq - q) <= 5 * np.sqrt(q * (1 - q) / (n * k)) + 1e-12).all(), (freq, q)


def test_importance_weights_enter_the_loss_for_a_given_plan():
    """loss(plan) = sum_k w_k L_{t_k} / (K R) exactly, with step entropies that differ by orders of magnitude."""
    base, model, ro = mixed_rollout(2)
    cur = RowEos(perturbed(base, seed=9), model.starts, ro.prompt_len)
    losses = slow_step_losses(cur, ro, MIXED_ADV)
    k = 3
    plan = plan_steps(ro, k, "low_discrepancy", "entropy", generator=torch.Generator().manual_seed(5))
    w = plan.weight.double()
    assert float(w.max() / w.min()) > 3
    rows = {int(r) for r in plan.row}
    terms = [losses[(int(plan.row[i]), int(plan.t[i]))][0] for i in range(plan.row.numel())]
    want = sum(float(w[i]) * terms[i] for i in range(len(terms))) / (k * len(rows))
    unweighted = sum(terms) / (k * len(rows))
    assert abs(float(want.detach()) - float(unweighted.detach())) > 1e-2  # leaving w out shows
    loss, _ = agrpo_loss(Policy(cur), ro, MIXED_ADV, plan=plan)
    assert abs(float(loss.detach()) - float(want.detach())) < 1e-9


@pytest.mark.parametrize("normalization", ["sequence", "token"])
def test_diffu_grpo_dropped_rows_equal_the_kept_rows_alone(normalization):
    base, model, ro = mixed_rollout()
    cur = perturbed(base, seed=3)
    keep = torch.tensor([True, False, True, True, False, True])
    pm = random_prompt_mask(ro, 0.3, generator=torch.Generator().manual_seed(2))
    old = mean_field_logp(Policy(base), ro, pm).detach()
    with_rows, m = diffu_grpo_loss(Policy(cur), ro, MIXED_ADV * 10, pm, old, row_valid=keep,
                                   normalization=normalization)
    alone, m_alone = diffu_grpo_loss(Policy(cur), _subset(ro, keep), (MIXED_ADV * 10)[keep], pm[keep], old[keep],
                                     normalization=normalization)
    assert m["loss_tokens"] == m_alone["loss_tokens"] > 0
    assert abs(float(with_rows.detach()) - float(alone.detach())) < 1e-9 * max(1.0, abs(float(alone.detach())))


def test_unfiltered_rollout_never_gives_mask_probability():
    """No top-k/top-p: [MASK] is banned when sampling and when log-probs are recomputed."""
    base = tiny_model(32, logit_scale=3.0)
    model = BiasedLM(base, {MASK: 2.0})  # [MASK] would hold a real share of the mass
    cfg = SamplingConfig(gen_length=8, block_length=4, steps=4, temperature=1.0, remasking="random", stop_at_eos=False)
    ro = generate(Policy(model), prompts(4, 4, seed=12), None, cfg, generator=torch.Generator().manual_seed(0))
    assert ro.filter_ids is None and not bool((ro.completion == MASK).any())
    x = rebuild_states(ro, torch.tensor([0]), torch.tensor([0]))
    p_mask = torch.softmax(full_logits(model, x)[0, ro.prompt_len:].detach(), -1)[:, MASK]
    assert float(p_mask.min()) > 0.05
    loss, m = agrpo_loss(Policy(model), ro, ADV, num_samples=4)
    assert abs(m["ratio_mean"] - 1) < 1e-6 and m["clip_frac"] == 0
    losses = slow_step_losses(model, ro, ADV)
    assert abs(float(loss.detach()) - float(exact_sequence(losses, ro).detach())) < 1e-9


@pytest.mark.parametrize("eos_steps", ["include", "exclude"])
def test_every_step_plan_is_the_exact_objective(eos_steps):
    """The plan the estimator-variance study takes as truth equals the float64 every-step reference."""
    from agrpo.objectives.agrpo import every_step_plan

    base, model, ro = mixed_rollout()
    cur = RowEos(perturbed(base), model.starts, ro.prompt_len)
    exact = exact_sequence(slow_step_losses(cur, ro, MIXED_ADV, 0.05, 0.3, eos_steps=eos_steps), ro, eos_steps=eos_steps)
    plan = every_step_plan(ro, eos_steps=eos_steps)
    assert plan.row.numel() == sum(slow_horizon(ro, eos_steps))  # each live step once
    loss, _ = agrpo_loss(Policy(cur), ro, MIXED_ADV, plan=plan, eps_low=0.05, eps_high=0.3)
    assert abs(float(loss.detach()) - float(exact.detach())) < 1e-9
