"""What an objective is, to the RL recipe.

One step of the recipe gives an objective this process's rollouts as micro-batches (`Part`:
a rollout, its rewards, advantages, which rows count, and the generator the rollout drew from,
which the objective continues for its own draws, so that 1 process draws what N processes
draw and a resumed run what the straight run drew). The objective then

* `advantages(rewards, group_size)`: how rewards become advantages (centred by default);
* `prepare(ctx, parts)`: the work done once before the first update of the batch: old
  likelihoods, reference values, fixed weights, kept on `part.state`;
* `update(ctx, parts, inner)`: back-propagates the loss of update `inner` (of `cfg.inner_steps`)
  over every micro-batch, normalised over the whole batch of all processes, with one gradient
  synchronisation, and returns the step's global metrics (`loss`, `clip_frac`, `kl`, ...);
* `check(cfg)`: refuses settings that cannot work with it, in one line.

An objective lives in one file under `agrpo/objectives/`, registers itself with `@register`
and, when it has settings of its own, declares them as a dataclass (`settings`) that becomes
the config section named after it (`espo.copies=2`). Settings that predate the sections keep
their top-level keys (`num_samples=24`): an objective declares those as a dataclass too
(`top_level`). The recipe calls nothing else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from agrpo.distributed import reduce_sum
from agrpo.errors import AgrpoError
from agrpo.objectives.advantages import group_advantages
from agrpo.sampling import Rollout


@dataclass
class Part:
    """One micro-batch of rollouts of a step and what the objective keeps of it."""

    rollout: Rollout
    advantages: torch.Tensor  # [B] float32
    valid: torch.Tensor  # [B] bool: the reward was not None
    rewards: list  # [B] float | None
    generator: torch.Generator  # continues from the rollout into the objective's own draws
    state: dict = field(default_factory=dict)  # what `prepare` computed, per objective


@dataclass
class Context:
    """What an objective may use during a step."""

    accelerator: Any
    policy: nn.Module  # as prepared by accelerate (its forwards may synchronise)
    ref_logits_fn: Any  # (x, positions, attention_mask) -> reference logits, or None
    cfg: Any  # the run's RLConfig
    settings: Any = None  # the objective's own config section, if it has one
    step: int = 0  # the optimizer step being taken (from 0): every process and a resumed run agree on it


class Objective:
    """Base of the objectives; subclasses set `name` (and `settings`) and implement `update`."""

    name: ClassVar[str] = ""
    settings: ClassVar[type | None] = None  # a dataclass whose fields carry help texts
    top_level: ClassVar[type | None] = None  # a dataclass of settings kept as top-level config keys
    summary: ClassVar[str] = ""  # one line for `agrpo config train` and the README's table
    block_models_only: ClassVar[bool] = False  # replays block by block: needs a block-diffusion model

    def needs_reference(self, cfg) -> bool:
        """Whether the run keeps a reference model (the base, or the adapter switched off)."""
        return cfg.beta > 0

    def check(self, cfg) -> None:
        """Refuse settings this objective cannot run with (one AgrpoError line)."""

    def advantages(self, rewards: list, group_size: int, cfg) -> tuple[torch.Tensor, torch.Tensor]:
        return group_advantages(rewards, group_size, cfg.scale_std)

    def prepare(self, ctx: Context, parts: list[Part]) -> None:
        """Work done once per batch of rollouts, before its first update."""

    def update(self, ctx: Context, parts: list[Part], inner: int) -> dict:
        raise NotImplementedError


OBJECTIVES: dict[str, type[Objective]] = {}


def register(cls: type[Objective]) -> type[Objective]:
    """Class decorator: make an objective available by its `name`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in OBJECTIVES and OBJECTIVES[cls.name] is not cls:
        raise ValueError(f"two objectives are named {cls.name!r}")
    for kind in ("settings", "top_level"):
        if getattr(cls, kind) is not None and not dataclasses.is_dataclass(getattr(cls, kind)):
            raise ValueError(f"{cls.__name__}.{kind} must be a dataclass")
    OBJECTIVES[cls.name] = cls
    return cls


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise AgrpoError(f"unknown objective {name!r}: choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]()


def settings_of(cfg, name: str):
    """The config section of objective `name` in `cfg` (None when it has none)."""
    return getattr(cfg, name, None) if OBJECTIVES[name].settings is not None else None


# -- pieces the objectives share ------------------------------------------------------------------

OFFPOLICY = ("offpolicy_logratio", "offpolicy_outside_clip", "tis_capped")


def new_sums() -> dict:
    # the off-policy keys are summed on every process (one all-reduce of the same keys), reported when any piece had them
    return {"loss": 0.0, "tokens": 0.0, "clipped": 0.0, "kl_sum": 0.0, "approximate": 0.0, **dict.fromkeys(OFFPOLICY, 0.0)}


def add_piece(sums: dict, metrics: dict) -> None:
    """Accumulate one piece's metrics (its `loss_tokens` weigh its clip fraction and KL)."""
    tokens = metrics["loss_tokens"]
    sums["loss"] += metrics["loss"]
    sums["tokens"] += tokens
    sums["clipped"] += metrics["clip_frac"] * max(tokens, 1)
    sums["kl_sum"] += metrics["kl"] * max(tokens, 1)
    if "offpolicy_logratio" in metrics:  # rollouts of an approximate sampler: the gap between the exact policy and mu
        sums["approximate"] += 1
        for key in OFFPOLICY:
            sums[key] += metrics.get(key, 0.0) * max(tokens, 1)


def global_metrics(accelerator, sums: dict) -> dict:
    """The step's loss, clip fraction and KL over every process."""
    g = reduce_sum(accelerator, sums)
    tokens = max(g["tokens"], 1.0)
    out = {"loss": g["loss"] / accelerator.num_processes, "clip_frac": g["clipped"] / tokens, "kl": g["kl_sum"] / tokens}
    if g.get("approximate", 0) > 0:
        out.update({key: g[key] / tokens for key in OFFPOLICY})
    return out


def with_objective_settings(cls):
    """`cls` (the RL config dataclass) with the settings every registered objective declares, so that
    an objective's file alone declares its knobs: a section named after the objective for its
    `settings` (`espo.copies=2`), and the fields of its `top_level` as top-level keys."""
    extra, seen = [], {f.name for f in dataclasses.fields(cls)}
    for name, obj in OBJECTIVES.items():
        for f in dataclasses.fields(obj.top_level) if obj.top_level is not None else ():
            if f.name in seen:
                raise ValueError(f"objective {name!r} declares the config key {f.name!r}, which is already taken")
            seen.add(f.name)
            made = field(default=f.default, default_factory=f.default_factory,
                         metadata={**f.metadata, "help": f"objective={name}: {f.metadata.get('help', '')}"})
            extra.append((f.name, f.type, made))
    for name, obj in OBJECTIVES.items():
        if obj.settings is not None:
            if name in seen:
                raise ValueError(f"objective {name!r} would name a config section after a key already taken")
            extra.append((name, obj.settings,
                          field(default_factory=obj.settings, metadata={"help": f"objective={name}: {obj.summary}"})))
    if not extra:
        return cls
    made = dataclasses.make_dataclass(cls.__name__, extra, bases=(cls,))
    made.__module__, made.__qualname__, made.__doc__ = cls.__module__, cls.__qualname__, cls.__doc__
    return made
