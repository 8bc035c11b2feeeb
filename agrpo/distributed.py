"""One optimizer step per batch on every backend, whatever the chunking and the process count.

The RL loss of a batch is back-propagated in pieces (micro-batches of prompts, chunks of at
most `max_rows_per_forward` sequences). Three rules make the pieces equal to one backward of
the whole batch on one process:

* Every process runs the same number of forward and backward calls. DDP's gradient buckets
  and FSDP's parameter gathers are collectives that pair up call by call across processes, so
  a process with fewer pieces (rows dropped for a `None` reward, or with nothing to learn
  from) pads with zero-weight pieces; without them the run hangs.
* Gradients synchronise once, in the last backward (`accelerator.no_sync` before it). Under
  DeepSpeed `accelerator.backward` also steps the engine (optimizer, clipping, zero_grad)
  whenever `accelerator.sync_gradients` is True, so that flag is True for the last piece only.
* Each piece is divided by the count of the whole batch over all processes (draws or tokens),
  times the number of processes: DDP, FSDP and DeepSpeed average gradients over processes.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from agrpo.errors import AgrpoError
from agrpo.policy import unwrap


def totals(accelerator, count: float, pieces: int) -> tuple[float, int]:
    """(sum of `count`, max of `pieces`) over processes, in one small gather."""
    local = torch.tensor([[float(count), float(pieces)]], dtype=torch.float64, device=accelerator.device)
    every = accelerator.gather(local) if accelerator.num_processes > 1 else local
    return float(every[:, 0].sum()), int(every[:, 1].max())


def reduce_sum(accelerator, values: dict[str, float]) -> dict[str, float]:
    """Each value summed over processes, in one all-reduce."""
    if accelerator.num_processes == 1:
        return dict(values)
    local = torch.tensor(list(values.values()), dtype=torch.float64, device=accelerator.device)
    summed = accelerator.reduce(local, reduction="sum")
    return dict(zip(values, summed.tolist()))


class OneSync:
    """Contexts for the `count` forward+backward pieces of one optimizer step; the last one syncs.

        sync = OneSync(accelerator, model, count)
        for ...:
            with sync.piece():
                loss = ...                  # the forward runs inside: DDP decides there
                accelerator.backward(loss)
        sync.check()
    """

    def __init__(self, accelerator, model: nn.Module, count: int):
        self.accelerator, self.model, self.count, self.used = accelerator, model, count, 0

    @contextlib.contextmanager
    def piece(self):
        self.used += 1
        last = self.used == self.count
        self.accelerator.sync_gradients = last
        try:
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.model):
                yield
        finally:
            self.accelerator.sync_gradients = True

    def check(self) -> None:
        if self.used != self.count:  # the padding arithmetic is wrong: processes would hang
            raise RuntimeError(f"ran {self.used} backward pieces where every process agreed on {self.count}")


class GradSyncCounter:
    """Counts the gradient synchronisations of a DDP model (its all-reduces of bucket 0)."""

    def __init__(self, model: nn.Module):
        self.count = 0
        self.active = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        if self.active:
            try:
                model.register_comm_hook(self, _count_and_allreduce)
            except RuntimeError:  # the accelerate config installed its own hook (e.g. fp16 compression)
                self.active = False


def _count_and_allreduce(counter: GradSyncCounter, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    if bucket.index() == 0:
        counter.count += 1
    return allreduce_hook(None, bucket)


def _sharded(model: nn.Module) -> bool:
    return any(hasattr(p, "full_tensor") for p in model.parameters())  # FSDP2 holds DTensor shards


def gather_for_save(accelerator, model: nn.Module, optimizer) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(weights of the model inside `agrpo.Policy`, optimizer state), whole, for the main process to save.

    Every process must call it: under FSDP and ZeRO-3 each holds a shard and the gather is a
    collective. FSDP's optimizer state is gathered too, keyed by parameter name (what
    `optimizer_loader` reads back); without sharding the optimizer's own state dict serves.
    DeepSpeed's stays in the engine: `optimizer_loader` refuses to resume such a run.
    """
    full = accelerator.get_state_dict(model) or {}
    policy = unwrap(model)
    # the Policy's weights live under `model.` (its fast-path modules hold the same tensors again);
    # a tied weight keeps its first name only: gathered shards no longer share storage, so
    # save_pretrained could not tell that lm_head.weight is embed_tokens.weight
    first = dict(policy.named_parameters())
    every = {name for name, _ in policy.named_parameters(remove_duplicate=False)}
    weights = {
        k[len("model.") :]: v for k, v in full.items() if k.startswith("model.") and (k in first or k not in every)
    }
    if not _sharded(model):
        return weights, None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return weights, get_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), options=options)


def optimizer_loader(accelerator, model: nn.Module, optimizer):
    """`load_training_state`'s loader: a gathered state goes back into the shards of a sharded model."""
    if getattr(accelerator.state, "deepspeed_plugin", None) is not None:
        raise AgrpoError(
            "resuming under DeepSpeed is not supported: its optimizer state is partitioned per process and "
            "checkpoints keep the model only; resume with the DDP or FSDP config, or start a new run from "
            "the checkpoint (model=<run>/checkpoints/step_...)"
        )
    if not _sharded(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    def load(saved: dict) -> None:
        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(model, getattr(optimizer, "optimizer", optimizer), saved, options=options)

    return load


@contextlib.contextmanager
def collective_free(accelerator, model: nn.Module):
    """The policy to sample with: its forward passes make no collective calls.

    Generation stops once every row of a process has ended and evaluation shares differ in
    size, so processes run different numbers of sampling forwards. DDP would broadcast
    buffers and FSDP / ZeRO-3 would gather parameters in each of them, pairing calls across
    processes and hanging. So: the unwrapped module under DDP; under FSDP every unit gathered
    once (the same calls on every process) and kept whole until the end; under ZeRO-3 the
    parameters gathered for the duration. Sampling then holds the whole model, as DDP does.
    """
    policy = unwrap(model)
    if _sharded(model):
        from torch.distributed.fsdp import FSDPModule

        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.unshard()
            unit.set_reshard_after_forward(False, recurse=False)
        try:
            yield policy
        finally:
            reshard = getattr(getattr(accelerator.state, "fsdp_plugin", None), "reshard_after_forward", True)
            for unit in units:
                unit.set_reshard_after_forward(reshard if isinstance(reshard, bool) else True, recurse=False)
                unit.reshard()
    elif getattr(getattr(accelerator.state, "deepspeed_plugin", None), "zero_stage", 0) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield policy
    else:
        yield policy
