"""Objectives by name. Each is a plain function on a Rollout and advantages -> (loss, metrics)."""

from agrpo.errors import AgrpoError
from agrpo.objectives.advantages import group_advantages
from agrpo.objectives.agrpo import agrpo_loss, plan_steps, rebuild_states
from agrpo.objectives.diffu_grpo import diffu_grpo_loss, mean_field_logp, random_prompt_mask

OBJECTIVES = {"agrpo": agrpo_loss, "diffu_grpo": diffu_grpo_loss}


def get_objective(name: str):
    if name not in OBJECTIVES:
        raise AgrpoError(f"unknown objective {name!r}: choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


__all__ = [
    "OBJECTIVES",
    "agrpo_loss",
    "diffu_grpo_loss",
    "get_objective",
    "group_advantages",
    "mean_field_logp",
    "plan_steps",
    "random_prompt_mask",
    "rebuild_states",
]
