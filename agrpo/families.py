"""Model families: how a hub checkpoint maps onto a model class of transformers, as data.

LLaDA's and Dream's hub code (`trust_remote_code`) was written for transformers 4.x and
fails on 5.x (NOTES.md, 2026-11-25). The functions they compute exist in transformers:

* LLaDA (8B-Base, 8B-Instruct, 1.5) is a Llama block (RMSNorm, SwiGLU, RoPE, no biases)
  with attention over the whole sequence, under other config fields and weight names;
* Dream (v0-Base/Instruct-7B) is a Qwen2 (q/k/v biases) with attention over the whole
  sequence whose logits are next-token style: position i predicts token i + 1;
* SDAR (1.7B/4B/8B-Chat, TraDo) is a Qwen3 (per-head q/k RMSNorm) under block attention:
  causal across blocks of `block_size` tokens, bidirectional inside one (`agrpo.blocks`);
* LLaDA2.0 / 2.1 (mini) is a mixture-of-experts model transformers does not ship, under the
  same block attention: `agrpo.modeling_llada2` implements it, with the hub's weight names.

A family is a `Family` record read by one loader (`agrpo.models`). The weight names are
renamed by `from_pretrained(key_mapping=...)` while the tensors stream in, so an 8B model
is never held twice. `save_in_family_format` writes a model back in its family's layout
(config fields and weight names of the hub checkpoint) for the model's own code and for
evaluation scripts written against it.

What a loaded model carries on its config (and keeps through `save_pretrained`):
`agrpo_family` = {"name", "hub_config", "source"}, `shift_logits`, `mask_token_id`,
`eos_token_id` as the list of ids that end a row (EOS first, then the end-of-turn tokens), and
for the block-diffusion families `block_size` (absent: attention over the whole sequence).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import torch
from torch import nn

from agrpo.errors import AgrpoError

ID_FIELDS = ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id")
# keys of a hub config.json that describe the file or the hub code, not the model
_FILE_KEYS = ("architectures", "auto_map", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path")


def _frozen(mapping: dict) -> MappingProxyType:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class Family:
    """One model family. Every mapping goes from the hub's names to the native ones."""

    name: str
    # `model_type` values of the hub config.json (lower case) that identify the family
    model_types: tuple[str, ...] = ()
    # the class the weights load into: a transformers class name, or "module.Class" for one of
    # ours (`native_model_class`); None: the class the config names
    native_class: str | None = None
    # architecture fields: hub config field -> native config field (written back on export)
    config_fields: MappingProxyType = field(default_factory=lambda: _frozen({}))
    # hub fields whose value the native class cannot express otherwise: allowed values
    supported_values: MappingProxyType = field(default_factory=lambda: _frozen({}))
    # hub fields outside `config_fields` are copied as they are (the native class shares them
    # and its defaults); without it every field of `config_fields` must be in config.json
    passthrough: bool = False
    # hub fields never handed to the native config (settings of the hub's own code, such as the
    # attention kernel it asks for); they stay in the recorded hub config.json
    dropped_fields: tuple[str, ...] = ()
    # regex on checkpoint weight names -> native name, applied in order (transformers' key_mapping)
    weight_names: MappingProxyType = field(default_factory=lambda: _frozen({}))
    # hub module names -> native ones, for LoRA target_modules written with the hub's names
    module_names: MappingProxyType = field(default_factory=lambda: _frozen({}))
    # used only when neither the config nor the tokenizer names a mask token
    default_mask_id: int | None = None
    # tokens that end a row besides EOS (looked up in the tokenizer where present)
    end_of_turn: tuple[str, ...] = ()
    shift_logits: bool = False
    # the transformers class that reads the family's tokenizer files, for a tokenizer_config.json
    # that names the hub's own tokenizer code (`remote_tokenizers`); None: what the files name
    tokenizer_class: str | None = None
    remote_tokenizers: tuple[str, ...] = ()
    # block-diffusion families: tokens per block when neither the config nor the caller says
    # (None: attention over the whole sequence)
    default_block_size: int | None = None
    # a recognised format agrpo does not read natively: why, and what to do instead (one line)
    unsupported: str | None = None


