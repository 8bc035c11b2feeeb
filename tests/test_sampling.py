import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from agrpo.errors import AgrpoError
from agrpo.objectives.agrpo import rebuild_states
from agrpo.policy import Policy
from agrpo.sampling import SamplingConfig, filter_logits, generate, token_log_prob
from conftest import EOS, MASK, BiasedLM, full_logits, prompts, tiny_model

REMASK = ["random", "low_confidence", "entropy", "margin"]


def ref_keep(scaled: np.ndarray, top_k: int, top_p: float) -> set:
    """Slow float64 filter: top-k with ties kept, then the top-p nucleus (plus ties) of the renormalised top-k."""
    v = scaled.astype(np.float64)
    keep = np.isfinite(v)
    if 0 < top_k < len(v):
        thr = np.sort(v)[::-1][top_k - 1]
        keep &= v >= thr
    if top_p < 1:
        ids = np.nonzero(keep)[0]
        p = np.exp(v[ids] - v[ids].max())
        p /= p.sum()
        order = np.argsort(-p, kind="stable")
        csum = 0.0
        for n, j in enumerate(order):
            csum += p[j]
            if csum >= top_p:
                break
        last = p[order[n]]
        keep = np.zeros_like(keep)
        keep[ids[p >= last]] = True
    return set(np.nonzero(keep)[0].tolist())


def ref_probs(logits: np.ndarray, temperature, top_k, top_p, mask_id=MASK) -> np.ndarray:
    v = logits.astype(np.float64) / temperature
    v[mask_id] = -np.inf
    kept = sorted(ref_keep(v, top_k, top_p))
    p = np.zeros_like(v)
    e = np.exp(v[kept] - v[kept].max())
    p[kept] = e / e.sum()
    return p


def kept_set(out, row):
    ids, _, keep = out
    return set(ids[row][keep[row]].tolist())


# -- (3) the filter ------------------------------------------------------------------------------
@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (5, 0.9), (12, 0.5), (0, 0.7), (0, 0.95), (3, 0.3), (29, 0.99)])
def test_filter_logits_matches_reference_on_random_logits(top_k, top_p):
    g = torch.Generator().manual_seed(top_k * 100 + int(top_p * 100))
    scaled = torch.randn(64, 30, generator=g, dtype=torch.float64) * 2
    out = filter_logits(scaled, top_k, top_p)
    ids, vals, keep = out
    for r in range(64):
        assert kept_set(out, r) == ref_keep(scaled[r].numpy(), top_k, top_p)
        # sorted descending, the kept entries a prefix, values are the row's own values
        n = int(keep[r].sum())
        assert bool(keep[r, :n].all()) and not bool(keep[r, n:].any())
        assert bool((vals[r, :n][:-1] >= vals[r, :n][1:]).all())
        torch.testing.assert_close(vals[r, :n], scaled[r, ids[r, :n]])


def test_filter_none_when_off():
    assert filter_logits(torch.randn(2, 10), 0, 1.0) is None
    assert filter_logits(torch.randn(2, 10), 10, 1.0) is None  # k = V filters nothing


def test_filter_ties_at_top_k_and_top_p_boundaries():
    # top-k = 2: the 2nd largest (4.0) is tied three ways, all of them stay
    row_k = torch.tensor([[5.0, 4.0, 1.0, 4.0, 0.0, 4.0, -1.0]], dtype=torch.float64)
    assert kept_set(filter_logits(row_k, 2, 1.0), 0) == {0, 1, 3, 5}
    # top-k = 1, tie at the top: both kept
    assert kept_set(filter_logits(torch.tensor([[3.0, 3.0, 0.0]]), 1, 1.0), 0) == {0, 1}
    # top-p: probs 0.4, 0.2, 0.2, 0.2 -> mass 0.6 reached at the 2nd member, which is tied with two more
    p = torch.tensor([[0.4, 0.2, 0.2, 0.2]], dtype=torch.float64)
    assert kept_set(filter_logits(p.log(), 0, 0.5), 0) == {0, 1, 2, 3}
    assert kept_set(filter_logits(p.log(), 0, 0.39), 0) == {0}  # the top token alone reaches 0.39
    # top-k then top-p on the renormalised top-k: top-3 of [.4,.3,.2,.1] -> [4/9, 3/9, 2/9]; 0.7 needs 2
    q = torch.tensor([[0.1, 0.4, 0.2, 0.3]], dtype=torch.float64).log()
    assert kept_set(filter_logits(q, 3, 0.7), 0) == {1, 3}
    assert kept_set(filter_logits(q, 0, 0.69), 0) == {1, 3}  # over all 4: .4 + .3 >= .69
    assert kept_set(filter_logits(q, 0, 0.71), 0) == {1, 3, 2}
    for row, k, tp in [(row_k, 2, 0.3), (row_k, 3, 0.95), (q, 3, 0.99)]:
        assert kept_set(filter_logits(row, k, tp), 0) == ref_keep(row[0].numpy(), k, tp)


