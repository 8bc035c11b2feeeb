"""A model that ships its own code, written the way hub checkpoints written for transformers 4 are.

Its model class never calls `post_init()`, its config class has no `use_cache` that its forward
reads, its decoder returns logits rather than hidden states, and its forward takes no
`position_ids`: each of these broke loading or scoring on transformers 5.
"""

import json
import sys
import warnings

import pytest
import torch
from safetensors.torch import save_file

from agrpo.models import load_model_and_tokenizer
from agrpo.objectives import agrpo_loss
from agrpo.policy import Policy
from agrpo.sampling import SamplingConfig, generate
from agrpo.tiny.tokenizer import EOS_ID, MASK_ID, PAD_ID, build_tokenizer

WIDTH = 32

CONFIGURATION = '''
from transformers import PretrainedConfig


class XDiffConfig(PretrainedConfig):
    model_type = "xdiff"

    def __init__(self, vocab_size=25, d_model=32, n_heads=4, mask_token_id=2, **kwargs):
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.n_heads = n_heads
        self.mask_token_id = mask_token_id
        super().__init__(**kwargs)
'''

MODELING = '''
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .configuration_x import XDiffConfig


class XDiffInner(nn.Module):
    def __init__(self, config):
        super().__init__()
        d = config.d_model
        self.n_heads = config.n_heads
        self.wte = nn.Embedding(config.vocab_size, d)
        self.wpe = nn.Embedding(64, d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.fc = nn.Linear(d, d, bias=False)
        self.norm = nn.LayerNorm(d)
        self.ff_out = nn.Linear(d, config.vocab_size, bias=False)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        bsz, length = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device)[None].expand(bsz, -1)
        h = self.wte(input_ids) + self.wpe(position_ids)
        q, k, v = self.qkv(h).view(bsz, length, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        a = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)
        h = h + self.proj(a.transpose(1, 2).reshape(bsz, length, -1))
        h = self.norm(h + torch.tanh(self.fc(h)))
        return self.ff_out(h), h


class XDiffLM(PreTrainedModel):
    config_class = XDiffConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.model = XDiffInner(config)

    def get_output_embeddings(self):
        return self.model.ff_out

    def get_decoder(self):
        return self.model

    def forward(self, input_ids, attention_mask=None):
        if self.config.use_cache:
            raise NotImplementedError("XDiffLM keeps no key/value cache")
        logits, _ = self.model(input_ids, attention_mask=attention_mask)
        return CausalLMOutput(logits=logits)
'''


def write_remote_model(path, seed=0):
    """config.json + code + weights + tokenizer, as a hub repository holds them; returns the weights."""
    path.mkdir()
    (path / "configuration_x.py").write_text(CONFIGURATION)
    (path / "modeling_x.py").write_text(MODELING)
    tok = build_tokenizer()
    vocab = len(tok)
    config = {
        "model_type": "xdiff", "architectures": ["XDiffLM"],
        "auto_map": {"AutoConfig": "configuration_x.XDiffConfig", "AutoModel": "modeling_x.XDiffLM"},
        "vocab_size": vocab, "d_model": WIDTH, "n_heads": 4,
        "mask_token_id": MASK_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID,
    }
    (path / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "model.wte.weight": (vocab, WIDTH), "model.wpe.weight": (64, WIDTH),
        "model.qkv.weight": (3 * WIDTH, WIDTH), "model.proj.weight": (WIDTH, WIDTH), "model.fc.weight": (WIDTH, WIDTH),
        "model.norm.weight": (WIDTH,), "model.norm.bias": (WIDTH,), "model.ff_out.weight": (vocab, WIDTH),
    }
    weights = {name: torch.randn(shape, generator=g) * 0.5 for name, shape in shapes.items()}
    weights["model.norm.weight"] += 1.0
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(path)
    return weights


@pytest.mark.parametrize("lora", [None, {"r": 4, "target_modules": ["qkv", "fc"]}])
def test_remote_code_model_loads_samples_and_trains(tmp_path, modules_cache, lora):
    path = tmp_path / f"xdiff_{tmp_path.name}"  # the directory names the dynamic module
    weights = write_remote_model(path)
    model, tok = load_model_and_tokenizer(str(path), trust_remote_code=True, lora=lora)
    base = model if lora is None else model.get_base_model()
    assert type(base).__name__ == "XDiffLM"
    assert type(base).__module__.startswith(f"transformers_modules.{path.name}.")
    assert str(modules_cache) in sys.modules[type(base).__module__].__file__
    state = base.state_dict()
    for name, value in weights.items():  # a LoRA layer keeps the loaded weight as its base_layer
        key = name if name in state else name.replace(".weight", ".base_layer.weight")
        assert torch.equal(state[key], value), name
    assert model.config.use_cache is False
    assert model.config.mask_token_id == tok.mask_token_id == MASK_ID

    # its decoder returns logits, not hidden states: the policy falls back to the model's own logits, once
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pol = Policy(model)
        x = torch.tensor([[PAD_ID, PAD_ID, 5, 6, 7], [4, 5, 6, 7, 8]])
        am = (x != PAD_ID).long()
        pos = torch.tensor([[2, 4], [0, 3]])
        got = pol(x, pos, am)
        again = pol(x, pos, am)
    warned = [str(w.message) for w in caught if "whole-sequence logits" in str(w.message)]
    assert len(warned) == 1 and f"not hidden states of width {WIDTH}" in warned[0]
    with torch.no_grad():
        own = model(input_ids=x, attention_mask=am).logits
    torch.testing.assert_close(got, torch.stack([own[b, pos[b]] for b in range(2)]), atol=0, rtol=0)
    torch.testing.assert_close(again, got, atol=0, rtol=0)

    # a left-padded rollout and a few optimizer steps on its AGRPO loss
    cfg = SamplingConfig(gen_length=4, block_length=4, steps=2, temperature=1.0, stop_at_eos=False)
    ro = generate(pol, x, am, cfg, generator=torch.Generator().manual_seed(0))
    assert ro.step.min() >= 0
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and (lora is None or all("lora_" in n for n in trained))
    before = {n: p.detach().clone() for n, p in trained.items()}
    opt = torch.optim.SGD(trained.values(), lr=0.1)
    adv = torch.tensor([1.0, -1.0])
    for i in range(3):
        loss, _ = agrpo_loss(pol, ro, adv, num_samples=2, generator=torch.Generator().manual_seed(i))
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trained.values())
        opt.step()
    assert all(not torch.equal(p, before[n]) for n, p in trained.items())
