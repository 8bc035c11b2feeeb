"""How far an approximate cache's rollouts are from the policy the trainer differentiates.

    python benchmarks/offpolicy_gap.py [--prompts 64] [--random-prompts 8] [--out gap.json]

For every setting, rollouts are drawn through the cache (the sampler records mu, the probability each
token was drawn with) and every committed token is scored by the exact policy at its rebuilt state
(pi): d = log pi - log mu (`agrpo.offpolicy`). Reported: mean d, mean |d|, quantiles of |d|, the
fraction of first-update ratios exp(d) outside the clip range [0.8, 1.2], and the fraction of tokens
committed at a block's first step (exact: the whole sequence runs there).

Part 1, a trained model: the shipped tiny:countdown on 64 held-out prompts, the training sampler
(temperature 1, low-confidence remasking, 16 tokens in 16 steps), blocks of 4 / 8 / 16, thresholds
0 / 0.5 / 0.9, prefix and dual caches.
Part 2, prompt length: a seeded random LLaDA-style model (hidden 128, 4 layers, vocabulary 512, the
LM head scaled so that draws are confident) with prompts of 16 / 64 / 256 tokens, a completion of 64,
blocks of 8 and 32.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agrpo.offpolicy import behaviour_gap, gap_summary
from agrpo.policy import Policy
from agrpo.sampling import SamplingConfig, generate


def measure(policy, ids, mask, cfg, seed):
    r = generate(policy, ids, mask, cfg, torch.Generator().manual_seed(seed))
    row = gap_summary(behaviour_gap(policy, r))
    row["tokens_per_step"] = float(r.sampled.sum()) / max(float(r.sampled.any(1).sum()), 1.0) / \
        max(float((r.step.masked_fill(~r.sampled, -1).max(1).values + 1).double().mean()), 1.0)
    return row


def trained_part(n_prompts: int, seed: int):
    from agrpo.data import encode_prompts
    from agrpo.models import load_model_and_tokenizer
    from agrpo.tasks import get_task

    model, tok = load_model_and_tokenizer("tiny:countdown", dtype="float32")
    policy = Policy(model.eval())
    task = get_task("tiny-countdown")
    rows = task.eval_examples(n_prompts)
    ids, mask = encode_prompts(tok, [task.prompt(r) for r in rows], False)
    out = []
    for cache, block, threshold in itertools.product(("prefix", "dual"), (4, 8, 16), (0.0, 0.5, 0.9)):
        cfg = SamplingConfig(gen_length=16, block_length=block, steps=16, temperature=1.0, remasking="low_confidence",
                             threshold=threshold, cache=cache)
        out.append({"model": "tiny:countdown", "prompt_len": ids.shape[1], "cache": cache, "block": block,
                    "threshold": threshold, **measure(policy, ids, mask, cfg, seed)})
        print(_line(out[-1]), flush=True)
    return out


def random_part(batch: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab, mask_id, eos_id = 512, 510, 511
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, is_causal=False, mask_token_id=mask_id, eos_token_id=eos_id, pad_token_id=eos_id,
        bos_token_id=None, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    policy = Policy(model)
    out = []
    for prompt_len, block, threshold, cache in itertools.product((16, 64, 256), (8, 32), (0.0, 0.9), ("prefix", "dual")):
        ids = torch.randint(0, 500, (batch, prompt_len), generator=torch.Generator().manual_seed(seed))
        cfg = SamplingConfig(gen_length=64, block_length=block, steps=64, temperature=1.0, remasking="low_confidence",
                             threshold=threshold, cache=cache, stop_at_eos=False)
        out.append({"model": "random", "prompt_len": prompt_len, "cache": cache, "block": block, "threshold": threshold,
                    **measure(policy, ids, torch.ones_like(ids), cfg, seed)})
        print(_line(out[-1]), flush=True)
    return out


def _line(r):
    return (f"| {r['model']} | {r['prompt_len']} | {r['cache']} | {r['block']} | {r['threshold']:g} | "
            f"{r['tokens_per_step']:.2f} | {r['first_step_share']:.2f} | {r['mean']:+.4f} | {r['mean_abs']:.4f} | "
            f"{r['p90_abs']:.4f} | {r['p99_abs']:.4f} | {100 * r['outside_clip']:.2f}% |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64, help="held-out tiny:countdown prompts (part 1)")
    ap.add_argument("--random-prompts", type=int, default=8, help="prompts of the random model (part 2)")
    ap.add_argument("--parts", default="trained,random", help="which parts: trained, random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="write every row as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    print("| model | prompt | cache | block | threshold | tokens/step | first-step share | mean d | mean abs d | "
          "p90 abs d | p99 abs d | ratio outside [0.8, 1.2] |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    parts = args.parts.split(",")
    if "trained" in parts:
        rows += trained_part(args.prompts, args.seed)
    if "random" in parts:
        rows += random_part(args.random_prompts, args.seed)
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