def test_top_p_alone_on_large_vocab_grows_the_window():
    g = torch.Generator().manual_seed(7)
    # nearly flat rows: the nucleus holds ~900 of 1000 tokens, beyond the first 256-wide window
    scaled = torch.randn(6, 1000, generator=g, dtype=torch.float64) * 0.05
    scaled[0, :] = scaled[0, :] * 40  # one peaked row: a small nucleus
    scaled[1, 10:20] = 3.0  # a tie block
    out = filter_logits(scaled, 0, 0.9)
    for r in range(6):
        ref = ref_keep(scaled[r].numpy(), 0, 0.9)
        assert kept_set(out, r) == ref
    assert len(ref_keep(scaled[3].numpy(), 0, 0.9)) > 256


# -- (1) on-policy exactness ---------------------------------------------------------------------
@pytest.mark.parametrize("remasking", REMASK)
def test_recorded_logp_is_recomputable_at_rebuilt_state(remasking, gen):
    model = tiny_model(11, double=False, logit_scale=20.0)
    pol = Policy(model)
    cfg = SamplingConfig(gen_length=8, block_length=4, steps=4, temperature=0.7, top_k=5, top_p=0.9,
                         remasking=remasking, stop_at_eos=False)
    x0 = prompts(3, 4, seed=5)
    ro = generate(pol, x0, None, cfg, generator=gen)
    assert ro.filter_ids is not None and ro.filter_ids.dtype == torch.int32
    checked = 0
    for b in range(3):
        for t in range(cfg.steps):
            cols = (ro.step[b] == t).nonzero().squeeze(1)
            assert cols.numel() == 2
            x = rebuild_states(ro, torch.tensor([b]), torch.tensor([t]))
            logits = full_logits(model, x)[0, ro.prompt_len + cols]
            new, ent = token_log_prob(logits, ro.completion[b, cols], 0.7, ro.filter_ids[b, cols], MASK)
            assert ((new - ro.logp[b, cols]).exp() - 1).abs().max() < 1e-5
            torch.testing.assert_close(ent, ro.entropy[b, cols], atol=1e-5, rtol=1e-5)
            for c in cols.tolist():
                # the recorded filter is the one the reference builds at that state
                rec = set(i for i in ro.filter_ids[b, c].tolist() if i >= 0)
                scaled = logits[cols.tolist().index(c)].detach().double().clone()
                scaled[MASK] = -math.inf
                assert rec == ref_keep((scaled / 0.7).numpy(), 5, 0.9)
                assert ro.completion[b, c].item() in rec
                checked += 1
    assert checked == 3 * 8


# -- (2) the sampled distribution ----------------------------------------------------------------
def test_single_token_counts_match_filtered_tempered_softmax():
    base = tiny_model(12, logit_scale=4.0)
    # push [MASK] to the top of the logits: it must still never be drawn
    model = BiasedLM(base, {MASK: 50.0})
    pol = Policy(model)
    n = 4000
    x0 = prompts(1, 5, seed=9).expand(n, -1).contiguous()
    cfg = SamplingConfig(gen_length=1, block_length=1, steps=1, temperature=0.7, top_k=5, top_p=0.9)
    ro = generate(pol, x0, None, cfg, generator=torch.Generator().manual_seed(3))
    logits = full_logits(base, torch.cat([x0[:1], torch.tensor([[MASK]])], 1))[0, -1].detach().numpy()
    p = ref_probs(logits, 0.7, 5, 0.9)
    toks = ro.completion[:, 0].numpy()
    assert (toks != MASK).all()
    assert set(toks.tolist()) <= set(np.nonzero(p)[0].tolist())
    kept = np.nonzero(p)[0]
    assert len(kept) >= 3  # the test is about a real distribution, not a point mass
    counts = np.array([(toks == k).sum() for k in kept])
    assert chisquare(counts, p[kept] * n).pvalue > 1e-4
    # and the recorded log-probs are the reference ones
    np.testing.assert_allclose(ro.logp[:, 0].numpy(), np.log(p[toks]), atol=1e-5)


