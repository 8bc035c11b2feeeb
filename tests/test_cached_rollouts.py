"""Approximate caches of bidirectional models (prefix, dual): the record against a slow reference that
recomputes the cached forward from the record, one row and one token at a time."""

import dataclasses

import pytest
import torch
from transformers import DynamicCache

from agrpo.errors import AgrpoError
from agrpo.objectives.agrpo import agrpo_loss, plan_steps, rebuild_states
from agrpo.policy import Policy
from agrpo.sampling import SamplingConfig, generate, token_log_prob
from conftest import MASK, prompts, tiny_model
from test_block_sampling import eos_prone
from test_block_sampling import padded_prompts as padded

BL = 4
BASE = SamplingConfig(gen_length=12, block_length=BL, steps=12, temperature=1.0, remasking="low_confidence",
                      stop_at_eos=True)
CASES = {
    "fixed": BASE,
    "top-k": dataclasses.replace(BASE, top_k=6, top_p=0.9),
    "threshold": dataclasses.replace(BASE, threshold=0.06),
    "random": dataclasses.replace(BASE, remasking="random", steps=6),
}
EOS_BIAS = {"fixed": 4.5, "top-k": 2.5, "threshold": 4.0, "random": 5.5}  # some rows stop early, not all


def reference_logit_row(model, x_block, x_now, attn, a, b, dual, state):
    """The cached forward of one row, written out: keys and values of every layer from the whole sequence at the
    block's start (natural order), the window [a, b) (prefix: [a, L)) cut out of them, then the chunk of the
    current state run against what is left; the logits of hidden state `state` of the sequence. The window is
    the block, and for a shifted model the position before it too."""
    length = x_now.shape[0]
    pos = (attn.cumsum(0) - 1).clamp(min=0)
    full = DynamicCache()
    model.model(input_ids=x_block[None], attention_mask=attn.bool()[None, None, None, :].expand(1, 1, length, length),
                position_ids=pos[None], cache=full, use_cache=True)
    end = b if dual else length
    keep = torch.cat([torch.arange(a), torch.arange(end, length)])
    cut = DynamicCache()
    for i, layer in enumerate(full.layers):
        cut.update(layer.keys[:, :, keep], layer.values[:, :, keep], i)
    chunk = torch.arange(a, end)
    keys = torch.cat([attn[keep], attn[chunk]]).bool()
    out = model.model(input_ids=x_now[chunk][None], attention_mask=keys[None, None, None, :].expand(1, 1, len(chunk), -1),
                      position_ids=pos[chunk][None], cache=cut, use_cache=True)
    return model.lm_head(out.last_hidden_state[0, state - a])


