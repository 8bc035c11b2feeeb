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

Everything that differs between backends lives here, keyed on what accelerate set up, never on
a name in the recipe: building the Accelerator so that an accelerate or DeepSpeed config is
honoured on CPU as on GPU (`make_accelerator`), the line that says what runs (`launch_line`),
DeepSpeed's config values that need the model (`settle_deepspeed`), how the model is loaded
(`model_loading`), a sampler without collectives (`collective_free`), and checkpoints that
resume exactly (`gather_for_save`, `save_engine_state`, `resume_training_state`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import socket
from pathlib import Path

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
    DeepSpeed's is partitioned over the processes and goes into the engine's own checkpoint
    (`save_engine_state`): the optimizer state returned is then None and no optimizer.pt is written.
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
    once (the same calls on every process) and kept whole until the end; under ZeRO-3 every
    parameter gathered at once and the engine's hooks off (`_zero3_gathered`). Sampling then
    holds the whole model, as DDP does.
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
    elif _zero_stage(accelerator) == 3:
        with _zero3_gathered(model):
            yield policy
    else:
        yield policy


@contextlib.contextmanager
def _zero3_gathered(engine):
    """Every parameter of a ZeRO-3 engine whole, and its module hooks off, until the block ends.

    ZeRO-3 hooks every submodule: each forward fetches its parameters and prefetches the next
    ones (all-gathers), which pair up across processes and would hang sampling that runs different
    numbers of forwards; a prefetch still in flight when the parameters are partitioned again
    fails ("a param in flight"). So: first release everything (waiting for any gather in flight),
    the same calls on every process; then gather all parameters at once; then take the hooks off,
    so that sampling forwards run on plain tensors; on the way out the hooks go back on (the
    engine records its fetch order anew) and the parameters are partitioned again.
    """
    import deepspeed

    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    if offload is None or not hasattr(offload, "forward_hooks"):
        raise RuntimeError(f"a ZeRO-3 engine without the parameter offload agrpo expects (deepspeed {deepspeed.__version__})")
    offload.empty_partition_cache()
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        offload._remove_module_hooks()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload.setup_zero_stage3_hooks()


# -- which backend runs ------------------------------------------------------------------
_YES = ("1", "true", "yes")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in _YES


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _deepspeed_plugin():
    """DeepSpeed's plugin as `accelerate launch` describes it in the environment, or one line why not."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        raise AgrpoError(
            f"the accelerate config asks for DeepSpeed, which does not import ({e}): pip install deepspeed, "
            "or launch with configs/accelerate/ddp.yaml or fsdp.yaml"
        ) from None
    from accelerate.utils import DeepSpeedPlugin

    try:
        plugin = DeepSpeedPlugin()
    except ValueError as e:
        if "will be ignored" in str(e):  # accelerate's multi-line refusal of settings beside a json file
            raise AgrpoError(
                "the accelerate config sets mixed_precision (or another engine setting) beside deepspeed_config_file, "
                "where DeepSpeed would ignore it: remove it from the yaml; precision is the recipe's dtype (bf16 "
                "auto in the json follows it), clipping and stage are in the json"
            ) from None
        raise AgrpoError(f"the DeepSpeed config is not usable: {str(e).splitlines()[0]}") from None
    config = plugin.deepspeed_config
    # the values DeepSpeed leaves to the program: agrpo fills them once the model is loaded
    plugin.agrpo_auto = {
        key for key in ("bf16.enabled", "fp16.enabled")
        if str(config.get(key.split(".")[0], {}).get("enabled", "")).lower() == "auto"
    }
    return plugin


def _cpu_process_group(timeout: datetime.timedelta | None) -> None:
    """A gloo process group for DeepSpeed on CPU (accelerate makes none when it is told cpu=False
    and finds no GPU); a process started without a launcher is a group of one."""
    if torch.distributed.is_initialized():
        return
    if "LOCAL_RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    torch.distributed.init_process_group("gloo", **({"timeout": timeout} if timeout else {}))


def make_accelerator(**kwargs):
    """The recipes' Accelerator: the backend the accelerate config (or DeepSpeed's) asks for, on CPU as
    on GPU, or an error in one line. `kwargs` go to `Accelerator` (log_with, project_dir, handlers).

    accelerate drops DeepSpeed whenever `cpu=True` and FSDP unless the processes have GPUs, so on a
    machine without one: DeepSpeed gets `cpu=False` and a gloo process group made here; FSDP gets its
    plugin and accelerate's state set to FSDP by hand (torch's FSDP2 runs on gloo). DDP needs nothing.
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs

    gpu = torch.cuda.is_available()
    want_deepspeed, want_fsdp = _env_flag("ACCELERATE_USE_DEEPSPEED"), _env_flag("ACCELERATE_USE_FSDP")
    if want_deepspeed and want_fsdp:
        raise AgrpoError("the launch asks for both DeepSpeed and FSDP: use one accelerate config (configs/accelerate/)")
    handlers = list(kwargs.pop("kwargs_handlers", None) or [])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if want_deepspeed:
        plugin = _deepspeed_plugin()
        if not gpu:
            os.environ["ACCELERATE_USE_CPU"] = "false"  # accelerate would take it as cpu=True and drop DeepSpeed
            group = next((h for h in handlers if isinstance(h, InitProcessGroupKwargs)), None)
            _cpu_process_group(group.timeout if group else None)
            handlers = [h for h in handlers if not isinstance(h, InitProcessGroupKwargs)]
            handlers.append(InitProcessGroupKwargs(backend="gloo", **({"timeout": group.timeout} if group else {})))
        accelerator = Accelerator(cpu=False, deepspeed_plugin=plugin, kwargs_handlers=handlers, **kwargs)
        if accelerator.distributed_type != DistributedType.DEEPSPEED:
            raise AgrpoError("the accelerate config asks for DeepSpeed but accelerate did not turn it on: "
                             f"it set up {accelerator.distributed_type.value}")
        return accelerator
    if want_fsdp and not gpu and world > 1:
        plugin = FullyShardedDataParallelPlugin()
        accelerator = Accelerator(cpu=True, fsdp_plugin=plugin, kwargs_handlers=handlers, **kwargs)
        # AcceleratorState copies PartialState's fields again on later look-ups: set both
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
        return accelerator
    accelerator = Accelerator(cpu=not gpu, kwargs_handlers=handlers, **kwargs)
    if want_fsdp and accelerator.num_processes > 1 and accelerator.distributed_type != DistributedType.FSDP:
        raise AgrpoError("the accelerate config asks for FSDP but accelerate did not turn it on: "
                         f"it set up {accelerator.distributed_type.value}")
    return accelerator


