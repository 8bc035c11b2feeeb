"""Rollout on a block-diffusion model: the sampler with its prefix KV cache against itself without one.

A seeded, randomly initialised Qwen3-style model (SDAR's and TraDo's layout: per-head q/k norms,
grouped-query attention, untied LM head, Qwen3's 151,936-token vocabulary) with `config.block_size`
set, so that it attends block-causally (`agrpo.blocks`) and `generate` samples it block by block.
Both samplers draw from generators of the same seed, and the cache is exact, so both must write the
same tokens: the run compares the two rollouts and reports it beside the speeds.

* cache=none (`_FullSequence`): every step runs the backbone over the whole sequence, prompt and
  completion (P + C positions), and the LM head on the positions the step scores;
* cache=prefix (`BlockCache`): the prompt and each finished block are encoded once into a key/value
  cache; every step runs the current block alone against it, the LM head on the scored positions.

Remasking is low-confidence (what SDAR and TraDo decode with), so a step scores every masked position
of its block; threshold decoding (DiPO's dynamic threshold) commits every drawn token whose probability
reaches the threshold, at least the schedule's one. A random model is far from confident, so
`block_logit_scale` multiplies its LM head to make some draws pass (the number of tokens a step is
reported). Rows never stop at EOS here: both runs write all B x C tokens.

Each sampler runs once on two blocks to warm up (allocator, kernels, the head check); the cached one
is then timed `block_repeats` times (best reported), the uncached one once (it is most of the run's
time). Forward hooks on the backbone and the LM head split each timed run (microseconds a step).

The LM head runs on the same rows in both samplers, so its time caps the ratio: at a 151,936-token
vocabulary and a few prompts the cached step reads the head's 311 MB of float32 weights (and the
backbone's 96 MB) from memory for a handful of rows, a cost that hardly grows with the batch, while
the uncached step's backbone grows with B x (P + C). `backbone_ratio` reports what the cache changes,
the backbone's time, alone.
"""

from __future__ import annotations

import dataclasses

import torch

from agrpo.bench import ModuleTimer, fmt_bytes, load_average, print_table, timed
from agrpo.errors import AgrpoError

RATIO_BAR = 10.0  # cached tokens/s against uncached, fixed schedule


def check_block_config(cfg) -> None:
    """Refuse block-model settings the model or the sampler cannot take, in one line."""
    positive = ("block_batch", "block_prompt_len", "block_gen_length", "block_size", "block_vocab", "block_hidden",
                "block_layers", "block_heads", "block_kv_heads", "block_intermediate")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise AgrpoError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.block_vocab < 3:
        raise AgrpoError(f"block_vocab must be >= 3 ([MASK], EOS and a token to sample), got {cfg.block_vocab}")
    if cfg.block_hidden % cfg.block_heads or cfg.block_heads % cfg.block_kv_heads:
        raise AgrpoError(
            f"block_heads={cfg.block_heads} must divide block_hidden={cfg.block_hidden}, and block_kv_heads="
            f"{cfg.block_kv_heads} must divide block_heads"
        )
    if cfg.block_repeats < 1:
        raise AgrpoError(f"block_repeats must be >= 1, got {cfg.block_repeats}")
    if cfg.block_temperature <= 0:
        raise AgrpoError(f"block_temperature must be > 0, got {cfg.block_temperature}")
    if not cfg.block_logit_scale > 0:
        raise AgrpoError(f"block_logit_scale must be > 0, got {cfg.block_logit_scale}")
    for threshold in {0.0, cfg.block_threshold}:
        block_sampling(cfg, "prefix", threshold).validate()


def block_sampling(cfg, cache: str, threshold: float = 0.0):
    from agrpo.sampling import SamplingConfig

    return SamplingConfig(
        gen_length=cfg.block_gen_length,
        block_length=cfg.block_size,
        steps=cfg.block_steps or cfg.block_gen_length,
        temperature=cfg.block_temperature,
        top_k=cfg.block_top_k,
        top_p=1.0,
        remasking="low_confidence",
        stop_at_eos=False,
        threshold=threshold,
        cache=cache,
    )


