"""Loading models and tokenizers for the recipes.

`load_model_and_tokenizer` accepts:

* `tiny:<task>`: the checkpoint shipped inside the package (agrpo/tiny/checkpoints/<task>/);
* a local directory written by `save_pretrained` (config + safetensors + tokenizer);
* an agrpo checkpoint directory (runs/<name>/checkpoints/step_NNNNNN) or a run directory
  (its latest checkpoint, else the `model/` an SFT run saved). Checkpoints do not carry a
  tokenizer, so it comes from the model they were trained from (recorded in state.json,
  or in adapter_config.json for a LoRA adapter, which is loaded on top of that base);
* a hub name (`org/model`), loaded with `from_pretrained`.

Anything that looks like a filesystem path but does not exist is refused before the hub
is asked, so a typo never turns into a download attempt.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from agrpo.compat import prepare_remote_code
from agrpo.errors import AgrpoError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY_PREFIX = "tiny:"
TINY_DIR = Path(__file__).resolve().parent / "tiny" / "checkpoints"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
# tried in this order: bidirectional LMs saved as *ForCausalLM first, then the classes the
# remote code of LLaDA / Dream registers
_AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModel")
_LORA_KEYS = {"r", "alpha", "dropout", "target_modules"}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _looks_like_path(name: str) -> bool:
    """A hub id is `name` or `org/name`; anything else with separators is meant as a path."""
    if name.startswith((".", "/", "~")) or re.match(r"^[A-Za-z]:[\\/]", name):
        return True
    if "\\" in name or (os.sep != "/" and os.sep in name):
        return True
    return name.count("/") > 1


def _resolve_tiny(name: str) -> Path:
    task = name[len(TINY_PREFIX):]
    path = TINY_DIR / task
    if not task or not (path / "config.json").is_file():
        raise AgrpoError(
            f"no shipped tiny checkpoint for task {task!r} at {path}: create it with "
            f"`agrpo sft task={task or '<task>'} export_to={path}`"
        )
    return path


def _resolve_run_dir(path: Path) -> Path:
    """A run directory stands for its latest checkpoint, or for the model an SFT run saved."""
    if (path / "config.json").is_file() or (path / "adapter_config.json").is_file():
        return path
    from agrpo.checkpoint import latest_checkpoint

    latest = latest_checkpoint(path)
    if latest is not None:
        return latest
    if (path / "model" / "config.json").is_file():
        return path / "model"
    raise AgrpoError(
        f"{path} holds no model (no config.json): pass a directory written by save_pretrained, "
        "a checkpoint directory or a hub name"
    )


def _recorded_source(path: Path) -> str | None:
    """The model a checkpoint was trained from, as save_checkpoint / peft recorded it."""
    state = path / "state.json"
    if state.is_file():
        try:
            source = json.loads(state.read_text(encoding="utf-8")).get("model_source")
        except (OSError, ValueError, AttributeError):
            source = None
        if source:
            return str(source)
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        try:
            source = json.loads(adapter.read_text(encoding="utf-8")).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            source = None
        if source:
            return str(source)
    return None


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in _TOKENIZER_FILES)


def _auto_class(config, trust_remote_code: bool):
    import transformers

    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and auto_map:
        for name in _AUTO_CLASSES:
            if name in auto_map:
                return getattr(transformers, name)
    for name in _AUTO_CLASSES:
        cls = getattr(transformers, name)
        if type(config) in cls._model_mapping:
            return cls
    raise AgrpoError(
        f"transformers has no model class for config {type(config).__name__}: "
        "pass trust_remote_code=true if the model ships its own code"
    )


def _tokenizer(source: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise AgrpoError(f"cannot load a tokenizer from {source}: {_first_line(e)}") from e


def _set_mask_token(model: nn.Module, tokenizer, name: str) -> None:
    config = model.config
    for key in ("mask_token_id", "mask_id"):
        if getattr(config, key, None) is not None:
            return
    mask = getattr(tokenizer, "mask_token_id", None)
    if mask is None:
        raise AgrpoError(
            f"{name} has no mask token: set mask_token_id in its config.json or give its tokenizer "
            "a mask token (a masked diffusion LM needs one)"
        )
    config.mask_token_id = int(mask)


def _apply_lora(model: nn.Module, lora: dict) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    unknown = set(lora) - _LORA_KEYS
    if unknown:
        raise AgrpoError(f"unknown lora settings {sorted(unknown)}: use {sorted(_LORA_KEYS)}")
    r = int(lora.get("r", 0))
    if r < 1:
        raise AgrpoError(f"lora.r must be >= 1, got {r}: pass lora=None to train the full model")
    config = LoraConfig(
        r=r,
        lora_alpha=lora.get("alpha", 16),
        lora_dropout=float(lora.get("dropout", 0.0)),
        target_modules=list(lora["target_modules"]) if lora.get("target_modules") else None,
        task_type=None,
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # e.g. no module matches target_modules
        raise AgrpoError(f"cannot add LoRA adapters: {_first_line(e)}; check lora.target_modules") from e


def _quantization(dtype: torch.dtype):
    try:
        import bitsandbytes  # noqa: F401  (only needed to fail early with a clear message)
    except ImportError as e:
        raise AgrpoError("load_in_4bit needs bitsandbytes: pip install bitsandbytes (needs a CUDA GPU)") from e
    if not torch.cuda.is_available():
        raise AgrpoError("load_in_4bit needs a CUDA GPU: set load_in_4bit=false on this machine")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True
    )


def _load_model(source: str, torch_dtype, trust_remote_code: bool, load_in_4bit: bool, device):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        hint = " (pass trust_remote_code=true for models with their own code)" if "trust_remote_code" in str(e) else ""
        raise AgrpoError(f"cannot load a model config from {source}: {_first_line(e)}{hint}") from e
    cls = _auto_class(config, trust_remote_code)
    kwargs = {"config": config, "dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if load_in_4bit:
        kwargs["quantization_config"] = _quantization(torch_dtype)
        kwargs["device_map"] = {"": device if device is not None else torch.cuda.current_device()}
    prepare_remote_code(cls, source, **kwargs)
    try:
        model = cls.from_pretrained(source, **kwargs)
    except OSError as e:
        raise AgrpoError(f"cannot load model weights from {source}: {_first_line(e)}") from e
    if device is not None and not load_in_4bit:  # a quantised model is placed by device_map
        model = model.to(device)
    return model


def load_model_and_tokenizer(
    name_or_path: str,
    *,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    lora: dict | None = None,
    load_in_4bit: bool = False,
    device=None,
):
    """(model, tokenizer) ready for `agrpo.Policy`; the config always has `mask_token_id`.

    Args:
        dtype: "float32", "bfloat16" or "float16" (parameter dtype).
        lora: {"r", "alpha", "dropout", "target_modules"}: wrap the model with peft LoRA
            adapters so that only those train. Given with a LoRA checkpoint, the saved
            adapter is loaded trainable instead of a new one (its rank must match).
        load_in_4bit: quantise with bitsandbytes (CUDA only).
        device: move the model there (default: where from_pretrained puts it, the CPU).
    """
    if dtype not in DTYPES:
        raise AgrpoError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    name = str(name_or_path)
    if name.startswith(TINY_PREFIX):
        path: Path | None = _resolve_tiny(name)
    else:
        candidate = Path(name).expanduser()
        if candidate.exists():
            if not candidate.is_dir():
                raise AgrpoError(f"{name} is a file: pass a model directory (written by save_pretrained) or a hub name")
            path = _resolve_run_dir(candidate)
        elif _looks_like_path(name):
            hint = "check the path, or pass a hub name like org/model"
            if candidate.name == "model" and candidate.parent.name:  # where `agrpo sft` saves its model
                run = candidate.parent
                hint = f"create it with `agrpo sft output_dir={run.parent} name={run.name}` (plus the task's settings), or {hint}"
            raise AgrpoError(f"model path {name} does not exist: {hint}")
        else:
            path = None

    if path is None:  # a hub name
        source = name
        model = _load_model(source, torch_dtype, trust_remote_code, load_in_4bit, device)
        tokenizer = _tokenizer(source, trust_remote_code)
    elif (path / "adapter_config.json").is_file():
        model, tokenizer = _load_adapter(path, lora, dtype, trust_remote_code, load_in_4bit, device)
        lora = None  # the adapter is the LoRA
    else:
        model = _load_model(str(path), torch_dtype, trust_remote_code, load_in_4bit, device)
        tok_source = str(path) if _has_tokenizer(path) else _recorded_source(path)
        if tok_source is None:
            raise AgrpoError(
                f"{path} has no tokenizer files and records no base model: save the tokenizer there "
                "with tokenizer.save_pretrained"
            )
        tokenizer = _tokenizer(tok_source, trust_remote_code)

    _set_mask_token(model, tokenizer, name)
    if lora is not None:
        model = _apply_lora(model, lora)
    return model, tokenizer


def _load_adapter(path: Path, lora: dict | None, dtype: str, trust_remote_code: bool, load_in_4bit: bool, device):
    """A LoRA checkpoint: its base model (recorded at save time) plus the saved adapter."""
    from peft import PeftModel

    base_source = _recorded_source(path)
    if base_source is None:
        raise AgrpoError(f"adapter checkpoint {path} does not record its base model: cannot load it")
    saved_r = None
    try:
        saved_r = json.loads((path / "adapter_config.json").read_text(encoding="utf-8")).get("r")
    except (OSError, ValueError, AttributeError) as e:
        raise AgrpoError(f"adapter checkpoint {path} has an unreadable adapter_config.json: {e}") from e
    if lora is not None and saved_r is not None and int(lora.get("r", saved_r)) != int(saved_r):
        raise AgrpoError(
            f"adapter checkpoint {path} has LoRA rank {saved_r} but lora.r={lora.get('r')}: use the same rank"
        )
    base, tokenizer = load_model_and_tokenizer(
        base_source, dtype=dtype, trust_remote_code=trust_remote_code, load_in_4bit=load_in_4bit, device=device
    )
    if _has_tokenizer(path):
        tokenizer = _tokenizer(str(path), trust_remote_code)
    try:
        model = PeftModel.from_pretrained(base, str(path), is_trainable=lora is not None)
    except (OSError, ValueError, RuntimeError) as e:
        raise AgrpoError(f"cannot load the adapter in {path}: {_first_line(e)}") from e
    return model, tokenizer


def frozen_copy(model: nn.Module) -> nn.Module:
    """An independent, frozen copy in eval mode (the KL reference of full fine-tuning)."""
    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref
