"""Block attention of block-diffusion LMs (SDAR, LLaDA2.0), as masks for transformers models.

A block-diffusion LM writes its answer block by block: a position sees every earlier block and
all of its own block (bidirectional inside a block, causal across blocks). The mask is the one
the models' own inference builds, `torch.tril(torch.ones(nb, nb)).repeat_interleave(b, 0)
.repeat_interleave(b, 1)`: blocks are counted from position 0 of the sequence as given, padding
keys are removed, and a padding query sees only itself. Real tokens keep positions 0, 1, ...
from their first one (`position_ids`), as LLaDA2's `prepare_inputs_for_generation` makes them.
A row left-padded by whole blocks is therefore split exactly as it would be without its
padding; samplers pad prompts to a whole number of blocks so that the completion's blocks
start on the grid.

Two facts make a key/value cache exact under this mask: a position never sees a later block,
so the keys and values of finished blocks do not change when later blocks are written; and a
cache must therefore end where a block ends (`cache_ends_on_blocks`).
"""

from __future__ import annotations

import torch

from agrpo.errors import AgrpoError


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] positions counted from each row's first real token (0 there and on left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def block_index(attention_mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, L] block number of each position, counted from position 0 of the sequence."""
    index = torch.arange(attention_mask.shape[-1], device=attention_mask.device) // block_size
    return index.expand(attention_mask.shape)


def block_attention_mask(attention_mask: torch.Tensor, block_size: int, start: int = 0) -> torch.Tensor:
    """Block-causal attention as a [B, 1, L - start, L] bool mask (True = may attend).

    Args:
        attention_mask: [B, L] padding mask (1 = real token, 0 = padding).
        block_size: tokens per block.
        start: the first query position returned (the rows of a chunk that follows `start`
            cached positions); every key position is kept.

    Query q may attend key k when k is a real token and k // block_size <= q // block_size. A
    padding query attends only to itself, so that no row of the mask is empty.
    """
    if block_size < 1:
        raise AgrpoError(f"block_size must be at least 1, got {block_size}")
    real = attention_mask.bool()
    block = block_index(attention_mask, block_size)
    length = attention_mask.shape[-1]
    queries = torch.arange(start, length, device=attention_mask.device)
    keys = torch.arange(length, device=attention_mask.device)
    visible = (block[:, None, :] <= block[:, start:, None]) & real[:, None, :]
    itself = queries[:, None] == keys[None, :]
    return torch.where(real[:, start:, None], visible, itself)[:, None]


def cache_ends_on_blocks(attention_mask: torch.Tensor, block_size: int, cached: int) -> torch.Tensor:
    """[B] bool: whether, in each row, no real token after the first `cached` positions shares a
    block with a real token among them (the cached keys and values then need no later token).
    True whenever `cached` is a multiple of the block size."""
    rows = attention_mask.shape[0]
    if cached <= 0 or cached >= attention_mask.shape[-1]:
        return torch.ones(rows, dtype=torch.bool, device=attention_mask.device)
    real = attention_mask.bool()
    block = block_index(attention_mask, block_size)
    last_cached = torch.where(real[:, :cached], block[:, :cached], -1).amax(-1)
    first_new = torch.where(real[:, cached:], block[:, cached:], torch.iinfo(block.dtype).max).amin(-1)
    return last_cached < first_new


def for_attention(mask: torch.Tensor, implementation: str | None, dtype: torch.dtype) -> torch.Tensor:
    """A bool block mask in the form an attention implementation of transformers adds or reads.

    sdpa (and any class that is not one of transformers', such as agrpo's LLaDA2 or the hub's
    own code, all of which read bool masks) takes it as it is; eager and flex attention add the
    mask to the scores, so they get 0 where allowed and the dtype's minimum elsewhere. Flash
    attention takes no 4D mask at all.
    """
    if implementation in (None, "sdpa"):
        return mask
    if implementation.startswith("flash"):
        raise AgrpoError(
            f"block attention needs a 4D attention mask, which attn_implementation={implementation} does not take: "
            "load the model with attn_implementation=sdpa"
        )
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