def _deepspeed(accelerator):
    return getattr(accelerator.state, "deepspeed_plugin", None) if accelerator.distributed_type == "DEEPSPEED" else None


def _zero_stage(accelerator) -> int:
    plugin = _deepspeed(accelerator)
    return int(plugin.zero_stage) if plugin is not None else 0


def launch_record(accelerator, model: nn.Module) -> dict:
    """What runs: backend, ZeRO stage, precision, processes, device and collective backend."""
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    plugin = _deepspeed(accelerator)
    if plugin is not None:
        config = plugin.deepspeed_config
        lower = "bf16" if config.get("bf16", {}).get("enabled") is True else "fp16" if config.get("fp16", {}).get("enabled") is True else None
        precision = f"{lower} (fp32 master weights)" if lower else dtype
        backend, stage = "deepspeed", int(plugin.zero_stage)
    else:
        precision = dtype if accelerator.mixed_precision == "no" else f"{dtype}, {accelerator.mixed_precision} autocast"
        stage = None
        if accelerator.distributed_type == "FSDP":
            backend = "fsdp2" if getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) == 2 else "fsdp"
        else:
            backend = "ddp" if accelerator.num_processes > 1 else "single"
    group = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    return {"backend": backend, "zero_stage": stage, "precision": precision, "processes": accelerator.num_processes,
            "device": accelerator.device.type, "comm": group}


def launch_line(record: dict, sampling_only: bool = False) -> str:
    """`agrpo: deepspeed zero-3, float32, 2 processes (cpu, gloo)`, the first line of a run.
    `sampling_only`: for a command that only samples (evaluation), where no engine shards the model."""
    if record["backend"] == "single":
        head = "1 process, no distributed backend"
    else:
        head = record["backend"] + (f" zero-{record['zero_stage']}" if record["zero_stage"] else "")
    count = "" if record["backend"] == "single" else f", {record['processes']} processes"
    where = record["device"] + (f", {record['comm']}" if record["comm"] else "")
    note = ""
    if record["backend"] == "single" and _env_flag("ACCELERATE_USE_FSDP"):
        note = "; FSDP needs 2 or more processes to shard, so it is off"
    elif sampling_only and record["backend"] != "single":
        note = "; evaluation only samples: each process holds the whole model and takes its own share of the problems"
    return f"agrpo: {head}, {record['precision']}{count} ({where}){note}"


