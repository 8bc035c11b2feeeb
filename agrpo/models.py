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

import contextlib
import copy
import json
import logging
import os
import re
import warnings
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


class _KnownMapping(logging.Filter):
    """Drops transformers' "model of type `llada` to instantiate a model of type `llama` ... can
    yield errors" for the families agrpo maps on purpose (peft and checkpoint code reread the hub
    config.json through the native config class); any other mismatch is still reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        from agrpo.families import FAMILIES, native_model_class

        text = record.getMessage()
        found = re.match(r"You are using a model of type `([^`]*)` to instantiate a model of type `([^`]*)`", text)
        if not found:
            return True
        source, target = found.group(1).lower(), found.group(2)
        for family in FAMILIES.values():
            if source in family.model_types and family.native_class:
                return native_model_class(family).config_class.model_type != target
        return True


logging.getLogger("transformers.configuration_utils").addFilter(_KnownMapping())


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _looks_like_path(name: str) -> bool:
    """A hub id is `name` or `org/name`; anything else with separators is meant as a path, and so
    is `dir/name` when `dir` is a local directory (`runs/my-run` with a typo in `my-run`)."""
    if name.startswith((".", "/", "~")) or re.match(r"^[A-Za-z]:[\\/]", name):
        return True
    if "\\" in name or (os.sep != "/" and os.sep in name):
        return True
    return name.count("/") > 1 or ("/" in name and Path(name.split("/", 1)[0]).is_dir())


def _offline_unless_reachable() -> bool:
    """True when hub files can come from the local cache only.

    One quick request decides: with no route to the hub, huggingface_hub retries every file
    with backoff (~27 s before the first error); in offline mode a cached model loads at once
    and a missing one fails at once.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    from huggingface_hub.utils import get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=5)
    except Exception:  # noqa: BLE001 - any transport failure means the hub cannot be reached
        constants.HF_HUB_OFFLINE = True
        os.environ["HF_HUB_OFFLINE"] = "1"  # worker processes started later agree
        return True
    return False


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
    if latest is None and path.name == "checkpoints":  # runs/<name>/checkpoints stands for the run
        latest = latest_checkpoint(path.parent)
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


def _whole_reason(e: BaseException) -> str:
    """An exception's whole message on one line (transformers' often spans several)."""
    return " ".join(str(e).split()) or type(e).__name__


