"""Rollout on a bidirectional model through Fast-dLLM's approximate caches: their speed, and the off-policy
gap of what they record.

A seeded, randomly initialised LLaDA-style model: a transformers `LlamaForCausalLM` with `is_causal=False`,
hidden 512, 8 layers, 8 heads (no grouped-query attention, as LLaDA), MLP 1536, untied LM head, LLaDA's
vocabulary (126,464 tokens, [MASK] 126336, EOS 126081), float32. Each of 8 rows samples a completion of
256 tokens after a prompt of 256 random tokens, in blocks of 32, one token a step, random remasking
(`cache_remasking`), T 1.0, top-k 50, no early stop (every row writes every token). Four modes, each from
a generator of the same seed (`agrpo.sampling.generate`, `SamplingConfig.cache`):

* `none` (`_FullSequence`): every step runs the whole sequence (P + C positions);
* `prefix` (`BidirectionalCache`): a block's first step runs the whole sequence and keeps the keys and
  values of the positions before the block; its later steps run the block and everything after it;
* `dual`: the first step keeps the keys and values after the block too; later steps run the block alone;
* `dual + threshold`: `dual` under confidence-threshold decoding (`cache_threshold`, 0.9): a step commits
  every masked token of the block drawn with probability >= the threshold, at least one. A random model is
  far from confident, so `cache_logit_scale` multiplies its LM head (50: about 3 tokens a step at 0.9 on
  this model); the head is scaled for every mode, so the fixed-schedule modes see the same model.

The cached keys and values were computed while the block was still masked, so the cached modes draw from
an approximation mu of the policy pi (`Rollout.approximate`); `Rollout.logp` is mu's log-prob. For each
cached mode the run measures the gap an objective faces at its first update: for committed tokens,
d = log pi(token | x_t) - recorded log-prob, pi being the exact policy (`Policy.forward` over the whole
rebuilt state x_t, `rebuild_states`) under the recorded top-k filter, as the objectives compute the ratio.
It reports the mean of d, of |d|, the quantiles p50, p90, p99 of |d|, the fraction of tokens whose ratio
exp(d) is outside the clip range [0.8, 1.2], and the share of tokens committed at their block's first step
(which runs the whole sequence: exact, d is rounding). Scoring a state costs one whole-sequence forward, so
only a random subset of `cache_gap_states` (row, step) states of each rollout is scored (64 by default,
0 = every state: as long as the `none` run), `cache_gap_batch` states a forward; the table says how many.

Each mode runs once to warm up on a short schedule (two steps a block: the full and the cached forward);
`none` is then timed once (it is most of the run's time), the cached modes `cache_repeats` times (best
reported). Forward hooks on the backbone and the LM head split each timed run.

Acceptance bars (the issue's; ratios of tokens/s within one run, reported pass/fail in the table):
prefix >= 3x and dual + threshold >= 5x the tokens/s of `none`.

Every mode runs the LM head on the same positions, and at LLaDA's vocabulary on a model of hidden 512 the
head costs about 2.4 tokens' worth of backbone a scored position (65M multiply-adds against 27M), where on
LLaDA-8B it costs 0.07 of one. With random remasking the committed positions are drawn first and the head
runs on them alone; with low-confidence remasking (`cache_remasking=low_confidence`) it runs on every masked
position of the block at every step of every mode, and that shared cost caps the ratios (measured: prefix
2.27x, dual 3.66x at B = 2, the head 12% of the uncached time and 42% of the dual one). Threshold decoding
ranks by confidence, so it always runs the head on every position of the block; its ratio is taken against
the `none` mode of the fixed schedule, the faster baseline under random remasking. Batches of 8 keep the
cached chunks' matrix products about as efficient per token as the whole sequence's (at B = 2 a 32-token
chunk costs 1.9x the per-token time of the whole sequence).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

import torch

from agrpo.bench import load_average, print_table
from agrpo.bench.block import timed_generate
from agrpo.errors import AgrpoError
from agrpo.offpolicy import CLIP_EPS, behaviour_gap, block_first_step, gap_summary

PREFIX_BAR = 3.0  # prefix tokens/s against none, fixed schedule
THRESHOLD_BAR = 5.0  # dual + threshold tokens/s against none


def check_cache_config(cfg) -> None:
    """Refuse settings of the cache part the model or the sampler cannot take, in one line."""
    positive = ("cache_batch", "cache_prompt_len", "cache_gen_length", "cache_block_length", "cache_vocab",
                "cache_hidden", "cache_layers", "cache_heads", "cache_intermediate", "cache_repeats", "cache_gap_batch")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise AgrpoError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("cache_steps", "cache_gap_states", "cache_top_k"):
        if getattr(cfg, name) < 0:
            raise AgrpoError(f"{name} must be >= 0 (0 = {'off' if name == 'cache_top_k' else 'all'}), "
                             f"got {getattr(cfg, name)}")
    if cfg.cache_vocab < 3:
        raise AgrpoError(f"cache_vocab must be >= 3 ([MASK], EOS and a token to sample), got {cfg.cache_vocab}")
    ids = (cfg.cache_mask_id, cfg.cache_eos_id)
    if not all(0 <= i < cfg.cache_vocab for i in ids) or ids[0] == ids[1]:
        raise AgrpoError(f"cache_mask_id={ids[0]} and cache_eos_id={ids[1]} must be two different ids below "
                         f"cache_vocab={cfg.cache_vocab}")
    if cfg.cache_hidden % cfg.cache_heads or (cfg.cache_hidden // cfg.cache_heads) % 2:
        raise AgrpoError(f"cache_heads={cfg.cache_heads} must divide cache_hidden={cfg.cache_hidden} into heads of "
                         "an even width (rotary embeddings rotate pairs)")
    if not (cfg.cache_temperature > 0 and math.isfinite(cfg.cache_temperature)):
        raise AgrpoError(f"cache_temperature must be > 0 (the gap compares stochastic policies), got "
                         f"{cfg.cache_temperature}")
    if not (cfg.cache_logit_scale > 0 and math.isfinite(cfg.cache_logit_scale)):
        raise AgrpoError(f"cache_logit_scale must be > 0, got {cfg.cache_logit_scale}")
    try:
        for threshold in {0.0, cfg.cache_threshold}:
            cache_sampling(cfg, "dual", threshold).validate()
    except AgrpoError as e:  # the sampler names its own fields: name the settings of this part
        message = re.sub(r"\b(gen_length|block_length|steps|threshold|top_k|temperature|remasking)=", r"cache_\1=",
                         str(e))
        raise AgrpoError(f"cache part: {message} (the cache_* settings)") from None


def cache_sampling(cfg, cache: str, threshold: float = 0.0):
    from agrpo.sampling import SamplingConfig

    return SamplingConfig(
        gen_length=cfg.cache_gen_length,
        block_length=cfg.cache_block_length,
        steps=cfg.cache_steps or cfg.cache_gen_length,
        temperature=cfg.cache_temperature,
        top_k=cfg.cache_top_k,
        top_p=1.0,
        remasking="low_confidence" if threshold else cfg.cache_remasking,
        stop_at_eos=False,
        threshold=threshold,
        cache=cache,
    )


def build_cache_model(cfg):
    """(HF model, Policy): a seeded, randomly initialised LLaDA-style bidirectional Llama, float32."""
    from agrpo.bench import bidirectional_llama

    return bidirectional_llama(cfg.seed, cfg.cache_vocab, cfg.cache_hidden, cfg.cache_intermediate, cfg.cache_layers,
                               cfg.cache_heads, max(4096, cfg.cache_prompt_len + cfg.cache_gen_length),
                               cfg.cache_mask_id, cfg.cache_eos_id, cfg.cache_logit_scale)


def cache_prompts(cfg) -> torch.Tensor:
    """[B, P] random ids other than [MASK] and EOS."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    allowed = torch.ones(cfg.cache_vocab, dtype=torch.bool)
    allowed[[cfg.cache_mask_id, cfg.cache_eos_id]] = False
    ids = allowed.nonzero().squeeze(1)
    return ids[torch.randint(0, ids.numel(), (cfg.cache_batch, cfg.cache_prompt_len), generator=gen)]


