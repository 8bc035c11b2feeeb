"""Which ids a loaded model uses, for every family: the id that fills a row that stopped early,
the ids that end a row, the mask id, and the parameter dtype `dtype=auto` picks on a CPU and on
a GPU.

The LLaDA and Dream checkpoints are the hub-format fixtures (../shared/fixtures/models); each test
saves a word-level tokenizer into a copy, with the special tokens a case needs. The generic family
is a bidirectional Llama saved with `save_pretrained`.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from agrpo.data import decode_completions
from agrpo.errors import AgrpoError
from agrpo.models import load_model_and_tokenizer
from agrpo.policy import Policy
from agrpo.sampling import SamplingConfig, generate
from conftest import BiasedLM

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURES = SHARED / "fixtures" / "models"
TOKENIZERS = SHARED / "tokenizers"
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason="model fixtures not available")

VOCAB = 1024
CHARS = "0123456789+-*/()=,:| <>abcdefghijklmnopqrstuvwxyz"
# special tokens of the test vocabulary; the fixtures' config.json say mask 1020, eos = pad 1021
SPECIALS = {"<|beginoftext|>": 1016, "<other_mask>": 1017, "<|pad|>": 1018, "<|im_end|>": 1019,
            "<|mdm_mask|>": 1020, "<|endoftext|>": 1021, "<|eot_id|>": 1022, "<unk>": 1023}
CONFIG_MASK, CONFIG_EOS = 1020, 1021
# each family's end of turn and the hub default of its mask id
END_OF_TURN = {"llada": "<|eot_id|>", "dream": "<|im_end|>"}
FAMILY_DEFAULT_MASK = {"llada": 126336, "dream": 151666}


def word_tokenizer(**roles):
    """A tokenizer over SPECIALS and CHARS (one token a character) with the given special roles."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<t{i}>": i for i in range(VOCAB) if i not in SPECIALS.values() and i >= len(CHARS)}
    vocab.update({ch: i for i, ch in enumerate(CHARS)})
    vocab.update(SPECIALS)
    assert len(vocab) == VOCAB and len(set(vocab.values())) == VOCAB
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False,
                                  unk_token="<unk>", **roles)
    tok.add_special_tokens({"additional_special_tokens": ["<|eot_id|>", "<|im_end|>"]})
    return tok


def family_copy(family: str, dest: Path, tokenizer=None, drop=(), **config) -> Path:
    """The fixture of `family` copied to `dest` with `tokenizer` saved beside it; config.json keys
    in `drop` removed and the keyword arguments written over it."""
    shutil.copytree(FIXTURES / family, dest)
    for f in dest.iterdir():
        f.chmod(0o644)
    hub = json.loads((dest / "config.json").read_text())
    hub = {k: v for k, v in hub.items() if k not in drop}
    hub.update(config)
    (dest / "config.json").write_text(json.dumps(hub))
    if tokenizer is not None:
        tokenizer.save_pretrained(dest)
    return dest


