"""Rollout benchmark: `agrpo.sampling.generate` against the straightforward sampler, same run;
then, on a block-diffusion model, the sampler with its prefix KV cache against itself without one
(`agrpo.bench.block`: `block=false` skips it); then, on a LLaDA-style bidirectional model, the
approximate prefix and dual caches against no cache, with the off-policy gap of what they record
(`agrpo.bench.cache`: `cache=false` skips it). `bidirectional=false` skips the first part.

Ours runs first (one warm-up, then `repeats` timed runs, best reported) so that the peak
resident memory read right after it is ours alone; the baseline then samples the same
prompts once (NOTES.md: ~78 s for 512 tokens, too slow to repeat within the time budget).
One extra run of ours with forward hooks splits its time into backbone, LM head and the
rest (filter, sampling, bookkeeping).
"""

from __future__ import annotations

import torch

from agrpo.bench import (
    ModuleTimer,
    build_model,
    describe,
    emit,
    fmt_bytes,
    load_average,
    make_config,
    make_prompts,
    peak_rss_bytes,
    print_table,
    sampling_config,
    thread_scope,
    timed,
)
from agrpo.bench.baseline import naive_generate
from agrpo.bench.block import check_block_config, run_block
from agrpo.bench.cache import check_cache_config, run_cache
from agrpo.errors import AgrpoError
from agrpo.sampling import generate

SPEEDUP_BAR = 10.0  # tokens/s against the baseline
RECORD_BAR = 20.0  # record bytes: baseline / ours
TOKENS_PER_S_GOAL = 550.0


def run_rollout(json_out: bool = False, **overrides) -> dict:
    cfg = make_config(overrides)
    if not (cfg.bidirectional or cfg.block or cfg.cache):
        raise AgrpoError("bidirectional=false, block=false and cache=false leave nothing to time")
    if cfg.block:
        check_block_config(cfg)  # before the first part's minutes, not after
    if cfg.cache:
        check_cache_config(cfg)
    with thread_scope(cfg.threads) as threads:
        result = {"benchmark": "rollout",
                  "config": {k: v for k, v in vars(cfg).items() if k not in ("num_samples", "perturb")},
                  "threads": threads, "load_avg": load_average()}
        if cfg.bidirectional:
            result.update(_run(cfg, threads))
        if cfg.block:
            if cfg.bidirectional:
                print()
            result["block"] = run_block(cfg, threads)
        if cfg.cache:
            if cfg.bidirectional or cfg.block:
                print()
            result["cache"] = run_cache(cfg, threads)
    return emit(result, json_out)


def _run(cfg, threads: int) -> dict:
    model, policy = build_model(cfg)
    prompts = make_prompts(cfg)
    sc = sampling_config(cfg)
    tokens = cfg.batch * cfg.gen_length
    gen = torch.Generator().manual_seed(cfg.seed + 2)

    rss_model = peak_rss_bytes()  # interpreter, torch, transformers and the model, before any sampling
    generate(policy, prompts, None, sc, generator=gen)  # warm-up: allocator, kernels, the head check
    runs = []
    for _ in range(cfg.repeats):
        rollout, seconds = timed(lambda: generate(policy, prompts, None, sc, generator=gen))
        runs.append(seconds)
    peak = peak_rss_bytes()
    best = min(runs)

    timer = ModuleTimer(backbone=model.get_decoder(), head=model.get_output_embeddings())
    try:
        _, split_total = timed(lambda: generate(policy, prompts, None, sc, generator=gen))
    finally:
        timer.close()
    split = {
        "total_s": split_total,
        "backbone_s": timer.seconds["backbone"],
        "head_s": timer.seconds["head"],
        "other_s": split_total - timer.seconds["backbone"] - timer.seconds["head"],
    }

    base_seconds = base_bytes = None
    if cfg.baseline:
        bgen = torch.Generator().manual_seed(cfg.seed + 3)
        naive, base_seconds = timed(
            lambda: naive_generate(model, prompts, sc, policy.mask_id, policy.eos_id, generator=bgen)
        )
        base_bytes = naive.record_bytes()
        del naive

    ours_tps = tokens / best
    base_tps = tokens / base_seconds if base_seconds else None
    speedup = ours_tps / base_tps if base_tps else None
    record_ratio = base_bytes / rollout.record_bytes() if base_bytes else None
    result = {
        "tokens": tokens,
        "tokens_per_s": round(ours_tps, 2),
        "runs_s": [round(r, 4) for r in runs],
        "baseline_tokens_per_s": round(base_tps, 3) if base_tps else None,
        "baseline_s": round(base_seconds, 2) if base_seconds else None,
        "speedup": round(speedup, 1) if speedup else None,
        "record_bytes": rollout.record_bytes(),
        "baseline_record_bytes": base_bytes,
        "record_ratio": round(record_ratio, 1) if record_ratio else None,
        "peak_rss_bytes": peak,
        "rss_before_sampling_bytes": rss_model,
        "split": {k: round(v, 4) for k, v in split.items()},
        "checks": {
            "speedup_ge_10x": speedup >= SPEEDUP_BAR if speedup else None,
            "record_le_1_20": record_ratio >= RECORD_BAR if record_ratio else None,
            "tokens_per_s_ge_550": ours_tps >= TOKENS_PER_S_GOAL,
        },
    }
    def ok(flag):
        return "-" if flag is None else ("yes" if flag else "NO")

    checks = result["checks"]
    rows = [
        ["tokens/s", f"{ours_tps:.1f}", f"{base_tps:.2f}" if base_tps else "-",
         f"{speedup:.1f}x faster" if speedup else "-", f">= {SPEEDUP_BAR:.0f}x: {ok(checks['speedup_ge_10x'])}"],
        ["seconds for the batch", f"{best:.3f}", f"{base_seconds:.1f}" if base_seconds else "-", "", ""],
        ["record", fmt_bytes(rollout.record_bytes()), fmt_bytes(base_bytes) if base_bytes else "-",
         f"{record_ratio:.0f}x smaller" if record_ratio else "-", f">= {RECORD_BAR:.0f}x: {ok(checks['record_le_1_20'])}"],
        ["peak RSS after ours", fmt_bytes(peak), "", f"{fmt_bytes(peak - rss_model)} over the loaded model", ""],
    ]
    share = {k: 100.0 * split[k + "_s"] / split["total_s"] for k in ("backbone", "head", "other")}
    notes = [
        (f"ours, runs (s): {', '.join(f'{r:.3f}' for r in runs)} (best reported); "
         f"goal >= {TOKENS_PER_S_GOAL:.0f} tokens/s: {ok(checks['tokens_per_s_ge_550'])}"),
        (f"ours, time split of one run ({split['total_s']:.3f} s): backbone {share['backbone']:.0f}%, "
         f"LM head {share['head']:.0f}%, filter + sampling + bookkeeping {share['other']:.0f}%"),
    ]
    print_table(f"rollout: {describe(cfg, threads)}", ["", "ours", "baseline", "ratio", "bar"], rows, notes)
    return result
