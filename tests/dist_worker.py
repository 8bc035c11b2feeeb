"""One process of the multi-process tests in tests/test_distributed.py: the RL recipe, observed.

    accelerate launch --config_file configs/accelerate/zero3.yaml --num_processes 2 tests/dist_worker.py SPEC.json
    python tests/dist_worker.py SPEC.json                                    # 1 process, no backend

The backend is whatever the launch asks for: the recipe builds its Accelerator itself (the worker
only adds a timeout and its counters to it), and the record says what ran, from the recipe's
summary and from the type of the model `accelerator.prepare` returned, so a test that launches
a DeepSpeed config and gets DDP sees it.

SPEC (JSON): {"overrides": ["key=value", ...], "out": dir,
              "kill_after": a checkpointed step to die at (or null), "deadline_s": exit 99 after this long}

The task's reward returns None for the last prompt of every step's global batch and for the
first completion of the prompt before it: with two processes both land on the second one,
which then has fewer rows (and loss chunks) than the first.
Writes <out>/rank<r>.pt: per optimizer step the whole flat parameters (gathered from the shards
under FSDP and ZeRO-3) and the numbers of backward calls and gradient reduce-scatters this
process made; over the run, the numbers of rows that stopped early and of rows kept (reward not
None), and the summary's `launch` record (backend, stage, precision, processes).
"""

import datetime
import json
import os
import sys
import threading
from pathlib import Path

import torch


def _whole_parameters(model) -> torch.Tensor:
    """Every parameter of the Policy, whole, flat, in float64; a collective under FSDP and ZeRO-3."""
    from agrpo.policy import unwrap

    params = list(unwrap(model).parameters())
    if any(hasattr(p, "ds_id") for p in params):  # ZeRO-3 partitions
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return torch.cat([p.detach().flatten().double() for p in params])
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in params]
    return torch.cat([p.detach().flatten().double() for p in full])


def _none_rewards(rl, task, cfg):
    """Wrap the task's reward: None where the docstring above says, the real reward elsewhere."""
    pool = task.train_examples(cfg.train_pool, seed=cfg.seed, path=cfg.train_data or None)
    all_none, first_none = set(), set()
    for step in range(cfg.max_steps):
        idx = rl._batch_indices(len(pool), cfg.prompts_per_step, step, cfg.seed)
        all_none.add(task.prompt(pool[idx[-1]]))
        first_none.add(task.prompt(pool[idx[-2]]))
    real = task.reward

    def reward(prompts, completions, **columns):
        out = list(real(prompts, completions, **columns))
        for i, prompt in enumerate(prompts):
            starts_group = i % cfg.group_size == 0
            if prompt in all_none or (prompt in first_none and starts_group):
                out[i] = None
        return out

    task.reward = reward
    return task


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    from agrpo.config import load_config
    from agrpo.recipes import rl

    # torchrun starts each process in a session of its own: a test that gives up on the launch
    # cannot reach them, so they end themselves
    watchdog = threading.Timer(spec["deadline_s"], lambda: os._exit(99))
    watchdog.daemon = True
    watchdog.start()
    cfg = load_config(rl.RLConfig, None, spec["overrides"])
    record = {"params": [], "backwards": [], "reduce_scatters": []}
    calls = {"backward": 0, "reduce_scatter": 0}
    prepared = {}
    real_make = rl.make_accelerator

    def make_accelerator(**kw):
        from accelerate.utils import InitProcessGroupKwargs

        # a collective that finds no partner fails after this long instead of waiting for ever
        patience = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=spec["deadline_s"] / 2))
        accelerator = real_make(**kw, kwargs_handlers=[patience])
        real_backward, real_prepare = accelerator.backward, accelerator.prepare

        def backward(loss, **kw):
            calls["backward"] += 1
            return real_backward(loss, **kw)

        def prepare(*objects):
            # how the model came to accelerate: whole, or already partitioned by a ZeRO-3 load
            record["loaded_partitioned"] = any(hasattr(p, "ds_id") or p.numel() == 0 for p in objects[0].parameters())
            out = real_prepare(*objects)
            prepared["model"] = out[0]
            record["prepared"] = type(out[0]).__name__
            return out

        accelerator.backward, accelerator.prepare = backward, prepare
        prepared["accelerator"] = accelerator
        return accelerator

    rl.make_accelerator = make_accelerator

    real_rs = torch.distributed.reduce_scatter_single

    def reduce_scatter(*a, **kw):
        calls["reduce_scatter"] += 1
        return real_rs(*a, **kw)

    torch.distributed.reduce_scatter_single = reduce_scatter

    real_step = torch.optim.lr_scheduler.LambdaLR.step

    def scheduler_step(self, *a, **kw):
        real_step(self, *a, **kw)
        if self._step_count > 1:  # the constructor's own call is not an optimizer step
            record["params"].append(_whole_parameters(prepared["model"]))
            record["backwards"].append(calls["backward"])
            record["reduce_scatters"].append(calls["reduce_scatter"])
            calls["backward"] = calls["reduce_scatter"] = 0

    torch.optim.lr_scheduler.LambdaLR.step = scheduler_step

    real_generate = rl.generate

    def generate(*a, **kw):
        rollout = real_generate(*a, **kw)
        record["early_stopped"] = record.get("early_stopped", 0) + int((~rollout.sampled).any(1).sum())
        return rollout

    rl.generate = generate

    from agrpo.objectives import base as objective_base

    real_advantages = objective_base.group_advantages

    def group_advantages(*a, **kw):
        advantages, valid = real_advantages(*a, **kw)
        record["kept_rows"] = record.get("kept_rows", 0) + int(valid.sum())
        return advantages, valid

    objective_base.group_advantages = group_advantages

    real_get_task = rl.get_task
    rl.get_task = lambda *a, **kw: _none_rewards(rl, real_get_task(*a, **kw), cfg)

    if spec.get("kill_after") is not None:
        real_save = rl.save_checkpoint

        def save_then_die(run_dir, step, *a, **kw):
            path = real_save(run_dir, step, *a, **kw)
            if step == spec["kill_after"]:
                os._exit(17)
            return path

        rl.save_checkpoint = save_then_die

    summary = rl.train(cfg)
    rank = prepared["accelerator"].process_index
    record["launch"] = summary["launch"]
    record["engine_steps"] = getattr(prepared["model"], "global_steps", None)  # DeepSpeed's own count
    Path(spec["out"]).mkdir(parents=True, exist_ok=True)
    torch.save(record, Path(spec["out"]) / f"rank{rank}.pt")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
