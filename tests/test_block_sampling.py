"""The block sampler on block-diffusion models: the cached sampler against the uncached one, the record
against the training forward, confidence-threshold decoding, and the block layout's checks."""

import dataclasses

import pytest
import torch

from agrpo.errors import AgrpoError
from agrpo.objectives.agrpo import rebuild_states
from agrpo.policy import Policy
from agrpo.sampling import SamplingConfig, generate, token_log_prob
from conftest import EOS, PAD, prompts, tiny_model

BS = 4


def block_policy(seed=0, double=True, **kw):
    return Policy(tiny_model(seed, double, block_size=BS, **kw))


def padded_prompts(lengths, seed=0):
    """Left-padded prompts of the given lengths (pad id, attention 0 on the padding)."""
    width = max(lengths)
    ids = prompts(len(lengths), width, seed)
    mask = torch.ones_like(ids)
    for b, n in enumerate(lengths):
        ids[b, : width - n] = PAD
        mask[b, : width - n] = 0
    return ids, mask


FIXED = SamplingConfig(gen_length=12, block_length=BS, steps=6, temperature=1.0, remasking="low_confidence",
                       stop_at_eos=True)
CASES = {
    "fixed": FIXED,
    "fixed-top-k": dataclasses.replace(FIXED, top_k=5, top_p=0.9, steps=12),
    "threshold": dataclasses.replace(FIXED, steps=12, threshold=0.08),
    "threshold-entropy": dataclasses.replace(FIXED, steps=12, threshold=0.1, remasking="entropy"),
}


def eos_prone(policy, bias=3.0):
    """Raise the EOS logit (on every path to the logits: a hook on the LM head) so that some rows
    write a whole block of EOS and stop."""

    def hook(module, args, out):
        out = out.clone()
        out[..., EOS] += bias
        return out

    policy.model.get_output_embeddings().register_forward_hook(hook)
    return policy


@pytest.mark.parametrize("case", sorted(CASES))
def test_cached_and_uncached_samplers_draw_the_same_rollout(case):
    cfg = CASES[case]
    policy = eos_prone(block_policy(3), 3.5)
    ids, mask = padded_prompts([5, 9, 7, 3, 8, 6])
    runs = {}
    for cache in ("none", "prefix"):
        g = torch.Generator().manual_seed(11)
        runs[cache] = generate(policy, ids, mask, dataclasses.replace(cfg, cache=cache), g)
    a, b = runs["none"], runs["prefix"]
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.step, b.step) and torch.equal(a.sampled, b.sampled)
    assert torch.allclose(a.logp, b.logp, rtol=0, atol=1e-9) and torch.allclose(a.entropy, b.entropy, atol=1e-9)
    assert (a.filter_ids is None) == (b.filter_ids is None)
    if a.filter_ids is not None:
        assert torch.equal(a.filter_ids, b.filter_ids)
    assert a.prompt_len % BS == 0  # the prompt part is a whole number of blocks
    if case == "fixed":
        assert (~a.sampled).any(), "no row stopped early: the early-stop path is not exercised"


@pytest.mark.parametrize("case", sorted(CASES))
def test_recorded_log_probs_are_what_the_training_forward_computes(case):
    """Every committed token's recorded log-probability, recomputed at its rebuilt state by the
    whole-sequence block-masked forward the trainer runs (float32): |ratio - 1| < 1e-5."""
    cfg = dataclasses.replace(CASES[case], cache="prefix")
    policy = eos_prone(block_policy(5, double=False))
    ids, mask = padded_prompts([6, 2, 9, 5])
    ro = generate(policy, ids, mask, cfg, torch.Generator().manual_seed(2))
    assert (~ro.sampled).any(), "no row stopped early: the early-stop path is not exercised"
    checked = 0
    for b in range(ro.tokens.shape[0]):
        for t in ro.step[b][ro.sampled[b]].unique().tolist():
            cols = ((ro.step[b] == t) & ro.sampled[b]).nonzero().squeeze(1)
            x = rebuild_states(ro, torch.tensor([b]), torch.tensor([t]))
            logits = policy(x, (ro.prompt_len + cols)[None], ro.attention_mask[b : b + 1])
            filt = None if ro.filter_ids is None else ro.filter_ids[b, cols][None]
            lp, _ = token_log_prob(logits, ro.completion[b, cols][None], cfg.temperature, filt, ro.mask_id)
            ratio = torch.exp(lp[0].double() - ro.logp[b, cols].double())
            assert (ratio - 1).abs().max() < 1e-5, (b, t)
            checked += cols.numel()
    assert checked == int(ro.sampled.sum()) > 0


