"""Loss benchmark: `agrpo_loss` + backward against the straightforward loss, same run.

One rollout of ours; the weights are then nudged (`perturb`) so that ratios move off 1 and
the clip engages, as in a second inner PPO iteration. Both losses score the same StepPlan
(K sampled steps per row, drawn once with `plan_steps`), so they must agree: the loss values
and the gradients are compared before any timing is reported.
"""

from __future__ import annotations

import torch

from agrpo.bench import (
    build_model,
    describe,
    emit,
    load_average,
    make_config,
    make_prompts,
    peak_rss_bytes,
    print_table,
    sampling_config,
    thread_scope,
    timed,
)
from agrpo.bench.baseline import naive_agrpo_loss
from agrpo.objectives.agrpo import agrpo_loss, plan_steps
from agrpo.sampling import generate

SPEEDUP_BAR = 3.0
SPEEDUP_GOAL = 8.0
LOSS_RTOL = 1e-4
GRAD_RTOL = 1e-3  # max |g_ours - g_base| / max |g_base|: different reduction orders, float32


def run_loss(json_out: bool = False, **overrides) -> dict:
    cfg = make_config(overrides)
    with thread_scope(cfg.threads) as threads:
        return _run(cfg, threads, json_out)


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def _run(cfg, threads: int, json_out: bool) -> dict:
    model, policy = build_model(cfg)
    prompts = make_prompts(cfg)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    rollout = generate(policy, prompts, None, sampling_config(cfg), generator=gen)
    if cfg.perturb > 0:
        noise = torch.Generator().manual_seed(cfg.seed + 4)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=noise) * cfg.perturb)
    advantages = torch.randn(cfg.batch, generator=gen)
    advantages = advantages - advantages.mean()
    plan = plan_steps(rollout, cfg.num_samples, generator=gen)

    def ours():
        model.zero_grad(set_to_none=True)
        loss, metrics = agrpo_loss(policy, rollout, advantages, num_samples=cfg.num_samples, plan=plan)
        loss.backward()
        return metrics

    ours()  # warm-up
    runs = []
    for _ in range(cfg.repeats):
        metrics, seconds = timed(ours)
        runs.append(seconds)
    peak = peak_rss_bytes()
    best = min(runs)
    ours_grads = _grads(model)

    base_seconds = base_loss = grad_err = None
    if cfg.baseline:
        model.zero_grad(set_to_none=True)
        base_loss, base_seconds = timed(
            lambda: naive_agrpo_loss(model, rollout, advantages, plan, cfg.num_samples)
        )
        base_grads = _grads(model)
        scale = max(float(g.abs().max()) for g in base_grads) or 1.0
        grad_err = max(float((a - b).abs().max()) for a, b in zip(ours_grads, base_grads)) / scale
        if abs(base_loss - metrics["loss"]) > LOSS_RTOL * max(abs(base_loss), 1e-6) or grad_err > GRAD_RTOL:
            raise RuntimeError(
                f"the two losses disagree (ours {metrics['loss']:.8g}, baseline {base_loss:.8g}, "
                f"relative gradient difference {grad_err:.2e}): the timing comparison would be meaningless"
            )
        model.zero_grad(set_to_none=True)

    speedup = base_seconds / best if base_seconds else None
    result = {
        "benchmark": "loss",
        "config": {k: v for k, v in vars(cfg).items() if k not in ("bidirectional", "block") and not k.startswith("block_")},
        "threads": threads,
        "load_avg": load_average(),
        "samples": metrics["samples"],
        "loss_tokens": metrics["loss_tokens"],
        "step_s": round(best, 4),
        "runs_s": [round(r, 4) for r in runs],
        "baseline_step_s": round(base_seconds, 3) if base_seconds else None,
        "speedup": round(speedup, 1) if speedup else None,
        "loss": metrics["loss"],
        "baseline_loss": base_loss,
        "grad_rel_diff": grad_err,
        "ratio_mean": metrics["ratio_mean"],
        "clip_frac": metrics["clip_frac"],
        "peak_rss_bytes": peak,
        "checks": {
            "speedup_ge_3x": speedup >= SPEEDUP_BAR if speedup else None,
            "speedup_ge_8x": speedup >= SPEEDUP_GOAL if speedup else None,
        },
    }

    def ok(flag):
        return "-" if flag is None else ("yes" if flag else "NO")

    rows = [
        ["forward + backward (s)", f"{best:.3f}", f"{base_seconds:.2f}" if base_seconds else "-",
         f"{speedup:.1f}x faster" if speedup else "-",
         f">= {SPEEDUP_BAR:.0f}x: {ok(result['checks']['speedup_ge_3x'])}, "
         f">= {SPEEDUP_GOAL:.0f}x: {ok(result['checks']['speedup_ge_8x'])}"],
        ["loss", f"{metrics['loss']:.6g}", f"{base_loss:.6g}" if base_loss is not None else "-",
         f"grad diff {grad_err:.1e}" if grad_err is not None else "", ""],
    ]
    notes = [
        f"K={cfg.num_samples} steps per row: {metrics['samples']} sampled states, {metrics['loss_tokens']} tokens; "
        f"ratio mean {metrics['ratio_mean']:.4f}, clip fraction {metrics['clip_frac']:.3f} (weights perturbed by {cfg.perturb})",
        f"ours, runs (s): {', '.join(f'{r:.3f}' for r in runs)} (best reported)",
    ]
    print_table(f"loss: {describe(cfg, threads)}", ["", "ours", "baseline", "ratio", "bar"], rows, notes)
    return emit(result, json_out)