# -- (4) record invariants -----------------------------------------------------------------------
def test_rebuild_invariants_and_record_shape(gen):
    model = tiny_model(13, double=False, vocab=4096, logit_scale=10.0)
    pol = Policy(model)
    cfg = SamplingConfig(gen_length=12, block_length=4, steps=6, temperature=0.8, top_k=5, top_p=1.0,
                         remasking="random", stop_at_eos=False)
    x0 = prompts(4, 5, seed=6, vocab=4096)
    pm = torch.ones_like(x0)
    x0[1, :2] = 0
    pm[1, :2] = 0  # left padding in row 1
    x0[3, :4] = 0
    pm[3, :4] = 0
    ro = generate(pol, x0, pm, cfg, generator=gen)
    B, C, P = 4, 12, 5
    assert ro.tokens.shape == (B, P + C) and ro.step.shape == (B, C)
    assert torch.equal(ro.tokens[:, :P], x0)
    assert torch.equal(ro.attention_mask, torch.cat([pm, torch.ones(B, C, dtype=torch.long)], 1))
    assert bool(ro.sampled.all()) and not bool((ro.completion == MASK).any())
    for t in range(cfg.steps):
        assert torch.equal((ro.step == t).sum(1), torch.full((B,), 2))
        xt = rebuild_states(ro, torch.arange(B), torch.full((B,), t))
        assert torch.equal(xt[:, :P], x0)
        comp = xt[:, P:]
        before = ro.step < t
        assert torch.equal(comp[before], ro.completion[before])
        assert bool((comp[~before] == MASK).all())
    blk = torch.arange(C) // 4
    assert bool(((ro.step >= 2 * blk) & (ro.step < 2 * blk + 2)).all())
    assert ro.t_eff.tolist() == [6] * B
    f = ro.filter_ids
    assert f.dtype == torch.int32 and f.shape[:2] == (B, C) and f.shape[2] <= 5
    assert ro.record_bytes() < B * C * 4096 / 20


# -- (5) EOS ---------------------------------------------------------------------------------------
def test_rows_stop_after_an_eos_block(gen):
    base = tiny_model(14, logit_scale=10.0)
    P = 4
    # rows whose first prompt token is < 20 get EOS forced from completion column 4 (block 1) on
    model = BiasedLM(base, {EOS: 20.0}, start=P + 4, row_pred=lambda ids: ids[:, 0] < 20)
    pol = Policy(model)
    x0 = prompts(6, P, seed=8)
    x0[:3, 0] = 5
    x0[3:, 0] = 30
    cfg = SamplingConfig(gen_length=16, block_length=4, steps=8, temperature=0.7, top_k=5, top_p=0.95)
    ro = generate(pol, x0, None, cfg, generator=gen)
    comp = ro.completion
    for b in range(6):
        stopped_at = None
        for blk in range(1, 4):
            if bool((comp[b, 4 * (blk - 1) : 4 * blk] == EOS).all()):
                stopped_at = blk
                break
        if b < 3:
            assert stopped_at == 2
        if stopped_at is not None:
            rest = slice(4 * stopped_at, None)
            assert bool((comp[b, rest] == EOS).all())
            assert not bool(ro.sampled[b, rest].any())
            assert bool((ro.step[b, rest] == 2 * stopped_at).all())
            assert bool(ro.sampled[b, : 4 * stopped_at].all())
        else:
            assert bool(ro.sampled[b].all())
        # slow t_eff: last step that committed a sampled non-EOS token, + 1
        t_eff = 0
        for c in range(16):
            if ro.sampled[b, c] and comp[b, c] != EOS:
                t_eff = max(t_eff, int(ro.step[b, c]) + 1)
        assert int(ro.t_eff[b]) == t_eff
    assert ro.t_eff[:3].max() <= 4


def test_every_eos_id_stops_a_row_and_counts_as_eos(gen):
    """Two EOS ids (LLaDA-Instruct: end of turn, then end of text): a block of either, or of both mixed, stops a row."""
    EOT = 3
    base = tiny_model(14, logit_scale=10.0, eos_token_id=[EOS, EOT])
    P = 4
    # rows led by 5: EOT alone from block 1; rows led by 6: EOS and EOT equally likely from block 1
    model = BiasedLM(base, {EOT: 20.0}, start=P + 4, row_pred=lambda ids: ids[:, 0] <= 6)
    model2 = BiasedLM(model, {EOS: 20.0}, start=P + 4, row_pred=lambda ids: ids[:, 0] == 6)
    pol = Policy(model2)
    assert pol.eos_ids == (EOS, EOT) and pol.eos_id == EOS
    x0 = prompts(6, P, seed=8)
    x0[:2, 0], x0[2:4, 0], x0[4:, 0] = 5, 6, 30
    cfg = SamplingConfig(gen_length=16, block_length=4, steps=8, temperature=0.7, top_k=5, top_p=0.95)
    ro = generate(pol, x0, None, cfg, generator=gen)
    comp = ro.completion
    assert ro.stop_ids == (EOS, EOT)
    assert bool((comp[:2, 4:8] == EOT).all())
    assert bool((comp[2:4, 4:8] == EOS).any()) and bool((comp[2:4, 4:8] == EOT).any())  # mixed blocks
    for b in range(4):
        assert bool((comp[b, 8:] == EOS).all()) and not bool(ro.sampled[b, 8:].any())  # stopped, filled
        t_eff = max([int(ro.step[b, c]) + 1 for c in range(16) if ro.sampled[b, c] and int(comp[b, c]) not in (EOS, EOT)],
                    default=0)
        assert int(ro.t_eff[b]) == t_eff <= 2


