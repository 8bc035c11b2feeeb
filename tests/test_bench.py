"""The benchmarks compare equal computations and print one JSON object last."""

import json
import math

import pytest
import torch

from agrpo.bench import run_loss, run_rollout
from agrpo.bench.baseline import naive_filter
from agrpo.errors import AgrpoError
from agrpo.sampling import filter_logits

SMALL = {"vocab": 300, "mask_id": 298, "eos_id": 299, "batch": 2, "prompt_len": 4, "gen_length": 8, "steps": 4,
         "block_length": 4, "top_k": 20, "hidden": 32, "heads": 2, "intermediate": 64, "repeats": 1}
# the block-model part of the rollout bench at tiny sizes (a prompt of 6: padded to whole blocks of 4)
BLOCK_SMALL = {"block_vocab": 300, "block_batch": 3, "block_prompt_len": 6, "block_gen_length": 12, "block_hidden": 32,
               "block_heads": 4, "block_kv_heads": 2, "block_intermediate": 64, "block_layers": 2,
               "block_logit_scale": 20.0}
# the approximate-cache part at tiny sizes: 3 blocks of 4, 12 steps (about 2 tokens a step at the threshold),
# every state scored for the gap
CACHE_SMALL = {"cache_vocab": 300, "cache_mask_id": 298, "cache_eos_id": 299, "cache_batch": 3, "cache_prompt_len": 6,
               "cache_gen_length": 12, "cache_block_length": 4, "cache_hidden": 32, "cache_heads": 4, "cache_layers": 2,
               "cache_intermediate": 64, "cache_logit_scale": 100.0, "cache_threshold": 0.5, "cache_gap_states": 0,
               "cache_gap_batch": 5}


def test_naive_filter_keeps_the_same_sets():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 300, generator=gen)
    logits[0, :5] = 3.0  # a tie across the top-k boundary
    for top_k, top_p in [(20, 1.0), (20, 0.9), (4, 0.99), (0, 0.8)]:
        ours = filter_logits(logits, top_k, top_p)
        kept = torch.zeros_like(logits, dtype=torch.bool)
        ids, _, keep = ours
        kept.scatter_(1, ids, keep)
        assert torch.equal(naive_filter(logits, top_k, top_p), kept)


def test_rollout_bench_json(capsys):
    out = run_rollout(True, **SMALL, **BLOCK_SMALL, **CACHE_SMALL)
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # one object: the three parts
    assert last["tokens_per_s"] == out["tokens_per_s"]
    assert last["block"]["modes"]["fixed"]["ratio"] == out["block"]["modes"]["fixed"]["ratio"]
    assert last["cache"]["modes"]["dual"]["ratio"] == out["cache"]["modes"]["dual"]["ratio"]
    # the record keeps <= top_k ids a position against a vocabulary-wide bool mask
    assert out["baseline_record_bytes"] >= 2 * 8 * 300
    assert out["record_bytes"] < out["baseline_record_bytes"]


def test_loss_bench_agrees_with_baseline(capsys):
    out = run_loss(True, **SMALL)
    assert abs(out["loss"] - out["baseline_loss"]) < 1e-4
    assert out["grad_rel_diff"] < 1e-3
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step_s"] == out["step_s"]


def test_rollout_bench_block_model_compares_cached_and_uncached(capsys):
    """The block part alone: cached and uncached samplers draw the same tokens, each reported with its speed."""
    out = run_rollout(True, bidirectional=False, cache=False, block_threshold=0.5, **BLOCK_SMALL)
    printed = capsys.readouterr().out
    assert "cached tokens/s" in printed and "tokens_per_s" not in out  # the bidirectional part did not run
    block = out["block"]
    assert set(block["modes"]) == {"fixed", "threshold"}
    for name, mode in block["modes"].items():
        for key in ("cached_tokens_per_s", "uncached_tokens_per_s", "ratio", "backbone_ratio"):
            assert mode[key] > 0, (name, key)
        assert mode["same_tokens"] and mode["same_steps"], name
        assert mode["max_logp_diff"] < 1e-4
        split = mode["cached_split"]
        assert split["backbone_s"] > 0 and split["head_s"] > 0
    assert block["modes"]["fixed"]["tokens_per_step"] == 1.0  # 12 tokens in 12 steps
    assert block["modes"]["threshold"]["threshold"] == 0.5
    assert block["tokens"] == 3 * 12 and block["kv_cache_bytes"] > 0
    assert block["checks"]["same_tokens"] is True


@pytest.mark.parametrize("bad, message", [
    ({"block_gen_length": 10}, "block_length=4 must divide gen_length=10"),
    ({"block_heads": 3}, "block_heads=3 must divide"),
    ({"block_threshold": 1.5}, "threshold must be in"),
    ({"bidirectional": False, "block": False, "cache": False}, "nothing to time"),
])
def test_rollout_bench_refuses_bad_block_settings(bad, message):
    with pytest.raises(AgrpoError, match=message):
        run_rollout(False, **{**BLOCK_SMALL, **bad})