def settle_deepspeed(accelerator, model: nn.Module, grad_clip: float) -> None:
    """Fill what a DeepSpeed config leaves `auto` and accelerate could only read from `model.config`
    (the Policy has none): bucket sizes from the hidden size, as accelerate would; `bf16` / `fp16`
    `auto` from the dtype the model was loaded in (the recipe's `dtype`: precision is set there only);
    `gradient_clipping` `auto` from the recipe's `grad_clip` (a number there that disagrees is refused:
    the engine clips, and the recipe's value would be silently ignored). Call it before `prepare`."""
    plugin = _deepspeed(accelerator)
    if plugin is None:
        return
    config = plugin.deepspeed_config
    zero = config.setdefault("zero_optimization", {})
    own = [key for key in ("optimizer", "scheduler") if key in config]
    if own:
        raise AgrpoError(
            f"the DeepSpeed config has its own {' and '.join(own)}: the recipe builds AdamW and its schedule from lr, "
            "adam_beta1/2, weight_decay, lr_schedule and warmup; remove the section from the json"
        )
    if int(plugin.zero_stage) == 3:  # checkpoints hold the whole model: the engine must gather it to save
        gather = zero.get("stage3_gather_16bit_weights_on_model_save", "auto")
        if gather is False:
            raise AgrpoError("stage3_gather_16bit_weights_on_model_save is false in the DeepSpeed config: checkpoints "
                             "hold the whole model in transformers' format, gathered at each save; set it to true")
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    clip = float(grad_clip) if grad_clip and grad_clip > 0 else 0.0
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = clip
        plugin.gradient_clipping = clip
    elif float(config["gradient_clipping"]) != clip:
        raise AgrpoError(
            f"the DeepSpeed config clips at gradient_clipping={config['gradient_clipping']} and the recipe at "
            f"grad_clip={grad_clip:g}; DeepSpeed's engine does the clipping: set gradient_clipping to \"auto\" "
            "(it follows grad_clip) or pass the same grad_clip"
        )
    hidden = getattr(getattr(unwrap(model).model, "config", None), "hidden_size", None)
    sizes = {"reduce_bucket_size": lambda h: h * h, "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
             "stage3_param_persistence_threshold": lambda h: 10 * h}
    for key, size in sizes.items():
        if zero.get(key) == "auto":
            if hidden is None:
                raise AgrpoError(f"zero_optimization.{key} is auto in the DeepSpeed config and the model's config has no "
                                 "hidden_size to compute it from: write a number")
            zero[key] = size(int(hidden))
    dtype = next(model.parameters()).dtype
    for key, wanted in (("bf16.enabled", torch.bfloat16), ("fp16.enabled", torch.float16)):
        if key in getattr(plugin, "agrpo_auto", ()):
            config[key.split(".")[0]]["enabled"] = dtype == wanted


@contextlib.contextmanager
def model_loading(accelerator, whole: bool = False):
    """Load the model as the run expects it: whole, unless a ZeRO-3 launch sets `zero3_init_flag`
    (`whole=True`: whole anyway, for a model no engine will hold, e.g. one being evaluated).

    accelerate registers the DeepSpeed config with transformers whatever that flag says, and
    transformers then loads every model already partitioned (parameters of shape (0,)); the flag
    off means whole, so the registration is lifted while the model loads.
    """
    plugin = _deepspeed(accelerator)
    if plugin is None or _zero_stage(accelerator) != 3 or (plugin.zero3_init_flag and not whole):
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def loads_sharded(accelerator) -> bool:
    """True when `model_loading` gives a partitioned model (ZeRO-3 with zero3_init_flag)."""
    plugin = _deepspeed(accelerator)
    return plugin is not None and _zero_stage(accelerator) == 3 and bool(plugin.zero3_init_flag)


def check_whole_copy(accelerator, what: str) -> None:
    """Refuse, in one line, something that copies the whole model when the launch loads it partitioned."""
    if loads_sharded(accelerator):
        raise AgrpoError(f"{what} needs a whole copy of the model, which a partitioned load (zero3_init_flag: true) "
                         "does not give: set zero3_init_flag: false in the accelerate config, or use LoRA")