# ---------------------------------------------------------------------------
# The off-policy gap: exact log-probs at the rebuilt states against the recorded ones
# ---------------------------------------------------------------------------


# ---------------------------------------------------------------------------
# The timed runs
# ---------------------------------------------------------------------------


def _warm_up(policy, prompts, sc, seed: int) -> None:
    """Two steps a block (the whole-sequence and the cached forward) at the timed sizes: allocator, kernels,
    the fast-head check."""
    from agrpo.sampling import generate

    blocks = sc.gen_length // sc.block_length
    per_block = 2 if sc.steps_per_block >= 2 and sc.block_length % 2 == 0 else sc.steps_per_block
    short = dataclasses.replace(sc, steps=blocks * per_block)
    generate(policy, prompts, None, short, generator=torch.Generator().manual_seed(seed))


def mode_configs(cfg) -> dict:
    modes = {"none": cache_sampling(cfg, "none"), "prefix": cache_sampling(cfg, "prefix"),
             "dual": cache_sampling(cfg, "dual")}
    if cfg.cache_threshold:
        modes["dual_threshold"] = cache_sampling(cfg, "dual", cfg.cache_threshold)
    return modes


def describe_cache(cfg, threads: int) -> str:
    load = load_average()
    steps = cfg.cache_steps or cfg.cache_gen_length
    return (
        f"B={cfg.cache_batch} prompt={cfg.cache_prompt_len} completion={cfg.cache_gen_length} "
        f"block={cfg.cache_block_length} steps={steps} {cfg.cache_remasking} remasking (threshold: low_confidence) "
        f"T={cfg.cache_temperature} "
        f"top-k={cfg.cache_top_k}; bidirectional Llama hidden {cfg.cache_hidden} x {cfg.cache_layers} layers, "
        f"{cfg.cache_heads} heads, MLP {cfg.cache_intermediate}, V={cfg.cache_vocab}, float32, "
        f"head x{cfg.cache_logit_scale:g}; {threads} thread(s); load {' '.join(map(str, load)) if load else 'n/a'}"
    )


