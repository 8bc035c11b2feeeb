"""Speed benchmarks: our sampler and AGRPO loss against straightforward versions, in one run.

`run_rollout(json_out, **overrides)` and `run_loss(json_out, **overrides)` build the same
seeded tiny bidirectional Llama with LLaDA's vocabulary (126,464 tokens, [MASK] 126336,
EOS 126081), time ours and the baseline of `agrpo.bench.baseline` on the same inputs, print
a table (and, with json_out, one JSON object as the last line) and return the figures.
The rollout bench has two more parts, each with its own settings: a block-diffusion model's
exact prefix cache (`block_*`, `agrpo.bench.block`) and a bidirectional model's approximate
prefix and dual caches with their off-policy gap (`cache_*`, `agrpo.bench.cache`).

Overrides are the fields of `BenchConfig`; values given as strings (from a command line)
are converted to the field's type.

Threads default to 1. On this kind of machine (2 cores shared with other jobs) the
sampler ran at 20 tokens/s with 2 OpenMP threads while another process kept both cores
busy, against 440 tokens/s with 1 thread: a parallel region of a few microseconds waits
for a thread the kernel has descheduled (OMP_WAIT_POLICY=passive, set before torch starts,
brought 2 threads back to 378 tokens/s). One thread gives figures that survive a busy
machine; `threads=2` measures both cores when they are free, `threads=0` keeps torch's setting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field

import torch

from agrpo.errors import AgrpoError


@dataclass
class BenchConfig:
    batch: int = field(default=8, metadata={"help": "completions per batch B"})
    prompt_len: int = field(default=32, metadata={"help": "prompt tokens P"})
    gen_length: int = field(default=64, metadata={"help": "completion tokens C"})
    steps: int = field(default=32, metadata={"help": "denoising steps T"})
    block_length: int = field(default=16, metadata={"help": "semi-autoregressive block length"})
    top_k: int = field(default=150, metadata={"help": "top-k of the sampling filter"})
    top_p: float = field(default=0.99, metadata={"help": "top-p of the sampling filter"})
    temperature: float = field(default=0.6, metadata={"help": "sampling temperature (> 0)"})
    remasking: str = field(default="random", metadata={"help": "random, low_confidence, entropy or margin"})
    vocab: int = field(default=126464, metadata={"help": "vocabulary size (LLaDA's by default)"})
    mask_id: int = field(default=126336, metadata={"help": "[MASK] id"})
    eos_id: int = field(default=126081, metadata={"help": "EOS id"})
    hidden: int = field(default=128, metadata={"help": "hidden size of the tiny Llama"})
    layers: int = field(default=2, metadata={"help": "transformer layers"})
    heads: int = field(default=4, metadata={"help": "attention heads"})
    intermediate: int = field(default=256, metadata={"help": "MLP width"})
    seed: int = field(default=0, metadata={"help": "seed of the model, prompts and samplers"})
    repeats: int = field(default=3, metadata={"help": "timed runs of ours after one warm-up (best is reported)"})
    threads: int = field(default=1, metadata={"help": "torch intra-op threads; 0 = leave as set"})
    num_samples: int = field(default=8, metadata={"help": "loss: sampled steps K per row"})
    perturb: float = field(default=5e-3, metadata={"help": "loss: std of the noise added to the weights after the rollout"})
    baseline: bool = field(default=True, metadata={"help": "also time the straightforward version"})
    # rollout on a block-diffusion model: the cached sampler against the uncached one (agrpo.bench.block)
    bidirectional: bool = field(default=True, metadata={"help": "rollout: time the sampler on the bidirectional Llama"})
    block: bool = field(default=True, metadata={"help": "rollout: time cache=prefix against cache=none on a block model"})
    block_batch: int = field(default=8, metadata={"help": "block: prompts B (the cached sampler's LM head costs the same per token in both samplers: the ratio grows with B)"})
    block_prompt_len: int = field(default=256, metadata={"help": "block: prompt tokens P"})
    block_gen_length: int = field(default=256, metadata={"help": "block: completion tokens C"})
    block_size: int = field(default=4, metadata={"help": "block: tokens per block (SDAR's 4)"})
    block_steps: int = field(default=0, metadata={"help": "block: denoising steps; 0 = block_gen_length (1 token a step)"})
    block_threshold: float = field(
        default=0.0, metadata={"help": "block: also compare under threshold decoding at this threshold (0.9: DiPO's); 0 = skip"})
    block_temperature: float = field(default=1.0, metadata={"help": "block: sampling temperature (> 0)"})
    block_top_k: int = field(default=50, metadata={"help": "block: top-k of the sampling filter (0 = off)"})
    block_vocab: int = field(default=151936, metadata={"help": "block: vocabulary (Qwen3's, as SDAR / TraDo); [MASK], EOS = the last two ids"})
    block_hidden: int = field(default=512, metadata={"help": "block: hidden size of the Qwen3-style model"})
    block_layers: int = field(default=8, metadata={"help": "block: transformer layers"})
    block_heads: int = field(default=8, metadata={"help": "block: attention heads (head_dim = hidden / heads)"})
    block_kv_heads: int = field(default=2, metadata={"help": "block: key/value heads (grouped-query attention)"})
    block_intermediate: int = field(default=1536, metadata={"help": "block: MLP width"})
    block_repeats: int = field(default=1, metadata={"help": "block: timed runs of the cached sampler (best reported); "
                                                       "the uncached one runs once"})
    block_logit_scale: float = field(
        default=120.0, metadata={"help": "block: multiplies the random LM head, whose draws are otherwise far below any "
                                 "threshold (120: about 2 tokens a step at threshold 0.9)"})
    # rollout on a bidirectional model through the approximate caches prefix and dual (agrpo.bench.cache)
    cache: bool = field(default=True, metadata={"help": "rollout: time cache=prefix, dual and dual + threshold against "
                                                "cache=none on a LLaDA-style bidirectional model, and their off-policy gap"})
    cache_batch: int = field(default=8, metadata={"help": "cache: prompts B (the uncached run, most of the part's time, "
                                                   "grows with B: about 10 minutes at B=8 on one thread)"})
    cache_prompt_len: int = field(default=256, metadata={"help": "cache: prompt tokens P"})
    cache_gen_length: int = field(default=256, metadata={"help": "cache: completion tokens C"})
    cache_block_length: int = field(default=32, metadata={"help": "cache: semi-autoregressive block length"})
    cache_steps: int = field(default=0, metadata={"help": "cache: denoising steps (at most, under the threshold); "
                                                   "0 = cache_gen_length (1 token a step)"})
    cache_threshold: float = field(
        default=0.9, metadata={"help": "cache: threshold of the dual + threshold mode (confidence-threshold decoding); "
                               "0 = skip that mode"})
    cache_remasking: str = field(default="random", metadata={
        "help": "cache: remasking of the fixed-schedule modes (low_confidence: the LM head ranks every masked position "
                "of the block each step; random: it runs on the committed ones only); threshold decoding is always "
                "low_confidence"})
    cache_temperature: float = field(default=1.0, metadata={"help": "cache: sampling temperature (> 0)"})
    cache_top_k: int = field(default=50, metadata={"help": "cache: top-k of the sampling filter (0 = off)"})
    cache_vocab: int = field(default=126464, metadata={"help": "cache: vocabulary (LLaDA's by default)"})
    cache_mask_id: int = field(default=126336, metadata={"help": "cache: [MASK] id (LLaDA's)"})
    cache_eos_id: int = field(default=126081, metadata={"help": "cache: EOS id (never stops a row here)"})
    cache_hidden: int = field(default=512, metadata={"help": "cache: hidden size of the bidirectional Llama"})
    cache_layers: int = field(default=8, metadata={"help": "cache: transformer layers"})
    cache_heads: int = field(default=8, metadata={"help": "cache: attention heads, as many key/value heads (LLaDA)"})
    cache_intermediate: int = field(default=1536, metadata={"help": "cache: MLP width"})
    cache_repeats: int = field(default=1, metadata={"help": "cache: timed runs of each cached mode (best reported); "
                                                     "cache=none runs once"})
    cache_logit_scale: float = field(
        default=50.0, metadata={"help": "cache: multiplies the random LM head (every mode), whose draws are otherwise "
                                "far below any threshold (50: about 3 tokens a step at threshold 0.9)"})
    cache_gap_states: int = field(
        default=64, metadata={"help": "cache: (row, step) states of each cached rollout scored by the exact policy for "
                              "the off-policy gap, a random subset (one whole-sequence forward each); 0 = every state"})
    cache_gap_batch: int = field(default=4, metadata={"help": "cache: states scored a forward (one thread: 0.33 s a state "
                                                       "at 2 or 4 a forward, 0.44 s at 8)"})


def make_config(overrides: dict) -> BenchConfig:
    fields = {f.name: f for f in dataclasses.fields(BenchConfig)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise AgrpoError(f"unknown benchmark setting(s) {', '.join(unknown)}: choose from {', '.join(fields)}")
    values = {}
    for name, value in overrides.items():
        kind = type(fields[name].default)
        if isinstance(value, str) and kind is not str:
            if kind is bool:
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise AgrpoError(f"{name} must be true or false, got {value!r}")
                value = value.lower() in ("1", "true", "yes")
            else:
                try:
                    value = kind(value)
                except ValueError:
                    raise AgrpoError(f"{name} must be a {kind.__name__}, got {value!r}") from None
        values[name] = value
    cfg = BenchConfig(**values)
    if cfg.temperature <= 0:
        raise AgrpoError("the benchmarks sample with temperature > 0 (the loss needs a stochastic policy)")
    if cfg.repeats < 1:
        raise AgrpoError(f"repeats must be >= 1, got {cfg.repeats}")
    if not (0 <= cfg.mask_id < cfg.vocab and 0 <= cfg.eos_id < cfg.vocab):
        raise AgrpoError(f"mask_id and eos_id must be below vocab={cfg.vocab}")
    sampling_config(cfg).validate()
    return cfg


def sampling_config(cfg: BenchConfig):
    from agrpo.sampling import SamplingConfig

    return SamplingConfig(
        gen_length=cfg.gen_length,
        block_length=cfg.block_length,
        steps=cfg.steps,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        remasking=cfg.remasking,
    )


def bidirectional_llama(seed: int, vocab: int, hidden: int, intermediate: int, layers: int, heads: int,
                        positions: int, mask_id: int, eos_id: int, logit_scale: float = 1.0):
    """(HF model, Policy): a seeded, randomly initialised bidirectional Llama (as many key/value heads as heads,
    untied head, multiplied by `logit_scale`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from agrpo.policy import Policy

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=positions, is_causal=False,
        tie_word_embeddings=False, mask_token_id=mask_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )
    model = LlamaForCausalLM(config).eval()
    if logit_scale != 1.0:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(logit_scale)
    return model, Policy(model)