def build_block_model(cfg):
    """(HF model, Policy): a seeded, randomly initialised Qwen3 under block attention, float32."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from agrpo.policy import Policy

    torch.manual_seed(cfg.seed)
    vocab = cfg.block_vocab
    config = Qwen3Config(
        vocab_size=vocab,
        hidden_size=cfg.block_hidden,
        intermediate_size=cfg.block_intermediate,
        num_hidden_layers=cfg.block_layers,
        num_attention_heads=cfg.block_heads,
        num_key_value_heads=cfg.block_kv_heads,
        head_dim=cfg.block_hidden // cfg.block_heads,
        max_position_embeddings=max(4096, cfg.block_prompt_len + cfg.block_gen_length + cfg.block_size),
        tie_word_embeddings=False,
        is_causal=False,
        block_size=cfg.block_size,
        mask_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
    )
    model = Qwen3ForCausalLM(config).eval()
    if cfg.block_logit_scale != 1.0:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(cfg.block_logit_scale)
    return model, Policy(model)


def block_prompts(cfg) -> torch.Tensor:
    """[B, P] random ids below [MASK] and EOS."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    return torch.randint(0, cfg.block_vocab - 2, (cfg.block_batch, cfg.block_prompt_len), generator=gen)


def _split(timer: ModuleTimer, total: float) -> dict:
    backbone, head = timer.seconds["backbone"], timer.seconds["head"]
    return {"total_s": round(total, 4), "backbone_s": round(backbone, 4), "head_s": round(head, 4),
            "other_s": round(total - backbone - head, 4)}


def timed_generate(model, policy, prompts, sc, seed: int):
    """(rollout, seconds, split) of one timed generate with a generator of seed `seed`."""
    from agrpo.sampling import generate

    timer = ModuleTimer(backbone=model.get_decoder(), head=model.get_output_embeddings())
    try:
        gen = torch.Generator().manual_seed(seed)
        rollout, seconds = timed(lambda: generate(policy, prompts, None, sc, generator=gen))
    finally:
        timer.close()
    return rollout, seconds, _split(timer, seconds)


def _compare(cfg, model, policy, prompts, threshold: float) -> dict:
    from agrpo.sampling import generate

    seed = cfg.seed + 2
    cached_sc, plain_sc = (block_sampling(cfg, cache, threshold) for cache in ("prefix", "none"))
    for sc in (cached_sc, plain_sc):  # two blocks each: allocator, kernels, the fast-head check
        short = dataclasses.replace(sc, gen_length=2 * sc.block_length, steps=2 * sc.steps_per_block)
        generate(policy, prompts, None, short, generator=torch.Generator().manual_seed(seed))
    runs = [timed_generate(model, policy, prompts, cached_sc, seed) for _ in range(cfg.block_repeats)]
    cached, cached_s, cached_split = min(runs, key=lambda r: r[1])
    plain, plain_s, plain_split = timed_generate(model, policy, prompts, plain_sc, seed)

    tokens = cfg.block_batch * cfg.block_gen_length
    steps_taken = (cached.step.max(1).values + 1).double().mean().item()  # a row's steps are consecutive from 0
    return {
        "threshold": threshold,
        "cached_tokens_per_s": round(tokens / cached_s, 2),
        "uncached_tokens_per_s": round(tokens / plain_s, 3),
        "ratio": round(plain_s / cached_s, 2),
        # what the cache changes: the backbone's time (the LM head runs on the same rows in both)
        "backbone_ratio": round(plain_split["backbone_s"] / max(cached_split["backbone_s"], 1e-9), 2),
        "cached_s": round(cached_s, 3),
        "cached_runs_s": [round(r[1], 3) for r in runs],
        "uncached_s": round(plain_s, 2),
        "same_tokens": torch.equal(cached.tokens, plain.tokens),
        "same_steps": torch.equal(cached.step, plain.step),
        "max_logp_diff": float((cached.logp - plain.logp).abs().max()),
        "steps_per_row": round(steps_taken, 2),
        "tokens_per_step": round(cfg.block_gen_length / steps_taken, 3),
        "cached_split": cached_split,
        "uncached_split": plain_split,
    }