# -- (6) greedy ----------------------------------------------------------------------------------
def test_temperature_zero_is_deterministic_argmax():
    model = tiny_model(15, logit_scale=10.0)
    pol = Policy(model)
    cfg = SamplingConfig(gen_length=8, block_length=4, steps=4, temperature=0.0, remasking="low_confidence",
                         stop_at_eos=False)
    x0 = prompts(3, 4, seed=10)
    a = generate(pol, x0, None, cfg, generator=torch.Generator().manual_seed(1))
    b = generate(pol, x0, None, cfg, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.step, b.step)
    assert a.filter_ids is None
    for r in range(3):
        for t in range(4):
            cols = (a.step[r] == t).nonzero().squeeze(1)
            x = rebuild_states(a, torch.tensor([r]), torch.tensor([t]))
            lg = full_logits(model, x)[0, a.prompt_len + cols].clone()
            lg[:, MASK] = -math.inf
            assert torch.equal(a.completion[r, cols], lg.argmax(-1))
            # low_confidence commits the masked positions of the block with the highest max-prob
            blk = t // 2
            masked = [c for c in range(4 * blk, 4 * blk + 4) if a.step[r, c] >= t]
            allg = full_logits(model, x)[0, a.prompt_len + torch.tensor(masked)].clone()
            allg[:, MASK] = -math.inf
            conf = allg.softmax(-1).max(-1).values
            best = {masked[i] for i in conf.topk(2).indices.tolist()}
            assert best == set(cols.tolist())


@pytest.mark.parametrize("remasking", ["low_confidence", "entropy", "margin"])
def test_remasking_commits_the_positions_its_rule_ranks_first(remasking):
    """Greedy rollouts: at every step, the committed positions are the masked positions of the block
    with the highest max-probability / lowest entropy / largest top1-top2 gap, by a float64 reference."""
    model = tiny_model(16, logit_scale=3.0)
    pol = Policy(model)
    cfg = SamplingConfig(gen_length=12, block_length=6, steps=4, temperature=0.0, remasking=remasking,
                         stop_at_eos=False)
    x0 = prompts(4, 4, seed=11)
    ro = generate(pol, x0, None, cfg)
    rules = {
        "low_confidence": lambda p: p.max(-1).values,
        "entropy": lambda p: (p * p.clamp(min=1e-300).log()).sum(-1),  # minus the entropy
        "margin": lambda p: p.topk(2, -1).values[:, 0] - p.topk(2, -1).values[:, 1],
    }
    differs = 0
    for r in range(4):
        for t in range(4):
            blk = t // 2
            masked = [c for c in range(6 * blk, 6 * blk + 6) if ro.step[r, c] >= t]
            x = rebuild_states(ro, torch.tensor([r]), torch.tensor([t]))
            lg = full_logits(model, x)[0, ro.prompt_len + torch.tensor(masked)].double().clone()
            lg[:, MASK] = -math.inf
            p = lg.softmax(-1)
            score = rules[remasking](p)
            top = score.topk(3).indices.tolist()
            assert set(masked[i] for i in top) == set((ro.step[r] == t).nonzero().squeeze(1).tolist())
            assert torch.equal(ro.completion[r, [masked[i] for i in top]], p[top].argmax(-1))
            other = rules["low_confidence" if remasking != "low_confidence" else "entropy"](p)
            differs += set(top) != set(other.topk(3).indices.tolist())
    assert differs > 0  # the rules disagree somewhere here, so a swapped rule cannot pass


# -- (7) config errors ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(gen_length=10, block_length=4), "block_length"),
        (dict(gen_length=8, block_length=4, steps=3), "steps"),
        (dict(gen_length=8, block_length=4, steps=6), "steps"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=-1.0), "temperature"),
        (dict(remasking="bogus"), "remasking"),
        (dict(top_k=-1), "top_k"),
    ],
)
def test_invalid_config_raises_naming_the_field(kw, field):
    base = dict(gen_length=8, block_length=4, steps=4)
    base.update(kw)
    cfg = SamplingConfig(**base)
    with pytest.raises(AgrpoError, match=field):
        cfg.validate()
    with pytest.raises(AgrpoError):
        generate(Policy(tiny_model(0)), prompts(1, 3), None, cfg)
