"""What a training run starts from: its task's defaults, then a preset (-c), then key=value.

The dataclass defaults of `RLConfig` are not a recipe for any real model. So:

* a tiny task without -c runs its shipped preset (`configs/tiny_sudoku.yaml`,
  `configs/tiny_countdown.yaml`): the only runs with a time budget;
* a natural-language task (gsm8k, math, countdown, sudoku) starts from the paper's recipe for
  its objective (`PAPER_RECIPES`: AGRPO.md §4 for AGRPO, d1's for diffu-GRPO), under any preset
  and overrides: 384-token rollouts in 128 steps, the paper's schedule, no time budget. What
  depends on the model follows it when loaded: `dtype=auto` (bf16 on a GPU for LLaDA / Dream),
  `chat_template` unset (the tokenizer's template when it has one), the family's logit shift.

The first line of a run says which of these it took (`describe`).
"""

from __future__ import annotations

import copy
from pathlib import Path

from agrpo.errors import AgrpoError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# the preset a tiny task runs when no -c is given
TINY_PRESETS = {"tiny-sudoku": "tiny_sudoku.yaml", "tiny-countdown": "tiny_countdown.yaml"}
# test files of the tasks whose test split is not on the hub, looked for where the run starts
TEST_FILES = {"countdown": "countdown_cd3_test.jsonl", "sudoku": "sudoku4x4_test.csv"}
# AGRPO's loss rows per forward on one 80 GB GPU, from the longest rendered prompt of each task
# (Dream-v0-Instruct-7B's tokenizer: countdown 178, gsm8k 274, math 877, sudoku 1,234 tokens) plus the
# 384-token completion; the arithmetic is in the header of configs/llada8b/<task>.yaml
MAX_ROWS_PER_FORWARD = {"countdown": 64, "gsm8k": 64, "gsm8k-platinum": 64, "math": 32, "sudoku": 32}

_SEVEN_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_PAPER_EVAL = {"gen_length": 256, "block_length": 32, "steps": 128, "temperature": 0.0, "remasking": "low_confidence"}
_RUN = {
    "gradient_checkpointing": True, "train_pool": 1_000_000, "eval_size": 256, "prompts_per_step": 16,
    "adam_beta1": 0.9, "adam_beta2": 0.99, "epochs": 1, "time_budget_s": 0, "eval_every": 100,
    "save_every": 100, "keep_checkpoints": 0, "log_samples_every": 10, "eval_sampling": _PAPER_EVAL,
}
PAPER_RECIPES = {
    # AGRPO.md §4 (LLaDA-8B-Instruct, LoRA r64); sized for one 80 GB GPU as configs/llada8b/*.yaml
    "agrpo": {
        **_RUN,
        "lora": {"r": 64, "alpha": 64, "target_modules": _SEVEN_PROJECTIONS},
        "objective": "agrpo", "group_size": 8, "num_samples": 24, "step_sampling": "low_discrepancy",
        "importance": "entropy", "eps_low": 0.2, "eps_high": 0.2, "beta": 0.0,
        "lr": 5e-6, "lr_schedule": "cosine", "warmup_ratio": 0.01, "weight_decay": 0.01, "grad_clip": 1.0,
        "sampling": {"gen_length": 384, "block_length": 12, "steps": 128, "temperature": 0.6, "top_p": 0.99,
                     "top_k": 150, "remasking": "random"},
    },
    # d1's diffu-GRPO settings (configs/llada8b/*_diffu_grpo.yaml says where they come from)
    "diffu_grpo": {
        **_RUN,
        "lora": {"r": 128, "alpha": 64, "dropout": 0.05, "target_modules": _SEVEN_PROJECTIONS},
        "objective": "diffu_grpo", "inner_steps": 12, "prompt_mask_p": 0.15, "group_size": 6,
        "rollout_batch_size": 12, "eps_low": 0.5, "eps_high": 0.5, "beta": 0.04, "lr": 3e-6,
        "lr_schedule": "constant", "warmup_ratio": 0.0001, "weight_decay": 0.1, "grad_clip": 0.2,
        "sampling": {"gen_length": 256, "block_length": 32, "steps": 128, "temperature": 0.9,
                     "remasking": "low_confidence"},
    },
}
# what the first line says of each recipe
_RECIPE_NAMES = {
    "agrpo": "the paper's AGRPO recipe (AGRPO.md §4: LoRA r64, 384 tokens in 128 steps, K 24, lr 5e-6 cosine, 1 epoch)",
    "diffu_grpo": "d1's diffu-GRPO recipe (LoRA r128, 256 tokens in 128 steps, mu 12, lr 3e-6, 1 epoch)",
}


