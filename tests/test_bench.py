"""The benchmarks compare equal computations and print one JSON object last."""

import json

import pytest
import torch

from agrpo.bench import run_loss, run_rollout
from agrpo.bench.baseline import naive_filter
from agrpo.errors import AgrpoError
from agrpo.sampling import filter_logits

SMALL = dict(vocab=300, mask_id=298, eos_id=299, batch=2, prompt_len=4, gen_length=8, steps=4,
             block_length=4, top_k=20, hidden=32, heads=2, intermediate=64, repeats=1)
# the block-model part of the rollout bench at tiny sizes (a prompt of 6: padded to whole blocks of 4)
BLOCK_SMALL = dict(block_vocab=300, block_batch=3, block_prompt_len=6, block_gen_length=12, block_hidden=32,
                   block_heads=4, block_kv_heads=2, block_intermediate=64, block_layers=2, block_logit_scale=20.0)


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
    out = run_rollout(True, **SMALL, **BLOCK_SMALL)
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # one object: both parts
    assert last["tokens_per_s"] == out["tokens_per_s"]
    assert last["block"]["modes"]["fixed"]["ratio"] == out["block"]["modes"]["fixed"]["ratio"]
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
    out = run_rollout(True, bidirectional=False, block_threshold=0.5, **BLOCK_SMALL)
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
    (dict(block_gen_length=10), "block_length=4 must divide gen_length=10"),
    (dict(block_heads=3), "block_heads=3 must divide"),
    (dict(block_threshold=1.5), "threshold must be in"),
    (dict(bidirectional=False, block=False), "nothing to time"),
])
def test_rollout_bench_refuses_bad_block_settings(bad, message):
    with pytest.raises(AgrpoError, match=message):
        run_rollout(False, **{**BLOCK_SMALL, **bad})