def test_rollout_bench_cache_part_reports_speeds_and_the_gap(capsys):
    """The approximate-cache part alone: four modes with their speeds; the cached ones with a finite gap."""
    out = run_rollout(True, bidirectional=False, block=False, **CACHE_SMALL)
    printed = capsys.readouterr().out
    assert "approximate caches" in printed and "off-policy gap" in printed and "block" not in out
    cache = out["cache"]
    assert list(cache["modes"]) == ["none", "prefix", "dual", "dual_threshold"]
    assert cache["tokens"] == 3 * 12
    for name, mode in cache["modes"].items():
        assert mode["tokens_per_s"] > 0 and mode["ratio"] > 0, name
        assert mode["split"]["backbone_s"] > 0 and mode["split"]["head_s"] > 0, name
        assert mode["approximate"] == (name != "none")
    none = cache["modes"]["none"]
    assert "gap" not in none and none["ratio"] == 1.0 and none["tokens_per_step"] == 1.0
    assert cache["modes"]["dual_threshold"]["threshold"] == 0.5
    assert cache["modes"]["dual_threshold"]["tokens_per_step"] > 1.5  # the scaled head makes draws pass 0.5
    for name in ("prefix", "dual", "dual_threshold"):
        gap = cache["modes"][name]["gap"]
        assert gap["states"] == gap["states_total"] and gap["tokens"] == 3 * 12, name  # every state scored
        for key in ("mean", "mean_abs", "p50_abs", "p90_abs", "p99_abs", "max_abs", "outside_clip", "first_step_share"):
            assert math.isfinite(gap[key]), (name, key)
        assert gap["p50_abs"] <= gap["p90_abs"] <= gap["p99_abs"] <= gap["max_abs"]
        assert 0 < gap["first_step_share"] < 1 and 0 <= gap["outside_clip"] <= 1
        assert gap["max_abs"] > 1e-4, name  # 3 of 4 steps a block read stale keys and values
    assert set(cache["checks"]) == {"prefix_ge_3x", "dual_threshold_ge_5x"}
    assert all(isinstance(v, bool) for v in cache["checks"].values())
    assert json.loads(printed.strip().splitlines()[-1])["cache"]["checks"] == cache["checks"]


def test_rollout_bench_cache_one_step_a_block_is_exact(capsys):
    """With one step a block every step is a block's first: the cached modes run the whole sequence each step,
    draw what cache=none draws (all ranking by confidence, as threshold decoding does), and their gap is rounding."""
    out = run_rollout(False, bidirectional=False, block=False, cache_steps=3, cache_remasking="low_confidence",
                      **CACHE_SMALL)["cache"]
    for name, mode in out["modes"].items():
        assert mode["same_tokens_as_none"], name
        assert mode["first_step_share"] == 1.0 and mode["tokens_per_step"] == 4.0, name
        if name != "none":
            assert mode["gap"]["first_step_share"] == 1.0 and mode["gap"]["max_abs"] < 1e-4, name


def test_cache_gap_of_the_uncached_sampler_is_zero():
    """The gap scorer on a cache=none rollout: the recorded log-probs are the exact policy's (a subset of states,
    several a forward)."""
    from agrpo.bench import make_config
    from agrpo.bench.cache import build_cache_model, cache_prompts, cache_sampling
    from agrpo.offpolicy import behaviour_gap, gap_summary
    from agrpo.sampling import generate

    cfg = make_config(CACHE_SMALL)
    _, policy = build_cache_model(cfg)
    rollout = generate(policy, cache_prompts(cfg), None, cache_sampling(cfg, "none"), torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    gap = gap_summary(behaviour_gap(policy, rollout, max_states=20, batch=7, generator=gen))
    assert gap["states"] == 20 and gap["states_total"] == 36 and gap["tokens"] == 20
    assert gap["max_abs"] < 1e-5 and gap["outside_clip"] == 0.0


@pytest.mark.parametrize("bad, message", [
    ({"cache_gen_length": 10}, "cache part: cache_block_length=4 must divide cache_gen_length=10"),
    ({"cache_steps": 5}, "cache_steps=5 must be a multiple"),
    ({"cache_heads": 3}, "cache_heads=3 must divide"),
    ({"cache_threshold": 1.5}, "threshold must be in"),
    ({"cache_mask_id": 299}, "two different ids"),
    ({"cache_gap_states": -1}, "cache_gap_states must be >= 0"),
    ({"cache_logit_scale": 0.0}, "cache_logit_scale must be > 0"),
    ({"cache_temperature": 0.0}, "cache_temperature must be > 0"),
    ({"cache_repeats": 0}, "cache_repeats must be >= 1"),
])
def test_rollout_bench_refuses_bad_cache_settings(bad, message):
    with pytest.raises(AgrpoError, match=message) as info:
        run_rollout(False, bidirectional=False, block=False, **{**CACHE_SMALL, **bad})
    assert "\n" not in str(info.value)


def test_bench_script_help_lists_the_cache_settings(capsys):
    from agrpo.bench import script_main

    assert script_main("rollout", ["--help"]) is None
    printed = capsys.readouterr().out
    assert "cache_gap_states" in printed and "cache_logit_scale" in printed and "block_size" in printed
    with pytest.raises(SystemExit) as info:  # a bad setting: one line, no stack trace
        script_main("rollout", ["bidirectional=false", "block=false", "cache_heads=3"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cache_heads=3 must divide" in err
