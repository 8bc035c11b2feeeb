import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from agrpo import models as models_mod
from agrpo.checkpoint import save_checkpoint
from agrpo.errors import AgrpoError
from agrpo.models import frozen_copy, load_model_and_tokenizer

WORDS = ["[PAD]", "[EOS]", "[MASK]", "[UNK]"] + [str(d) for d in range(10)] + list("abcdefghijklmnopqrstuvwxyz")


def tiny_tokenizer(with_mask: bool = True):
    """A 40-token word-level tokenizer (the shipped builder is used when it exists)."""
    try:
        from agrpo.tiny.tokenizer import build_tokenizer
    except ImportError:
        build_tokenizer = None
    if build_tokenizer is not None and with_mask:
        return build_tokenizer()
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = {"pad_token": "[PAD]", "eos_token": "[EOS]", "unk_token": "[UNK]"}
    if with_mask:
        special["mask_token"] = "[MASK]"
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


def save_tiny(path, *, mask_in_config=True, mask_in_tokenizer=True, seed=0):
    tok = tiny_tokenizer(with_mask=mask_in_tokenizer)
    torch.manual_seed(seed)
    extra = {"mask_token_id": 2} if mask_in_config else {}
    cfg = LlamaConfig(
        vocab_size=max(len(tok), 40), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, is_causal=False, eos_token_id=1, pad_token_id=0, **extra,
    )
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_model")
    model, tok = save_tiny(path)
    return path, model, tok


def test_local_dir_round_trip(tiny_dir):
    path, saved, tok = tiny_dir
    model, tokenizer = load_model_and_tokenizer(str(path))
    ref = saved.state_dict()
    assert model.state_dict().keys() == ref.keys()
    for k, v in model.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert model.dtype == torch.float32
    assert model.config.mask_token_id == 2
    assert tokenizer("1 2 a")["input_ids"] == tok("1 2 a")["input_ids"]


