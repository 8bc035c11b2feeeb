"""Likelihood proxies and advantage estimators, and the helpers the objective tests share."""

import copy

import pytest
import torch

from agrpo.objectives import Context, Part
from agrpo.objectives.advantages import centred_advantages, group_advantages, loo_advantages, z_advantages
from agrpo.objectives.proxies import (
    Copies, block_copies, copies_logp, elbo_copies, random_subsets, sequence_elbo, spg_bounds, stratified_counts,
    valid_tokens,
)
from agrpo.policy import Policy
from agrpo.sampling import SamplingConfig, generate
from conftest import EOS, MASK, full_logits, prompts, tiny_model

SAMPLING = SamplingConfig(gen_length=8, block_length=4, steps=4, temperature=1.0, remasking="random", stop_at_eos=False)
_ACCELERATOR = None


def accelerator():
    global _ACCELERATOR
    if _ACCELERATOR is None:
        from accelerate import Accelerator

        _ACCELERATOR = Accelerator(cpu=True)
    return _ACCELERATOR


def make_rollout(model, batch=6, seed=0, eos_at=(None, 2, 5, None, 0, 7)):
    """Rollouts of `model` with an EOS planted in some rows (valid lengths differ)."""
    ro = generate(Policy(model), prompts(batch, 4, seed=seed), None, SAMPLING, torch.Generator().manual_seed(seed))
    ro.tokens[:, ro.prompt_len:][ro.tokens[:, ro.prompt_len:] == EOS] = 5
    for b, at in enumerate(eos_at[:batch]):
        if at is not None:
            ro.tokens[b, ro.prompt_len + at] = EOS
    return ro


def perturbed(model, seed=1, scale=0.3):
    new = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale * (p.abs().mean() + 1e-3))
    return new


def split_part(part, rows):
    """The rows `rows` (a slice) of a part, with its fixed masks."""
    ro = part.rollout
    fields = {k: (v[rows] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == ro.tokens.shape[0] else v)
              for k, v in ro.__dict__.items()}
    new = Part(type(ro)(**fields), part.advantages[rows], part.valid[rows], part.rewards[rows], torch.Generator().manual_seed(0))
    if "masks" in part.state:
        new.state["masks"] = [m.rows(rows) for m in part.state["masks"]]
    if "prompt_masks" in part.state:
        new.state["prompt_masks"] = [m[rows] for m in part.state["prompt_masks"]]
    return new


def run_update(objective, model, parts, cfg, settings=None, old_model=None, ref_model=None, inner=0):
    """(loss, gradient of every parameter) of one update of `objective` on `parts`, old values from old_model."""
    policy = Policy(model)
    old = Policy(old_model if old_model is not None else model)
    ref = Policy(ref_model) if ref_model is not None else None
    model.zero_grad(set_to_none=True)
    objective.prepare(Context(accelerator(), old, ref, cfg, settings), parts)
    metrics = objective.update(Context(accelerator(), policy, ref, cfg, settings), parts, inner)
    grads = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return metrics["loss"], grads


def slow_gradient(model, loss):
    return list(torch.autograd.grad(loss, list(model.parameters()), allow_unused=True))


def assert_same(loss, grads, ref_loss, ref_grads, rel=1e-9):
    assert loss == pytest.approx(float(ref_loss.detach() if hasattr(ref_loss, "detach") else ref_loss), rel=rel, abs=1e-12)
    flat = torch.cat([g.flatten() for g in grads])
    ref = torch.cat([(torch.zeros_like(g) if r is None else r).flatten() for g, r in zip(grads, ref_grads)])
    assert ref.abs().max() > 0
    assert torch.allclose(flat, ref, rtol=rel, atol=rel * 1e-3 * float(ref.abs().max())), float((flat - ref).abs().max())