def run_cache(cfg, threads: int) -> dict:
    """Time cache=none, prefix, dual and dual + threshold on the bidirectional model, score the cached
    rollouts' off-policy gap; print two tables, return the figures."""
    check_cache_config(cfg)
    model, policy = build_cache_model(cfg)
    prompts = cache_prompts(cfg)
    seed = cfg.seed + 2
    configs = mode_configs(cfg)
    for sc in configs.values():
        _warm_up(policy, prompts, sc, seed)

    tokens = cfg.cache_batch * cfg.cache_gen_length
    rollouts, modes, best = {}, {}, {}
    for name, sc in configs.items():
        repeats = 1 if name == "none" else cfg.cache_repeats
        runs = [timed_generate(model, policy, prompts, sc, seed) for _ in range(repeats)]
        rollout, seconds, split = min(runs, key=lambda r: r[1])
        rollouts[name], best[name] = rollout, seconds
        steps_taken = (rollout.step.max(1).values + 1).double().mean().item()  # a row's steps run from 0
        modes[name] = {
            "cache": sc.cache,
            "threshold": sc.threshold,
            "tokens_per_s": round(tokens / seconds, 3),
            "seconds": round(seconds, 3),
            "runs_s": [round(r[1], 3) for r in runs],
            "steps_per_row": round(steps_taken, 2),
            "tokens_per_step": round(cfg.cache_gen_length / steps_taken, 3),
            "split": split,
            "first_step_share": round(float(block_first_step(rollout).double().mean()), 4),
            "approximate": rollout.approximate,
        }
    none = rollouts["none"]
    for name, m in modes.items():
        m["ratio"] = round(best["none"] / best[name], 2)
        # what the cache changes, the backbone's time alone (the LM head runs on the same rows in every mode)
        m["backbone_ratio"] = round(modes["none"]["split"]["backbone_s"] / max(m["split"]["backbone_s"], 1e-9), 2)
        r = rollouts[name]
        m["same_tokens_as_none"] = torch.equal(r.tokens, none.tokens) and torch.equal(r.step, none.step)

    gen = torch.Generator().manual_seed(cfg.seed + 3)
    for name in configs:
        if name == "none":
            continue
        start = time.perf_counter()
        gap = behaviour_gap(policy, rollouts[name], cfg.cache_gap_states, cfg.cache_gap_batch, gen)
        modes[name]["gap"] = {**gap_summary(gap), "seconds": round(time.perf_counter() - start, 2)}

    threshold = modes.get("dual_threshold")
    result = {
        "config": {k: v for k, v in vars(cfg).items() if k.startswith("cache") or k in ("seed", "threads")},
        "tokens": tokens,
        "clip_range": [1 - CLIP_EPS, 1 + CLIP_EPS],
        "modes": modes,
        "checks": {
            "prefix_ge_3x": modes["prefix"]["ratio"] >= PREFIX_BAR,
            "dual_threshold_ge_5x": threshold["ratio"] >= THRESHOLD_BAR if threshold else None,
        },
    }
    _print(cfg, threads, result)
    return result