def test_dtype_is_applied_and_unknown_dtype_is_refused(tiny_dir):
    path, saved, _ = tiny_dir
    model, _ = load_model_and_tokenizer(str(path), dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert torch.equal(model.lm_head.weight, saved.lm_head.weight.to(torch.bfloat16))
    with pytest.raises(AgrpoError, match="dtype 'fp8'.*float32"):
        load_model_and_tokenizer(str(path), dtype="fp8")


def test_lora_trains_adapter_params_only(tiny_dir):
    path, _, _ = tiny_dir
    model, _ = load_model_and_tokenizer(
        str(path), lora={"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert any("embed_tokens" in n for n in frozen)
    assert model.config.mask_token_id == 2
    with pytest.raises(AgrpoError, match="unknown lora settings"):
        load_model_and_tokenizer(str(path), lora={"r": 4, "rank": 4})
    with pytest.raises(AgrpoError, match="target_modules"):
        load_model_and_tokenizer(str(path), lora={"r": 4, "target_modules": ["no_such_proj"]})


def test_missing_paths_never_reach_the_hub(tmp_path, monkeypatch):
    import transformers

    def no_hub(*args, **kwargs):
        raise AssertionError("a missing local path must not be looked up on the hub")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_hub)
    for bad in ("./nope", str(tmp_path / "missing"), "runs/x/checkpoints/step_000001", "~/no/such/model"):
        with pytest.raises(AgrpoError, match="does not exist"):
            load_model_and_tokenizer(bad)
    with pytest.raises(AgrpoError, match=r"create it with `agrpo sft output_dir=runs name=countdown-sft`"):
        load_model_and_tokenizer("runs/countdown-sft/model")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(AgrpoError, match="is a file"):
        load_model_and_tokenizer(str(tmp_path / "file.txt"))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(AgrpoError, match="no config.json"):
        load_model_and_tokenizer(str(tmp_path / "emptydir"))


def test_hub_like_names_are_not_mistaken_for_paths():
    assert not models_mod._looks_like_path("GSAI-ML/LLaDA-8B-Instruct")
    assert not models_mod._looks_like_path("gpt2")
    assert models_mod._looks_like_path("runs/a/b")
    assert models_mod._looks_like_path("./model")


def test_tiny_alias_missing_points_to_sft():
    with pytest.raises(AgrpoError, match="agrpo sft task=nonexistent"):
        load_model_and_tokenizer("tiny:nonexistent")


def test_tiny_alias_resolves_inside_the_package(tmp_path, monkeypatch):
    from pathlib import Path

    assert models_mod.TINY_DIR == Path(models_mod.__file__).resolve().parent / "tiny" / "checkpoints"
    save_tiny(tmp_path / "sudoku")
    monkeypatch.setattr(models_mod, "TINY_DIR", tmp_path)
    model, _ = load_model_and_tokenizer("tiny:sudoku")
    assert model.config.mask_token_id == 2
    assert model.name_or_path == str(tmp_path / "sudoku")


def test_mask_id_comes_from_tokenizer_or_is_required(tmp_path):
    save_tiny(tmp_path / "tok_mask", mask_in_config=False, mask_in_tokenizer=True)
    model, tok = load_model_and_tokenizer(str(tmp_path / "tok_mask"))
    assert model.config.mask_token_id == tok.mask_token_id == 2

    save_tiny(tmp_path / "no_mask", mask_in_config=False, mask_in_tokenizer=False)
    with pytest.raises(AgrpoError, match="no mask token"):
        load_model_and_tokenizer(str(tmp_path / "no_mask"))


def test_load_in_4bit_without_bitsandbytes_is_explained(tiny_dir, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("no bitsandbytes")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(AgrpoError, match="pip install bitsandbytes"):
        load_model_and_tokenizer(str(tiny_dir[0]), load_in_4bit=True)


def test_frozen_copy_is_independent_and_frozen(tiny_dir):
    path, _, _ = tiny_dir
    model, _ = load_model_and_tokenizer(str(path))
    model.train()
    ref = frozen_copy(model)
    assert not ref.training and model.training
    assert all(not p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    assert not torch.equal(ref.lm_head.weight, model.lm_head.weight)


def test_checkpoint_dirs_load_with_the_base_tokenizer(tiny_dir, tmp_path):
    path, _, tok = tiny_dir
    model, _ = load_model_and_tokenizer(str(path))
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    run = tmp_path / "run"
    ckpt = save_checkpoint(run, 5, model, torch.optim.AdamW(model.parameters()))
    assert not (ckpt / "tokenizer.json").exists()
    for where in (ckpt, run, run / "checkpoints"):  # a run (or its checkpoints folder) stands for its latest checkpoint
        loaded, tokenizer = load_model_and_tokenizer(str(where))
        assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
        assert tokenizer("a b")["input_ids"] == tok("a b")["input_ids"]


def test_adapter_checkpoint_loads_on_its_base(tiny_dir, tmp_path):
    from peft import PeftModel

    path, _, _ = tiny_dir
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj"]}
    model, _ = load_model_and_tokenizer(str(path), lora=lora)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.fill_(0.5)
    ckpt = save_checkpoint(tmp_path / "run", 1, model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad]))
    loaded, _ = load_model_and_tokenizer(str(ckpt))
    assert isinstance(loaded, PeftModel)
    weights = dict(loaded.named_parameters())
    b_keys = [n for n in weights if "lora_B" in n]
    assert b_keys and all(torch.all(weights[n] == 0.5) for n in b_keys)
    assert not any(p.requires_grad for p in loaded.parameters())  # evaluation: nothing trains
    trainable, _ = load_model_and_tokenizer(str(ckpt), lora=lora)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == set(b_keys) | {
        n.replace("lora_B", "lora_A") for n in b_keys
    }
    with pytest.raises(AgrpoError, match="rank 4"):
        load_model_and_tokenizer(str(ckpt), lora={**lora, "r": 8})


# -- the generic family: any transformers model with a mask token -------------------------------
def test_generic_models_run_bidirectionally_with_the_given_options(tmp_path):
    from transformers import AutoModelForCausalLM

    model, _ = save_tiny(tmp_path / "causal")
    model.config.is_causal = True
    model.config.save_pretrained(tmp_path / "causal")
    assert AutoModelForCausalLM.from_pretrained(str(tmp_path / "causal")).config.is_causal is True
    loaded, _ = load_model_and_tokenizer(str(tmp_path / "causal"), mask_token_id=5, shift_logits=True)
    assert loaded.config.is_causal is False
    assert loaded.config.mask_token_id == 5 and models_mod.shift_logits_of(loaded) is True
    assert loaded.config.agrpo_family["name"] == "generic"
    x = torch.tensor([[4, 5, 6, 7]])
    with torch.no_grad():  # bidirectional: the first position sees the last token
        a = loaded(input_ids=x).logits[0, 0]
        b = loaded(input_ids=torch.tensor([[4, 5, 6, 8]])).logits[0, 0]
    assert not torch.allclose(a, b)
    plain, _ = load_model_and_tokenizer(str(tmp_path / "causal"))
    assert plain.dtype == torch.float32 and models_mod.shift_logits_of(plain) is False  # auto on CPU


def test_attention_and_checkpointing_options(tiny_dir, monkeypatch):
    import importlib.util
    import warnings

    path = str(tiny_dir[0])
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(AgrpoError, match="flash-attn.*attn_implementation=sdpa"):
            load_model_and_tokenizer(path, attn_implementation="flash_attention_2")
    eager, _ = load_model_and_tokenizer(path, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # no deprecated checkpointing call of ours
        model, _ = load_model_and_tokenizer(path, gradient_checkpointing=True)
    assert model.is_activation_checkpointing
    model.train()
    x = torch.tensor([[4, 5, 6, 7]])
    model(input_ids=x).logits.sum().backward()
    assert model.lm_head.weight.grad is not None and model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_mistyped_run_path_fails_at_once_without_the_hub(tmp_path, monkeypatch):
    (tmp_path / "runs" / "sudoku-agrpo").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)

    def no_hub(*a, **k):
        raise AssertionError("the hub was asked about a local path")

    monkeypatch.setattr(models_mod, "_offline_unless_reachable", no_hub)
    with pytest.raises(AgrpoError, match=r"does not exist: did you mean runs/sudoku-agrpo\?"):
        load_model_and_tokenizer("runs/sudoku-agrpp")


def test_unreachable_hub_goes_offline_after_one_probe(monkeypatch):
    from huggingface_hub import constants
    import huggingface_hub.utils

    calls = []

    class DeadSession:
        def head(self, *a, **k):
            calls.append(a)
            raise OSError("no route to host")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: DeadSession())
    with pytest.raises(AgrpoError, match="not in the local cache and the hub cannot be reached"):
        load_model_and_tokenizer("someorg/not-cached-model")
    assert len(calls) == 1 and constants.HF_HUB_OFFLINE is True


def test_loading_draws_no_progress_bar_of_its_own(capfd):
    load_model_and_tokenizer("tiny:sudoku")
    out, err = capfd.readouterr()
    assert "Loading weights" not in out + err
