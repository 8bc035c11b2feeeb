"""DiPO against a slow float64 reference of ALGORITHMS.md's formula (one forward per block state), its
group filter, its refusal on a bidirectional model, and 2 steps of the recipe on the SDAR fixture."""

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from agrpo.errors import AgrpoError
from agrpo.objectives import Context, Part, get_objective
from agrpo.objectives.agrpo import rebuild_states
from agrpo.objectives.block_replay import block_ranges
from agrpo.objectives.dipo import DiPOSettings, dipo_advantages
from agrpo.policy import Policy
from agrpo.recipes.rl import RLConfig
from agrpo.sampling import generate, token_log_prob
from conftest import tiny_model
from test_block_replay import CFG
from test_block_sampling import BS, block_policy, eos_prone, padded_prompts
from test_proxies import accelerator, assert_same, perturbed, slow_gradient

REWARDS = [1.0, 0.0, 0.5, 0.25, 0.25, 0.25, 1.0, None, 0.0]  # group 2 all equal: dropped


def setup(seed=0, threshold=0.1):
    policy = eos_prone(block_policy(seed), 1.5)
    ids, mask = padded_prompts([5, 9, 3, 7, 6, 4, 8, 2, 5], seed)
    ro = generate(policy, ids, mask, dataclasses.replace(CFG, threshold=threshold), torch.Generator().manual_seed(1))
    adv, valid = dipo_advantages(REWARDS, 3)
    return policy, Part(ro, adv, valid, REWARDS, torch.Generator().manual_seed(0))


def run(policy, part, cfg, settings, ref=None):
    policy.zero_grad(set_to_none=True)
    obj = get_objective("dipo")
    ctx = Context(accelerator(), policy, ref, cfg, settings)
    obj.prepare(ctx, [part])
    m = obj.update(ctx, [part], 0)
    return m["loss"], [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in policy.model.parameters()]


def slow_loss(policy, part, cfg, s, ref=None):
    """Loops over rows, blocks, the block's steps and their tokens; each state a forward of its own."""
    ro = part.rollout
    lo, hi = block_ranges(ro)
    p, temp = ro.prompt_len, ro.config.temperature
    terms = []
    for b in range(ro.tokens.shape[0]):
        if not part.valid[b]:
            continue
        for k in range(ro.completion.shape[1] // BS):
            for t in range(int(lo[b, k]), int(hi[b, k])):
                x = rebuild_states(ro, torch.tensor([b]), torch.tensor([t]))
                for j in range(k * BS, (k + 1) * BS):
                    if not (ro.sampled[b, j] and ro.step[b, j] == t):
                        continue
                    pos = torch.tensor([[p + j]])
                    filt = None if ro.filter_ids is None else ro.filter_ids[b, j][None, None]
                    tok = ro.completion[b, j][None, None]
                    lp = token_log_prob(policy(x, pos, ro.attention_mask[b : b + 1]), tok, temp, filt, ro.mask_id)[0][0, 0]
                    d = lp - ro.logp[b, j].double()
                    rho = torch.exp(d.clamp(-s.log_ratio_clamp, s.log_ratio_clamp) if s.log_ratio_clamp else d)
                    a = float(part.advantages[b])
                    term = -torch.minimum(rho * a, rho.clamp(1 - cfg.eps_low, 1 + cfg.eps_high) * a)
                    if cfg.beta > 0:
                        with torch.no_grad():
                            lr_ = token_log_prob(ref(x, pos, ro.attention_mask[b : b + 1]), tok, temp, filt, ro.mask_id)[0][0, 0]
                        term = term + cfg.beta * rho * (torch.exp(lr_ - lp) - (lr_ - lp) - 1)
                    terms.append(term)
    return sum(terms) / len(terms)


CASES = {
    "plain": (dict(eps_low=0.2, eps_high=0.28, beta=0.0), DiPOSettings()),
    "kl-and-tight-clip": (dict(eps_low=0.02, eps_high=0.03, beta=0.05), DiPOSettings(log_ratio_clamp=0.05)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loss_and_gradient_match_the_formula(case):
    over, s = CASES[case]
    policy, part = setup(0)
    # the update's policy moved away from the one that sampled: ratios differ from 1 and the clamp and clip act
    moved = Policy(perturbed(policy.model, 2, 0.4))
    ref = Policy(perturbed(policy.model, 3, 0.3)) if over["beta"] else None
    cfg = RLConfig(objective="dipo", group_size=3, max_rows_per_forward=4, **over)
    loss, grads = run(moved, part, cfg, s, ref)
    want = slow_loss(moved, part, cfg, s, ref)
    assert_same(loss, grads, want, slow_gradient(moved.model, want))


def test_groups_whose_rewards_are_all_equal_are_dropped():
    adv, valid = dipo_advantages(REWARDS, 3)
    assert valid.tolist() == [True, True, True, False, False, False, True, False, True]
    assert float(adv[3:6].abs().sum()) == 0.0
    assert dipo_advantages(REWARDS, 3, filter_groups=False)[1].tolist()[3:6] == [True, True, True]


def test_zero_advantages_give_zero_gradient():
    policy, part = setup(1)
    part = Part(part.rollout, torch.zeros_like(part.advantages), part.valid, part.rewards, part.generator)
    _, grads = run(Policy(perturbed(policy.model, 2, 0.4)), part, RLConfig(objective="dipo", group_size=3), DiPOSettings())
    assert all(not g.any() for g in grads)


def test_a_bidirectional_model_is_refused_in_one_line():
    policy = Policy(tiny_model(0))
    _, part = setup(0)
    with pytest.raises(AgrpoError, match="needs a block-diffusion model"):
        run(policy, part, RLConfig(objective="dipo", group_size=3), DiPOSettings())


FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "models"


@pytest.mark.skipif(not (FIXTURES / "sdar").is_dir(), reason="model fixtures not available")
def test_two_steps_of_the_recipe_on_the_sdar_fixture(tmp_path):
    """The whole recipe on a block model in its hub format: block sampler with the cache, DiPO, evaluation."""
    from test_paper_rl import write_data
    from test_presets import nl_fixture_tokenizer

    from agrpo.config import load_config
    from agrpo.recipes import rl

    model = tmp_path / "sdar"
    shutil.copytree(FIXTURES / "sdar", model)
    nl_fixture_tokenizer("llada").save_pretrained(model)  # the fixture's ids: mask 1020, eos 1021
    train, test = write_data(tmp_path, "countdown")
    configs = Path(__file__).resolve().parents[1] / "configs"
    cfg = load_config(RLConfig, [str(configs / "llada8b" / "countdown.yaml"), str(configs / "objectives" / "dipo.yaml")], [
        f"model={model}", f"train_data={train}", f"eval_data={test}", f"output_dir={tmp_path / 'runs'}", "dtype=float32",
        "max_steps=2", "time_budget_s=0", "progress=false", "prompts_per_step=2", "group_size=3", "eval_size=4",
        "train_pool=4", "lora.r=0", "max_rows_per_forward=4", "sampling.gen_length=12", "sampling.block_length=4",
        "sampling.steps=12", "sampling.threshold=0.05", "eval_sampling.gen_length=8", "eval_sampling.block_length=4",
        "eval_sampling.steps=8", "dipo.filter_groups=false",
    ])
    summary = rl.train(cfg)
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0 and summary["objective"] == "dipo"
    lines = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(line["loss"]) and line["completion_length"] > 0 for line in lines[1:])
