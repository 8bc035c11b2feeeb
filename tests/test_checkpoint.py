import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from agrpo import checkpoint as ckpt_mod
from agrpo.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from agrpo.errors import AgrpoError


def tiny_llama(seed: int, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, is_causal=False, mask_token_id=2, eos_token_id=1, pad_token_id=0,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(cfg)


def make_training(model, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return opt, sched


def train_steps(model, opt, sched, n, seed=123):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randint(3, 40, (2, 6), generator=g)
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 40), x.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()


def assert_same_params(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def assert_same_optimizer(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys() and len(sa["state"]) > 0
    for i in sa["state"]:
        for k, v in sa["state"][i].items():
            assert torch.equal(v, sb["state"][i][k]), (i, k)


def step_dirs(run_dir):
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))


@pytest.fixture
def trained():
    model = tiny_llama(0)
    opt, sched = make_training(model)
    train_steps(model, opt, sched, 2)
    return model, opt, sched


def test_round_trip_is_bit_identical_and_resumes_identically(tmp_path, trained):
    model, opt, sched = trained
    path = save_checkpoint(tmp_path, 2, model, opt, sched, extra={"counters": {"skipped_steps": 1, "r": float("nan")}})
    assert path == tmp_path / "checkpoints" / "step_000002"
    assert {"model.safetensors", "config.json", "optimizer.pt", "scheduler.pt", "state.json"} <= {
        p.name for p in path.iterdir()
    }
    assert latest_checkpoint(tmp_path) == path

    model2 = tiny_llama(1)
    opt2, sched2 = make_training(model2)
    train_steps(model2, opt2, sched2, 1, seed=7)  # different weights and optimizer state
    state = load_checkpoint(path, model2, opt2, sched2)
    assert state["step"] == 2
    assert state["counters"] == {"skipped_steps": 1, "r": None}  # NaN stored as null
    assert_same_params(model, model2)
    assert_same_optimizer(opt, opt2)
    assert sched2.last_epoch == sched.last_epoch and sched2.get_last_lr() == sched.get_last_lr()

    # the restored state must train on exactly like the original
    train_steps(model, opt, sched, 1, seed=99)
    train_steps(model2, opt2, sched2, 1, seed=99)
    assert_same_params(model, model2)


def test_tied_embeddings_round_trip(tmp_path):
    model = tiny_llama(0, tie=True)
    opt, sched = make_training(model)
    train_steps(model, opt, sched, 1)
    path = save_checkpoint(tmp_path, 1, model, opt)
    model2 = tiny_llama(5, tie=True)
    load_checkpoint(path, model2)
    assert_same_params(model, model2)
    assert model2.lm_head.weight is model2.model.embed_tokens.weight


def test_keep_last_prunes_oldest_and_never_the_newest(tmp_path, trained):
    model, opt, sched = trained
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, sched, keep_last=2)
    assert step_dirs(tmp_path) == ["step_000002", "step_000003"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000003"
    save_checkpoint(tmp_path, 4, model, opt, keep_last=0)  # below 1: the newest still stays
    assert step_dirs(tmp_path) == ["step_000004"]


def test_resaving_an_earlier_step_drops_the_abandoned_future(tmp_path, trained):
    model, opt, sched = trained
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, sched, keep_last=None)
    # a run resumed from step 1 reaches step 2 again: its new step 2 replaces the old one
    marker = {"timeline": "second"}
    save_checkpoint(tmp_path, 2, model, opt, sched, extra=marker, keep_last=5)
    assert step_dirs(tmp_path) == ["step_000001", "step_000002"]
    assert latest_checkpoint(tmp_path).name == "step_000002"
    assert load_checkpoint(latest_checkpoint(tmp_path), tiny_llama(3))["timeline"] == "second"


@pytest.mark.parametrize("where", ["torch.save", "save_pretrained"])
def test_crash_during_second_save_keeps_the_first(tmp_path, trained, monkeypatch, where):
    model, opt, sched = trained
    first = save_checkpoint(tmp_path, 1, model, opt, sched)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model, opt, sched, 1, seed=5)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    if where == "torch.save":
        monkeypatch.setattr(ckpt_mod.torch, "save", boom)
    else:
        real = model.save_pretrained

        def half_then_boom(directory, **kwargs):  # leaves some files behind, like a real crash
            real(directory, **kwargs)
            raise OSError("disk full")

        monkeypatch.setattr(model, "save_pretrained", half_then_boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 2, model, opt, sched)
    monkeypatch.undo()

    assert latest_checkpoint(tmp_path) == first
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_000001"
    assert step_dirs(tmp_path) == ["step_000001"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")] == []
    fresh = tiny_llama(9)
    opt2, sched2 = make_training(fresh)
    assert load_checkpoint(first, fresh, opt2, sched2)["step"] == 1
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, snapshot[k]), k


