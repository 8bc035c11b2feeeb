"""The RL recipe on block-diffusion checkpoints in their hub formats: AGRPO with the block sampler and the
block-diffusion layout, on the LLaDA2 fixture (whose config does not record its block size)."""

import json
import math
import shutil
from pathlib import Path

import pytest

from agrpo.config import load_config
from agrpo.errors import AgrpoError
from agrpo.recipes import rl
from agrpo.recipes.rl import RLConfig

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "models"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
needs_fixtures = pytest.mark.skipif(not (FIXTURES / "llada2").is_dir(), reason="model fixtures not available")


def _settings(tmp_path, family):
    from test_paper_rl import write_data
    from test_presets import nl_fixture_tokenizer

    model = tmp_path / family
    shutil.copytree(FIXTURES / family, model)
    nl_fixture_tokenizer("llada").save_pretrained(model)  # the fixtures' ids: mask 1020, eos 1021
    train, test = write_data(tmp_path, "gsm8k")
    return [
        f"model={model}", f"train_data={train}", f"eval_data={test}", f"output_dir={tmp_path / 'runs'}", "dtype=float32",
        "max_steps=2", "time_budget_s=0", "progress=false", "prompts_per_step=2", "group_size=2", "eval_size=4",
        "train_pool=4", "lora.r=0", "max_rows_per_forward=3", "num_samples=2", "sampling.gen_length=12",
        "sampling.block_length=4", "sampling.steps=12", "eval_sampling.gen_length=8", "eval_sampling.block_length=4",
        "eval_sampling.steps=8",
    ]


@needs_fixtures
def test_agrpo_runs_on_the_llada2_fixture_with_its_block_size_given(tmp_path):
    cfg = load_config(RLConfig, str(CONFIGS / "llada8b" / "gsm8k.yaml"), [*_settings(tmp_path, "llada2"), "block_size=4"])
    summary = rl.train(cfg)
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    lines = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    # the first update's ratio is exactly 1: the sampler's record is the trainer's policy
    assert lines[1]["clip_frac"] == 0.0 and all(math.isfinite(line["loss"]) for line in lines[1:])


@needs_fixtures
def test_a_sampler_block_length_other_than_the_models_is_refused_in_one_line(tmp_path):
    over = [*_settings(tmp_path, "llada2"), "block_size=4", "sampling.block_length=6", "sampling.gen_length=12",
            "sampling.steps=12"]
    cfg = load_config(RLConfig, str(CONFIGS / "llada8b" / "gsm8k.yaml"), over)
    with pytest.raises(AgrpoError, match=r"blocks of 4 tokens \(its block_size\): set sampling.block_length=4"):
        rl.train(cfg)
    assert not (tmp_path / "runs").exists()  # refused before any work: no run folder, no evaluation


@needs_fixtures
@pytest.mark.parametrize("family", ["sdar", "llada2"])
@pytest.mark.parametrize("threshold", [0.0, 0.02])
def test_cached_rollouts_of_the_fixtures_are_what_the_trainer_computes(family, threshold, tmp_path):
    """On each family's hub checkpoint (float32): the cached and uncached samplers draw the same rollout
    (padded prompts, early stops), and every committed token's recorded log-probability equals the one
    the training forward computes, both one rebuilt state a forward and in the block-diffusion layout
    (every step of every block): |ratio - 1| < 1e-5."""
    import dataclasses

    import torch

    from agrpo.models import load_model_and_tokenizer
    from agrpo.objectives.agrpo import agrpo_loss, every_step_plan
    from agrpo.objectives.block_replay import every_block_step_plan, packed_inputs, pack_chunks
    from agrpo.policy import Policy
    from agrpo.sampling import SamplingConfig, generate, token_log_prob
    from test_block_sampling import padded_prompts

    from test_presets import nl_fixture_tokenizer

    shutil.copytree(FIXTURES / family, tmp_path / family)
    nl_fixture_tokenizer("llada").save_pretrained(tmp_path / family)
    model, _ = load_model_and_tokenizer(str(tmp_path / family), dtype="float32", block_size=4)
    policy = Policy(model)
    ids, mask = padded_prompts([5, 9, 3, 7], seed=1)
    ids = ids + 3  # the fixtures' ids: keep clear of pad / eos / mask (1020-1023)
    ids[mask == 0] = 1021
    cfg = SamplingConfig(gen_length=16, block_length=4, steps=16, temperature=1.0, top_k=20,
                         remasking="low_confidence", threshold=threshold)
    runs = [generate(policy, ids, mask, dataclasses.replace(cfg, cache=c), torch.Generator().manual_seed(3))
            for c in ("none", "prefix")]
    assert torch.equal(runs[0].tokens, runs[1].tokens) and torch.equal(runs[0].step, runs[1].step)
    ro = runs[1]
    plan = every_block_step_plan(ro, "token")
    with torch.no_grad():
        for idx, first, last in pack_chunks(plan, 8):
            tokens_ids, position_ids, attention, scored, pos, valid, _, rows = packed_inputs(ro, plan, idx, first, last)
            logits = policy(tokens_ids, scored, attention, position_ids=position_ids)
            filt = ro.filter_ids[rows].gather(1, pos[:, :, None].expand(-1, -1, ro.filter_ids.shape[-1]))
            lp, _ = token_log_prob(logits, ro.completion[rows].gather(1, pos), 1.0, filt, ro.mask_id)
            gap = (lp.double() - ro.logp[rows].gather(1, pos).double()).abs()[valid]
            assert gap.numel() and float(gap.max()) < 1e-5
        # one rebuilt state a forward: the per-step AGRPO loss sees ratio 1 everywhere
        _, m = agrpo_loss(policy, ro, torch.ones(ro.tokens.shape[0]), plan=every_step_plan(ro), eps_low=1e-6,
                          eps_high=1e-6)
    assert m["clip_frac"] == 0.0 and abs(m["ratio_mean"] - 1) < 1e-5 and m["loss_tokens"] == int(ro.sampled.sum())


@needs_fixtures
def test_tracerl_runs_on_the_sdar_fixture_with_the_block_options(tmp_path):
    """TraceRL's block-model settings (length normalisation, log-ratio clamp) through the recipe on SDAR's
    hub format, with threshold decoding and two updates a batch (so the ratio moves off 1)."""
    over = [*_settings(tmp_path, "sdar"), "objective=tracerl", "tracerl.normalize=length", "tracerl.log_ratio_clamp=10",
            "tracerl.shrink=2", "tracerl.min_accuracy=0", "tracerl.max_accuracy=1", "inner_steps=2",
            "sampling.threshold=0.02", "sampling.remasking=low_confidence"]
    cfg = load_config(RLConfig, str(CONFIGS / "llada8b" / "gsm8k.yaml"), over)
    summary = rl.train(cfg)
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0 and summary["objective"] == "tracerl"
    lines = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(line["loss"]) for line in lines[1:])