def generic_copy(dest: Path, tokenizer, drop=(), **config) -> Path:
    """A bidirectional Llama of the test vocabulary (the generic family) saved at `dest`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    ids = {"mask_token_id": CONFIG_MASK, "eos_token_id": CONFIG_EOS, "pad_token_id": CONFIG_EOS}
    ids = {k: v for k, v in ids.items() if k not in drop}
    ids.update(config)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, is_causal=False, **ids)
    LlamaForCausalLM(cfg).save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def make(family: str, dest: Path, tokenizer, drop=(), **config) -> Path:
    if family == "generic":
        return generic_copy(dest, tokenizer, drop, **config)
    return family_copy(family, dest, tokenizer, drop, **config)


FAMILIES = ["llada", "dream", "generic"]
TWO_FAMILIES = [pytest.param(f, marks=needs_fixtures) for f in ("llada", "dream")]
ALL_FAMILIES = TWO_FAMILIES + ["generic"]


# -- which id fills a row that stopped early --------------------------------------------------------

def _rollout_writing(model, token: int, gen_length: int = 12, block_length: int = 4):
    """A rollout of a policy that writes `token` everywhere (a bias of 60 on its logit)."""
    policy = Policy(BiasedLM(model, {token: 60.0}))
    cfg = SamplingConfig(gen_length=gen_length, block_length=block_length, steps=gen_length, temperature=1.0)
    prompt = torch.tensor([[3, 4, 5], [6, 7, 8]])
    with torch.no_grad():
        return generate(policy, prompt, torch.ones_like(prompt), cfg, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("tokenizer_eos", ["<|endoftext|>", "<|eot_id|>", "<|im_end|>"])
def test_rows_that_stop_early_are_filled_with_the_configs_eos(family, tokenizer_eos, tmp_path):
    """Whatever EOS the tokenizer names (LLaDA-8B-Instruct's says <|eot_id|>, its config.json
    <|endoftext|>), a row that ends early is filled with the config's EOS, the model's padding;
    every id that ends a row (config EOS, tokenizer EOS, the family's end of turn) stops it after
    its first block, and the completion read from it is empty."""
    tok = word_tokenizer(mask_token="<|mdm_mask|>", eos_token=tokenizer_eos, pad_token="<|endoftext|>")
    model, _ = load_model_and_tokenizer(str(make(family, tmp_path / family, tok)), dtype="float32")
    ends = {CONFIG_EOS, SPECIALS[tokenizer_eos]}
    if family in END_OF_TURN:
        ends.add(SPECIALS[END_OF_TURN[family]])
    policy = Policy(model)
    assert policy.eos_id == CONFIG_EOS
    assert set(policy.eos_ids) == ends
    for end in sorted(ends):
        ro = _rollout_writing(model, end)
        first = ro.completion[:, :4]
        assert bool((first == end).all()), (end, first)
        assert bool((ro.completion[:, 4:] == CONFIG_EOS).all()), (end, ro.completion)
        assert not bool(ro.sampled[:, 4:].any())  # the fill is written, not sampled
        assert decode_completions(tok, ro.completion, ro.stop_ids) == ["", ""]


@pytest.mark.skipif(not TOKENIZERS.is_dir(), reason="real tokenizers not available")
def test_dreams_real_tokenizer_ends_rows_at_im_end_and_fills_with_the_configs_eos():
    """Dream-v0-Instruct: config and tokenizer EOS <|endoftext|> 151643, end of turn <|im_end|>
    151645. Both end a row, 151643 fills it, and text after either is never decoded."""
    from transformers import Qwen2Config

    from agrpo.families import DREAM, annotate
    from agrpo.models import load_tokenizer

    tok = load_tokenizer(str(TOKENIZERS / "dream"))
    config = Qwen2Config(eos_token_id=151643, vocab_size=151667)
    annotate(config, DREAM, tok)
    assert config.eos_token_id == [151643, 151645] and config.mask_token_id == 151666
    before = tok("<answer>18</answer>", add_special_tokens=False)["input_ids"]
    after = tok("<answer>17</answer>", add_special_tokens=False)["input_ids"]
    for end in (151643, 151645):
        row = before + [end] + after + [151643] * 3
        assert decode_completions(tok, torch.tensor([row]), config.eos_token_id) == ["<answer>18</answer>"]


# -- the mask id ----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_mask_id_precedence(family, tmp_path):
    """The mask id is, in order: the one passed, the config's `mask_token_id`, the tokenizer's
    mask token, the family's hub default (LLaDA 126336, Dream 151666); a generic model with none
    is refused. The policy and the sampler use that id."""
    with_mask = word_tokenizer(mask_token="<other_mask>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    without = word_tokenizer(eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    other = SPECIALS["<other_mask>"]

    def mask_of(name, tok, drop=(), **kw):
        model, _ = load_model_and_tokenizer(str(make(family, tmp_path / name, tok, drop)), dtype="float32", **kw)
        policy = Policy(model)
        assert policy.mask_id == model.config.mask_token_id
        return model.config.mask_token_id

    # the config names one: it wins over the tokenizer's
    assert mask_of("config", with_mask) == CONFIG_MASK
    # the config names none: the tokenizer's, never the family's default
    assert mask_of("tokenizer", with_mask, drop=("mask_token_id",)) == other
    # neither: the family's default, or a refusal for a model of no known family
    if family == "generic":
        with pytest.raises(AgrpoError, match="no mask token"):
            mask_of("neither", without, drop=("mask_token_id",))
    else:
        assert mask_of("neither", without, drop=("mask_token_id",)) == FAMILY_DEFAULT_MASK[family]
    # one passed wins over all of them
    for name, tok, drop in (("config", with_mask, ()), ("tokenizer", with_mask, ("mask_token_id",)),
                            ("neither", without, ("mask_token_id",))):
        model, _ = load_model_and_tokenizer(str(tmp_path / name), dtype="float32", mask_token_id=7)
        assert model.config.mask_token_id == 7 and Policy(model).mask_id == 7


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_the_sampler_masks_with_the_tokenizers_mask_when_the_config_names_none(family, tmp_path):
    """A checkpoint whose config.json has no mask_token_id: the completion starts as the
    tokenizer's mask token, which is what the model reads as "still to fill"."""
    tok = word_tokenizer(mask_token="<other_mask>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    model, _ = load_model_and_tokenizer(str(make(family, tmp_path / family, tok, drop=("mask_token_id",))),
                                        dtype="float32")
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids, attention_mask=None, position_ids=None):
            seen.append(input_ids.clone())
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    cfg = SamplingConfig(gen_length=4, block_length=4, steps=4, temperature=0.0)
    prompt = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        generate(Policy(Spy(model)), prompt, None, cfg)
    assert seen and bool((seen[0][:, 3:] == SPECIALS["<other_mask>"]).all())