def _label(name: str, m: dict) -> str:
    return f"dual + threshold {m['threshold']:g}" if name == "dual_threshold" else name


def _print(cfg, threads: int, result: dict) -> None:
    modes, checks = result["modes"], result["checks"]
    bars = {"prefix": (PREFIX_BAR, checks["prefix_ge_3x"]),
            "dual_threshold": (THRESHOLD_BAR, checks["dual_threshold_ge_5x"])}

    def pct(m, key):
        return f"{100 * m['split'][key] / (m['split']['total_s'] or 1.0):.0f}%"

    rows, notes = [], []
    for name, m in modes.items():
        bar = ""
        if name in bars and bars[name][1] is not None:
            bar = f">= {bars[name][0]:.0f}x: {'yes' if bars[name][1] else 'NO'}"
        rows.append([_label(name, m), f"{m['tokens_per_s']:.2f}", f"{m['ratio']:.2f}x", f"{m['backbone_ratio']:.2f}x",
                     f"{m['tokens_per_step']:.2f}",
                     pct(m, "backbone_s"), pct(m, "head_s"), pct(m, "other_s"),
                     "yes" if m["same_tokens_as_none"] else "no", bar])
        notes.append(f"{_label(name, m)}: {m['seconds']:.2f} s (runs {', '.join(f'{r:.2f}' for r in m['runs_s'])}), "
                     f"{m['steps_per_row']:.0f} steps a row, {100 * m['first_step_share']:.1f}% of the tokens "
                     "committed at a block's first step (the whole sequence runs: exact)")
    notes.append("same tokens as none: only expected with one step a block (cache_steps = blocks), where every step "
                 "of a cached mode runs the whole sequence")
    print_table(f"rollout, approximate caches of a bidirectional model: {describe_cache(cfg, threads)}",
                ["", "tokens/s", "vs none", "backbone vs none", "tokens a step", "backbone", "LM head", "rest",
                 "same tokens as none",
                 "bar"],
                rows, notes)

    lo, hi = result["clip_range"]
    rows = []
    for name, m in modes.items():
        g = m.get("gap")
        if g is None:
            continue
        if not g["tokens"]:
            rows.append([_label(name, m), f"{g['states']}/{g['states_total']}", "0"] + ["-"] * 7)
            continue
        rows.append([_label(name, m), f"{g['states']}/{g['states_total']}", str(g["tokens"]), f"{g['mean']:+.2e}",
                     f"{g['mean_abs']:.2e}", f"{g['p50_abs']:.2e}", f"{g['p90_abs']:.2e}", f"{g['p99_abs']:.2e}",
                     f"{100 * g['outside_clip']:.1f}%", f"{100 * g['first_step_share']:.1f}%"])
    sampled = "every (row, step) state" if not cfg.cache_gap_states else (
        f"a random subset of at most {cfg.cache_gap_states} (row, step) states a mode (cache_gap_states; 0 = all)")
    notes = [(f"d = log pi_exact(token | rebuilt x_t) - recorded log-prob, pi_exact the whole-sequence forward under "
              f"the recorded filter (the objectives' first-update ratio is exp(d)); scored on {sampled}, every token "
              f"each committed; outside clip: exp(d) outside [{lo:g}, {hi:g}]")]
    notes += [f"{_label(name, m)}: mean |d| over tokens after a block's first step "
              f"{m['gap']['mean_abs_later_steps']:.2e}, max |d| {m['gap']['max_abs']:.2e}; scoring took {m['gap']['seconds']:.1f} s"
              for name, m in modes.items() if m.get("gap", {}).get("tokens")]
    print()
    print_table("off-policy gap of the cached rollouts against the exact policy",
                ["", "states", "tokens", "mean d", "mean |d|", "p50 |d|", "p90 |d|", "p99 |d|",
                 f"outside [{lo:g}, {hi:g}]", "first-step tokens"], rows, notes)
