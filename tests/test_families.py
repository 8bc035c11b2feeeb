"""LLaDA and Dream hub checkpoints through the native loader, against their own reference logits.

The fixtures (../shared/fixtures/models) hold tiny checkpoints in each family's hub format and
the logits of the family's own modeling code (float64, transformers 4.57). They carry no
tokenizer: each test copies a fixture directory and saves a word-level tokenizer into the copy,
whose ids match the fixture config (mask, EOS, pad) and cover the tiny tasks' characters.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from agrpo import families
from agrpo.errors import AgrpoError
from agrpo.models import load_model_and_tokenizer, shift_logits_of
from agrpo.policy import Policy

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "models"
pytestmark = pytest.mark.skipif(not FIXTURES.is_dir(), reason="model fixtures not available")

VOCAB = 1024
CHARS = "0123456789+-*/()=,:| "
# special tokens of each fixture: the ids its config.json names, and an end-of-turn token
SPECIALS = {
    "llada": {"<|mdm_mask|>": 1020, "<|endoftext|>": 1021, "<|eot_id|>": 1022, "<unk>": 1023},
    "dream": {"<|beginoftext|>": 1019, "<|mask|>": 1020, "<|endoftext|>": 1021, "<|pad|>": 1022, "<|im_end|>": 1023},
}
ROLES = {
    "llada": {"mask_token": "<|mdm_mask|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"},
    "dream": {"mask_token": "<|mask|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>", "unk_token": "<unk>",
              "bos_token": "<|beginoftext|>"},
}
EOT = {"llada": 1022, "dream": 1023}


def fixture_tokenizer(family: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<t{i}>": i for i in range(VOCAB)}
    vocab = {tok: i for tok, i in vocab.items() if i not in SPECIALS[family].values()}
    for i, ch in enumerate(CHARS):
        del vocab[f"<t{10 + i}>"]
        vocab[ch] = 10 + i
    vocab.update(SPECIALS[family])
    if "<unk>" not in vocab:
        del vocab["<t9>"]
        vocab["<unk>"] = 9
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **ROLES[family])
    tok.add_special_tokens({"additional_special_tokens": ["<|eot_id|>" if family == "llada" else "<|im_end|>"]})
    return tok


def fixture_copy(family: str, dest: Path) -> Path:
    """The fixture directory copied to `dest`, with the test tokenizer saved into it."""
    shutil.copytree(FIXTURES / family, dest)
    for f in dest.iterdir():
        f.chmod(0o644)
    fixture_tokenizer(family).save_pretrained(dest)
    return dest


@pytest.fixture(scope="module", params=["llada", "dream"])
def loaded(request, tmp_path_factory):
    family = request.param
    path = fixture_copy(family, tmp_path_factory.mktemp(family) / family)
    model, tok = load_model_and_tokenizer(str(path), dtype="float32")
    return family, path, model.eval(), tok


def reference(family: str) -> dict:
    return load_file(str(FIXTURES / family / "reference.safetensors"))


def left_pad_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def max_error(logits, ref, attention_mask) -> float:
    """Largest |difference| at positions with attention mask 1."""
    diff = (logits.double() - ref).abs().amax(-1)
    return float(diff[attention_mask.bool()].max())


# -- the function the family's own code computes ------------------------------------------
def test_logits_match_the_family_reference(loaded):
    family, _, model, _ = loaded
    ref = reference(family)
    ids, attn = ref["input_ids"], ref["attention_mask"]
    assert not bool(attn[2].all()) and bool(attn[:2].all())  # row 2 is the left-padded one
    tol = 1e-5 * float(ref["logits"].abs().max())
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=attn, position_ids=left_pad_positions(attn)).logits
        unpadded = model(input_ids=ids[:2]).logits
    errors = {"padded": max_error(padded, ref["logits"], attn),
              "no_mask": max_error(unpadded, ref["logits_no_attention_mask"], attn[:2])}
    print(f"{family} max |logit error|: {errors}, tolerance {tol:.2e}")
    assert errors["padded"] <= tol and errors["no_mask"] <= tol, errors


def test_the_reference_used_positions_from_zero_and_rope_makes_both_conventions_agree(loaded):
    """The reference ran the padded row with positions 0..L-1 over the padding too (the family
    code's default); Policy counts positions from the first real token. RoPE depends on position
    differences only, so the two agree to rounding; in float64 Dream's reference is matched
    exactly by its own convention, which tells which one it used."""
    family, _, model, _ = loaded
    ref = reference(family)
    ids, attn = ref["input_ids"], ref["attention_mask"]
    m64 = model.double()
    try:
        with torch.no_grad():
            shifted = m64(input_ids=ids, attention_mask=attn, position_ids=left_pad_positions(attn)).logits
            absolute = m64(input_ids=ids, attention_mask=attn).logits
    finally:
        model.float()
    scale = float(ref["logits"].abs().max())
    assert max_error(shifted, ref["logits"], attn) <= 1e-5 * scale
    assert max_error(absolute, ref["logits"], attn) <= 1e-5 * scale
    if family == "dream":
        assert max_error(absolute[2:], ref["logits"][2:], attn[2:]) < 1e-12
        assert max_error(shifted[2:], ref["logits"][2:], attn[2:]) > 1e-9


def test_config_carries_the_family_facts(loaded):
    family, _, model, tok = loaded
    config = model.config
    assert type(model).__name__ == {"llada": "LlamaForCausalLM", "dream": "Qwen2ForCausalLM"}[family]
    assert config.is_causal is False
    assert config.agrpo_family["name"] == family
    assert config.mask_token_id == 1020
    # EOS first (the sampler's fill token), then the end of turn of the chat template
    assert config.eos_token_id == [1021, EOT[family]]
    assert shift_logits_of(model) is (family == "dream")
    assert shift_logits_of(model, False) is False
    assert config.vocab_size == VOCAB and config.hidden_size == 64 and config.intermediate_size == 160
    assert config.rope_parameters["rope_theta"] == {"llada": 500000.0, "dream": 1000000.0}[family]
    assert config.num_key_value_heads == {"llada": 4, "dream": 2}[family]
    assert config.tie_word_embeddings is False
    assert tok.padding_side == "left" and tok.mask_token_id == 1020


# -- through Policy ------------------------------------------------------------------------
def test_policy_takes_the_fast_path_and_reads_the_shifted_logits(loaded):
    family, _, model, _ = loaded
    ref = reference(family)
    ids, attn = ref["input_ids"], ref["attention_mask"]
    policy = Policy(model, shift_logits=shift_logits_of(model))
    positions = torch.arange(1, ids.shape[1]).expand(ids.shape[0], -1)
    with torch.no_grad():
        got = policy(ids, positions, attn)
        own = model(input_ids=ids, attention_mask=attn, position_ids=left_pad_positions(attn)).logits
    assert policy._backbone is not None
    expected = own[:, :-1] if family == "dream" else own[:, 1:]
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
    if family == "dream":
        with pytest.raises(AgrpoError, match="position 0"):
            policy(ids, torch.zeros(ids.shape[0], 1, dtype=torch.long), attn)


def task_prompts(n: int) -> list[str]:
    from agrpo.tasks import TASKS, get_task

    name = next(n for n in ("tiny-countdown", "countdown") if n in TASKS)
    return [ex["prompt"] for ex in get_task(name).train_examples(n, seed=0)]


def test_rollout_is_on_policy_at_every_committed_token(loaded):
    from agrpo.data import encode_prompts
    from agrpo.objectives import agrpo_loss
    from agrpo.objectives.agrpo import rebuild_states
    from agrpo.sampling import SamplingConfig, generate, token_log_prob

    family, _, model, tok = loaded
    policy = Policy(model, shift_logits=shift_logits_of(model))
    prompt_ids, prompt_mask = encode_prompts(tok, task_prompts(4))
    assert not bool(prompt_mask.all()) and int(prompt_mask.sum(1).min()) >= 1  # left padding, >= 1 prompt token
    cfg = SamplingConfig(gen_length=8, block_length=4, steps=4, temperature=1.0, top_k=50, top_p=0.95)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ro = generate(policy, prompt_ids, prompt_mask, cfg, gen)
        # recompute every committed token at the state it was committed in (AGRPO.md §2, check 1)
        bsz, c = ro.completion.shape
        row = torch.arange(bsz).repeat_interleave(cfg.steps)
        t = torch.arange(cfg.steps).repeat(bsz)
        x = rebuild_states(ro, row, t)
        pos = ro.prompt_len + torch.arange(c).expand(len(row), c)
        logits = policy(x, pos, ro.attention_mask[row])
        filt = ro.filter_ids[row] if ro.filter_ids is not None else None
        logp, _ = token_log_prob(logits, ro.completion[row], cfg.temperature, filt, ro.mask_id)
    at_step = (ro.step[row] == t[:, None]) & ro.sampled[row]
    assert int(at_step.sum()) == int(ro.sampled.sum()) > 0
    ratio = (logp - ro.logp[row]).exp()[at_step]
    assert float((ratio - 1).abs().max()) < 1e-5
    _, metrics = agrpo_loss(policy, ro, torch.randn(bsz), num_samples=2, generator=gen)
    assert abs(metrics["ratio_mean"] - 1) < 1e-5 and metrics["loss_tokens"] > 0


# -- back to the hub's layout ----------------------------------------------------------------
def safetensors_layout(path: Path) -> dict:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        if f.name == "reference.safetensors":
            continue
        with safe_open(str(f), "pt") as s:
            out.update({k: tuple(s.get_slice(k).get_shape()) for k in s.keys()})
    return out


ARCH = {
    "llada": ("d_model", "n_heads", "n_kv_heads", "n_layers", "mlp_hidden_size", "embedding_size", "vocab_size",
              "weight_tying", "rope_theta", "rms_norm_eps", "max_sequence_length", "activation_type", "block_type",
              "mask_token_id", "eos_token_id", "pad_token_id", "model_type", "architectures", "auto_map"),
    "dream": ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "vocab_size", "rope_theta", "rms_norm_eps", "tie_word_embeddings", "mask_token_id", "eos_token_id",
              "pad_token_id", "bos_token_id", "model_type", "architectures", "auto_map"),
}


def assert_hub_layout(family: str, out: Path) -> None:
    assert safetensors_layout(out) == safetensors_layout(FIXTURES / family)
    original = json.loads((FIXTURES / family / "config.json").read_text())
    written = json.loads((out / "config.json").read_text())
    assert set(written) == set(original)
    assert {k: written[k] for k in ARCH[family]} == {k: original[k] for k in ARCH[family]}


def logits_of(model, ids, attn):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=attn, position_ids=left_pad_positions(attn)).logits


def test_hub_layout_round_trip(loaded, tmp_path):
    family, _, model, tok = loaded
    ref = reference(family)
    ids, attn = ref["input_ids"], ref["attention_mask"]
    out = families.save_in_family_format(model, tok, tmp_path / "hub")
    assert_hub_layout(family, out)
    reloaded, _ = load_model_and_tokenizer(str(out), dtype="float32")
    assert torch.equal(logits_of(reloaded, ids, attn), logits_of(model, ids, attn))
    assert reloaded.config.eos_token_id == model.config.eos_token_id


def test_native_checkpoint_keeps_native_names_and_the_family(loaded, tmp_path):
    """save_pretrained (the run checkpoints) stays in transformers' names: resume and reload work."""
    family, _, model, tok = loaded
    model.save_pretrained(tmp_path / "native")
    tok.save_pretrained(tmp_path / "native")
    names = set(safetensors_layout(tmp_path / "native"))
    assert "model.embed_tokens.weight" in names and not any("transformer" in n for n in names)
    reloaded, _ = load_model_and_tokenizer(str(tmp_path / "native"), dtype="float32")
    assert shift_logits_of(reloaded) is (family == "dream")
    ref = reference(family)
    assert torch.equal(logits_of(reloaded, ref["input_ids"], ref["attention_mask"]),
                       logits_of(model, ref["input_ids"], ref["attention_mask"]))
    families.save_in_family_format(reloaded, None, tmp_path / "hub")  # the hub config travels along
    assert_hub_layout(family, tmp_path / "hub")


OFFICIAL_LLADA_TARGETS = ["q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"]


def test_lora_accepts_llada_module_names_and_merges_back_to_the_hub_layout(tmp_path):
    path = fixture_copy("llada", tmp_path / "llada")
    lora = {"r": 4, "alpha": 8, "target_modules": OFFICIAL_LLADA_TARGETS}
    model, tok = load_model_and_tokenizer(str(path), dtype="float32", lora=lora)
    adapted = {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    with torch.no_grad():  # a trained adapter: B away from its zero initialisation
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    ref = reference("llada")
    ids, attn = ref["input_ids"], ref["attention_mask"]
    trained = logits_of(model, ids, attn)
    base = load_model_and_tokenizer(str(path), dtype="float32")[0]
    assert float((trained - logits_of(base, ids, attn)).abs().max()) > 1e-3
    out = families.save_in_family_format(model, tok, tmp_path / "merged")
    assert_hub_layout("llada", out)
    reloaded, _ = load_model_and_tokenizer(str(out), dtype="float32")
    assert torch.allclose(logits_of(reloaded, ids, attn), trained, atol=1e-5, rtol=0)
    with pytest.raises(AgrpoError, match=r"\['attn_proj'\] match no linear layer.*o_proj"):
        load_model_and_tokenizer(str(path), dtype="float32", lora={"r": 4, "target_modules": ["q_proj", "attn_proj"]})


def test_rl_recipe_runs_with_the_family_shift_lora_and_kl(loaded, tmp_path, monkeypatch):
    from agrpo.recipes import rl
    from agrpo.sampling import SamplingConfig, paper_eval_sampling
    from agrpo.tasks import TASKS

    family, path, _, _ = loaded
    seen = []

    class SpyPolicy(Policy):
        def __init__(self, model, **kw):
            super().__init__(model, **kw)
            seen.append((self.shift_logits, self.mask_id, self.eos_id))

    monkeypatch.setattr(rl, "Policy", SpyPolicy)
    task = next(n for n in ("tiny-sudoku", "sudoku") if n in TASKS)
    targets = OFFICIAL_LLADA_TARGETS if family == "llada" else ["q_proj", "v_proj", "o_proj", "down_proj"]
    cfg = rl.RLConfig(
        name="fam", output_dir=str(tmp_path), model=str(path), task=task, train_pool=8, eval_size=2,
        prompts_per_step=2, group_size=2, num_samples=2, beta=0.05, max_steps=2, time_budget_s=0,
        sampling=SamplingConfig(gen_length=4, block_length=4, steps=2, temperature=1.0),
        eval_sampling=paper_eval_sampling(4), lora=rl.LoraConfig(r=4, target_modules=targets),
        gradient_checkpointing=True, progress=False, save_every=0, eval_every=0,
    )
    summary = rl.train(cfg)
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    assert seen and seen[0] == (family == "dream", 1020, 1021)
    metrics = [json.loads(line) for line in (tmp_path / "fam" / "metrics.jsonl").read_text().splitlines()]
    assert all(m["grad_norm"] > 0 for m in metrics if "grad_norm" in m)

    # the LoRA run, merged, in the hub's layout: same function as the adapter on its base
    from agrpo.cli import main

    assert main(["export", f"model={tmp_path / 'fam'}", f"out={tmp_path / 'hub'}", "dtype=float32"]) == 0
    assert_hub_layout(family, tmp_path / "hub")
    ref = reference(family)
    trained, _ = load_model_and_tokenizer(str(tmp_path / "fam"), dtype="float32")
    exported, _ = load_model_and_tokenizer(str(tmp_path / "hub"), dtype="float32")
    ids, attn = ref["input_ids"], ref["attention_mask"]
    assert torch.allclose(logits_of(exported, ids, attn), logits_of(trained, ids, attn), atol=1e-5, rtol=0)
    assert main(["export", f"model={tmp_path / 'fam'}", f"out={tmp_path / 'hub'}"]) == 2  # never into a full directory


def test_tied_llada_head_is_written_once(tmp_path):
    """LLaDA with weight_tying stores no top-level ff_out: the export must not add one."""
    from safetensors.torch import save_file

    path = fixture_copy("llada", tmp_path / "tied")
    weights = load_file(str(path / "model.safetensors"))
    del weights["model.transformer.ff_out.weight"]
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "weight_tying": True}))
    for module in ("configuration_llada", "modeling_llada"):  # the hub code beside the weights
        (path / f"{module}.py").write_text(f"# {module}\n")
    model, tok = load_model_and_tokenizer(str(path), dtype="float32")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    out = families.save_in_family_format(model, tok, tmp_path / "hub")
    assert safetensors_layout(out) == safetensors_layout(path)
    assert json.loads((out / "config.json").read_text())["weight_tying"] is True
    assert (out / "modeling_llada.py").read_text() == "# modeling_llada\n" and (out / "configuration_llada.py").is_file()


# -- mistakes a user can make ------------------------------------------------------------------
def test_unsupported_llada_settings_are_one_line(tmp_path):
    path = fixture_copy("llada", tmp_path / "llada")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "alibi": True}))
    with pytest.raises(AgrpoError, match="alibi=True"):
        load_model_and_tokenizer(str(path))
    del config["rope_theta"]  # Llama's default (10,000) would load and compute another function
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(AgrpoError, match="lacks rope_theta"):
        load_model_and_tokenizer(str(path))


def test_hub_layout_needs_a_family_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2))
    with pytest.raises(AgrpoError, match="LLaDA or Dream checkpoints.*save_pretrained"):
        families.save_in_family_format(model, None, tmp_path / "x")


def test_family_records_are_data():
    assert families.identify({"model_type": "llada"}) == (families.LLADA, True)
    assert families.identify({"model_type": "Dream"}) == (families.DREAM, True)
    assert families.identify({"model_type": "llama", "agrpo_family": {"name": "dream"}}) == (families.DREAM, False)
    assert families.identify({"model_type": "llama"}) == (families.GENERIC, False)