@pytest.mark.parametrize("shift", [False, True], ids=["llada", "dream"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_recorded_log_prob_is_the_cached_forward_recomputed(case, cache, shift):
    cfg = dataclasses.replace(CASES[case], cache=cache)
    policy = eos_prone(Policy(tiny_model(3, logit_scale=4.0), shift_logits=shift), EOS_BIAS[case])
    ids, mask = padded([5, 9, 7, 3, 8, 6])
    r = generate(policy, ids, mask, cfg, torch.Generator().manual_seed(7))
    assert r.approximate
    model, plen, s = policy.model, r.prompt_len, int(shift)
    checked = stopped = 0
    gap = 0.0
    for row in range(r.tokens.shape[0]):
        stopped += int(not r.sampled[row].all())
        for i in r.sampled[row].nonzero().squeeze(1).tolist():
            block = i // BL
            t = int(r.step[row, i])
            first = int(r.step[row, block * BL : (block + 1) * BL].min())  # the block's first step in this row
            x_now = rebuild_states(r, torch.tensor([row]), torch.tensor([t]))[0]
            x_block = rebuild_states(r, torch.tensor([row]), torch.tensor([first]))[0]
            start = plen + block * BL
            with torch.no_grad():
                logits = reference_logit_row(model, x_block, x_now, r.attention_mask[row], start - s, start + BL,
                                             cache == "dual", plen + i - s)
                exact = policy(x_now[None], torch.tensor([[plen + i]]), r.attention_mask[row][None])[0, 0]
            filt = None if r.filter_ids is None else r.filter_ids[row, i][None]
            tok = r.completion[row, i][None]
            ref, ref_ent = token_log_prob(logits[None], tok, cfg.temperature, filt, r.mask_id)
            ex, _ = token_log_prob(exact[None], tok, cfg.temperature, filt, r.mask_id)
            assert abs(float(ref) - float(r.logp[row, i])) < 1e-5, (row, i, float(ref), float(r.logp[row, i]))
            assert abs(float(ref_ent) - float(r.entropy[row, i])) < 1e-5
            if t == first:  # a block's first step runs the whole sequence: exact
                assert abs(float(ex) - float(r.logp[row, i])) < 1e-5
            gap = max(gap, abs(float(ex) - float(r.logp[row, i])))
            checked += 1
    assert checked >= 24 and 1 <= stopped < 6  # early stops are covered
    assert gap > 1e-3  # the cache is an approximation here: the test would not see a wrong window otherwise


@pytest.mark.parametrize("shift", [False, True], ids=["llada", "dream"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_one_step_per_block_draws_what_the_uncached_sampler_draws(cache, shift):
    """With one step a block every step is a block's first: the cached sampler runs the whole sequence each time, and
    its rollouts are not marked approximate."""
    policy = Policy(tiny_model(2, logit_scale=3.0), shift_logits=shift)
    ids, mask = padded([5, 9, 4])
    cfg = dataclasses.replace(BASE, steps=3, stop_at_eos=False)
    a = generate(policy, ids, mask, cfg, torch.Generator().manual_seed(1))
    b = generate(policy, ids, mask, dataclasses.replace(cfg, cache=cache), torch.Generator().manual_seed(1))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.step, b.step)
    assert (a.logp - b.logp).abs().max() < 1e-6 and not a.approximate and not b.approximate


@pytest.mark.parametrize("shift", [False, True], ids=["llada", "dream"])
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_later_steps_see_every_token_of_the_block(cache, shift):
    """After a block's first step, a token written anywhere in the block (its last position included, which for a
    shifted model scores nothing in the block) changes the logits of the block's other positions."""
    from agrpo.sampling import BidirectionalCache

    policy = Policy(tiny_model(0), shift_logits=shift)
    plen = 6
    x = torch.cat([prompts(1, plen, 0), torch.full((1, 8), MASK)], 1)
    attn = torch.ones_like(x)
    scorer = BidirectionalCache(policy, dual=cache == "dual")
    scorer.begin_block(x, attn, None, plen, BL)
    pos = torch.tensor([[plen, plen + 1]])
    with torch.no_grad():
        scorer.logits(x, attn, pos)  # the first step: the cache is filled
        for j in range(plen + 2, plen + BL):
            a, b = x.clone(), x.clone()
            a[0, j], b[0, j] = 5, 9
            assert float((scorer.logits(a, attn, pos) - scorer.logits(b, attn, pos)).abs().max()) > 1e-4, j


def test_cache_off_is_the_exact_sampler():
    """cache=none and auto on a bidirectional model: no cache, nothing approximate."""
    policy = Policy(tiny_model(2))
    ids, mask = padded([5, 9, 4])
    a = generate(policy, ids, mask, BASE, torch.Generator().manual_seed(1))
    b = generate(policy, ids, mask, dataclasses.replace(BASE, cache="none"), torch.Generator().manual_seed(1))
    assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("tokens", "step", "logp", "entropy"))
    assert not a.approximate and not b.approximate


def test_the_first_update_ratio_is_exact_over_recorded():
    """The objective's ratio is the exact policy at the rebuilt state over the probability the cached sampler drew
    from: exp(exact - recorded), token by token."""
    policy = Policy(tiny_model(3, logit_scale=4.0))
    ids, mask = padded([5, 9, 7, 3])
    cfg = dataclasses.replace(BASE, cache="dual", threshold=0.06)
    r = generate(policy, ids, mask, cfg, torch.Generator().manual_seed(7))
    plan = plan_steps(r, 12, "stratified", "none", "sequence", None, torch.Generator().manual_seed(0))
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    _, m = agrpo_loss(policy, r, adv, plan=plan, eps_low=1e9, eps_high=1e9, tis_cap=0.0)
    ratios = []
    for k in range(plan.row.numel()):
        row, t = plan.row[k : k + 1], plan.t[k : k + 1]
        pos = plan.positions[k][plan.valid[k]]
        x = rebuild_states(r, row, t)
        with torch.no_grad():
            logits = policy(x, (r.prompt_len + pos)[None], r.attention_mask[row])[0]
        filt = None if r.filter_ids is None else r.filter_ids[row[0], pos]
        lp, _ = token_log_prob(logits, r.completion[row[0], pos], cfg.temperature, filt, r.mask_id)
        ratios.append(torch.exp(lp.double() - r.logp[row[0], pos].double()))
    ratios = torch.cat(ratios)
    assert abs(m["ratio_mean"] - float(ratios.mean())) < 1e-10
    assert float((ratios - 1).abs().max()) > 1e-3


def test_dual_cache_on_a_block_model_is_refused():
    policy = Policy(tiny_model(0, block_size=BL))
    ids, mask = padded([4, 6])
    with pytest.raises(AgrpoError, match="cache=dual caches the masked blocks"):
        generate(policy, ids, mask, dataclasses.replace(BASE, cache="dual"), torch.Generator())


def _reference_tis_loss(policy, r, plan, adv, cap, eps, old_logits_of):
    """The truncated-IS AGRPO loss written from its formula, one draw and one token at a time, float64:
    sum_draws coef * sum_tokens min(pi_old/mu, C) * -min(rho A, clip(rho, 1-eps, 1+eps) A), rho = pi / pi_old."""
    total = torch.zeros((), dtype=torch.float64)
    for k in range(plan.row.numel()):
        b = int(plan.row[k])
        x = rebuild_states(r, plan.row[k : k + 1], plan.t[k : k + 1])
        for i in plan.positions[k][plan.valid[k]].tolist():
            p = torch.tensor([[r.prompt_len + i]])
            logits = policy(x, p, r.attention_mask[b : b + 1])[0, 0] / r.config.temperature
            ids = r.filter_ids[b, i].long()
            ids = ids[ids >= 0]
            tok = int(r.completion[b, i])
            logp = torch.log_softmax(logits[ids], -1)[(ids == tok).nonzero()[0, 0]]
            old_logits = old_logits_of(x, p, r.attention_mask[b : b + 1])[0, 0] / r.config.temperature
            old = torch.log_softmax(old_logits[ids], -1)[(ids == tok).nonzero()[0, 0]].detach()
            w = min(float(torch.exp(old - r.logp[b, i].double())), cap)
            rho = torch.exp(logp - old)
            a = float(adv[b])
            term = -torch.minimum(rho * a, rho.clamp(1 - eps, 1 + eps) * a)
            total = total + float(plan.coef[k]) * w * term
    return total


@pytest.mark.parametrize("inner", [0, 1], ids=["first-update", "later-update"])
def test_truncated_is_loss_and_gradient_match_the_formula(inner):
    """Rollouts through a dual cache, top-k filtered; C small enough that some weights are truncated. At the
    batch's first update pi_old is the current policy; at a later one (parameters moved) it is the stored one."""
    import copy

    policy = Policy(tiny_model(3, logit_scale=4.0))
    ids, mask = padded([5, 9, 7, 3])
    cfg = dataclasses.replace(BASE, cache="dual", top_k=8)
    r = generate(policy, ids, mask, cfg, torch.Generator().manual_seed(7))
    plan = plan_steps(r, 6, "stratified", "none", "sequence", None, torch.Generator().manual_seed(0))
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    cap, eps = 1.005, 0.01
    old_policy = copy.deepcopy(policy)
    store = None
    if inner:
        store = torch.full(r.step.shape, float("nan"), dtype=torch.float64)
        agrpo_loss(policy, r, adv, plan=plan, eps_low=eps, eps_high=eps, tis_cap=cap, old_exact=store)
        with torch.no_grad():
            for q in policy.parameters():
                q.add_(0.02 * torch.randn(q.shape, generator=torch.Generator().manual_seed(q.numel()), dtype=q.dtype))
    policy.zero_grad()
    loss, m = agrpo_loss(policy, r, adv, plan=plan, eps_low=eps, eps_high=eps, tis_cap=cap, old_exact=store)
    loss.backward()
    grads = [q.grad.clone() for q in policy.parameters()]
    policy.zero_grad()
    ref = _reference_tis_loss(policy, r, plan, adv, cap, eps, lambda *a: old_policy(*a))
    ref.backward()
    assert abs(float(loss.detach()) - float(ref.detach())) < 1e-9 * max(1.0, abs(float(ref.detach())))
    scale = max(float(g.abs().max()) for g in grads)
    assert scale > 0 and all(float((g - q.grad).abs().max()) < 1e-9 * scale for g, q in zip(grads, policy.parameters()))
    assert 0 < m["tis_capped"] < 1  # some weights truncated, not all
    assert (m["ratio_mean"] == pytest.approx(1.0, abs=1e-12)) == (inner == 0)


def test_later_updates_of_a_batch_reuse_its_draws_and_their_old_log_probs():
    """With truncated IS, the batch's second update scores the first update's draws against the exact old log-probs
    the first stored: nothing new is written, and its loss is the same plan's."""
    from accelerate import Accelerator

    from agrpo.objectives import Context, Part, get_objective
    from agrpo.recipes.rl import RLConfig

    policy = Policy(tiny_model(3, logit_scale=4.0))
    ids, mask = padded([5, 9, 7, 3])
    r = generate(policy, ids, mask, dataclasses.replace(BASE, cache="dual", top_k=8), torch.Generator().manual_seed(7))
    part = Part(r, torch.tensor([1.0, -1.0, 0.5, -0.5]), torch.ones(4, dtype=torch.bool), [1.0, 0.0, 1.0, 0.0],
                torch.Generator().manual_seed(3))
    cfg = RLConfig(num_samples=3, tis_cap=2.0)
    ctx = Context(Accelerator(cpu=True), policy, None, cfg)
    objective = get_objective("agrpo")
    objective.update(ctx, [part], 0)
    plan, stored = part.state["plan"], part.state["old_exact"].clone()
    assert int((~torch.isnan(stored)).sum()) > 0
    with torch.no_grad():
        for q in policy.parameters():
            q.mul_(1.01)
    objective.update(ctx, [part], 1)
    assert part.state["plan"] is plan
    assert torch.equal(torch.isnan(part.state["old_exact"]), torch.isnan(stored))
    assert torch.equal(part.state["old_exact"].nan_to_num(), stored.nan_to_num())