def describe_block(cfg, threads: int) -> str:
    load = load_average()
    steps = cfg.block_steps or cfg.block_gen_length
    head_dim = cfg.block_hidden // cfg.block_heads
    return (
        f"B={cfg.block_batch} prompt={cfg.block_prompt_len} completion={cfg.block_gen_length} block={cfg.block_size} "
        f"steps={steps} (at most) low_confidence T={cfg.block_temperature} top-k={cfg.block_top_k}; "
        f"Qwen3 hidden {cfg.block_hidden} x {cfg.block_layers} layers, {cfg.block_heads} heads "
        f"({cfg.block_kv_heads} kv, dim {head_dim}), MLP {cfg.block_intermediate}, V={cfg.block_vocab}, float32, "
        f"head x{cfg.block_logit_scale:g}; {threads} thread(s); load {' '.join(map(str, load)) if load else 'n/a'}"
    )


def run_block(cfg, threads: int) -> dict:
    """Time cache=prefix against cache=none on the block model; print a table, return the figures."""
    check_block_config(cfg)
    model, policy = build_block_model(cfg)
    prompts = block_prompts(cfg)
    modes = {"fixed": _compare(cfg, model, policy, prompts, 0.0)}
    if cfg.block_threshold:
        modes["threshold"] = _compare(cfg, model, policy, prompts, cfg.block_threshold)
    head_dim = cfg.block_hidden // cfg.block_heads
    prompt = -(-cfg.block_prompt_len // cfg.block_size) * cfg.block_size  # the sampler pads it to whole blocks
    kv_tokens = cfg.block_batch * (prompt + cfg.block_gen_length)
    kv_bytes = 2 * cfg.block_layers * cfg.block_kv_heads * head_dim * kv_tokens * 4
    fixed = modes["fixed"]
    result = {
        "config": {k: v for k, v in vars(cfg).items()
                   if (k.startswith("block_") and k != "block_length") or k in ("seed", "threads")},
        "tokens": cfg.block_batch * cfg.block_gen_length,
        "kv_cache_bytes": kv_bytes,
        "modes": modes,
        "checks": {
            "cached_ge_10x_uncached": fixed["ratio"] >= RATIO_BAR,
            "same_tokens": all(m["same_tokens"] for m in modes.values()),
        },
    }

    def share(split: dict) -> str:
        total = split["total_s"] or 1.0
        return (f"backbone {100 * split['backbone_s'] / total:.0f}%, LM head {100 * split['head_s'] / total:.0f}%, "
                f"rest {100 * split['other_s'] / total:.0f}%")

    rows, notes = [], []
    for name, m in modes.items():
        label = "1 token a step" if name == "fixed" and cfg.block_steps in (0, cfg.block_gen_length) else (
            f"{m['steps_per_row']:.0f} steps" if name == "fixed" else f"threshold {m['threshold']:g}")
        bar = f">= {RATIO_BAR:.0f}x: {'yes' if m['ratio'] >= RATIO_BAR else 'NO'}" if name == "fixed" else ""
        rows.append([label, f"{m['cached_tokens_per_s']:.1f}", f"{m['uncached_tokens_per_s']:.2f}",
                     f"{m['ratio']:.1f}x", "yes" if m["same_tokens"] and m["same_steps"] else "NO",
                     f"{m['tokens_per_step']:.2f}", bar])
        notes.append(f"{label}: cached {m['cached_s']:.2f} s (runs {', '.join(f'{r:.2f}' for r in m['cached_runs_s'])}; "
                     f"{share(m['cached_split'])}), uncached {m['uncached_s']:.1f} s ({share(m['uncached_split'])}); "
                     f"backbone alone {m['backbone_ratio']:.1f}x faster cached; max |logp difference| {m['max_logp_diff']:.1e}")
    notes.append(f"KV cache of the batch at the last block: {fmt_bytes(kv_bytes)} "
                 f"(2 x {cfg.block_layers} layers x {cfg.block_kv_heads} kv heads x {head_dim} x "
                 f"{kv_tokens} tokens x 4 bytes)")
    print_table(f"rollout, block model: {describe_block(cfg, threads)}",
                ["", "cached tokens/s", "uncached tokens/s", "ratio", "same tokens", "tokens a step", "bar"],
                rows, notes)
    return result