def slow_token_logp(model, ro, b, masked_cols, masked_prompt=()):
    """{col: log p(o_col | x~)} from the model's own logits of ONE corrupted sequence."""
    P = ro.prompt_len
    x = ro.tokens[b : b + 1].clone()
    for c in masked_cols:
        x[0, P + c] = MASK
    for j in masked_prompt:
        x[0, j] = MASK
    logits = full_logits(model, x, ro.attention_mask[b : b + 1])[0]
    logp = torch.log_softmax(logits, -1)
    return {c: logp[P + c, int(ro.tokens[b, P + c])] for c in range(ro.tokens.shape[1] - P)}


def cols(mask_row):
    return [c for c in range(mask_row.shape[0]) if bool(mask_row[c])]


# -- the proxies ------------------------------------------------------------------------------------

def test_stratified_counts_cover_one_to_n_and_spread_over_copies():
    n = torch.tensor([8, 5, 1, 0, 64])
    counts = stratified_counts(n, 4, torch.Generator().manual_seed(0))
    for b in range(n.numel()):
        row = counts[b].tolist()
        if n[b] == 0:
            assert row == [0, 0, 0, 0]
        else:
            assert all(1 <= x <= int(n[b]) for x in row)
    assert sorted((x - 1) // 16 for x in counts[4].tolist()) == [0, 1, 2, 3]  # one per quarter of 1..64


def test_elbo_copies_complement_partitions_the_eligible_positions():
    eligible = torch.tensor([[True] * 6 + [False] * 2, [True] * 8])
    c = elbo_copies(eligible, 3, torch.Generator().manual_seed(1), complement=True)
    m = c["completion"]
    assert m.shape == (2, 6, 8)
    for b in range(2):
        n = int(eligible[b].sum())
        for k in range(3):
            first, second = m[b, 2 * k], m[b, 2 * k + 1]
            assert not (first & second).any() and torch.equal(first | second, eligible[b])
            x = int(first.sum())
            share = 0.5 if x < n else 1.0
            assert float(c["coef"][b, 2 * k]) == pytest.approx(n / x * share / 3)
            assert float(c["coef"][b, 2 * k + 1]) == pytest.approx(n / (n - x) * 0.5 / 3 if x < n else 0.0)


def test_sequence_elbo_with_every_position_known_is_unbiased_for_additive_scores():
    """With log p_k(o_j) = s_j whatever the mask, the estimate is sum_j s_j for any draw (1/t weights)."""
    eligible = torch.ones(3, 7, dtype=torch.bool)
    s = torch.randn(3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for complement in (False, True):
        c = elbo_copies(eligible, 2, torch.Generator().manual_seed(3), complement)
        logp = s[:, None, :].expand(-1, c["completion"].shape[1], -1)
        est = sequence_elbo(logp, c)
        # mean over many draws approaches sum s; each draw's own weights are N / x
        many = torch.stack([sequence_elbo(logp, elbo_copies(eligible, 2, torch.Generator().manual_seed(i), complement)) for i in range(3000)])
        # unbiased: the mean of 3,000 independent draws lies within 5 standard errors of sum s
        stderr = many.std(0) / len(many) ** 0.5
        assert ((many.mean(0) - s.sum(1)).abs() < 5 * stderr + 1e-12).all()
        assert est.shape == (3,)


def test_block_copies_follow_the_block_layout():
    model = tiny_model(3)
    ro = make_rollout(model)
    valid = valid_tokens(ro)
    c = block_copies(ro, valid, 4, 2, prompt_p=0.5, generator=torch.Generator().manual_seed(0))
    m, pm = c["completion"], c["prompt"]
    for b in range(ro.tokens.shape[0]):
        n = int(valid[b].sum())
        for k in range(2):
            masked_valid = [j for j in range(8) if m[b, k, j] and valid[b, j]]
            assert masked_valid, "every copy masks some valid token"
            assert all(bool(m[b, k, j]) for j in range(8) if not valid[b, j])  # after EOS: always masked
            block = min(masked_valid[-1], n - 1) // 4
            for j in range((block + 1) * 4, 8):
                assert m[b, k, j]  # later blocks fully masked
            assert not pm[b, k, ro.prompt_len:].any()


def test_spg_bounds_match_loops():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand((3, 2, 8), generator=g, dtype=torch.float64) * 3
    masks = torch.rand((3, 2, 8), generator=g) < 0.5
    valid = torch.ones(3, 8, dtype=torch.bool)
    valid[1, 5:] = False
    masks[2, :, :] = False
    masks[2, 0, 3] = True
    elbo, eubo = spg_bounds(logp, Copies(completion=masks, prompt=None, coef=None), valid, 1.5)
    for b in range(3):
        n = int(valid[b].sum())
        e, u = 0.0, {}
        for s in range(2):
            m = [j for j in range(8) if masks[b, s, j] and valid[b, j]]
            if m:
                e += sum(float(logp[b, s, j]) for j in m) / len(m) / 2
            for j in m:
                u[j] = u.get(j, 0.0) + float(torch.exp(1.5 * logp[b, s, j])) / (len(m) / n) / 2
        assert float(elbo[b]) == pytest.approx(e, rel=1e-12)
        assert float(eubo[b]) == pytest.approx(sum(torch.log(torch.tensor(v, dtype=torch.float64)).item() for v in u.values()) / len(u) / 1.5, rel=1e-12)


def test_copies_logp_reads_each_corrupted_sequence():
    model = tiny_model(4)
    ro = make_rollout(model, batch=2)
    c = elbo_copies(torch.ones(2, 8, dtype=torch.bool), 2, torch.Generator().manual_seed(0))
    c["prompt"] = torch.zeros((2, 2, ro.tokens.shape[1]), dtype=torch.bool)
    c["prompt"][1, 1, 2] = True
    got = copies_logp(Policy(model), ro, slice(0, 2), c)
    for b in range(2):
        for k in range(2):
            ref = slow_token_logp(model, ro, b, cols(c["completion"][b, k]), cols(c["prompt"][b, k]))
            for j in range(8):
                assert float(got[b, k, j]) == pytest.approx(float(ref[j]), rel=1e-10)


def test_random_subsets_pick_exactly_count_eligible_positions():
    eligible = torch.tensor([[True, False, True, True, False, True]])
    m = random_subsets(eligible, torch.tensor([[0, 2, 4]]), torch.Generator().manual_seed(0))
    assert m.sum(-1).tolist() == [[0, 2, 4]] and not (m & ~eligible[:, None]).any()


# -- advantage estimators ---------------------------------------------------------------------------

def test_estimators_by_formula_and_none_rows_dropped():
    r = [1.0, 0.0, None, 3.0, 2.0, 2.0, 2.0, 2.0]
    a, ok = centred_advantages(r, 4)
    assert ok.tolist() == [True, True, False, True] + [True] * 4
    assert a.tolist() == pytest.approx([-1 / 3, -4 / 3, 0.0, 5 / 3, 0, 0, 0, 0], rel=1e-6)
    assert torch.equal(a, group_advantages(r, 4)[0])
    a, _ = loo_advantages(r, 4)
    assert a.tolist() == pytest.approx([1 - 1.5, 0 - 2.0, 0.0, 3 - 0.5, 0, 0, 0, 0], rel=1e-6)
    a, _ = z_advantages(r, 4)
    m = 4 / 3
    std = ((1 - m) ** 2 / 3 + (0 - m) ** 2 / 3 + (3 - m) ** 2 / 3) ** 0.5
    assert a.tolist() == pytest.approx([(1 - m) / std, (0 - m) / std, 0.0, (3 - m) / std, 0, 0, 0, 0], rel=1e-6)
    a, _ = loo_advantages([1.0, None], 2)
    assert a.tolist() == [0.0, 0.0]
