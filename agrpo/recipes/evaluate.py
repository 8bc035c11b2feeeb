"""Held-out accuracy of a model on a task, the paper's way by default (greedy, low-confidence).

    agrpo eval                                           # shipped tiny Sudoku base
    agrpo eval model=runs/sudoku-agrpo/checkpoints/step_000100
    agrpo eval data=../shared/data/sudoku4x4_test.csv    # a test split from a file
    agrpo eval task=gsm8k model=GSAI-ML/LLaDA-8B-Instruct trust_remote_code=true
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from agrpo.errors import AgrpoError
from agrpo.evaluation import evaluate
from agrpo.models import load_model_and_tokenizer, shift_logits_of
from agrpo.policy import Policy
from agrpo.sampling import SamplingConfig, paper_eval_sampling
from agrpo.tasks import check_model_fits, get_task



@dataclass
class EvalConfig:
    model: str = field(default="tiny:sudoku", metadata={"help": "tiny:<task>, a saved model/checkpoint directory or a hub name"})
    task: str = field(default="tiny-sudoku", metadata={"help": "task name (tiny-sudoku, tiny-countdown; gsm8k, math, countdown, sudoku)"})
    data: str = field(default="", metadata={"help": "a test file in the task's public format; empty: the generated held-out set (tiny tasks) or the public test split"})
    eval_size: int = field(default=256, metadata={"help": "problems evaluated (the first N of the set)"})
    batch_size: int = field(default=128, metadata={"help": "problems per sampler call"})
    sampling: SamplingConfig = field(default_factory=paper_eval_sampling, metadata={"help": "evaluation sampler"})
    seed: int = field(default=0, metadata={"help": "seed for non-greedy sampling"})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "parameter dtype; auto: bfloat16 for LLaDA / Dream on a GPU, else float32"}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "allow model code from the hub (LLaDA, Dream)"})
    shift_logits: bool | None = field(
        default=None, metadata={"help": "the model predicts position i from i-1 (unset: the model family's value; Dream: true)"}
    )
    chat_template: bool = field(default=False, metadata={"help": "wrap prompts in the tokenizer's chat template"})
    output: str = field(default="", metadata={"help": "write per-problem results to this JSON file"})

    def validate(self) -> None:
        self.sampling.validate()
        if self.eval_size < 1 or self.batch_size < 1:
            raise AgrpoError("eval_size and batch_size must be >= 1")


def run_eval(cfg: EvalConfig) -> dict:
    cfg.validate()
    task = get_task(cfg.task)
    check_model_fits(task, cfg.model)
    examples = task.eval_examples(cfg.eval_size, path=cfg.data or None)
    model, tokenizer = load_model_and_tokenizer(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy = Policy(model, shift_logits=shift_logits_of(model, cfg.shift_logits)).to(device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    t0 = time.perf_counter()
    res = evaluate(policy, tokenizer, task, examples, cfg.sampling, cfg.batch_size, gen, cfg.chat_template)
    out = {"accuracy": res["accuracy"], "n": len(examples), "wall_s": time.perf_counter() - t0, "model": cfg.model}
    if cfg.output:
        rows = [
            {"prompt": task.prompt(ex), "completion": c, "score": s}
            for ex, c, s in zip(examples, res["completions"], res["scores"])
        ]
        Path(cfg.output).write_text(json.dumps({**out, "results": rows}, indent=1))
    return out
