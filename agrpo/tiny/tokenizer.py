"""Character-level tokenizer for the tiny models trained on the built-in tasks.

Every character is its own token so that a Sudoku cell or a Countdown digit is exactly one
position of the completion: the samplers unmask token by token and the graders read the
completion character by character, so the two views must line up.

The ids are fixed (special tokens first, then the characters in `CHARS` order) so that a
checkpoint trained today decodes the same way with a tokenizer rebuilt later.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN, EOS_TOKEN, MASK_TOKEN, UNK_TOKEN = "[PAD]", "[EOS]", "[MASK]", "[UNK]"
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN, MASK_TOKEN, UNK_TOKEN)
PAD_ID, EOS_ID, MASK_ID, UNK_ID = 0, 1, 2, 3
CHARS = "0123456789+-*/()=,:| "


def vocabulary() -> dict[str, int]:
    """Token -> id for the fixed vocabulary (special tokens, then `CHARS`)."""
    return {tok: i for i, tok in enumerate(SPECIAL_TOKENS + tuple(CHARS))}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh character-level tokenizer; `save_pretrained` / `AutoTokenizer` round-trip it."""
    backend = Tokenizer(models.WordLevel(vocabulary(), unk_token=UNK_TOKEN))
    # `[\s\S]` rather than `.` so that newlines and other whitespace are isolated too (and
    # become [UNK]) instead of being glued to a neighbour
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # the default WordLevel decoding joins tokens with spaces, which would corrupt the text
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        mask_token=MASK_TOKEN,
        unk_token=UNK_TOKEN,
        clean_up_tokenization_spaces=False,
    )
