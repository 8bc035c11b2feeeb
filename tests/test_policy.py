import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from agrpo.errors import AgrpoError
from agrpo.models import TINY_DIR, load_model_and_tokenizer
from agrpo.policy import Policy, unwrap
from conftest import MASK, VOCAB, BiasedLM, full_logits, prompts, tiny_config, tiny_model


def at(logits, pos):
    """[B, L, V] logits read at [B, P] positions."""
    return torch.stack([logits[b, pos[b]] for b in range(pos.shape[0])])


def policy_warnings(fn):
    """(result of fn(), messages of the warnings Policy emitted meanwhile)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught if "whole-sequence logits" in str(w.message)]


def test_gathered_logits_equal_full_forward():
    model = tiny_model(0)
    pol = Policy(model)
    assert pol._backbone is not None  # the fast path is the one under test
    x = prompts(3, 10, seed=1)
    pos = torch.tensor([[0, 4, 9], [2, 2, 7], [9, 8, 1]])
    got, warned = policy_warnings(lambda: pol(x, pos))
    assert pol._backbone is not None and not warned  # the one-time check kept it
    ref = full_logits(model, x)
    expect = torch.stack([ref[b, pos[b]] for b in range(3)])
    assert got.shape == (3, 3, 40)
    # a float64 model keeps float64 logits: the exactness checks of the objectives (1e-9) rely on it
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expect, atol=1e-12, rtol=0)
    # a different position must give different logits: the gather index matters
    assert (got[0, 0] - got[0, 1]).abs().max() > 1e-3


def test_left_padding_matches_unpadded_sequence():
    model = tiny_model(1)
    pol = Policy(model)
    real = prompts(1, 7, seed=2)
    x = torch.cat([torch.zeros(1, 3, dtype=torch.long), real], 1)  # 3 pad tokens on the left
    am = torch.cat([torch.zeros(1, 3), torch.ones(1, 7)], 1).long()
    xx = torch.cat([x, torch.cat([real, torch.zeros(1, 3, dtype=torch.long)], 1)])
    aa = torch.cat([am, torch.ones(1, 10, dtype=torch.long)])
    pos = torch.tensor([[3, 6, 9], [3, 6, 9]])
    got = pol(xx, pos, aa)
    ref = full_logits(model, xx, aa)
    torch.testing.assert_close(got[0].double(), ref[0, [3, 6, 9]], atol=1e-5, rtol=0)
    # the padded row sees exactly what the unpadded sequence sees (same positions 0.., pads invisible)
    alone = full_logits(model, real)[0, [0, 3, 6]]
    torch.testing.assert_close(got[0].double(), alone, atol=1e-5, rtol=0)


def test_shift_logits_reads_previous_position():
    model = tiny_model(2)
    pol = Policy(model, shift_logits=True)
    x = prompts(2, 8, seed=3)
    pos = torch.tensor([[1, 5], [7, 3]])
    got = pol(x, pos)
    ref = full_logits(model, x)
    expect = torch.stack([ref[b, pos[b] - 1] for b in range(2)])
    torch.testing.assert_close(got.double(), expect, atol=1e-5, rtol=0)
    with pytest.raises(AgrpoError):
        pol(x, torch.tensor([[0, 1], [1, 2]]))


def test_full_head_fallback_is_exact():
    model = tiny_model(3)
    pol = Policy(model, fast_head=False)
    x = prompts(2, 6, seed=4)
    pos = torch.tensor([[0, 5], [3, 1]])
    ref = full_logits(model, x)
    torch.testing.assert_close(pol(x, pos).double(), torch.stack([ref[b, pos[b]] for b in range(2)]), atol=1e-5, rtol=0)


def test_ids_from_config_and_missing_mask_id():
    pol = Policy(tiny_model(0))
    assert (pol.mask_id, pol.eos_id, pol.pad_id, pol.vocab_size) == (MASK, 1, 0, 40)
    cfg = tiny_config()
    cfg.mask_token_id = None
    with pytest.raises(AgrpoError, match="mask"):
        Policy(LlamaForCausalLM(cfg))
    assert Policy(LlamaForCausalLM(cfg), mask_id=5).mask_id == 5
    with pytest.raises(AgrpoError):
        unwrap(torch.nn.Linear(2, 2))


def test_low_precision_logits_are_upcast_to_float32():
    x = prompts(2, 6, seed=5)
    pos = torch.tensor([[1, 2], [3, 4]])
    m32 = tiny_model(4, double=False)
    got = Policy(m32)(x, pos)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.stack([full_logits(m32, x)[b, pos[b]] for b in range(2)]), atol=1e-5, rtol=0)
    mbf = tiny_model(4, double=False).to(torch.bfloat16)
    assert Policy(mbf)(x, pos).dtype == torch.float32


class PostProcessedLlama(LlamaForCausalLM):
    """Logits changed after the LM head (scaled, or soft-capped as Gemma 2 does): not head(hidden)."""

    scale, cap = 1.0, None

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        logits = out.logits * self.scale
        out.logits = logits if self.cap is None else torch.tanh(logits / self.cap) * self.cap
        return out


@pytest.mark.parametrize("scale,cap", [(0.5, None), (1.0, 3.0), (1.0, 50.0)])
def test_logits_post_processed_after_the_head_fall_back_exactly(scale, cap):
    torch.manual_seed(5)
    model = PostProcessedLlama(tiny_config()).double().eval()
    model.scale, model.cap = scale, cap
    pol = Policy(model)
    x = prompts(2, 9, seed=6)
    pos = torch.tensor([[0, 4, 8], [7, 2, 3]])
    got, warned = policy_warnings(lambda: pol(x, pos))
    assert len(warned) == 1 and "soft-capping" in warned[0]
    with torch.no_grad():
        own = at(model(input_ids=x).logits, pos)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, own, atol=1e-13, rtol=0)
    again, warned = policy_warnings(lambda: pol(x, pos))
    assert not warned
    torch.testing.assert_close(again, own, atol=1e-13, rtol=0)


def lora_model(seed=0, dropout=0.0):
    """A peft LoRA model whose adapters change the logits (B is zero at creation)."""
    model = get_peft_model(tiny_model(seed), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                        target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def test_lora_model_runs_its_adapters_on_the_fast_path():
    model = lora_model(dropout=0.5).train()  # dropout on: the one-time check must not see it
    pol = Policy(model)
    x = prompts(2, 8, seed=7)
    am = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    pos = torch.tensor([[2, 5, 7], [0, 3, 6]])
    got, warned = policy_warnings(lambda: pol(x, pos, am))
    assert not warned and pol._backbone is not None
    assert model.training and model.get_base_model().model.layers[0].self_attn.q_proj.training
    model.eval()
    with torch.no_grad():
        own = at(full_logits(model, x, am), pos)
        with model.disable_adapter():
            base = at(full_logits(model, x, am), pos)
            torch.testing.assert_close(pol(x, pos, am), base, atol=1e-12, rtol=0)
    torch.testing.assert_close(pol(x, pos, am), own, atol=1e-12, rtol=0)
    assert (own - base).abs().max() > 1e-2  # the adapters matter to these logits
    # gradients reach the adapters through the fast path
    pol(x, pos, am).sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def causal_models():
    """transformers runs these causally: is_causal True, or missing as in any causal checkpoint."""
    explicit = tiny_config(is_causal=True)
    missing = tiny_config()
    del missing.is_causal
    qwen = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=4, mask_token_id=MASK)
    return [LlamaForCausalLM(explicit), LlamaForCausalLM(missing), Qwen2ForCausalLM(qwen)]


@pytest.mark.parametrize("index", range(3))
def test_causal_models_are_refused_unless_intended(index):
    model = causal_models()[index]
    with pytest.raises(AgrpoError, match="is_causal = False.*allow_causal=True"):
        Policy(model)
    assert Policy(model, allow_causal=True).mask_id == MASK
    with pytest.raises(AgrpoError, match="allow_causal"):
        Policy(get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])))
    model.config.is_causal = False
    Policy(model)


def test_bidirectional_and_unknown_models_are_accepted():
    model = tiny_model(0)
    x = prompts(1, 6, seed=8)
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1) % VOCAB
    pos = torch.tensor([[0]])
    pol = Policy(model)  # is_causal=False: the first position sees the last token
    assert (pol(x, pos) - pol(y, pos)).abs().max() > 1e-6
    causal = LlamaForCausalLM(tiny_config(is_causal=True))
    Policy(BiasedLM(causal, {}))  # not a transformers class: its attention is its own business
    for task in sorted(p.name for p in TINY_DIR.iterdir() if (p / "config.json").is_file()):
        shipped, _ = load_model_and_tokenizer(f"tiny:{task}")
        assert shipped.config.is_causal is False
        Policy(shipped)


class NoExtrasLM(torch.nn.Module):
    """A forward taking neither position_ids nor use_cache (as some hub code does)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


@pytest.mark.parametrize("fast_head", [True, False])
def test_optional_kwargs_follow_the_signature_of_the_called_forward(fast_head):
    model = tiny_model(6)
    seen = []
    model.model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs), with_kwargs=True)
    x = prompts(2, 6, seed=9)
    am = torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6])
    pos = torch.tensor([[1, 5], [0, 2]])
    Policy(model, fast_head=fast_head)(x, pos, am)
    # no key/value cache is built, and left-padded rows keep positions 0, 1, ...
    assert all(kw["use_cache"] is False for kw in seen)
    assert torch.equal(seen[-1]["position_ids"], torch.tensor([[0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 4, 5]]))
    wrapped = NoExtrasLM(model)
    got = Policy(wrapped, fast_head=fast_head)(x, pos, am)
    with torch.no_grad():
        own = at(wrapped(x, am).logits, pos)
    torch.testing.assert_close(got, own, atol=1e-12, rtol=0)
