"""The benchmarks compare equal computations and print one JSON object last."""

import json

import torch

from agrpo.bench import run_loss, run_rollout
from agrpo.bench.baseline import naive_filter
from agrpo.sampling import filter_logits

SMALL = dict(vocab=300, mask_id=298, eos_id=299, batch=2, prompt_len=4, gen_length=8, steps=4,
             block_length=4, top_k=20, hidden=32, heads=2, intermediate=64, repeats=1)


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
    out = run_rollout(True, **SMALL)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["tokens_per_s"] == out["tokens_per_s"]
    # the record keeps <= top_k ids a position against a vocabulary-wide bool mask
    assert out["baseline_record_bytes"] >= 2 * 8 * 300
    assert out["record_bytes"] < out["baseline_record_bytes"]


def test_loss_bench_agrees_with_baseline(capsys):
    out = run_loss(True, **SMALL)
    assert abs(out["loss"] - out["baseline_loss"]) < 1e-4
    assert out["grad_rel_diff"] < 1e-3
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step_s"] == out["step_s"]