LLADA = Family(
    name="llada",
    model_types=("llada",),
    native_class="LlamaForCausalLM",
    config_fields=_frozen({
        "d_model": "hidden_size",
        "n_heads": "num_attention_heads",
        "n_kv_heads": "num_key_value_heads",
        "n_layers": "num_hidden_layers",
        "mlp_hidden_size": "intermediate_size",
        # the weights have `embedding_size` rows (LLaDA may pad the vocabulary up to it)
        "embedding_size": "vocab_size",
        "weight_tying": "tie_word_embeddings",
        "rms_norm_eps": "rms_norm_eps",
        "rope_theta": "rope_theta",
        "max_sequence_length": "max_position_embeddings",
        "activation_type": "hidden_act",
        "attention_dropout": "attention_dropout",
    }),
    supported_values=_frozen({
        "block_type": ("llama",),
        "layer_norm_type": ("rms",),
        "layer_norm_with_affine": (True,),
        "activation_type": ("silu",),
        "rope": (True,),
        "alibi": (False,),
        "include_bias": (False,),
        "include_qkv_bias": (False,),
        "attention_layer_norm": (False,),
        "input_emb_norm": (False,),
        "scale_logits": (False,),
        "block_group_size": (1,),
        "multi_query_attention": (None, False),
        "clip_qkv": (None,),
    }),
    weight_names=_frozen({
        # the top-level ff_out (the LM head) before the blocks' ff_out (the MLP output)
        r"^model\.transformer\.wte\.": "model.embed_tokens.",
        r"^model\.transformer\.ln_f\.": "model.norm.",
        r"^model\.transformer\.ff_out\.": "lm_head.",
        r"^model\.transformer\.blocks\.": "model.layers.",
        r"\.attn_norm\.": ".input_layernorm.",
        r"\.ff_norm\.": ".post_attention_layernorm.",
        r"\.q_proj\.": ".self_attn.q_proj.",
        r"\.k_proj\.": ".self_attn.k_proj.",
        r"\.v_proj\.": ".self_attn.v_proj.",
        r"\.attn_out\.": ".self_attn.o_proj.",
        r"\.ff_proj\.": ".mlp.gate_proj.",
        r"\.up_proj\.": ".mlp.up_proj.",
        r"\.ff_out\.": ".mlp.down_proj.",
    }),
    module_names=_frozen({"attn_out": "o_proj", "ff_proj": "gate_proj", "ff_out": "down_proj"}),
    default_mask_id=126336,
    end_of_turn=("<|eot_id|>",),
)

DREAM = Family(
    name="dream",
    model_types=("dream",),
    native_class="Qwen2ForCausalLM",
    config_fields=_frozen({k: k for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "vocab_size", "rms_norm_eps", "rope_theta", "max_position_embeddings", "hidden_act", "tie_word_embeddings",
    )}),
    supported_values=_frozen({"hidden_act": ("silu",), "use_sliding_window": (False,)}),
    passthrough=True,
    default_mask_id=151666,
    end_of_turn=("<|im_end|>",),
    shift_logits=True,
    # DreamTokenizer (tokenization_dream.py) is Qwen2's byte-level BPE under another name: the same
    # ids from the same vocab.json + merges.txt, without importing the hub's code
    tokenizer_class="Qwen2Tokenizer",
    remote_tokenizers=("DreamTokenizer",),
)

_QWEN3_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "vocab_size", "rms_norm_eps", "rope_theta", "max_position_embeddings", "hidden_act", "tie_word_embeddings",
    "attention_bias", "attention_dropout",
)

SDAR = Family(
    name="sdar",
    model_types=("sdar",),
    # SDARConfig's fields and defaults are Qwen3Config's; its modules and weight names are Qwen3's
    native_class="Qwen3ForCausalLM",
    config_fields=_frozen({k: k for k in _QWEN3_FIELDS}),
    supported_values=_frozen({
        "hidden_act": ("silu",),
        "use_sliding_window": (False, None),
        "rope_scaling": (None,),
    }),
    passthrough=True,
    # SDAR asks for flex attention (its training kernel); agrpo chooses the attention kernel itself
    dropped_fields=("attn_implementation",),
    default_mask_id=151669,
    end_of_turn=("<|im_end|>",),
    default_block_size=4,
)

LLADA2 = Family(
    name="llada2",
    model_types=("llada2_moe",),
    native_class="agrpo.modeling_llada2.LLaDA2ForCausalLM",
    # the native config takes the hub's field names, and the modules carry the hub's weight names
    config_fields=_frozen({k: k for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim", "vocab_size", "rms_norm_eps", "rope_theta", "partial_rotary_factor", "hidden_act",
        "tie_word_embeddings", "use_qkv_bias", "use_bias", "num_experts", "num_shared_experts", "num_experts_per_tok",
        "n_group", "topk_group", "routed_scaling_factor", "moe_intermediate_size", "first_k_dense_replace",
        "max_position_embeddings", "attention_dropout",
    )}),
    # fields the hub code reads as a fixed choice: another value means code agrpo does not know
    supported_values=_frozen({
        "hidden_act": ("silu",),
        "score_function": ("sigmoid",),
        "use_qk_norm": (True,),
        "use_rmsnorm": (True,),
        "norm_topk_prob": (True,),
        "norm_head": (False,),
        "norm_softmax": (False,),
        "use_sliding_window": (False, None),
        "using_split_qkv_in_self_attention": (False, None),
        "rope_scaling": (None,),
    }),
    passthrough=True,
    dropped_fields=("rope_scaling",),
    # LLaDA2's mask and block length are arguments of its generate (mask_id=156895, block_length=32)
    default_mask_id=156895,
    end_of_turn=("<|role_end|>",),
    default_block_size=32,
)