def test_threshold_decoding_commits_every_confident_token_and_at_least_the_schedule():
    cfg = dataclasses.replace(FIXED, steps=12, threshold=0.06, stop_at_eos=False)  # schedule: 1 token a step
    policy = block_policy(7, logit_scale=6.0)
    ids, mask = padded_prompts([4, 8, 6])
    ro = generate(policy, ids, mask, cfg, torch.Generator().manual_seed(4))
    counts = []
    for b in range(ro.tokens.shape[0]):
        steps = ro.step[b].tolist()
        distinct = sorted(set(steps))
        assert distinct == list(range(len(distinct)))  # a row's steps are consecutive: each commits something
        for blk in range(cfg.gen_length // BS):
            in_block = sorted(set(steps[blk * BS : (blk + 1) * BS]))
            assert len(in_block) <= BS  # at most the schedule's steps a block
        for t in distinct:
            n = steps.count(t)
            counts.append(n)
            p = ro.logp[b][torch.tensor(steps) == t].exp()
            if n > 1:  # more than the schedule: every one of them passed the threshold
                assert (p >= cfg.threshold - 1e-6).all()
    assert max(counts) > 1 and min(counts) == 1  # some steps commit several tokens, none commits nothing


def test_a_threshold_no_token_passes_commits_the_schedule():
    """threshold 1: every step commits exactly gen_length/steps tokens, every block takes its steps."""
    cfg = dataclasses.replace(FIXED, steps=6, threshold=1.0, stop_at_eos=False)  # 2 tokens a step
    policy = block_policy(8)
    ids, mask = padded_prompts([4, 7])
    ro = generate(policy, ids, mask, cfg, torch.Generator().manual_seed(3))
    for b in range(2):
        steps = ro.step[b].tolist()
        assert sorted(set(steps)) == list(range(cfg.steps))
        assert all(steps.count(t) == cfg.tokens_per_step for t in range(cfg.steps))
        assert all(set(steps[k * BS : (k + 1) * BS]) == {2 * k, 2 * k + 1} for k in range(3))


def test_block_length_must_be_the_models_block_size():
    policy = block_policy(0)
    ids, mask = padded_prompts([4, 6])
    with pytest.raises(AgrpoError, match="blocks of 4 tokens .* block_length=4"):
        generate(policy, ids, mask, dataclasses.replace(FIXED, block_length=6, steps=6), torch.Generator())


def test_threshold_with_random_remasking_is_refused():
    with pytest.raises(AgrpoError, match="threshold decoding commits by the model's confidence"):
        dataclasses.replace(FIXED, remasking="random", threshold=0.9).validate()


def test_cached_sampler_runs_the_block_alone():
    """With the cache every step's forward holds the block's positions only (plus one prompt pass and
    one pass per finished block that a later block follows)."""
    policy = block_policy(1)
    lengths = []
    real = policy.model.model.forward

    def spy(*a, **kw):
        ids = kw.get("input_ids", a[0] if a else None)
        if ids.shape[0] == 2:  # the sampler's passes (the policy's one-time check of its head runs on one row)
            lengths.append(ids.shape[1])
        return real(*a, **kw)

    policy.model.model.forward = spy
    ids, mask = padded_prompts([5, 7])
    cfg = dataclasses.replace(FIXED, cache="prefix", stop_at_eos=False)
    generate(policy, ids, mask, cfg, torch.Generator().manual_seed(0))
    prompt_len = 8  # 7 tokens padded to two blocks
    blocks, spb = cfg.gen_length // BS, cfg.steps_per_block
    assert sorted(lengths) == sorted([prompt_len] + [BS] * (blocks * spb + blocks - 1))