def build_model(cfg: BenchConfig):
    """(HF model, Policy): the seeded, randomly initialised bidirectional Llama of the first part."""
    return bidirectional_llama(cfg.seed, cfg.vocab, cfg.hidden, cfg.intermediate, cfg.layers, cfg.heads,
                               max(256, cfg.prompt_len + cfg.gen_length), cfg.mask_id, cfg.eos_id)


def make_prompts(cfg: BenchConfig) -> torch.Tensor:
    """[B, P] random ids below the special tokens, so no prompt holds [MASK] or EOS."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    high = min(cfg.mask_id, cfg.eos_id)
    return torch.randint(0, max(high, 1), (cfg.batch, cfg.prompt_len), generator=gen)


@contextlib.contextmanager
def thread_scope(threads: int):
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def peak_rss_bytes() -> int:
    """Peak resident set of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def load_average() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def timed(fn):
    """(result, seconds) of fn()."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


class ModuleTimer:
    """Wall time spent inside modules' forwards (exact on CPU, where kernels run synchronously)."""

    def __init__(self, **modules):
        self.seconds = {name: 0.0 for name in modules}
        self._handles = []
        for name, module in modules.items():
            self._handles.append(module.register_forward_pre_hook(self._start(name)))
            self._handles.append(module.register_forward_hook(self._stop(name)))
        self._t0 = {}

    def _start(self, name):
        def hook(module, args):
            self._t0[name] = time.perf_counter()

        return hook

    def _stop(self, name):
        def hook(module, args, output):
            self.seconds[name] += time.perf_counter() - self._t0.pop(name)

        return hook

    def close(self):
        for h in self._handles:
            h.remove()


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} GB"


