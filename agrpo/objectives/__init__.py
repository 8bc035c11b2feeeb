"""Objectives by name: one file each, registered with `@register` (see `base.py` for the interface).

The loss functions stay plain functions on a Rollout and advantages -> (loss, metrics); the
`Objective` classes around them are what the RL recipe calls.
"""

import importlib
import pkgutil

from agrpo.objectives.advantages import group_advantages
from agrpo.objectives.agrpo import agrpo_loss, plan_steps, rebuild_states
from agrpo.objectives.base import OBJECTIVES, Context, Objective, Part, get_objective, register, settings_of
from agrpo.objectives.diffu_grpo import diffu_grpo_loss, mean_field_logp, random_prompt_mask

DEFAULT_OBJECTIVE = "agrpo"

# every module of this package is imported, so a new objective is one new file
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "DEFAULT_OBJECTIVE",
    "OBJECTIVES",
    "Context",
    "Objective",
    "Part",
    "agrpo_loss",
    "diffu_grpo_loss",
    "get_objective",
    "group_advantages",
    "mean_field_logp",
    "plan_steps",
    "random_prompt_mask",
    "rebuild_states",
    "register",
    "settings_of",
]
