"""Tiny character-level tokenizer and bidirectional Llama for CPU-sized experiments."""

from agrpo.tiny.model import build_tiny_model, tiny_config
from agrpo.tiny.tokenizer import EOS_ID, MASK_ID, PAD_ID, UNK_ID, build_tokenizer

__all__ = ["EOS_ID", "MASK_ID", "PAD_ID", "UNK_ID", "build_tiny_model", "build_tokenizer", "tiny_config"]
