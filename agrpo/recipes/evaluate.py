"""Held-out accuracy of one or more models on a task, over a sweep of decoding settings.

    agrpo eval                                             # shipped tiny Sudoku base, 16 tokens
    agrpo eval model=runs/tiny-sudoku-agrpo steps=4,8,16        # three step counts, one call
    agrpo eval task=countdown model=runs/cd,GSAI-ML/LLaDA-8B-Instruct data=countdown_cd3_test.jsonl \\
        chat_template=true steps=64,128,256                # the paper's "4x fewer steps" table
    accelerate launch -m agrpo.cli eval ...                # the same, sharded over every process

Decoding is the paper's evaluation (AGRPO.md §4): greedy, low-confidence remasking, and for
natural-language tasks 256 tokens in blocks of 32, 2 tokens a step (128 steps). The tiny
character-level tasks keep their 16 tokens, one a step. `gen_length`, `block_length` and
`steps` take a comma list; the sweep is their cross product, every setting checked before
any model loads.

Writes to `out` (default `<run dir>/eval` for a run's model, else `evals/<model name>`):
    results.json             per (model, setting): accuracy, counts, 95% interval, mean reward terms
    generations.jsonl        one line per (model, setting, row), appended and fsync'ed per batch
    accuracy_vs_steps.png    accuracy against steps, a line per model and gen_length

The work is cut into batches (model, setting, batch_size consecutive rows). Processes take
whole batches in turn, so a batch is sampled with the same rows, and therefore gives the same
completions, whatever the number of processes; each process grades its completions against
the rows it sampled (the official code grades every process's output against the first
process's references, AGRPO.md §5). A rerun into the same `out` skips the batches already in
generations.jsonl: an interrupted evaluation resumes and ends with the same results.json.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from agrpo.data import resolve_chat_template
from agrpo.errors import AgrpoError, say
from agrpo.evaluation import complete_rows, summarize
from agrpo.fileio import write_atomic
from agrpo.models import TINY_DIR, TINY_PREFIX, load_model_and_tokenizer, shift_logits_of
from agrpo.policy import Policy
from agrpo.runlog import append_jsonl, plot_sweep, read_jsonl
from agrpo.sampling import SamplingConfig, check_block_sampling, paper_eval_sampling
from agrpo.tasks import DEFAULT_TASK, check_model_fits, check_task_matches, get_task

RESULTS, GENERATIONS, PLOT = "results.json", "generations.jsonl", "accuracy_vs_steps.png"
SWEPT = ("gen_length", "block_length", "steps")
# AGRPO.md §4: the paper's evaluation decoding for natural-language tasks
PAPER_GEN_LENGTH, PAPER_BLOCK_LENGTH, PAPER_TOKENS_PER_STEP = 256, 32, 2
_SWEEP_HELP = "; a comma list sweeps (cross product with the other swept fields)"


@dataclass
class EvalConfig:
    model: str = field(default="tiny:sudoku-rows-boxes", metadata={"help": "the base `agrpo train` starts from unless given: tiny:<task>, a saved model/checkpoint/run directory or a hub name; a comma list evaluates each"})
    task: str = field(default="", metadata={"help": "task name (tiny-sudoku, tiny-countdown; gsm8k, math, countdown, sudoku); empty: the task the model was made for (tiny:<x>, a run's config.yaml), else tiny-sudoku"})
    data: str = field(default="", metadata={"help": "a test file in the task's public format; empty: the generated held-out set (tiny tasks) or the public test split"})
    eval_size: int = field(default=256, metadata={"help": "problems evaluated (the first N of the set)"})
    batch_size: int = field(default=128, metadata={"help": "problems per sampler call; a process takes whole batches"})
    gen_length: str = field(default="", metadata={"help": "completion length; empty: sampling.gen_length if set, else 256 (the paper) for natural-language tasks, 16 for tiny ones" + _SWEEP_HELP})
    block_length: str = field(default="", metadata={"help": "block length; empty: sampling.block_length if set, else 32 (the paper), gen_length for tiny tasks" + _SWEEP_HELP})
    steps: str = field(default="", metadata={"help": "denoising steps; empty: sampling.steps if set, else gen_length/2 (the paper), gen_length for tiny tasks" + _SWEEP_HELP})
    sampling: SamplingConfig = field(default_factory=paper_eval_sampling, metadata={"help": "evaluation sampler (its lengths: see gen_length, block_length, steps)"})
    seed: int = field(default=0, metadata={"help": "seed for non-greedy sampling (each batch draws from its own seed)"})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "parameter dtype; auto: bfloat16 for LLaDA / Dream on a GPU, else float32"}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the hub (LLaDA, Dream)"})
    shift_logits: bool | None = field(
        default=None, metadata={"help": "the model predicts position i from i-1 (unset: the model family's value; Dream: true)"}
    )
    mask_token_id: int | None = field(
        default=None, metadata={"help": "the [MASK] id, for a model whose config and tokenizer name none (unset: theirs)"}
    )
    block_size: int | None = field(
        default=None,
        metadata={"help": "a block-diffusion model's block size, for a checkpoint whose config does not record it "
                  "(unset: the config's, else the family's: SDAR 4, LLaDA2 32)"},
    )
    chat_template: bool | None = field(default=None, metadata={"help": "wrap prompts in the tokenizer's chat template (false: plain text, as for a base model); unset: when the tokenizer has one"})
    out: str = field(default="", metadata={"help": "output directory; empty: <run dir>/eval for a run's model, else evals/<model name>"})
    output: str = field(default="", metadata={"help": "also write per-problem results of a single setting to this JSON file"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar over all the work"})

    def validate(self) -> None:
        self.sampling.validate()
        if self.eval_size < 1 or self.batch_size < 1:
            raise AgrpoError("eval_size and batch_size must be >= 1")
        if not models_of(self):
            raise AgrpoError("model is empty: pass model=<name> or model=a,b")
        for name in SWEPT:
            _values(self, name)


def models_of(cfg: EvalConfig) -> list[str]:
    return list(dict.fromkeys(m.strip() for m in cfg.model.split(",") if m.strip()))


def _values(cfg: EvalConfig, name: str) -> list[int] | None:
    """The swept values of a length field, None when left empty."""
    raw = str(getattr(cfg, name)).strip()
    if not raw:
        return None
    values = []
    for item in raw.split(","):
        try:
            value = int(item)
        except ValueError:
            raise AgrpoError(f"{name}={raw}: {item.strip()!r} is not an integer; write e.g. {name}=64,128,256") from None
        if value <= 0:
            raise AgrpoError(f"{name}={raw}: every value must be positive")
        values.append(value)
    return list(dict.fromkeys(values))


def sweep_settings(cfg: EvalConfig, character_level: bool) -> list[SamplingConfig]:
    """Every possible setting of the sweep. A cross product can hold impossible pairs (the paper's
    `gen_length=128,256,512 steps=64,128,256` asks 128 tokens for 256 steps): those are left out
    with one warning; when none is possible, the first is one AgrpoError line."""
    defaults = paper_eval_sampling()
    settings = []
    for gen_length in _values(cfg, "gen_length") or [_default(cfg, defaults, "gen_length", None, character_level)]:
        blocks = _values(cfg, "block_length") or [_default(cfg, defaults, "block_length", gen_length, character_level)]
        steps = _values(cfg, "steps") or [None]
        for block_length, step_count in itertools.product(blocks, steps):
            if step_count is None:
                step_count = _default(cfg, defaults, "steps", gen_length, character_level)
            settings.append(replace(cfg.sampling, gen_length=gen_length, block_length=block_length, steps=step_count))
    bad = []
    for s in settings:
        try:
            s.validate()
        except AgrpoError as err:
            bad.append((s, err))
    if len(bad) == len(settings):
        s, err = bad[0]
        more = f" (none of the {len(settings)} settings can run)" if len(settings) > 1 else ""
        raise AgrpoError(
            f"gen_length={s.gen_length} block_length={s.block_length} steps={s.steps} cannot run{more}: {err}; "
            "change those values"
        )
    if bad:
        left_out = ", ".join(f"gen_length={s.gen_length} steps={s.steps}" for s, _ in bad)
        say(f"agrpo: warning: {len(bad)} of the {len(settings)} settings cannot run and are left out: {left_out}")
    return [s for s in settings if all(s is not b for b, _ in bad)]


def _default(cfg: EvalConfig, defaults: SamplingConfig, name: str, gen_length: int | None, character_level: bool) -> int:
    chosen = getattr(cfg.sampling, name)
    if chosen != getattr(defaults, name):
        return chosen
    if name == "gen_length":
        return chosen if character_level else PAPER_GEN_LENGTH
    if name == "block_length":
        return gen_length if character_level else min(PAPER_BLOCK_LENGTH, gen_length)
    return gen_length if character_level else max(1, gen_length // PAPER_TOKENS_PER_STEP)


def default_out(models: list[str]) -> Path:
    """`<run dir>/eval` for one model that belongs to a run, else `evals/<model names>`."""
    if len(models) == 1 and Path(models[0]).is_dir():
        path = Path(models[0]).resolve()
        for run in (path, path.parent, path.parent.parent):
            if (run / "metrics.jsonl").is_file() or (run / "checkpoints").is_dir():
                return run / "eval"
    names = [Path(m.rstrip("/")).name if Path(m).exists() else m for m in models]
    names = [re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") for name in names]
    return Path("evals") / "+".join(names)


def model_version(model: str) -> str:
    """What the weights under a local model are: names, sizes and times of its files. A run
    directory stands for its latest checkpoint, so a new checkpoint is a new version and its
    earlier generations are not reused. A hub name is taken as it is."""
    path = TINY_DIR / model[len(TINY_PREFIX):] if model.startswith(TINY_PREFIX) else Path(model)
    if not path.is_dir():
        return model
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt", ".json"))
    stats = [(str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return hashlib.blake2b(json.dumps(stats).encode(), digest_size=8).hexdigest()


def _setting_record(s: SamplingConfig, cfg: EvalConfig) -> dict:
    """What determines a generation besides the model and the row: the key of resumed work."""
    return {**asdict(s), "seed": cfg.seed, "chat_template": cfg.chat_template, "shift_logits": cfg.shift_logits,
            "mask_token_id": cfg.mask_token_id, "block_size": cfg.block_size}


def _batch_seed(seed: int, model: str, setting: dict, start: int) -> int:
    # a seed per batch, not one stream for the run: skipped (resumed) batches and other
    # process counts leave every batch's draws unchanged
    text = json.dumps([seed, model, setting, start], sort_keys=True)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


@dataclass
class _Batch:
    model: str
    setting: dict
    sampling: SamplingConfig
    rows: range


def _key(task: str, model: str, version: str, setting: dict, row: int) -> str:
    return json.dumps([task, model, version, setting, row], sort_keys=True)


def _finished(path: Path, task: str, examples: list[dict], prompt_of) -> dict[str, dict]:
    """Records already in generations.jsonl by key, the last of a repeated key winning; a
    record for another prompt at the same row means `out` holds another evaluation."""
    done = {}
    for record in read_jsonl(path, repair=True):
        row = record.get("row")
        if record.get("task") != task or not isinstance(row, int) or row >= len(examples):
            continue
        if record.get("prompt") != prompt_of(row):
            raise AgrpoError(
                f"{path} holds a generation for another problem at row {row}: pass another out=... or delete that file"
            )
        done[_key(task, record["model"], record.get("model_version"), record["setting"], row)] = record
    return done


def run_eval(cfg: EvalConfig, accelerator=None) -> dict:
    from accelerate.utils import broadcast_object_list, gather_object

    from agrpo.distributed import launch_line, launch_record, make_accelerator, model_loading

    cfg.validate()
    t0 = time.perf_counter()
    models = models_of(cfg)
    task = get_task(check_task_matches(cfg.task or DEFAULT_TASK, models, given=bool(cfg.task)))
    for model in models:
        check_model_fits(task, model)
    settings = sweep_settings(cfg, task.character_level)
    if cfg.output and len(settings) * len(models) > 1:
        raise AgrpoError(f"output= writes one setting of one model: with a sweep read {GENERATIONS} in out= instead")
    try:
        examples = task.eval_examples(cfg.eval_size, path=cfg.data or None)
    except AgrpoError as err:
        if cfg.task or not cfg.data:
            raise
        raise AgrpoError(f"{err}; this is not a {task.name} file, the task {models[0]} was made for: evaluate a "
                         "model made for that file's task (and task=)") from None
    # the prompt as JSON sees it: chat messages stay a list, a string stays a string
    prompts = [json.loads(json.dumps(task.prompt(row))) for row in examples]
    out = Path(cfg.out) if cfg.out else default_out(models)

    # a process group this call starts, it ends: left to interpreter exit, gloo's threads
    # sometimes abort the process after the results were written
    owns_group = accelerator is None and not torch.distributed.is_initialized()
    accelerator = accelerator or make_accelerator()  # the launch's backend, on CPU as on GPU (agrpo/distributed.py)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    batches = [
        _Batch(model, _setting_record(s, cfg), s, range(start, min(start + cfg.batch_size, len(examples))))
        for model in models for s in settings for start in range(0, len(examples), cfg.batch_size)
    ]
    versions = {model: model_version(model) for model in models}
    done = _finished(out / GENERATIONS, task.name, examples, prompts.__getitem__) if main else {}

    def key(model, setting, row):
        return _key(task.name, model, versions[model], setting, row)

    pending = [i for i, b in enumerate(batches) if not all(key(b.model, b.setting, r) in done for r in b.rows)]
    if world > 1:  # what the first process read and saw is what every process works from
        pending, versions = broadcast_object_list([pending, versions])

    bar, generated = None, 0
    for model in models:
        todo = [i for i in pending if batches[i].model == model]
        if not todo:
            continue
        with model_loading(accelerator, whole=True):
            loaded, tokenizer = load_model_and_tokenizer(
                model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code, mask_token_id=cfg.mask_token_id,
                block_size=cfg.block_size,
            )
        policy = Policy(loaded, shift_logits=shift_logits_of(loaded, cfg.shift_logits)).to(accelerator.device)
        check_block_sampling(policy, *(("sampling", s) for s in settings))
        if model == batches[pending[0]].model:  # the first model loaded: what runs, said first
            say(launch_line(launch_record(accelerator, policy), sampling_only=True))
        templated = resolve_chat_template(cfg.chat_template, tokenizer)
        if bar is None and cfg.progress and main:  # after a load, so that a bad model= stays one line
            from tqdm.auto import tqdm

            total = sum(len(b.rows) for b in batches)
            left = sum(len(batches[i].rows) for i in pending)
            bar = tqdm(total=total, initial=total - left, desc="eval", unit="row")
        # rounds of one batch per process; every process joins every gather, idle or not
        for first in range(0, len(todo), world):
            records = []
            if first + rank < len(todo):
                b = batches[todo[first + rank]]
                gen = torch.Generator(device=accelerator.device)
                gen.manual_seed(_batch_seed(cfg.seed, model, b.setting, b.rows.start))
                rows = [examples[r] for r in b.rows]
                completed = complete_rows(policy, tokenizer, task, rows, b.sampling, gen, templated)
                for r, rec in zip(b.rows, completed):
                    records.append({"task": task.name, "model": model, "model_version": versions[model],
                                    "setting": b.setting, "row": r, "chat_template": templated, **rec})
            records = gather_object(records) if world > 1 else records
            generated += len(records)
            if main:
                out.mkdir(parents=True, exist_ok=True)
                append_jsonl(out / GENERATIONS, records)
                for rec in records:
                    done[key(rec["model"], rec["setting"], rec["row"])] = rec
                if bar is not None:
                    bar.update(len(records))
        del policy, loaded
    if bar is not None:
        bar.close()

    summary = None
    if main:
        out.mkdir(parents=True, exist_ok=True)
        found = [(model, s, [done[key(model, _setting_record(s, cfg), r)] for r in range(len(examples))])
                 for model in models for s in settings]
        summary = _write_results(cfg, task.name, models, found, out, time.perf_counter() - t0, generated)
    if world > 1:
        summary = broadcast_object_list([summary])[0]
        if owns_group:
            torch.distributed.destroy_process_group()
    return summary


def _write_results(cfg, task_name, models, found, out: Path, wall_s: float, generated: int) -> dict:
    """results.json, the plot (and the `output=` file) from (model, setting, records in row order)."""
    results = [
        {"model": model, "gen_length": s.gen_length, "block_length": s.block_length, "steps": s.steps,
         "chat_template": records[0].get("chat_template", cfg.chat_template),
         **summarize([r["grade"] for r in records], [r["rewards"] for r in records])}
        for model, s, records in found
    ]
    n = len(found[0][2])
    sampling = {k: v for k, v in asdict(cfg.sampling).items() if k not in SWEPT}
    # what the prompts went through, as used (unset resolves per model's tokenizer)
    used = {r["model"]: r["chat_template"] for r in results}
    templated = next(iter(used.values())) if len(set(used.values())) == 1 else used
    report = {"task": task_name, "data": cfg.data or None, "eval_size": n, "models": models,
              "sampling": sampling, "chat_template": templated, "settings": results}
    write_atomic(out / RESULTS, json.dumps(report, indent=1) + "\n")
    plot_sweep(results, out / PLOT, title=f"{task_name}, {n} problems")
    if cfg.output:
        rows = found[0][2]
        legacy = {"accuracy": results[0]["accuracy"], "n": n, "model": models[0],
                  "results": [{"prompt": r["prompt"], "completion": r["completion"], "score": r["grade"]} for r in rows]}
        write_atomic(cfg.output, json.dumps(legacy, indent=1))
    summary = {
        "out": str(out), "task": task_name, "n": n, "generated": generated,
        "reused": len(found) * n - generated, "wall_s": round(wall_s, 3),
        "settings": [{k: r[k] for k in ("model", "gen_length", "block_length", "steps", "accuracy", "ci95")} for r in results],
    }
    if len(results) == 1:
        summary.update(model=models[0], accuracy=results[0]["accuracy"])
    return summary