def print_table(title: str, header: list[str], rows: list[list[str]], notes: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(title)
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    for n in notes:
        print(n)


def emit(result: dict, json_out: bool) -> dict:
    if json_out:
        print(json.dumps(result, sort_keys=False), flush=True)
    return result


def describe(cfg: BenchConfig, threads: int) -> str:
    load = load_average()
    return (
        f"B={cfg.batch} prompt={cfg.prompt_len} completion={cfg.gen_length} steps={cfg.steps} "
        f"block={cfg.block_length} top-k={cfg.top_k} top-p={cfg.top_p} T={cfg.temperature} "
        f"{cfg.remasking}; Llama hidden {cfg.hidden} x {cfg.layers} layers, V={cfg.vocab}; "
        f"{threads} thread(s); load {' '.join(map(str, load)) if load else 'n/a'}"
    )


def describe_settings() -> str:
    """Every setting of `BenchConfig`: name, default, help (what `--help` prints)."""
    from agrpo.config import describe_config

    return describe_config(BenchConfig)


def script_main(name: str, argv: list[str]) -> dict | None:
    """`[--json] [key=value ...]` -> run the named benchmark (for the scripts in benchmarks/); `--help` lists
    the settings. A mistake in the settings prints one line on stderr and exits with status 2, as `agrpo` does."""
    if any(arg in ("-h", "--help") for arg in argv):
        print(f"python benchmarks/{name}.py [--json] [key=value ...]\n")
        print(describe_settings())
        return None
    try:
        return run_named(name, argv)
    except AgrpoError as err:
        print(f"benchmarks/{name}.py: error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def run_named(name: str, argv: list[str]) -> dict:
    """Run benchmark `name` ("rollout" or "loss") with `[--json] [key=value ...]` arguments."""
    json_out = "--json" in argv
    overrides = {}
    for arg in argv:
        if arg == "--json":
            continue
        key, sep, value = arg.partition("=")
        if not sep:
            raise AgrpoError(f"expected key=value or --json, got {arg!r}")
        overrides[key.strip().replace("-", "_")] = value
    run = __getattr__(f"run_{name}")
    return run(json_out, **overrides)


def __getattr__(name):
    # the runners import transformers and the objectives: load them when asked for
    if name == "run_rollout":
        from agrpo.bench.rollout import run_rollout

        return run_rollout
    if name == "run_loss":
        from agrpo.bench.loss import run_loss

        return run_loss
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BenchConfig", "run_loss", "run_rollout"]
