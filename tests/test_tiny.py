import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from agrpo.errors import AgrpoError
from agrpo.tiny import EOS_ID, MASK_ID, PAD_ID, UNK_ID, build_tiny_model, build_tokenizer, tiny_config

SMALL = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_fixed_ids(tok):
    assert (PAD_ID, EOS_ID, MASK_ID, UNK_ID) == (0, 1, 2, 3)
    assert (tok.pad_token_id, tok.eos_token_id, tok.mask_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert (tok.pad_token, tok.eos_token, tok.mask_token, tok.unk_token) == ("[PAD]", "[EOS]", "[MASK]", "[UNK]")
    assert len(tok) == 25
    # characters follow the specials in the documented order
    assert tok.convert_tokens_to_ids(list("09+|")) == [4, 13, 14, 23]
    assert tok.convert_tokens_to_ids(" ") == 24


def test_one_id_per_character_and_no_added_tokens(tok):
    assert tok("12+3")["input_ids"] == [5, 6, 14, 7]
    assert tok("12+3", add_special_tokens=False)["input_ids"] == [5, 6, 14, 7]
    assert tok("(3*4)/5=12,3:4| ")["input_ids"] == [18, 7, 16, 8, 19, 17, 9, 20, 5, 6, 21, 7, 22, 8, 23, 24]


def test_decode_gives_the_string_back(tok):
    for text in ["12+3", "0310200404001043=", " 1 2 ", "(100-93)*30"]:
        assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    # specials vanish without shifting or spacing the characters around them
    assert tok.decode([5, EOS_ID, 6, PAD_ID, MASK_ID, 7], skip_special_tokens=True) == "123"


def test_unknown_characters_map_to_unk(tok):
    assert tok("a1\n2é")["input_ids"] == [UNK_ID, 5, UNK_ID, 6, UNK_ID]


def test_tokenizer_round_trip_through_save_pretrained(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "0123456789+-*/()=,:| x"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.mask_token_id, loaded.unk_token_id) == (0, 1, 2, 3)
    assert loaded.decode(loaded("30,100,93:23=")["input_ids"]) == "30,100,93:23="


def test_config_fields():
    cfg = tiny_config(25)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (128, 4, 4, 4)
    assert cfg.intermediate_size == 512 and cfg.max_position_embeddings == 64
    assert cfg.is_causal is False and cfg.tie_word_embeddings is True
    assert (cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id) == (MASK_ID, EOS_ID, PAD_ID)


def test_config_refuses_bad_shapes():
    with pytest.raises(AgrpoError, match="divisible"):
        tiny_config(25, hidden_size=30, num_heads=4)
    with pytest.raises(AgrpoError, match="num_layers"):
        tiny_config(25, num_layers=0)
    with pytest.raises(AgrpoError, match="mask_token_id"):
        tiny_config(2)


def test_model_needs_a_mask_token(tok):
    no_mask = build_tokenizer()
    no_mask.mask_token = None
    with pytest.raises(AgrpoError, match="mask token"):
        build_tiny_model(no_mask, **SMALL)


def _logits_at_0(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[0, 0]


def _assert_bidirectional(model):
    ids = torch.tensor([[5, 6, 14, 7, 20, MASK_ID, MASK_ID]])
    changed = ids.clone()
    changed[0, -1] = 9
    ones = torch.ones_like(ids)
    for mask in (None, ones):
        before, after = _logits_at_0(model, ids, mask), _logits_at_0(model, changed, mask)
        # a causal model would give identical logits at position 0
        assert (before - after).abs().max().item() > 1e-4


def test_model_is_bidirectional_and_tied(tok):
    torch.manual_seed(0)
    model = build_tiny_model(tok, **SMALL).eval()
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.vocab_size == len(tok)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    _assert_bidirectional(model)


def test_model_round_trip_keeps_weights_mask_id_and_bidirectionality(tok, tmp_path):
    torch.manual_seed(1)
    model = build_tiny_model(tok, **SMALL).eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.mask_token_id == MASK_ID
    assert loaded.config.is_causal is False
    ids = torch.tensor([[4, 5, 6, 7, 20]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    _assert_bidirectional(loaded)


def test_same_seed_same_weights(tok):
    torch.manual_seed(3)
    a = build_tiny_model(tok, **SMALL)
    torch.manual_seed(3)
    b = build_tiny_model(tok, **SMALL)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
