"""A masked diffusion LM seen as a policy: logits only where they are needed.

At LLaDA's vocabulary (126,464) the LM head costs far more than a small backbone, and
a denoising step or an AGRPO sample needs logits at a handful of positions only
(NOTES.md: 0.46 s for the whole sequence against 0.10 s for 16 positions). So the
wrapper runs the backbone on the whole sequence, gathers the hidden states of the
requested positions and applies the head to those rows alone.

`Policy` is an `nn.Module` so that accelerate can wrap it (DDP, FSDP, DeepSpeed):
calling the wrapped module's forward keeps the gradient synchronisation hooks, which
calling the HF submodules directly would bypass.

Block-diffusion models (SDAR, LLaDA2.0: `config.block_size` set) attend block-causally: the
wrapper builds that mask itself (`agrpo.blocks`), and `chunk_logits` runs one chunk of
positions against a key/value cache of the earlier, finished blocks, which is what a block
sampler needs: the prompt and each committed block are encoded once, and only the block
being denoised is run at every step.
"""

from __future__ import annotations

import inspect
import warnings

import torch
from torch import nn

from agrpo import blocks
from agrpo.errors import AgrpoError


_CHECK_LEN = 32  # positions compared once between the gathered head and the model's own logits
_OPTIONAL_KWARGS = ("position_ids", "use_cache")
# relative agreement required of the two paths; bf16/fp16 round each logit at ~1e-2
_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4}


def _config_ids(model: nn.Module, name: str) -> tuple[int, ...]:
    """Every id a config lists under `name` (LLaDA-Instruct ends a turn with one EOS and pads with another)."""
    value = getattr(getattr(model, "config", None), name, None)
    if value is None:
        return ()
    values = value if isinstance(value, (list, tuple)) else [value]
    return tuple(dict.fromkeys(int(v) for v in values if v is not None))


def _config_id(model: nn.Module, *names: str) -> int | None:
    config = getattr(model, "config", None)
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)):  # some configs list several EOS ids
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return None


def _base_model(model: nn.Module) -> nn.Module:
    """The model under a peft wrapper. LoRA replaces layers inside it in place, so calling its
    submodules still runs the adapters (and `disable_adapter` still turns them off)."""
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else None
    return base if isinstance(base, nn.Module) else model


def _runs_causally(model: nn.Module) -> bool:
    """True only when transformers itself would run this model with causal attention.

    transformers 5 builds a bidirectional mask for its decoder-only models when
    `config.is_causal` is False (masking_utils.create_causal_mask), and a causal one when it
    is True or missing. Classes it does not ship (remote code, custom wrappers) are trusted.
    """
    base = _base_model(model)
    config = getattr(base, "config", None)
    if config is None or not getattr(config, "is_causal", True):
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal_class = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config, "model_type", None))
    return any(
        cls.__name__ == causal_class and cls.__module__.startswith("transformers.models.") for cls in type(base).__mro__
    )


def _accepted_kwargs(*modules: nn.Module) -> frozenset[str]:
    """The optional keyword arguments every one of these forwards takes (named or through **kwargs)."""
    accepted = set(_OPTIONAL_KWARGS)
    for module in modules:
        try:
            params = inspect.signature(module.forward).parameters
        except (TypeError, ValueError):
            return frozenset()
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            accepted &= set(params)
    return frozenset(accepted)


def _block_size(model: nn.Module) -> int | None:
    """The block size a block-diffusion model's config records (None: whole-sequence attention)."""
    size = getattr(getattr(_base_model(model), "config", None), "block_size", None)
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise AgrpoError(f"config.block_size must be a positive whole number of tokens, got {size!r}")
    return size