def task_defaults(task: str, objective: str) -> dict:
    """The settings a run of `task` with `objective` starts from below any preset ({} for the
    tiny tasks, whose presets are complete)."""
    from agrpo.tasks import TASKS

    if task not in TASKS or TASKS[task].character_level:
        return {}
    if objective in PAPER_RECIPES:
        defaults = copy.deepcopy(PAPER_RECIPES[objective])
    else:  # the paper's run around it, the objective's own settings from its preset when there is one
        defaults = copy.deepcopy(PAPER_RECIPES["agrpo"])
        own = objective_preset(objective)
        if own is not None:
            from agrpo.config import read_yaml

            _merge(defaults, read_yaml(own))
        defaults["objective"] = objective
    defaults["max_rows_per_forward"] = defaults.get("max_rows_per_forward") or MAX_ROWS_PER_FORWARD.get(task, 32)
    if objective == "diffu_grpo":
        defaults.pop("max_rows_per_forward")  # d1's recipe bounds memory with rollout_batch_size
    if task in TEST_FILES:
        defaults["eval_data"] = TEST_FILES[task]
    return defaults


def objective_preset(objective: str) -> str | None:
    """configs/objectives/<objective>.yaml, the settings of the objective's own paper, if shipped."""
    path = CONFIGS / "objectives" / f"{objective}.yaml"
    return str(path) if path.is_file() else None


def _merge(into: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def recipe_name(objective: str) -> str:
    if objective in _RECIPE_NAMES:
        return _RECIPE_NAMES[objective]
    own = objective_preset(objective)
    where = f"its own settings from configs/objectives/{Path(own).name}" if own else "its own defaults"
    return f"the paper's run settings (AGRPO.md §4) with objective {objective}, {where}"


def tiny_preset(task: str) -> str | None:
    """The shipped preset a tiny task runs without -c (None for other tasks)."""
    if task not in TINY_PRESETS:
        return None
    path = CONFIGS / TINY_PRESETS[task]
    if not path.is_file():
        raise AgrpoError(f"task {task} without -c runs {path}, which this installation lacks: pass -c <preset.yaml>")
    return str(path)


def train_config(preset: str | None, overrides: list[str]):
    """(RLConfig, the line that says what it was built from) for `agrpo train [-c preset] key=value ...`."""
    from agrpo.config import load_config
    from agrpo.recipes.rl import RLConfig

    given = load_config(RLConfig, preset, overrides, validate=False)  # which task and objective
    chosen = preset is None and given.task in TINY_PRESETS
    if chosen:
        preset = tiny_preset(given.task)
        given = load_config(RLConfig, preset, overrides, validate=False)  # the preset may name the task
    base = task_defaults(given.task, given.objective)
    cfg = load_config(RLConfig, preset, overrides, base=base)
    return cfg, describe(preset, cfg.task, cfg.objective, bool(base), chosen)


def describe(preset, task: str, objective: str, task_defaults_used: bool, chosen: bool = False) -> str:
    """The first line of a run: the preset it read and the task defaults under it."""
    if task_defaults_used:
        recipe = f"task {task}'s defaults, {recipe_name(objective)}"
        return f"agrpo: preset {_short(preset)} over {recipe}" if preset else f"agrpo: {recipe}; no preset"
    if preset is None:
        return f"agrpo: no preset, task {task}"
    return f"agrpo: preset {_short(preset)}" + (f" (task {task}'s default; -c picks another)" if chosen else f", task {task}")


def _short(path) -> str:
    """Preset paths as the user would write them: relative to the working directory when inside it."""
    from agrpo.config import preset_paths

    out = []
    for one in preset_paths(path):
        try:
            out.append(str(Path(one).resolve().relative_to(Path.cwd())))
        except ValueError:
            out.append(str(one))
    return " + ".join(out)