def _tokenizer_config(source: str) -> dict:
    """The tokenizer_config.json of a local folder or a cached / reachable hub repo ({} if none)."""
    from transformers.utils import cached_file

    try:
        found = cached_file(source, "tokenizer_config.json", _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except (OSError, ValueError):
        return {}
    if not found:
        return {}
    try:
        data = json.loads(Path(found).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AgrpoError(f"cannot load a tokenizer from {source}: tokenizer_config.json is not valid JSON ({e})") from e
    return data if isinstance(data, dict) else {}


def load_tokenizer(source: str, *, trust_remote_code: bool = False, config=None):
    """The tokenizer of a model folder or hub repo, never through the model's own code.

    A tokenizer_config.json naming a tokenizer class of the hub's code (Dream's DreamTokenizer)
    is read with the transformers class its family record names (`Family.tokenizer_class`); an
    unknown one runs its own code only with `trust_remote_code` (its tokenization module alone,
    not the modeling code). Any failure is one line with the whole reason.
    """
    import transformers

    from agrpo.families import tokenizer_family

    settings = _tokenizer_config(source)
    named = settings.get("tokenizer_class")
    remote = (settings.get("auto_map") or {}).get("AutoTokenizer") if isinstance(settings.get("auto_map"), dict) else None
    remote = [r for r in (remote if isinstance(remote, (list, tuple)) else [remote]) if isinstance(r, str)]
    native_names = (named, str(named).removesuffix("Fast")) if named else ()
    needs_code = bool(named) and not any(hasattr(transformers, n) for n in native_names)
    native = None
    if needs_code:
        family = tokenizer_family([named, *remote])
        if family is not None:
            native = family.tokenizer_class
        elif not trust_remote_code:
            raise AgrpoError(
                f"the tokenizer in {source} is {named}, a class of the model's own code that agrpo does not read "
                "natively: pass trust_remote_code=true to run its tokenizer code"
            )
    try:
        if native is not None:
            tokenizer = getattr(transformers, native).from_pretrained(source)
        else:
            # a given config spares AutoTokenizer from reading a config.json it cannot parse (LLaDA's, Dream's)
            kwargs = {"config": config} if config is not None else {}
            tokenizer = transformers.AutoTokenizer.from_pretrained(
                source, trust_remote_code=bool(trust_remote_code and needs_code), **kwargs
            )
    except (OSError, ValueError, ImportError, TypeError, AttributeError, KeyError) as e:
        raise AgrpoError(f"cannot load a tokenizer from {source}: {_whole_reason(e)}") from e
    tokenizer.padding_side = "left"  # prompts end where the completion starts (agrpo.data.encode_prompts)
    return tokenizer


def _require_mask_token(model: nn.Module, name: str) -> None:
    if getattr(model.config, "mask_token_id", None) is None and getattr(model.config, "mask_id", None) is None:
        raise AgrpoError(
            f"{name} has no mask token: set mask_token_id in its config.json or give its tokenizer "
            "a mask token (a masked diffusion LM needs one)"
        )


def shift_logits_of(model: nn.Module, override: bool | None = None) -> bool:
    """Whether position i is scored from the logits of i - 1: `override` if given, else the
    value the loader recorded for the model's family (Dream: True)."""
    if override is not None:
        return bool(override)
    return bool(getattr(getattr(model, "config", None), "shift_logits", False))


def _lora_targets(model: nn.Module, names: list[str] | None) -> list[str] | None:
    """Hub module names translated (LLaDA's attn_out -> o_proj, ...); a name matching nothing is refused."""
    if not names:
        return None
    from agrpo.families import lora_targets

    targets = lora_targets(model.config, list(names))
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    missing = [t for t in targets if t != "all-linear" and not any(n == t or n.endswith("." + t) for n in linear)]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
        raise AgrpoError(f"lora.target_modules {missing} match no linear layer of this model: choose among {', '.join(leaves)}")
    return targets


@contextlib.contextmanager
def _peft_quietly():
    """peft reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model: a
    FutureWarning about peft's code, not the user's, printed on every LoRA run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


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
        target_modules=_lora_targets(model, lora.get("target_modules")),
        task_type=None,
    )
    try:
        with _peft_quietly():
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


def _resolve_dtype(dtype: str, family) -> torch.dtype:
    if dtype == "auto":
        # an 8B family model in float32 needs 32 GB for the weights alone; tiny models keep float32
        gpu = torch.cuda.is_available() and family.native_class is not None
        return torch.bfloat16 if gpu else torch.float32
    return DTYPES[dtype]


def _check_attention(attn_implementation: str | None) -> None:
    if attn_implementation and attn_implementation.startswith("flash_attention"):
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise AgrpoError(
                f"attn_implementation={attn_implementation} needs the flash-attn package (pip install flash-attn, "
                "CUDA GPU): install it or use attn_implementation=sdpa"
            )


def _read_config_json(source: str) -> dict:
    from huggingface_hub import constants
    from transformers import PretrainedConfig

    try:
        hub, _ = PretrainedConfig.get_config_dict(source)
    except (OSError, ValueError) as e:
        if constants.HF_HUB_OFFLINE and not Path(source).exists():
            raise AgrpoError(
                f"{source} is not in the local cache and the hub cannot be reached (offline): pass a local "
                "directory written by save_pretrained, or download the model where there is network "
                "(HF_HUB_OFFLINE=1 then reads it from the cache)"
            ) from e
        raise AgrpoError(f"cannot load a model config from {source}: {_first_line(e)}") from e
    return hub


def _load_model(source: str, opts: dict):
    """(model, its family, the hub config.json it was mapped from or None)."""
    import transformers
    from transformers import AutoConfig

    from agrpo.families import identify, native_config, native_model_class

    trust_remote_code = opts["trust_remote_code"]
    # transformers draws a "Loading weights" bar per load, which tears through the run's own bar
    transformers.utils.logging.disable_progress_bar()
    hub = _read_config_json(source)
    family, hub_layout = identify(hub)
    if not hub_layout or trust_remote_code:  # trust_remote_code: the hub's own classes, as asked
        hub = None
    if hub is None and family.native_class and not trust_remote_code:
        native_model_class(family)  # a class of ours registers itself with AutoConfig on import
    torch_dtype = _resolve_dtype(opts["dtype"], family)
    if hub is not None:  # a family's hub layout: its native class, names renamed while the weights stream in
        config = native_config(family, hub)
        cls = native_model_class(family)
        kwargs = {"config": config, "dtype": torch_dtype, "key_mapping": dict(family.weight_names) or None}
    else:
        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            hint = " (pass trust_remote_code=true for models with their own code)" if "trust_remote_code" in str(e) else ""
            raise AgrpoError(f"cannot load a model config from {source}: {_first_line(e)}{hint}") from e
        cls = _auto_class(config, trust_remote_code)
        kwargs = {"config": config, "dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    attn = opts["attn_implementation"]
    if attn and not (trust_remote_code and attn == "sdpa"):  # hub code may not declare sdpa support
        _check_attention(attn)
        kwargs["attn_implementation"] = attn
    device = opts["device"]
    if opts["load_in_4bit"]:
        kwargs["quantization_config"] = _quantization(torch_dtype)
        kwargs["device_map"] = {"": device if device is not None else torch.cuda.current_device()}
    elif opts["device_map"] is not None:
        kwargs["device_map"] = opts["device_map"]
    try:
        prepare_remote_code(cls, source, **kwargs)
        model = cls.from_pretrained(source, **kwargs)
    except ImportError as e:  # the hub's own code imports what this machine lacks (flash_attn, ...)
        native = (f": agrpo reads the {family.name} format itself, leave trust_remote_code unset"
                  if family.native_class else "")
        raise AgrpoError(f"the model code shipped with {source} cannot be imported ({_whole_reason(e)}){native}") from e
    except OSError as e:
        raise AgrpoError(f"cannot load model weights from {source}: {_first_line(e)}") from e
    if hub is not None:
        # save_pretrained would otherwise write the hub's weight names under a native config.json;
        # checkpoints stay native, save_in_family_format writes the hub layout
        model._weight_conversions = []
    if device is not None and "device_map" not in kwargs:  # a quantised model is placed by device_map
        model = model.to(device)
    return model, family, hub


def _enable_activation_checkpointing(model: nn.Module) -> None:
    # activation_checkpointing_enable replaced the deprecated gradient_checkpointing_enable in transformers 5
    enable = getattr(model, "activation_checkpointing_enable", None)
    try:
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    except ValueError as e:
        raise AgrpoError(f"gradient_checkpointing=true is not supported by this model: {_first_line(e)}") from e


def load_model_and_tokenizer(
    name_or_path: str,
    *,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    lora: dict | None = None,
    load_in_4bit: bool = False,
    device=None,
    device_map=None,
    attn_implementation: str | None = "sdpa",
    gradient_checkpointing: bool = False,
    mask_token_id: int | None = None,
    shift_logits: bool | None = None,
    block_size: int | None = None,
):
    """(model, tokenizer) ready for `agrpo.Policy`; the config always has `mask_token_id`.

    LLaDA and Dream hub checkpoints load into Llama / Qwen2 classes of transformers with
    attention over the whole sequence, SDAR into Qwen3 and LLaDA2.0 into agrpo's own class,
    both with block attention (`agrpo.families`); anything else loads through the Auto
    classes, with `is_causal=False` forced. The config records `shift_logits`,
    `eos_token_id` (the list of ids that end a row) and, for block models, `block_size`.

    Args:
        dtype: "auto" (bfloat16 for LLaDA / Dream on a GPU, else float32), "float32",
            "bfloat16" or "float16" (parameter dtype).
        lora: {"r", "alpha", "dropout", "target_modules"}: wrap the model with peft LoRA
            adapters so that only those train. LLaDA's module names (attn_out, ff_proj,
            ff_out) are translated. Given with a LoRA checkpoint, the saved adapter is
            loaded trainable instead of a new one (its rank must match).
        load_in_4bit: quantise with bitsandbytes (CUDA only).
        device: move the model there (default: where from_pretrained puts it, the CPU).
        device_map: passed to from_pretrained (e.g. "auto" to spread a model over GPUs).
        attn_implementation: "sdpa", "eager" or "flash_attention_2" (needs flash-attn).
        gradient_checkpointing: recompute activations in the backward pass (memory for time).
        mask_token_id / shift_logits: override what the config, tokenizer or family say.
        block_size: tokens per block of a block-diffusion model (SDAR, LLaDA2): overrides the
            config's `block_size` and the family default (LLaDA2.0's generate uses 32).
    """
    if dtype != "auto" and dtype not in DTYPES:
        raise AgrpoError(f"unknown dtype {dtype!r}: choose one of auto, {', '.join(DTYPES)}")
    opts = {
        "dtype": dtype, "trust_remote_code": trust_remote_code, "load_in_4bit": load_in_4bit, "device": device,
        "device_map": device_map, "attn_implementation": attn_implementation,
        "gradient_checkpointing": gradient_checkpointing, "mask_token_id": mask_token_id, "shift_logits": shift_logits,
        "block_size": block_size,
    }
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
            if candidate.parent.is_dir():
                import difflib

                close = difflib.get_close_matches(candidate.name, [c.name for c in candidate.parent.iterdir()], n=3)
                if close:
                    hint = f"did you mean {', '.join(str(candidate.parent / c) for c in close)}? Or {hint}"
            if candidate.name == "model" and candidate.parent.name:  # where `agrpo sft` saves its model
                run = candidate.parent
                hint = f"create it with `agrpo sft output_dir={run.parent} name={run.name}` (plus the task's settings), or {hint}"
            raise AgrpoError(f"model path {name} does not exist: {hint}")
        else:
            path = None

    if path is not None and (path / "adapter_config.json").is_file():
        model, tokenizer = _load_adapter(path, lora, opts)
        if gradient_checkpointing and lora is not None:
            model.enable_input_require_grads()
        return model, tokenizer
    source = name if path is None else str(path)
    if path is None:
        _offline_unless_reachable()
    model, family, hub = _load_model(source, opts)
    if path is None or _has_tokenizer(path):
        tok_source = source
    else:
        tok_source = _recorded_source(path)
        if tok_source is None:
            raise AgrpoError(
                f"{path} has no tokenizer files and records no base model: save the tokenizer there "
                "with tokenizer.save_pretrained"
            )
    tokenizer = load_tokenizer(tok_source, trust_remote_code=trust_remote_code,
                               config=model.config if hub is not None else None)

    from agrpo.families import annotate

    annotate(model.config, family, tokenizer, hub=hub, source=source if hub is not None else None,
             mask_token_id=mask_token_id, shift_logits=shift_logits, block_size=block_size)
    _require_mask_token(model, name)
    if gradient_checkpointing:
        _enable_activation_checkpointing(model)
    if lora is not None:
        model = _apply_lora(model, lora)
        if gradient_checkpointing:  # frozen embeddings: let the checkpointed blocks see an input that needs grad
            model.enable_input_require_grads()
    return model, tokenizer


def _load_adapter(path: Path, lora: dict | None, opts: dict):
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
    base, tokenizer = load_model_and_tokenizer(base_source, **opts)
    if _has_tokenizer(path):
        tokenizer = load_tokenizer(str(path), trust_remote_code=opts["trust_remote_code"], config=base.config)
    try:
        with _peft_quietly():
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