SDAR_MOE = Family(
    name="sdar_moe",
    model_types=("sdar_moe",),
    unsupported=(
        "SDAR MoE checkpoints (model_type sdar_moe, SDAR-30B-A3B) are not read natively: load them with "
        "trust_remote_code=true, or use a dense SDAR (1.7B/4B/8B-Chat)"
    ),
)

GENERIC = Family(name="generic")

FAMILIES = {f.name: f for f in (LLADA, DREAM, SDAR, LLADA2, SDAR_MOE, GENERIC)}


def native_model_class(family: Family):
    """The model class named by `family.native_class`: a transformers class, or "module.Class"
    (importing the module registers its classes with transformers' Auto classes)."""
    import importlib

    import transformers

    name = family.native_class
    if name is None:
        raise AgrpoError(family.unsupported or f"the {family.name} family has no native model class")
    module, _, cls = name.rpartition(".")
    return getattr(importlib.import_module(module) if module else transformers, cls)


def identify(hub: dict) -> tuple[Family, bool]:
    """(family, in the hub's layout?) of a raw config.json dict.

    A model saved by agrpo names its family in `agrpo_family` and is already native."""
    recorded = hub.get("agrpo_family")
    if isinstance(recorded, dict) and recorded.get("name") in FAMILIES:
        return FAMILIES[recorded["name"]], False
    model_type = str(hub.get("model_type", "")).lower()
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family, True
    return GENERIC, False


def native_config(family: Family, hub: dict):
    """The native transformers config of a hub config.json dict (bidirectional attention)."""
    if family.unsupported:
        raise AgrpoError(family.unsupported)
    for key, allowed in family.supported_values.items():
        if key in hub and hub[key] not in allowed:
            raise AgrpoError(
                f"this {family.name} checkpoint has {key}={hub[key]!r}, which the {family.native_class.rsplit('.', 1)[-1]} "
                f"mapping does not reproduce (supported: {', '.join(map(repr, allowed))})"
            )
    missing = [k for k in family.config_fields if k not in hub]
    if missing and not family.passthrough:  # the native class's defaults are not the family's
        raise AgrpoError(f"this {family.name} config.json lacks {', '.join(missing)}: is it a complete {family.name} checkpoint?")
    skip = set(_FILE_KEYS) | set(family.config_fields) | set(family.dropped_fields)
    kwargs = {k: v for k, v in hub.items() if k not in skip} if family.passthrough else {}
    kwargs.update({k: hub[k] for k in ID_FIELDS if k in hub})
    kwargs.update({native: hub[key] for key, native in family.config_fields.items() if hub.get(key) is not None})
    cls = native_model_class(family).config_class
    try:
        config = cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise AgrpoError(f"cannot map this {family.name} config.json onto {cls.__name__}: {e}") from e
    config.use_cache = False  # every denoising step sees a different sequence: nothing to cache
    return config


def tokenizer_family(class_names) -> Family | None:
    """The family whose hub tokenizer code is one of `class_names` (as a tokenizer_config.json
    names it: `tokenization_dream.DreamTokenizer` or `DreamTokenizer`), if any."""
    names = {str(n).rsplit(".", 1)[-1] for n in class_names if n}
    return next((f for f in FAMILIES.values() if names & set(f.remote_tokenizers)), None)


def family_of(config) -> Family:
    recorded = getattr(config, "agrpo_family", None)
    return FAMILIES.get(recorded.get("name"), GENERIC) if isinstance(recorded, dict) else GENERIC


