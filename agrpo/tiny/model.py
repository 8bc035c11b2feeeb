"""A small bidirectional Llama: the masked diffusion model the tiny recipes train from scratch.

A masked diffusion LM predicts every masked position from the whole sequence, so attention
must see both ways. Llama with `is_causal=False` does that while still loading with
`AutoModelForCausalLM`, which keeps saved checkpoints usable by every loader in the package.

With `block_size` the config records it, which makes the model a block-diffusion model for
every later load: `agrpo.policy.Policy` then runs it under block attention (bidirectional
inside a block of `block_size` tokens, causal across blocks counted from position 0) and the
sampler writes its completions block by block with an exact prefix cache.
"""

from __future__ import annotations

from transformers import LlamaConfig, LlamaForCausalLM

from agrpo.errors import AgrpoError
from agrpo.tiny.tokenizer import EOS_ID, MASK_ID, PAD_ID, build_tokenizer


def tiny_config(
    vocab_size: int,
    hidden_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 64,
    *,
    mask_token_id: int = MASK_ID,
    eos_token_id: int = EOS_ID,
    pad_token_id: int = PAD_ID,
    block_size: int | None = None,
) -> LlamaConfig:
    """Config of a bidirectional Llama; `intermediate_size` defaults to 4 * hidden_size.

    `block_size` (None: attention over the whole sequence) makes it a block-diffusion model:
    the config keeps `block_size`, which is what `agrpo.policy.Policy` reads."""
    for name, value in (("vocab_size", vocab_size), ("hidden_size", hidden_size), ("num_layers", num_layers),
                        ("num_heads", num_heads), ("max_position_embeddings", max_position_embeddings)):
        if not isinstance(value, int) or value < 1:
            raise AgrpoError(f"{name} must be a positive integer, got {value!r}")
    if hidden_size % num_heads:
        raise AgrpoError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}: change one of them")
    if intermediate_size is None:
        intermediate_size = 4 * hidden_size
    elif not isinstance(intermediate_size, int) or intermediate_size < 1:
        raise AgrpoError(f"intermediate_size must be a positive integer or None, got {intermediate_size!r}")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise AgrpoError(f"block_size must be a positive integer or None, got {block_size!r}")
    for name, tid in (("mask_token_id", mask_token_id), ("eos_token_id", eos_token_id), ("pad_token_id", pad_token_id)):
        if not 0 <= tid < vocab_size:
            raise AgrpoError(f"{name}={tid} is outside the vocabulary (size {vocab_size}): pass the matching tokenizer")
    extra = {"block_size": block_size} if block_size is not None else {}
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        is_causal=False,
        mask_token_id=mask_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        # LlamaConfig would otherwise claim id 1 as BOS; the tiny vocabulary has no BOS
        bos_token_id=None,
        tie_word_embeddings=True,
        # a key/value cache assumes later tokens never change earlier states, which is false
        # when every position attends to every other
        use_cache=False,
        **extra,
    )


def build_tiny_model(tokenizer=None, **kw) -> LlamaForCausalLM:
    """A randomly initialised tiny model (seed torch before calling for reproducible weights).

    The vocabulary size and the special ids come from `tokenizer` (default: the character
    tokenizer of `agrpo.tiny.tokenizer`); `kw` goes to `tiny_config`.
    """
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    if tokenizer.mask_token_id is None:
        raise AgrpoError("the tokenizer has no mask token: set tokenizer.mask_token (e.g. '[MASK]')")
    ids = {
        "mask_token_id": tokenizer.mask_token_id,
        "eos_token_id": tokenizer.eos_token_id if tokenizer.eos_token_id is not None else EOS_ID,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else PAD_ID,
    }
    clash = sorted(set(ids) & set(kw))
    if clash:
        raise AgrpoError(f"{', '.join(clash)} come from the tokenizer: do not pass them to build_tiny_model")
    return LlamaForCausalLM(tiny_config(len(tokenizer), **ids, **kw))
