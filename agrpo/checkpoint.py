"""Atomic, resumable checkpoints under `<run_dir>/checkpoints/`.

Layout:

    checkpoints/
        step_000100/          model (save_pretrained: full weights, or the adapter only for
                              a peft model), optimizer.pt, scheduler.pt, state.json; under
                              DeepSpeed, deepspeed/ (the engine's own checkpoint, every
                              rank's optimizer partition) in place of optimizer.pt
        step_000200/
        latest                text file naming the directory to resume from

A checkpoint is written into a hidden sibling directory (`.tmp-...`) and appears under
its `step_*` name only through one `os.replace` once every file in it is fsync'ed, so a
`step_*` directory is always complete. `latest` is then switched with the same
write-then-replace move, and only after that are old checkpoints removed (renamed to a
hidden `.trash-...` name first, so that a crash half-way through a deletion does not leave
a partial `step_*` directory either). A crash at any point therefore leaves the previous
checkpoint and `latest` usable; hidden leftovers are ignored by the loaders and removed by
the next save.

Models are passed unwrapped: the Hugging Face model (or peft model) itself, e.g.
`agrpo.policy.unwrap(policy).model` or `accelerator.unwrap_model(...)`. The optimizer may
be accelerate's wrapper: only its `state_dict` / `load_state_dict` are used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from agrpo.errors import AgrpoError
from agrpo.fileio import TMP_PREFIX, fsync_dir, json_safe, write_atomic

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE = "state.json"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
_TMP, _TRASH = TMP_PREFIX, ".trash-"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# keys of state.json written by this module; `extra` may not reuse them
_RESERVED = ("step", "model_source", "format")


# -- small filesystem helpers ------------------------------------------------------------
def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_file(Path(dirpath) / name)
        fsync_dir(Path(dirpath))


def _remove_dir(path: Path) -> None:
    """Delete a checkpoint so that no partial `step_*` directory can survive a crash."""
    trash = path.parent / f"{_TRASH}{path.name}-{uuid.uuid4().hex[:8]}"
    os.replace(path, trash)
    fsync_dir(path.parent)
    shutil.rmtree(trash, ignore_errors=True)


def _clean_leftovers(root: Path) -> None:
    for entry in root.iterdir():
        if entry.name.startswith((_TMP, _TRASH)):
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    out = []
    if root.is_dir():
        for entry in root.iterdir():
            m = _STEP_DIR.match(entry.name)
            if m and entry.is_dir() and (entry / STATE).is_file():
                out.append((int(m.group(1)), entry))
    return sorted(out)


# -- model helpers -------------------------------------------------------------------------
def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but a plain model never needs it
        return False
    return isinstance(model, PeftModel)


def _model_source(model: nn.Module) -> str | None:
    """Where the base model came from, so that a checkpoint can find its tokenizer later."""
    base = model.get_base_model() if _is_peft(model) else model
    source = getattr(base, "name_or_path", None)
    return str(source) if source else None


# -- public API ----------------------------------------------------------------------------
def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler=None,
    extra: dict | None = None,
    keep_last: int | None = 2,
    tokenizer=None,
    model_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict | None = None,
    engine_dir: str | os.PathLike | None = None,
) -> Path:
    """Write `run_dir/checkpoints/step_{step:06d}/` atomically and point `latest` at it.

    Args:
        model: the unwrapped HF model or peft model (a peft model saves its adapter only).
        optimizer / scheduler: anything with `state_dict()`; scheduler may be None.
        extra: JSON-serialisable values stored in state.json next to `step` (counters,
            config hash, ...); returned by `load_checkpoint`. Non-finite floats become null.
        keep_last: checkpoints kept after this save. The one just written is always kept,
            so values below 1 act as 1; None keeps every checkpoint. Checkpoints with a
            step above `step` belong to a timeline abandoned by a resume from an earlier
            checkpoint and are removed as well.
        tokenizer: optional; saved into the checkpoint so that it loads stand-alone.
        model_state / optimizer_state: what to write instead of `model.state_dict()` /
            `optimizer.state_dict()`: the whole model and optimizer gathered from the shards
            of a sharded run (`agrpo.distributed.gather_for_save`), on the process that saves.
        engine_dir: a folder (DeepSpeed's engine checkpoint, written by every process) moved into
            the checkpoint as `deepspeed/`; the optimizer is then None (its state is in there).

    Returns the checkpoint directory.
    """
    step = int(step)
    if step < 0:
        raise AgrpoError(f"checkpoint step must be >= 0, got {step}")
    extra = dict(extra or {})
    clash = [k for k in _RESERVED if k in extra]
    if clash:
        raise AgrpoError(f"save_checkpoint extra= may not contain {clash}: these keys are written by agrpo")
    state = {"format": 1, "step": step, "model_source": _model_source(model), **extra}
    try:  # serialise before touching the disk: a bad value must not cost a half-written save
        state_text = json.dumps(json_safe(state), indent=2, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise AgrpoError(f"save_checkpoint extra= is not JSON-serialisable: {e}") from e

    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    _clean_leftovers(root)
    name = f"step_{step:06d}"
    final = root / name
    tmp = root / f"{_TMP}{name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        model.save_pretrained(tmp, safe_serialization=True, **({} if model_state is None else {"state_dict": model_state}))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if engine_dir is not None:
            os.replace(engine_dir, tmp / "deepspeed")
        if optimizer is not None or optimizer_state is not None:
            torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / OPTIMIZER)
        if scheduler is not None:
            torch.save(scheduler.state_dict(), tmp / SCHEDULER)
        # state.json last: a directory holding it has everything else as well
        (tmp / STATE).write_text(state_text, encoding="utf-8")
        _fsync_tree(tmp)
        if final.exists():
            # Re-saving a step (e.g. after a resume): the old copy cannot be replaced by a
            # directory rename, so move it out of the way first. Should a crash land in
            # between, `latest_checkpoint` falls back to the newest complete directory.
            _remove_dir(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_atomic(root / LATEST, name + "\n")

    if keep_last is not None:
        keep = max(int(keep_last), 1)
        older = [p for s, p in _step_dirs(root) if s < step]
        newer = [p for s, p in _step_dirs(root) if s > step]
        for path in newer + older[: max(len(older) - (keep - 1), 0)]:
            _remove_dir(path)
    return final


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint `latest` names, or None when the run has no checkpoint yet.

    If `latest` is missing or names a directory that is gone (a crash while a step was
    being re-saved), the complete checkpoint with the highest step is returned instead.
    """
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        candidate = root / name
        if _STEP_DIR.match(name) and (candidate / STATE).is_file():
            return candidate
    found = _step_dirs(root)
    return found[-1][1] if found else None


def _read_state(path: Path) -> dict:
    state_file = path / STATE
    if not path.is_dir():
        raise AgrpoError(f"checkpoint {path} does not exist: pass a <run>/checkpoints/step_NNNNNN directory")
    if not state_file.is_file():
        raise AgrpoError(f"{path} is not a checkpoint (no {STATE}): pass a <run>/checkpoints/step_NNNNNN directory")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AgrpoError(f"checkpoint {path} is corrupt: {STATE} is unreadable ({e}); use an older checkpoint") from e
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise AgrpoError(f"checkpoint {path} is corrupt: {STATE} has no integer 'step'; use an older checkpoint")
    return state


def checkpoint_state(path: str | os.PathLike) -> dict:
    """The state.json of a checkpoint (its step and the `extra` values saved with it), checked."""
    return _read_state(Path(path))


def _read_safetensors(path: Path, files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error type for damaged files
            raise AgrpoError(f"checkpoint {path} is corrupt: cannot read {f.name} ({e}); use an older checkpoint") from e
    return tensors


def _weight_files(path: Path, peft: bool) -> list[Path]:
    if peft:
        files = [path / "adapter_model.safetensors"]
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    elif (path / "model.safetensors.index.json").is_file():  # large models are sharded
        try:
            index = json.loads((path / "model.safetensors.index.json").read_text(encoding="utf-8"))
            files = [path / name for name in sorted(set(index["weight_map"].values()))]
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise AgrpoError(f"checkpoint {path} is corrupt: unreadable shard index ({e})") from e
    else:
        files = [path / "model.safetensors"]
    for f in files:
        if not f.is_file():
            kind = "a LoRA adapter (peft model)" if peft else "full model weights"
            raise AgrpoError(
                f"checkpoint {path} has no {f.name}: expected {kind}; "
                "load it into the same kind of model it was saved from"
            )
    return files


def _check_fit(path: Path, own: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], kind: str) -> None:
    """Refuse a checkpoint of another model before a single weight is overwritten."""
    # save_pretrained drops the second name of a tied tensor (lm_head.weight of a model
    # with tied embeddings); such a key is fine as long as its tensor comes in under
    # another name. Anything else missing means the weights belong to another model.
    names_by_tensor: dict[int, set[str]] = {}
    for name, tensor in own.items():
        names_by_tensor.setdefault(id(tensor), set()).add(name)
    missing = [k for k in own if k not in tensors and not (names_by_tensor[id(own[k])] & tensors.keys())]
    unexpected = [k for k in tensors if k not in own]
    wrong_shape = [k for k in tensors if k in own and tuple(tensors[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong_shape:
        raise AgrpoError(
            f"{kind} {path} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"other shape {wrong_shape[:3]}): load it into the model and settings it was saved from"
        )


def _load_plain(path: Path, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    _check_fit(path, model.state_dict(keep_vars=True), tensors, "checkpoint")
    model.load_state_dict(tensors, strict=False)


def _load_peft(path: Path, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    # the adapter's own keys, named as in the saved file (without the adapter name)
    _check_fit(path, get_peft_model_state_dict(model), tensors, "adapter checkpoint")
    set_peft_model_state_dict(model, tensors)


def _torch_load(path: Path, file: Path):
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle / zip errors of a damaged file
        raise AgrpoError(f"checkpoint {path} is corrupt: cannot read {file.name} ({e}); use an older checkpoint") from e


def load_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
) -> dict:
    """Load a checkpoint into `model` (and `optimizer` / `scheduler` if given), in place.

    `model` is the unwrapped HF model or peft model, of the same kind that was saved:
    full weights go through `load_state_dict` (tied weights allowed), an adapter through
    `peft.set_peft_model_state_dict`. Every file is read and checked before anything is
    modified, so a corrupt checkpoint raises `AgrpoError` and leaves the objects untouched.

    Returns the state.json dict (`step`, the `extra` values given to `save_checkpoint`).
    """
    path = Path(path)
    state = _read_state(path)
    peft = _is_peft(model)
    tensors = _read_safetensors(path, _weight_files(path, peft))
    opt_state, sched_state = _read_training_state(path, optimizer is not None, scheduler is not None)
    (_load_peft if peft else _load_plain)(path, model, tensors)
    _apply_training_state(path, optimizer, scheduler, opt_state, sched_state)
    return state


def load_training_state(
    path: str | os.PathLike,
    optimizer: torch.optim.Optimizer | None,
    scheduler=None,
    load_optimizer_state: Callable[[dict], None] | None = None,
) -> dict:
    """Load the optimizer and scheduler of a checkpoint, not the model; returns state.json.

    For runs that shard the model: its weights go in with `load_checkpoint(path, model)` before
    accelerate shards it, the optimizer state once the optimizer holds the shards.
    `load_optimizer_state(saved)` replaces `optimizer.load_state_dict(saved)` (e.g.
    `agrpo.distributed.optimizer_loader`, which shards a gathered state). `optimizer=None`: the
    optimizer state was restored elsewhere (DeepSpeed's engine checkpoint).
    """
    path = Path(path)
    state = _read_state(path)
    opt_state, sched_state = _read_training_state(path, optimizer is not None, scheduler is not None)
    _apply_training_state(path, optimizer, scheduler, opt_state, sched_state, load_optimizer_state)
    return state


def _read_training_state(path: Path, optimizer: bool, scheduler: bool) -> tuple[dict | None, dict | None]:
    opt_state = sched_state = None
    if optimizer:
        if not (path / OPTIMIZER).is_file():
            raise AgrpoError(f"checkpoint {path} has no {OPTIMIZER}: it cannot resume training; use another checkpoint")
        opt_state = _torch_load(path, path / OPTIMIZER)
    if scheduler:
        if not (path / SCHEDULER).is_file():
            raise AgrpoError(f"checkpoint {path} has no {SCHEDULER}: it was saved without a scheduler")
        sched_state = _torch_load(path, path / SCHEDULER)
    return opt_state, sched_state


def _apply_training_state(path, optimizer, scheduler, opt_state, sched_state, load_optimizer_state=None) -> None:
    if opt_state is not None:
        try:
            (load_optimizer_state or optimizer.load_state_dict)(opt_state)
        except (ValueError, KeyError, RuntimeError) as e:  # parameter groups or names differ
            raise AgrpoError(f"optimizer state in {path} does not fit this optimizer: {e}") from e
    if sched_state is not None:
        scheduler.load_state_dict(sched_state)
