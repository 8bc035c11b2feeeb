import pytest
import torch
from transformers import LlamaForCausalLM

from agrpo.errors import AgrpoError
from agrpo.policy import Policy, unwrap
from conftest import MASK, full_logits, prompts, tiny_config, tiny_model


def test_gathered_logits_equal_full_forward():
    model = tiny_model(0)
    pol = Policy(model)
    assert pol._backbone is not None  # the fast path is the one under test
    x = prompts(3, 10, seed=1)
    pos = torch.tensor([[0, 4, 9], [2, 2, 7], [9, 8, 1]])
    got = pol(x, pos)
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