def _cache_keyword(module: nn.Module) -> str:
    """The name under which a forward takes its key/value cache (`cache` since transformers 5.x's
    rename, `past_key_values` before and in hub code)."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _hidden_states(out) -> torch.Tensor | None:
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None and isinstance(out, (tuple, list)) and out:
        hidden = out[0]
    if hidden is None and isinstance(out, torch.Tensor):
        hidden = out
    return hidden if isinstance(hidden, torch.Tensor) else None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


class Policy(nn.Module):
    """Wraps a Hugging Face model whose output has `.logits`.

    Args:
        model: the HF model (a `*ForCausalLM` with bidirectional attention, a
            `from_pretrained(..., trust_remote_code=True)` LLaDA/Dream, or a peft model).
        mask_id / pad_id / eos_id: token ids (eos_id may be a list: each ends a row); default to the model config's
            `mask_token_id` / `pad_token_id` / `eos_token_id`.
        shift_logits: Dream-style models predict position i from position i-1.
        fast_head: gather hidden states before the LM head. Checked once against the
            full forward on a short input; falls back to full logits when the model's
            layout is unknown or the check fails (still exact, only slower).
        allow_causal: accept a model that transformers runs with causal attention (by
            default refused: a masked diffusion LM must see the whole sequence).

    A model whose config has `block_size` (SDAR, LLaDA2.0 loaded by `agrpo.models`) runs under
    block attention: every forward gets the block-causal 4D mask built from the padding mask
    (`agrpo.blocks.block_attention_mask`: blocks counted from position 0 of the sequence,
    positions from each row's first real token). Any other model runs exactly as before.
    """

    def __init__(
        self,
        model: nn.Module,
        mask_id: int | None = None,
        pad_id: int | None = None,
        eos_id: int | list[int] | None = None,
        shift_logits: bool = False,
        fast_head: bool = True,
        allow_causal: bool = False,
    ):
        super().__init__()
        if not allow_causal and _runs_causally(model):
            raise AgrpoError(
                f"{type(_base_model(model)).__name__} runs causal attention (config.is_causal is not False), "
                "but a masked diffusion LM must see both ways: set model.config.is_causal = False "
                "(or load it through its family's loader), or pass allow_causal=True if this is intended"
            )
        self.model = model
        self.mask_id = mask_id if mask_id is not None else _config_id(model, "mask_token_id", "mask_id")
        if self.mask_id is None:
            raise AgrpoError(
                "the model has no mask token id: pass mask_id=... or set config.mask_token_id "
                "(a masked diffusion LM needs a [MASK] token)"
            )
        # every id in eos_ids stops a row and counts as EOS; the first one fills a stopped row
        given = eos_id if isinstance(eos_id, (list, tuple)) else ([eos_id] if eos_id is not None else [])
        self.eos_ids = tuple(dict.fromkeys(int(e) for e in given)) or _config_ids(model, "eos_token_id")
        self.eos_id = self.eos_ids[0] if self.eos_ids else None
        self.pad_id = pad_id if pad_id is not None else _config_id(model, "pad_token_id")
        if self.pad_id is None:
            self.pad_id = self.eos_id
        self.shift_logits = shift_logits
        # the kwargs reach the base model's forward through the peft wrapper's **kwargs
        self._model_accepts = _accepted_kwargs(self.model, _base_model(self.model))
        self._backbone, self._head = self._find_backbone_and_head() if fast_head else (None, None)
        self._backbone_accepts = _accepted_kwargs(self._backbone) if self._backbone is not None else frozenset()
        self._checked = self._backbone is None
        # block-diffusion models: tokens per block of their block-causal attention (None: whole sequence)
        self.block_size = _block_size(model)

    # -- layout discovery -------------------------------------------------------
    def _find_backbone_and_head(self):
        base = _base_model(self.model)
        try:
            head = base.get_output_embeddings()
            backbone = base.get_decoder()
        except (AttributeError, NotImplementedError, TypeError):
            return None, None
        if not isinstance(head, nn.Module) or not isinstance(backbone, nn.Module) or backbone in (base, self.model):
            return None, None
        return backbone, head

    @property
    def vocab_size(self) -> int:
        head = self._head if self._head is not None else _base_model(self.model).get_output_embeddings()
        weight = getattr(head, "weight", None)
        if isinstance(weight, torch.Tensor):
            return int(weight.shape[0])
        return int(self.model.config.vocab_size)

    # -- forward ---------------------------------------------------------------
    @staticmethod
    def _kwargs(accepted: frozenset[str], attention_mask: torch.Tensor | None) -> dict:
        kwargs = {"use_cache": False} if "use_cache" in accepted else {}
        if attention_mask is not None and not bool(attention_mask.all()):
            kwargs["attention_mask"] = attention_mask
            if "position_ids" in accepted:
                # left padding: real tokens must keep positions 0, 1, ... as in training
                kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return kwargs

    def _attention_form(self) -> tuple[str | None, torch.dtype]:
        """(attention implementation, parameter dtype): how a 4D mask must be handed to the model.
        The hub's own code (a `transformers_modules` class) reads bool masks."""
        base = _base_model(self.model)
        try:
            weight = getattr(base.get_input_embeddings(), "weight", None)
        except (AttributeError, NotImplementedError, TypeError):
            weight = None
        dtype = weight.dtype if isinstance(weight, torch.Tensor) and weight.is_floating_point() else torch.float32
        if type(base).__module__.startswith("transformers_modules"):
            return None, dtype
        return getattr(getattr(base, "config", None), "_attn_implementation", None), dtype

    def _block_mask(self, attention_mask: torch.Tensor, start: int = 0) -> torch.Tensor:
        implementation, dtype = self._attention_form()
        return blocks.for_attention(blocks.block_attention_mask(attention_mask, self.block_size, start), implementation, dtype)

    def _forward_kwargs(self, accepted: frozenset[str], input_ids, attention_mask, position_ids=None) -> dict:
        if attention_mask is not None and attention_mask.dim() == 4:  # a layout of the caller's own (bool, True = may attend)
            if position_ids is None:
                raise AgrpoError("a 4D attention mask needs its position_ids")
            implementation, dtype = self._attention_form()
            kwargs = {"use_cache": False} if "use_cache" in accepted else {}
            kwargs["attention_mask"] = blocks.for_attention(attention_mask.bool(), implementation, dtype)
            if "position_ids" in accepted:
                kwargs["position_ids"] = position_ids
            return kwargs
        if self.block_size is None:
            return self._kwargs(accepted, attention_mask)
        # block attention: always a 4D mask (blocks from position 0, positions from the first real token)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs = {"use_cache": False} if "use_cache" in accepted else {}
        kwargs["attention_mask"] = self._block_mask(attention_mask)
        if "position_ids" in accepted:
            kwargs["position_ids"] = blocks.position_ids(attention_mask)
        return kwargs

    def _full_logits(self, input_ids, attention_mask, position_ids=None):
        kwargs = self._forward_kwargs(self._model_accepts, input_ids, attention_mask, position_ids)
        return self.model(input_ids=input_ids, **kwargs).logits

    def _fast_logits(self, input_ids, attention_mask, positions, position_ids=None):
        kwargs = self._forward_kwargs(self._backbone_accepts, input_ids, attention_mask, position_ids)
        out = self._backbone(input_ids=input_ids, **kwargs)
        hidden = _hidden_states(out)
        width = getattr(self._head, "in_features", None)
        if hidden is None or hidden.shape[:2] != input_ids.shape or (width is not None and hidden.shape[-1] != width):
            shape = None if hidden is None else tuple(hidden.shape)
            raise ValueError(f"the backbone returned {shape}, not hidden states of width {width}")
        return self._head(self._gather_rows(hidden, positions))

    def _gather_rows(self, states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self._gather_states(states, positions - 1 if self.shift_logits else positions)

    @staticmethod
    def _gather_states(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return states.gather(1, index.unsqueeze(-1).expand(*index.shape, states.shape[-1]))

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits at `positions` ([B, P] absolute indices into the sequence) -> [B, P, V], at least float32.

        `attention_mask` is the [B, L] padding mask, or a [B, 1, L, L] bool mask of a layout of the
        caller's own (True = may attend; e.g. the block-diffusion training layout), given with its
        `position_ids` [B, L]."""
        if self.shift_logits and bool((positions < 1).any()):
            raise AgrpoError("shift_logits models cannot score position 0: keep at least one prompt token")
        if not self._checked:
            # the last few positions suffice to compare the two paths; the whole sequence would
            # hold three [L, V] float32 copies at once (~200 MB at L = 96, V = 126k)
            tail = slice(-_CHECK_LEN, None)
            padding = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
            self._check_fast_path(input_ids[:1, tail], padding[:1, tail] if padding is not None else None)
        if self._backbone is None:
            return _upcast(self._gather_rows(self._full_logits(input_ids, attention_mask, position_ids), positions))
        return _upcast(self._fast_logits(input_ids, attention_mask, positions, position_ids))

    def chunk_logits(
        self,
        chunk_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache,
        *,
        store: bool = False,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of a chunk of positions that follows the positions held in `cache`.

        Under block attention a position never sees a later block, so the keys and values of
        the prompt and of committed blocks stay valid while later blocks are written. A block
        sampler encodes them once (`store=True`), then denoises the current block by calling
        this with the block alone (`store=False`: the cache is left as it was), and stores the
        block once it is committed. The result equals `forward` on the whole sequence at the
        chunk's positions (up to rounding).

        Args:
            chunk_ids: [B, C] tokens at sequence positions S .. S + C - 1, where S is the number
                of positions in `cache`.
            attention_mask: [B, S + C] padding mask of the whole sequence so far (the cached
                positions, then the chunk), or None for no padding.
            cache: a `transformers.DynamicCache` with the keys/values of positions 0 .. S - 1
                (a new, empty one for the first chunk). It must end where a block ends (S a
                multiple of the block size, or only padding before S in S's block), or the cached
                states would lack the chunk's tokens of their own block.
            store: append the chunk's keys/values to `cache`.
            positions: [B, n] indices into the chunk (0 .. C - 1) whose logits are wanted: the LM head
                runs on those rows alone. None: every position of the chunk. A [B, 0] tensor runs no
                head at all (storing a chunk whose logits nobody reads: at a 150k vocabulary the head
                on a 256-token prompt costs several times the backbone).

        Returns:
            [B, C, V] logits (at least float32), or [B, n, V] at `positions`; row i scores the token at
            chunk position i (positions[:, i]).
        """
        if self.block_size is None:
            raise AgrpoError(
                "chunk_logits needs a block-diffusion model (config.block_size set, e.g. SDAR or LLaDA2): "
                "a model attending over the whole sequence cannot reuse the states of earlier positions"
            )
        if self.shift_logits:
            raise AgrpoError("chunk_logits scores each position from its own state: shift_logits models are not supported")
        cached = cache.get_seq_length()
        bsz, length = chunk_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(bsz, cached + length, dtype=torch.long, device=chunk_ids.device)
        if tuple(attention_mask.shape) != (bsz, cached + length):
            raise AgrpoError(
                f"attention_mask must cover the {cached} cached positions and the {length} of the chunk: expected "
                f"shape {(bsz, cached + length)}, got {tuple(attention_mask.shape)}"
            )
        if not bool(blocks.cache_ends_on_blocks(attention_mask, self.block_size, cached).all()):
            raise AgrpoError(
                f"the cache ({cached} positions) ends inside a block of {self.block_size} tokens: cache whole blocks "
                "only, counted from position 0 of the sequence"
            )
        return self._run_chunk(chunk_ids, self._block_mask(attention_mask, start=cached),
                               blocks.position_ids(attention_mask)[:, cached:], cache, store, positions)

    def cached_logits(
        self,
        chunk_ids: torch.Tensor,
        key_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache,
        *,
        store: bool = False,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of a chunk of a bidirectional model run against the keys and values in `cache`, in any order.

        Every query of the chunk attends to every real key: the cached ones (whatever states they were
        computed from) and the chunk's own. This is the forward of the approximate caches of
        `agrpo.sampling` (prefix and dual): keys carry their rotary positions from `position_ids`, so the
        order in which positions sit in the cache does not matter.

        Args:
            chunk_ids: [B, C] tokens.
            key_mask: [B, S + C] 1 where a key is a real token: the S cached keys in cache order, then the chunk.
            position_ids: [B, C] the chunk's positions (each row counted from its first real token).
            cache: a `transformers.DynamicCache` holding S positions (a new, empty one: S = 0).
            store: append the chunk's keys and values to `cache` (else it is left as it was).
            rows: [B, n] indices into the chunk of the hidden states whose logits are wanted (no shift
                applied: for a shift_logits model the caller asks for the state before each position);
                a [B, 0] tensor runs no head. None: every position of the chunk.
        """
        if self.block_size is not None:
            raise AgrpoError("cached_logits is for bidirectional models; a block-diffusion model uses chunk_logits")
        cached = cache.get_seq_length()
        bsz, length = chunk_ids.shape
        if tuple(key_mask.shape) != (bsz, cached + length) or tuple(position_ids.shape) != (bsz, length):
            raise AgrpoError(
                f"key_mask must be [{bsz}, {cached + length}] (cached keys, then the chunk) and position_ids "
                f"[{bsz}, {length}], got {tuple(key_mask.shape)} and {tuple(position_ids.shape)}"
            )
        implementation, dtype = self._attention_form()
        mask = key_mask.bool()[:, None, None, :].expand(bsz, 1, length, cached + length)
        return self._run_chunk(chunk_ids, blocks.for_attention(mask, implementation, dtype), position_ids, cache, store,
                               rows, shift=False)

    def _run_chunk(self, chunk_ids, mask, position_ids, cache, store, positions, shift: bool = True):
        """The forward of a chunk against `cache` with a prepared 4D mask; logits at `positions` of the chunk."""
        cached = cache.get_seq_length()
        bsz, length = chunk_ids.shape
        if positions is not None and (positions.dim() != 2 or positions.shape[0] != bsz):
            raise AgrpoError(f"positions must be [batch={bsz}, n] indices into the chunk, got {tuple(positions.shape)}")
        if not self._checked:
            tail = slice(-_CHECK_LEN, None)
            self._check_fast_path(chunk_ids[:1, tail], None)
        module = self._backbone if self._backbone is not None else self.model
        accepted = self._backbone_accepts if self._backbone is not None else self._model_accepts
        if "position_ids" not in accepted:
            raise AgrpoError(f"{type(_base_model(module)).__name__} takes no position_ids: it cannot run from a key/value cache "
                             "here: use sampling.cache=none")
        kwargs = {"attention_mask": mask, _cache_keyword(_base_model(module)): cache, "position_ids": position_ids}
        if "use_cache" in accepted:
            kwargs["use_cache"] = True
        out = module(input_ids=chunk_ids, **kwargs)
        if cache.get_seq_length() != cached + length:
            raise AgrpoError(
                "the model did not extend the key/value cache (activation checkpointing drops it in training mode, and "
                "some hub code keeps none): run it under torch.no_grad() in eval mode, or use sampling.cache=none"
            )
        if not store:
            cache.crop(-length)  # forget the chunk: the cache holds its S positions again
        gather = self._gather_rows if shift else self._gather_states
        if self._backbone is None:
            logits = out.logits
            return _upcast(logits if positions is None else gather(logits, positions))
        hidden = _hidden_states(out)
        return _upcast(self._head(hidden if positions is None else gather(hidden, positions)))

    @torch.no_grad()
    def _check_fast_path(self, input_ids, attention_mask):
        """Compare the gathered head with the model's own logits once; fall back if they differ."""
        self._checked = True
        length = input_ids.shape[1]
        positions = torch.arange(1 if self.shift_logits else 0, length, device=input_ids.device)[None]
        # dropout (LoRA's included) would make the two paths differ in training mode
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            full = self._gather_rows(self._full_logits(input_ids, attention_mask), positions)
            try:
                fast = self._fast_logits(input_ids, attention_mask, positions)
            except Exception as e:  # noqa: BLE001 - any failure means a layout this wrapper does not know
                reason = _first_line(e)
            else:
                tol = max(_TOLERANCE.get(full.dtype, 2e-2), _TOLERANCE.get(fast.dtype, 2e-2))
                scale = full.abs().max().clamp(min=1.0)
                if fast.shape != full.shape or (fast - full).abs().max() > tol * scale:
                    reason = "they differ (logit scaling or soft-capping after the head?)"
                else:
                    reason = None
        finally:
            for module, mode in modes:
                module.training = mode
        if reason is not None:
            warnings.warn(
                f"the model's backbone + head do not reproduce its logits ({reason}): "
                "computing whole-sequence logits instead (exact, slower)",
                stacklevel=3,
            )
            self._backbone, self._head = None, None

    # -- helpers used by the recipes ------------------------------------------
    def disable_adapter(self):
        """Context manager running the frozen base of a peft model (the KL reference)."""
        if not hasattr(self.model, "disable_adapter"):
            raise AgrpoError("the model has no adapter to disable: use a frozen reference copy instead")
        return self.model.disable_adapter()


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits -> float32 for the softmax; float64 stays float64 (exact references)."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def unwrap(policy: nn.Module) -> Policy:
    """The `Policy` inside an accelerate/DDP/FSDP wrapper."""
    while not isinstance(policy, Policy) and hasattr(policy, "module"):
        policy = policy.module
    if not isinstance(policy, Policy):
        raise AgrpoError(f"expected an agrpo.Policy, got {type(policy).__name__}: wrap the model with Policy(model)")
    return policy
