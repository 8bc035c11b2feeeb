"""Tiny bidirectional Llama models shared by the policy, sampling and objective tests."""

import sys
import types
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from agrpo.policy import Policy

VOCAB, PAD, EOS, MASK = 40, 0, 1, 2
torch.set_num_threads(1)  # tiny matrices: thread hand-off costs more than the arithmetic


def tiny_config(vocab: int = VOCAB, **over) -> LlamaConfig:
    kw = dict(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, is_causal=False,
        mask_token_id=MASK, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=None,
    )
    kw.update(over)
    return LlamaConfig(**kw)


def tiny_model(seed: int = 0, double: bool = True, vocab: int = VOCAB, logit_scale: float = 1.0, **over):
    """A random bidirectional Llama; logit_scale multiplies the LM head (sharper distributions)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(vocab, **over))
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    model = model.double() if double else model.float()
    if double:
        exact_norms(model)
    return model.eval()


def _rms_norm_in_own_dtype(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def exact_norms(model):
    """transformers' RMSNorm computes in float32 whatever the model's dtype, and its backward rounds the
    gradient through it to float32 (~1e-8 relative below the last layer): a float64 reference model gets
    norms that stay in float64, so that two ways of computing one gradient agree to float64 round-off."""
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_rms_norm_in_own_dtype, module)
    return model


def tiny_policy(seed: int = 0, double: bool = True, **kw) -> Policy:
    return Policy(tiny_model(seed, double, **kw))


def prompts(batch: int, length: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def full_logits(model, x, attention_mask=None):
    """Reference: the model's own whole-sequence logits (positions 0.. of the real tokens under left padding)."""
    if attention_mask is None:
        return model(input_ids=x).logits
    pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=x, attention_mask=attention_mask, position_ids=pos).logits


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


class BiasedLM(nn.Module):
    """Wraps a model and adds bias[token] to the logits of selected rows at positions >= start.

    No get_decoder/get_output_embeddings: Policy falls back to whole-sequence logits.
    """

    def __init__(self, model, bias: dict, start: int = 0, row_pred=None):
        super().__init__()
        self.inner, self.bias, self.start, self.row_pred = model, bias, start, row_pred
        self.config = model.config

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        logits = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits.clone()
        rows = torch.ones(input_ids.shape[0], dtype=torch.bool) if self.row_pred is None else self.row_pred(input_ids)
        for tok, b in self.bias.items():
            logits[rows, self.start :, tok] += b
        return SimpleNamespace(logits=logits)


@pytest.fixture
def modules_cache(tmp_path, monkeypatch):
    """Dynamic modules go to a fresh directory: the user's cache is neither read nor written."""
    cache = tmp_path / "hf_modules"
    monkeypatch.setenv("HF_MODULES_CACHE", str(cache))
    from transformers import dynamic_module_utils

    monkeypatch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", str(cache))
    monkeypatch.setattr(sys, "path", list(sys.path))
    # the `transformers_modules` package is bound to the cache it was first imported from
    monkeypatch.delitem(sys.modules, "transformers_modules", raising=False)
    before = set(sys.modules)
    yield cache
    for name in set(sys.modules) - before:
        if name.startswith("transformers_modules."):
            del sys.modules[name]
