"""TraceRL against a slow float64 reference of ALGORITHMS.md's formula, and its properties."""

import math

import pytest
import torch
from conftest import EOS, MASK, full_logits, prompts, tiny_model
from test_proxies import (
    SAMPLING,
    accelerator,
    assert_same,
    make_rollout,
    perturbed,
    run_update,
    slow_gradient,
    split_part,
)

from agrpo.errors import AgrpoError
from agrpo.objectives import Context, Part, get_objective
from agrpo.objectives.advantages import accuracy_filter
from agrpo.objectives.tracerl import (
    TraceRLSettings,
    hit_length_limit,
    trace_logp,
    trace_rows,
    tracerl_advantages,
)
from agrpo.policy import Policy
from agrpo.recipes.rl import RLConfig
from agrpo.sampling import SamplingConfig, generate

# row 0 ends without EOS (it hits the length limit: its 0.7 becomes 0), row 3 too but has no reward;
# after the rule group 1 is [0, 1, 0] (accuracy 1/3), group 2 [None, 1, 0.25] (1/2): both kept
REWARDS = [0.7, 1.0, 0.0, None, 1.0, 0.25]
EOS_AT = (None, 2, 5, None, 0, 7)
# one token a step over 8 steps, tempered and filtered: every step is its own, and the filter is real
FILTERED = SamplingConfig(gen_length=8, block_length=4, steps=8, temperature=0.7, top_k=12, top_p=0.6,
                          remasking="random", stop_at_eos=False)


def filtered_rollout(model, seed=0):
    """Rollouts under FILTERED with EOS planted as make_rollout does; a planted EOS enters its position's
    recorded filter (in place of the token it replaces), so every recorded token stays inside its filter."""
    ro = generate(Policy(model), prompts(6, 4, seed=seed), None, FILTERED, torch.Generator().manual_seed(seed))
    P, C = ro.prompt_len, ro.completion.shape[1]
    assert ro.filter_ids is not None and int((ro.filter_ids >= 0).sum(-1).max()) < 40  # a real filter
    for b in range(6):
        for j in range(C):
            tok = int(ro.tokens[b, P + j])
            kept = [int(i) for i in ro.filter_ids[b, j] if int(i) >= 0]
            if EOS_AT[b] == j:
                if EOS not in kept:
                    ro.filter_ids[b, j, kept.index(tok)] = EOS
                ro.tokens[b, P + j] = EOS
            elif tok == EOS:  # a sampled EOS elsewhere: another token of the same filter
                ro.tokens[b, P + j] = next(i for i in kept if i != EOS)
    return ro


def setup(settings, rollout="plain", rewards=REWARDS, seed=0):
    model = tiny_model(11)
    ro = make_rollout(model, eos_at=EOS_AT) if rollout == "plain" else filtered_rollout(model)
    adv, valid = tracerl_advantages(rewards, 3, settings)
    return model, Part(ro, adv, valid, list(rewards), torch.Generator().manual_seed(seed))


def config(beta=0.05, eps=0.02, rows=4):
    return RLConfig(objective="tracerl", eps_low=eps, eps_high=eps, beta=beta, max_rows_per_forward=rows, group_size=3)


# -- the slow reference: loops over groups, completions, rows and tokens; one forward per rebuilt state --

def slow_advantages(ro, rewards, group_size, s):
    """{row: A} of the kept completions, from the formula: length rule, group accuracy, z (population std)."""
    P, C = ro.prompt_len, ro.completion.shape[1]
    stops = set(ro.stop_ids)
    r = []
    for b, reward in enumerate(rewards):
        hit = not any(int(ro.tokens[b, P + j]) in stops for j in range(C))
        r.append(None if reward is None else (0.0 if s.length_limit and hit else float(reward)))
    adv = {}
    for g0 in range(0, len(r), group_size):
        vals = [(b, r[b]) for b in range(g0, g0 + group_size) if r[b] is not None]
        if not vals:
            continue
        accuracy = sum(v >= s.correct_at for _, v in vals) / len(vals)
        if accuracy < s.min_accuracy or accuracy > s.max_accuracy:
            continue
        mean = sum(v for _, v in vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for _, v in vals) / len(vals))
        for b, v in vals:
            # the objective holds advantages in float32, as every objective here
            adv[b] = float(torch.tensor((v - mean) / std if std > 0 else 0.0, dtype=torch.float32))
    return adv