def test_leftover_tmp_dir_is_ignored_then_cleaned(tmp_path, trained):
    model, opt, sched = trained
    save_checkpoint(tmp_path, 1, model, opt)
    # what a killed process leaves behind: a partial hidden directory and pointer temp file
    dead = tmp_path / "checkpoints" / ".tmp-step_000002-deadbeef"
    dead.mkdir()
    (dead / "config.json").write_text("{}")
    (dead / "state.json").write_text('{"step": 2}')
    (tmp_path / "checkpoints" / ".tmp-latest-deadbeef").write_text("step_000002")
    assert latest_checkpoint(tmp_path).name == "step_000001"
    save_checkpoint(tmp_path, 2, model, opt)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step_000001", "step_000002"]


def test_latest_checkpoint_falls_back_and_none_without_checkpoints(tmp_path, trained):
    model, opt, _ = trained
    assert latest_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, 1, model, opt)
    save_checkpoint(tmp_path, 3, model, opt)
    (tmp_path / "checkpoints" / "latest").unlink()
    assert latest_checkpoint(tmp_path).name == "step_000003"
    (tmp_path / "checkpoints" / "latest").write_text("step_000009\n")  # names a vanished dir
    assert latest_checkpoint(tmp_path).name == "step_000003"


def test_missing_and_corrupt_checkpoints_raise_naming_the_path(tmp_path, trained):
    model, opt, sched = trained
    missing = tmp_path / "nope" / "step_000001"
    with pytest.raises(AgrpoError, match="nope"):
        load_checkpoint(missing, model)

    path = save_checkpoint(tmp_path, 1, model, opt, sched)
    target = tiny_llama(4)
    before = {k: v.clone() for k, v in target.state_dict().items()}

    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(AgrpoError, match="step_000001.*corrupt"):
        load_checkpoint(path, target)
    for k, v in target.state_dict().items():  # nothing was half-loaded
        assert torch.equal(v, before[k])

    path2 = save_checkpoint(tmp_path, 2, model, opt, sched)
    (path2 / "optimizer.pt").write_bytes(b"garbage")
    with pytest.raises(AgrpoError, match="optimizer.pt"):
        load_checkpoint(path2, target, make_training(target)[0])
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k])

    (path2 / "state.json").write_text("{not json")
    with pytest.raises(AgrpoError, match="state.json"):
        load_checkpoint(path2, target)


def test_checkpoint_of_another_architecture_is_refused_untouched(tmp_path, trained):
    model, opt, _ = trained
    path = save_checkpoint(tmp_path, 1, model, opt)
    torch.manual_seed(0)
    other = LlamaForCausalLM(
        LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, mask_token_id=2)
    )
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(AgrpoError, match="does not fit"):
        load_checkpoint(path, other)
    for k, v in other.state_dict().items():
        assert torch.equal(v, before[k])


def test_bad_extra_is_refused_before_writing(tmp_path, trained):
    model, opt, _ = trained
    with pytest.raises(AgrpoError, match="step"):
        save_checkpoint(tmp_path, 1, model, opt, extra={"step": 5})
    with pytest.raises(AgrpoError, match="JSON"):
        save_checkpoint(tmp_path, 1, model, opt, extra={"x": object()})
    assert latest_checkpoint(tmp_path) is None
    assert not (tmp_path / "checkpoints").exists() or step_dirs(tmp_path) == []


def lora_model(base_seed: int, adapter_seed: int):
    from peft import LoraConfig, get_peft_model

    base = tiny_llama(base_seed)
    torch.manual_seed(adapter_seed)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def test_peft_lora_round_trip_saves_adapter_only(tmp_path):
    model = lora_model(0, 0)
    opt, sched = make_training(model)
    train_steps(model, opt, sched, 2)
    path = save_checkpoint(tmp_path, 2, model, opt, sched, extra={"k": 1})
    files = {p.name for p in path.iterdir()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files

    model2 = lora_model(0, 1)
    opt2, sched2 = make_training(model2)
    lora_keys = [k for k in model.state_dict() if "lora_" in k]
    assert lora_keys and any(not torch.equal(model.state_dict()[k], model2.state_dict()[k]) for k in lora_keys)
    state = load_checkpoint(path, model2, opt2, sched2)
    assert state["k"] == 1 and state["step"] == 2
    assert_same_params(model, model2)
    assert_same_optimizer(opt, opt2)

    # an adapter is not a full model, and a full checkpoint is not an adapter
    with pytest.raises(AgrpoError, match="model.safetensors"):
        load_checkpoint(path, tiny_llama(0))
    full = save_checkpoint(tmp_path / "full", 1, tiny_llama(0), make_training(tiny_llama(0))[0])
    with pytest.raises(AgrpoError, match="adapter_model.safetensors"):
        load_checkpoint(full, lora_model(0, 0))


def test_state_json_records_step_and_model_source(tmp_path, trained):
    model, opt, _ = trained
    model.name_or_path = "/somewhere/base"
    path = save_checkpoint(tmp_path, 7, model, opt)
    state = json.loads((path / "state.json").read_text())
    assert state["step"] == 7 and state["model_source"] == "/somewhere/base"