def _token_id(tokenizer, token: str) -> int | None:
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    return vocab.get(token)


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def annotate(config, family: Family, tokenizer, *, hub: dict | None = None, source: str | None = None,
             mask_token_id: int | None = None, shift_logits: bool | None = None,
             block_size: int | None = None) -> None:
    """Record on `config` what the rest of the toolkit reads: family, shift, mask and EOS ids, and
    the block size of a block-diffusion model (given > config > family default)."""
    config.is_causal = False
    if hub is not None or getattr(config, "agrpo_family", None) is None:
        config.agrpo_family = {"name": family.name, "hub_config": hub, "source": source}
    if shift_logits is not None:
        config.shift_logits = bool(shift_logits)
    elif getattr(config, "shift_logits", None) is None:
        config.shift_logits = family.shift_logits
    if mask_token_id is not None:
        config.mask_token_id = int(mask_token_id)
    elif getattr(config, "mask_token_id", None) is None:
        tokenizer_mask = getattr(tokenizer, "mask_token_id", None)
        config.mask_token_id = tokenizer_mask if tokenizer_mask is not None else family.default_mask_id
    if block_size is not None or family.default_block_size:
        size = block_size if block_size is not None else getattr(config, "block_size", None)
        size = family.default_block_size if size is None else size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise AgrpoError(f"block_size must be a positive whole number of tokens, got {size!r}")
        config.block_size = size
    eos = _ids(getattr(config, "eos_token_id", None)) + _ids(getattr(tokenizer, "eos_token_id", None))
    eos += [i for i in (_token_id(tokenizer, t) for t in family.end_of_turn) if i is not None]
    eos = list(dict.fromkeys(eos))
    if eos:
        config.eos_token_id = eos if len(eos) > 1 else eos[0]


def lora_targets(config, names: list[str]) -> list[str]:
    """`lora.target_modules` with the family's hub module names replaced by the native ones."""
    table = family_of(config).module_names
    return list(dict.fromkeys(table.get(n, n) for n in names))


# -- back to the hub's layout ------------------------------------------------------------
def _native_value(config, name: str):
    if hasattr(config, name):
        return getattr(config, name)
    return (getattr(config, "rope_parameters", None) or {}).get(name)


def hub_config(config, dtype: torch.dtype | None = None) -> dict:
    """The config.json of the family's hub layout: the recorded one with the architecture
    fields read back from the native config (ids stay as the hub wrote them)."""
    family = family_of(config)
    recorded = getattr(config, "agrpo_family", None) or {}
    hub = dict(recorded.get("hub_config") or {})
    if family.native_class is None or not hub:
        raise AgrpoError(
            "the hub layout is known only for LLaDA or Dream checkpoints (and SDAR, LLaDA2) loaded by agrpo "
            "without trust_remote_code: save this model with save_pretrained"
        )
    for key, native in family.config_fields.items():
        value = _native_value(config, native)
        if value is not None or key in hub:
            hub[key] = value
    if dtype is not None:  # under the key the hub config uses (transformers >= 4.56 writes `dtype`)
        hub["dtype" if "dtype" in hub and "torch_dtype" not in hub else "torch_dtype"] = str(dtype).removeprefix("torch.")
    return hub


def _hub_state_dict(model: nn.Module, family: Family) -> dict[str, torch.Tensor]:
    from transformers.core_model_loading import WeightRenaming, apply_renamings

    # the reverse renamings in reverse order undo the forward ones (as transformers' own save does)
    forward = [WeightRenaming(src, dst) for src, dst in family.weight_names.items()]
    backward = [w.reverse_transform() for w in reversed(forward)]
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # the hub checkpoint stores a tied head once, as the embedding
    return {apply_renamings(k, backward): v for k, v in state.items()}


def _copy_model_code(hub: dict, source: str | None, path: Path) -> None:
    """The hub's modeling files next to the weights, where they can be found without a download:
    the modules `auto_map` names and every module they import relatively (Dream's
    modeling_dream.py imports generation_utils.py), as far as they are on disk."""
    if not source:
        return
    from transformers.dynamic_module_utils import get_relative_imports
    from transformers.utils import cached_file

    todo = sorted({ref.split(".")[0] for ref in (hub.get("auto_map") or {}).values() if isinstance(ref, str)})
    seen = set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        try:
            found = cached_file(source, f"{module}.py", local_files_only=True, _raise_exceptions_for_missing_entries=False)
        except (OSError, ValueError):
            found = None
        if found:
            shutil.copyfile(found, path / f"{module}.py")
            todo += [name for name in get_relative_imports(found) if name not in seen]


def save_in_family_format(model: nn.Module, tokenizer, path, max_shard_size: str = "5GB") -> Path:
    """Write `model` with its family's hub config fields and weight names.

    A peft model is merged into its base first, in place (`merge_and_unload`): the adapter
    is gone afterwards. The hub's modeling files are copied along when they are on disk.
    """
    from huggingface_hub import save_torch_state_dict

    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    config = model.config
    family = family_of(config)
    hub = hub_config(config, dtype=next(model.parameters()).dtype)
    state = _hub_state_dict(model, family)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_torch_state_dict(state, path, max_shard_size=max_shard_size, metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hub, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    _copy_model_code(hub, (getattr(config, "agrpo_family", None) or {}).get("source"), path)
    return path