def slow_scored(ro, b):
    """Completion columns of row b that are learned from: up to and including the first EOS, sampled."""
    P, C = ro.prompt_len, ro.completion.shape[1]
    out = []
    for j in range(C):
        if bool(ro.sampled[b, j]):
            out.append(j)
        if int(ro.tokens[b, P + j]) in set(ro.stop_ids):
            break
    return out


def slow_logp(logits, ro, b, j, distribution):
    """log pi(o_j) from one position's logits: the sampler's (ban [MASK], / T, its recorded filter) or softmax."""
    tok = int(ro.tokens[b, ro.prompt_len + j])
    if distribution == "softmax":
        return torch.log_softmax(logits, -1)[tok]
    v = logits.clone()
    v[MASK] = -math.inf
    v = v / ro.config.temperature
    if ro.filter_ids is not None:
        allowed = torch.zeros_like(v, dtype=torch.bool)
        for i in ro.filter_ids[b, j]:
            if int(i) >= 0:
                allowed[int(i)] = True
        v = torch.where(allowed, v, torch.full_like(v, -math.inf))
    return torch.log_softmax(v, -1)[tok]


def slow_loss(model, old_model, ro, rewards, s, eps, beta, group_size=3):
    P, C = ro.prompt_len, ro.completion.shape[1]
    adv = slow_advantages(ro, rewards, group_size, s)
    c = s.log_ratio_clamp
    total, rows = 0.0, 0
    for b in sorted(adv):
        scored = slow_scored(ro, b)
        steps = sorted({int(ro.step[b, j]) for j in scored})
        for k in range(0, len(steps), s.shrink):
            group = steps[k : k + s.shrink]
            first, last = group[0], group[-1]
            x = ro.tokens[b : b + 1].clone()
            for j in range(C):
                if int(ro.step[b, j]) >= first:  # the state before the group's first step
                    x[0, P + j] = MASK
            attn = ro.attention_mask[b : b + 1]
            cur = full_logits(model, x, attn)[0]
            with torch.no_grad():
                old = full_logits(old_model, x, attn)[0]
            surrogate, kl, n = 0.0, 0.0, 0
            for j in scored:
                if not first <= int(ro.step[b, j]) <= last:
                    continue
                lp = slow_logp(cur[P + j], ro, b, j, s.distribution)
                lo = slow_logp(old[P + j], ro, b, j, s.distribution)
                d = lp - lo
                rho = torch.exp(d.clamp(-c, c) if c else d)
                a = adv[b]
                surrogate = surrogate + torch.minimum(rho * a, rho.clamp(1 - eps, 1 + eps) * a)
                back = lo - lp
                kl = kl + torch.exp(back.clamp(-c, c) if c else back) - back - 1
                n += 1
            if s.normalize == "length":
                total = total - surrogate / C + beta * kl / C
            else:
                total = total - surrogate / n + beta * kl
            rows += 1
    return total / rows