# -- dtype=auto ---------------------------------------------------------------------------------------

def _native_llada(tmp_path: Path) -> Path:
    """A LLaDA model as a run checkpoint stores it: transformers' names, the family on its config."""
    tok = word_tokenizer(mask_token="<|mdm_mask|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    model, _ = load_model_and_tokenizer(str(family_copy("llada", tmp_path / "hub", tok)), dtype="float32")
    model.save_pretrained(tmp_path / "native")
    tok.save_pretrained(tmp_path / "native")
    return tmp_path / "native"


def _dtype_cases(tmp_path: Path) -> dict[str, tuple[str, torch.dtype]]:
    """name -> (model, dtype=auto's choice on a GPU)."""
    tok = word_tokenizer(mask_token="<|mdm_mask|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    cases = {"tiny": ("tiny:sudoku", torch.float32),
             "generic": (str(generic_copy(tmp_path / "generic", tok)), torch.float32)}
    if FIXTURES.is_dir():
        cases["llada"] = (str(family_copy("llada", tmp_path / "llada", tok)), torch.bfloat16)
        cases["dream"] = (str(family_copy("dream", tmp_path / "dream", tok)), torch.bfloat16)
        cases["llada, saved as a run checkpoint"] = (str(_native_llada(tmp_path / "saved")), torch.bfloat16)
    return cases


def test_dtype_auto_is_bfloat16_for_llada_and_dream_on_a_gpu_and_float32_otherwise(tmp_path, monkeypatch):
    """dtype=auto on a GPU machine: bfloat16 for LLaDA and Dream (an 8B model in float32 needs 32 GB
    for its weights), float32 for the tiny and generic models; on a CPU float32 for every one. An
    explicit dtype is used as given on both."""
    from agrpo.recipes.evaluate import EvalConfig
    from agrpo.recipes.rl import RLConfig

    assert RLConfig().dtype == EvalConfig().dtype == "auto"  # what train and eval pass unless told
    cases = _dtype_cases(tmp_path)
    for gpu in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda gpu=gpu: gpu)
        for name, (source, on_gpu) in cases.items():
            model, _ = load_model_and_tokenizer(source)
            expected = on_gpu if gpu else torch.float32
            assert {p.dtype for p in model.parameters()} == {expected}, (name, gpu)
            for dtype, wanted in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
                model, _ = load_model_and_tokenizer(source, dtype=dtype)
                assert {p.dtype for p in model.parameters()} == {wanted}, (name, gpu, dtype)