# -- checkpoints under every backend ---------------------------------------------------------
ENGINE_DIR = "deepspeed"  # inside a checkpoint: DeepSpeed's own engine checkpoint (every rank's shard)
_ENGINE_TAG = "state"


def _optimizer_format(record: dict | None) -> str:
    """How a checkpoint holds its optimizer state: one torch state dict (single process, DDP), one
    gathered by parameter name (FSDP), or DeepSpeed's partitions (per stage and process count)."""
    record = record or {}
    if record.get("backend") == "deepspeed":
        return f"DeepSpeed ZeRO-{record['zero_stage']} partitions over {record['processes']} processes"
    if str(record.get("backend", "")).startswith("fsdp"):
        return "FSDP's gathered state"
    return "a torch optimizer state (single process or DDP)"


def save_engine_state(accelerator, model: nn.Module, run_dir: Path, step: int) -> Path | None:
    """DeepSpeed's engine checkpoint of `step` (every rank writes its own optimizer partition) into a
    staging folder of the run, for `save_checkpoint(engine_dir=...)` to move into the checkpoint;
    None under other backends. Every process must call it (the engine saves collectively)."""
    if _deepspeed(accelerator) is None:
        return None
    staging = Path(run_dir) / f".engine-step_{step:06d}"
    if accelerator.is_main_process:
        for old in Path(run_dir).glob(".engine-step_*"):  # left by a crash between two saves
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    model.save_checkpoint(str(staging), tag=_ENGINE_TAG, save_latest=False, exclude_frozen_parameters=True)
    accelerator.wait_for_everyone()
    return staging


def check_resume_backend(accelerator, model: nn.Module, path: Path, saved: dict | None) -> None:
    """Refuse, in one line, to resume a checkpoint whose optimizer state this launch cannot read."""
    if saved is None and not (path / ENGINE_DIR).is_dir():
        return  # written before checkpoints recorded their launch: the optimizer loaders judge it
    saved_record = saved or {"backend": "deepspeed", "zero_stage": "?", "processes": "?"}
    now = launch_record(accelerator, model)
    if _optimizer_format(saved_record) != _optimizer_format(now):
        raise AgrpoError(
            f"{path} holds {_optimizer_format(saved_record)}, which this launch ({launch_line(now).removeprefix('agrpo: ')}) "
            f"cannot resume: resume with the accelerate config and process count it was saved under, or start a new run "
            f"from its weights with model={path}"
        )


def load_weights_for_resume(accelerator, path: Path, model: nn.Module, saved_launch: dict | None) -> None:
    """Before `accelerator.prepare`: the checkpoint's weights into the whole model, or, under DeepSpeed,
    nothing (the engine checkpoint restores them after prepare, into whole or partitioned parameters)."""
    from agrpo.checkpoint import load_checkpoint

    check_resume_backend(accelerator, model, path, saved_launch)
    if _deepspeed(accelerator) is None:
        load_checkpoint(path, model)


def resume_training_state(accelerator, path: Path, model: nn.Module, optimizer, scheduler) -> dict:
    """After `accelerator.prepare`: optimizer and scheduler state of a checkpoint -> its state.json.
    Under DeepSpeed every rank reads its own partition from the engine checkpoint."""
    from agrpo.checkpoint import load_training_state

    if _deepspeed(accelerator) is None:
        return load_training_state(path, optimizer, scheduler, optimizer_loader(accelerator, model, optimizer))
    engine_dir = Path(path) / ENGINE_DIR
    if not (engine_dir / _ENGINE_TAG).is_dir():
        raise AgrpoError(f"{path} has no DeepSpeed engine checkpoint ({ENGINE_DIR}/): resume it with the accelerate "
                         f"config it was saved under, or start a new run from its weights with model={path}")
    loaded, _ = model.load_checkpoint(str(engine_dir), tag=_ENGINE_TAG, load_module_strict=False,
                                      load_optimizer_states=True, load_lr_scheduler_states=False)
    if loaded is None:
        raise AgrpoError(f"checkpoint {path} is corrupt: DeepSpeed could not read {ENGINE_DIR}/; use an older checkpoint")
    return load_training_state(path, None, scheduler)


def record_launch(run_dir: Path, record: dict) -> None:
    """The launch line as the first line of the run's config.yaml (a comment: the file stays a preset)."""
    from agrpo.fileio import write_atomic

    path = Path(run_dir) / "config.yaml"
    write_atomic(path, f"# launch: {launch_line(record).removeprefix('agrpo: ')}\n{path.read_text(encoding='utf-8')}".encode())