CASES = {
    "shrink1": (TraceRLSettings(shrink=1), "plain", 0.05),
    "shrink3-filtered": (TraceRLSettings(shrink=3), "filtered", 0.05),
    "softmax": (TraceRLSettings(shrink=2, distribution="softmax"), "filtered", 0.0),
    "block-models": (TraceRLSettings(shrink=3, normalize="length", log_ratio_clamp=0.05), "filtered", 0.05),
    "group-dropped": (TraceRLSettings(shrink=2, min_accuracy=0.4, length_limit=False), "plain", 0.05),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradient_match_the_formula(case):
    settings, rollout, beta = CASES[case]
    model, part = setup(settings, rollout)
    old = perturbed(model, 1, 0.3)
    cfg = config(beta=beta)
    loss, grads = run_update(get_objective("tracerl"), model, [part], cfg, settings, old_model=old)
    ref = slow_loss(model, old, part.rollout, REWARDS, settings, 0.02, beta)
    assert_same(loss, grads, ref, slow_gradient(model, ref))
    if settings.log_ratio_clamp:  # the clamp is exercised: some log-ratios lie beyond it, some within
        rows = part.state["rows"]
        with torch.no_grad():
            d = (trace_logp(Policy(model), part.rollout, rows, settings.distribution) - part.state["old"])[rows.scored]
        assert (d.abs() > settings.log_ratio_clamp).any() and (d.abs() < settings.log_ratio_clamp).any()


def test_the_rebuilt_state_is_the_samplers():
    """shrink = 1, the sampler's model as the old policy, rollouts as sampled (nothing planted): every old
    log-prob is the one the sampler recorded (the state, the filter and the temperature are the sampler's own)."""
    settings = TraceRLSettings(shrink=1, min_accuracy=0.0, max_accuracy=1.0, length_limit=False)
    model = tiny_model(11)
    for sampling in (SAMPLING, FILTERED):
        ro = generate(Policy(model), prompts(6, 4, seed=3), None, sampling, torch.Generator().manual_seed(3))
        part = Part(ro, *tracerl_advantages(REWARDS, 3, settings), REWARDS, torch.Generator().manual_seed(0))
        get_objective("tracerl").prepare(_context(model, settings), [part])
        rows, old = part.state["rows"], part.state["old"]
        recorded = ro.logp[rows.row[:, None], rows.positions].double()
        assert rows.scored.sum() > 20
        assert torch.allclose(old[rows.scored], recorded[rows.scored], rtol=0, atol=2e-6), sampling


def _context(model, settings, beta=0.0):
    return Context(accelerator(), Policy(model), None, config(beta=beta), settings)


def test_shrink_one_scores_every_step_once_and_groups_are_consecutive_steps():
    model = tiny_model(11)
    ro = filtered_rollout(model)
    keep = torch.tensor([True, True, True, False, True, True])
    for shrink in (1, 3, 8):
        rows = trace_rows(ro, keep, shrink)
        for b in range(6):
            mine = (rows.row == b).nonzero().flatten().tolist()
            if not keep[b]:
                assert not mine
                continue
            scored = slow_scored(ro, b)
            steps = sorted({int(ro.step[b, j]) for j in scored})
            groups = [steps[k : k + shrink] for k in range(0, len(steps), shrink)]
            assert [(int(rows.start[r]), int(rows.last[r])) for r in mine] == [(g[0], g[-1]) for g in groups]
            seen = []
            for r in mine:
                seen += [int(p) for p, real in zip(rows.positions[r], rows.scored[r]) if real]
            assert sorted(seen) == sorted(scored)  # every scored token exactly once
            if shrink == 1:
                assert len(mine) == len(steps)
                for r in mine:  # a row scores exactly the tokens its step committed
                    assert all(int(ro.step[b, p]) == int(rows.start[r]) for p, real in zip(rows.positions[r], rows.scored[r]) if real)


def test_unsampled_tokens_are_not_scored():
    model = tiny_model(11)
    ro = make_rollout(model, eos_at=EOS_AT)
    ro.sampled[0, 3] = False  # as the EOS fill after an early stop
    rows = trace_rows(ro, torch.ones(6, dtype=torch.bool), 1)
    assert not any(int(p) == 3 for r in (rows.row == 0).nonzero().flatten() for p, real in zip(rows.positions[r], rows.scored[r]) if real)


def test_zero_advantages_give_zero_gradient():
    settings = TraceRLSettings(shrink=2, min_accuracy=0.0, max_accuracy=1.0)
    model, part = setup(settings, rewards=[0.0, 0.0, 0.0, None, 1.0, 1.0])
    assert not part.advantages.any() and part.valid.sum() == 5
    _, grads = run_update(get_objective("tracerl"), model, [part], config(beta=0.0), settings, old_model=perturbed(model))
    assert len(part.state["rows"]) > 0
    assert all(not g.any() for g in grads)


def test_micro_batches_give_the_gradient_of_the_whole_batch():
    settings = TraceRLSettings(shrink=2)
    model, part = setup(settings, "filtered")
    old = perturbed(model, 1, 0.3)
    obj = get_objective("tracerl")
    whole = run_update(obj, model, [part], config(rows=64), settings, old_model=old)
    halves = [split_part(part, slice(0, 3)), split_part(part, slice(3, 6))]
    split = run_update(obj, model, halves, config(rows=3), settings, old_model=old)
    assert split[0] == pytest.approx(whole[0], rel=1e-9)
    for a, b in zip(split[1], whole[1]):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-13)


def test_group_filter_drops_the_right_groups():
    # groups of 5: accuracies 0, 0.2, 0.8, 1.0, 0.6 (0.2 and 0.8 are kept: the paper drops above 0.8 and below 0.2)
    rewards = [0, 0, 0, 0, 0] + [1, 0, 0, 0, 0] + [1, 1, 1, 1, 0] + [1, 1, 1, 1, 1] + [1, 1, 1, 0, None] + [2, 2, 2, 0, 0]
    rewards = [None if r is None else float(r) for r in rewards]
    keep = accuracy_filter(rewards, 5, 1.0, 0.2, 0.8).view(-1, 5)
    assert keep.all(1).tolist() == [False, True, True, False, True, True] and (keep.all(1) == keep.any(1)).all()
    adv, valid = tracerl_advantages(rewards, 5, TraceRLSettings())
    assert valid.view(-1, 5).any(1).tolist() == [False, True, True, False, True, True]
    assert not valid[24] and not adv.view(-1, 5)[[0, 3]].any()  # the None row stays out; dropped groups get 0
    # correct_at moves the line: at 1.5 only the 2s count, group 6 has accuracy 0.6, group 3 none
    keep = accuracy_filter(rewards, 5, 1.5, 0.2, 0.8).view(-1, 5)
    assert keep.all(1).tolist() == [False, False, False, False, False, True]


def test_a_dropped_group_changes_nothing_but_the_rows_it_had():
    """Group 1 dropped (accuracy 1/3 < 0.4): the batch gives the loss and gradient of group 2 alone."""
    settings = TraceRLSettings(shrink=2, min_accuracy=0.4)
    model, part = setup(settings)
    assert part.valid.tolist() == [False, False, False, False, True, True]
    old = perturbed(model, 1, 0.3)
    obj = get_objective("tracerl")
    whole = run_update(obj, model, [part], config(), settings, old_model=old)
    alone = run_update(obj, model, [split_part(part, slice(3, 6))], config(), settings, old_model=old)
    assert whole[0] == pytest.approx(alone[0], rel=1e-12)
    for a, b in zip(whole[1], alone[1]):
        assert torch.allclose(a, b, rtol=1e-12, atol=0)


def test_completions_at_the_length_limit_count_as_wrong():
    model = tiny_model(11)
    ro = make_rollout(model, eos_at=EOS_AT)
    hit = hit_length_limit(ro)
    assert hit.tolist() == [True, False, False, True, False, False]
    rewards = [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]
    on, off = (TraceRLSettings(min_accuracy=0.0, max_accuracy=1.0, length_limit=True),
               TraceRLSettings(min_accuracy=0.0, max_accuracy=1.0, length_limit=False))
    adv, _ = tracerl_advantages(rewards, 3, on, hit)
    assert adv[:3].tolist() == pytest.approx([-1 / math.sqrt(2), math.sqrt(2), -1 / math.sqrt(2)], rel=1e-6)  # [0, 1, 0]
    # what the objective learns from: prepare applies the rule (and only when it is on)
    for settings, first in ((on, adv[0]), (off, tracerl_advantages(rewards, 3, off)[0][0])):
        part = Part(ro, *tracerl_advantages(rewards, 3, settings), rewards, torch.Generator().manual_seed(0))
        get_objective("tracerl").prepare(_context(model, settings), [part])
        assert float(part.state["advantages"][0]) == pytest.approx(float(first))
    assert float(tracerl_advantages(rewards, 3, off)[0][0]) > 0 > float(adv[0])
    # with the paper's filter the group becomes [0, 1, 0] -> accuracy 1/3, kept; [0, 1, 0] of group 2 too
    paper = TraceRLSettings(length_limit=True)
    part = Part(ro, *tracerl_advantages(rewards, 3, paper), rewards, torch.Generator().manual_seed(0))
    get_objective("tracerl").prepare(_context(model, paper), [part])
    assert part.state["valid"].tolist() == [True] * 6 and float(part.state["advantages"][0]) < 0


def test_the_kl_is_against_the_snapshot_and_keeps_no_reference():
    obj = get_objective("tracerl")
    assert not obj.needs_reference(config(beta=0.01))
    settings = TraceRLSettings(shrink=2)
    model, part = setup(settings, "filtered")
    # policy == snapshot: rho = 1 and KL = 0, whatever beta
    same = run_update(obj, model, [part], config(beta=1.0), settings, old_model=model)
    without = run_update(obj, model, [part], config(beta=0.0), settings, old_model=model)
    assert same[0] == pytest.approx(without[0], rel=1e-12)
    for a, b in zip(same[1], without[1]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("over,words", [
    ({"shrink": 0}, "shrink"), ({"min_accuracy": 0.9}, "min_accuracy"), ({"max_accuracy": 1.5}, "max_accuracy"),
    ({"log_ratio_clamp": -1.0}, "log_ratio_clamp"), ({"distribution": "plain"}, "distribution"),
    ({"normalize": "tokens"}, "normalize"), ({"correct_at": math.nan}, "correct_at"),
])
def test_check_refuses_impossible_settings(over, words):
    cfg = config()
    for k, v in over.items():
        setattr(cfg.tracerl, k, v)
    with pytest.raises(AgrpoError, match=words) as err:
        get_objective("tracerl").check(cfg)
    assert "\n" not in str(err.value)
    get_objective("tracerl").check(config())
