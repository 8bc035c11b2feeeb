"""Supervised training of block-diffusion models: the block-diffusion loss is the sum over blocks of
each block's masked-diffusion loss in the state the block sampler sees (clean earlier blocks, the
block itself noisy), one noise level per block; bidirectional SFT is as it was."""

import json
from pathlib import Path

import pytest
import torch
from conftest import MASK, PAD, tiny_model

from agrpo.config import load_config
from agrpo.errors import AgrpoError
from agrpo.models import TINY_DIR, load_model_and_tokenizer
from agrpo.policy import Policy
from agrpo.recipes.evaluate import EvalConfig, run_eval
from agrpo.recipes.rl import RLConfig
from agrpo.recipes.sft import SFTConfig, masked_diffusion_loss, train_sft

ROOT = Path(__file__).resolve().parents[1]
BS, EPS = 4, 1e-3


def batch(prompt_len=6, gen=8, rows=3, seed=5):
    """Left-padded prompts (row 0 has two padding positions) and targets."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, 40, (rows, prompt_len), generator=g)
    mask = torch.ones_like(prompt)
    prompt[0, :2], mask[0, :2] = PAD, 0
    return prompt, mask, torch.randint(3, 40, (rows, gen), generator=g)


def draws(seed, rows, gen):
    """The documented draws: t_b = eps + (1 - eps) u_b for every (row, block), then v_i per position; masked: v_i < t_b."""
    g = torch.Generator().manual_seed(seed)
    t = EPS + (1 - EPS) * torch.rand(rows, gen // BS, generator=g, dtype=torch.float32)
    v = torch.rand(rows, gen, generator=g)
    masked = torch.zeros(rows, gen, dtype=torch.bool)
    for r in range(rows):
        for i in range(gen):
            masked[r, i] = bool(v[r, i] < t[r, i // BS])
    return t, masked


def reference(policy, prompt, mask, targets, t, masked):
    """The formula, one forward per (row, block): the prompt left-padded to whole blocks, the clean blocks
    before b, block b as drawn, nothing after it; the model's own block attention over that sequence.
    -> sum_rows sum_b (1 / t_b) sum_{masked i in b} -log p(x_i) / (rows * C), as a float64 tensor."""
    rows, gen = targets.shape
    pad = -prompt.shape[1] % BS
    total = torch.zeros((), dtype=torch.float64)
    for r in range(rows):
        p_ids = torch.cat([torch.full((pad,), PAD), prompt[r]])
        p_mask = torch.cat([torch.zeros(pad, dtype=torch.long), mask[r]])
        for b in range(gen // BS):
            cols = range(b * BS, (b + 1) * BS)
            noisy = targets[r, b * BS : (b + 1) * BS].masked_fill(masked[r, b * BS : (b + 1) * BS], MASK)
            x = torch.cat([p_ids, targets[r, : b * BS], noisy])[None]
            attn = torch.cat([p_mask, torch.ones(x.shape[1] - p_mask.numel(), dtype=torch.long)])[None]
            here = len(p_ids) + b * BS + torch.arange(BS)
            logp = torch.log_softmax(policy(x, here[None], attn)[0], -1)
            for j, i in enumerate(cols):
                if masked[r, i]:
                    total = total - logp[j, targets[r, i]] / float(t[r, b])
    return total / (rows * gen)


def grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


@pytest.mark.parametrize("prompt_len,seed", [(6, 0), (8, 3), (5, 7)])
def test_block_diffusion_loss_is_the_formula(prompt_len, seed):
    """Loss and gradient equal the per-block reference to 1e-9 (prompts padded to whole blocks or already whole)."""
    model = tiny_model(1, True, block_size=BS)
    policy = Policy(model)
    prompt, mask, targets = batch(prompt_len, 12, 3, seed)
    t, masked = draws(seed, 3, 12)
    assert masked.any() and not masked.all()
    loss = masked_diffusion_loss(policy, prompt, mask, targets, torch.Generator().manual_seed(seed), EPS)
    model.zero_grad(set_to_none=True)
    loss.backward()
    got = grads(model)
    model.zero_grad(set_to_none=True)
    ref = reference(policy, prompt, mask, targets, t, masked)
    ref.backward()
    want = grads(model)
    assert loss.dtype == torch.float64
    assert abs(loss.item() - ref.item()) <= 1e-9 * max(1.0, abs(ref.item()))
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_every_block_draws_its_own_noise_level():
    """Over many draws the masked share of a block follows its own t_b, not its row's other blocks."""
    from agrpo.recipes.sft import block_noise

    g = torch.Generator().manual_seed(0)
    t, masked = block_noise(4000, 16, BS, g, EPS)
    assert t.shape == (4000, 4) and masked.shape == (4000, 16)
    share = masked.view(4000, 4, BS).float().mean(-1)
    # within a row, blocks are independent: the correlation of two blocks' mask shares is ~0
    corr = torch.corrcoef(torch.stack([share[:, 0], share[:, 3]]))[0, 1]
    assert abs(float(corr)) < 0.08
    assert float((share - t).abs().mean()) < 0.25 and float(t.min()) >= EPS


def test_bidirectional_sft_loss_is_unchanged():
    """A model without block_size keeps LLaDA's loss as recorded before block models existed (value and gradient)."""
    model = tiny_model(0, True)
    policy = Policy(model)
    prompt, mask, targets = batch(6, 8, 3, 5)
    loss = masked_diffusion_loss(policy, prompt, mask, targets, torch.Generator().manual_seed(11), EPS)
    loss.backward()
    assert loss.item() == pytest.approx(3.2166632468454903, rel=1e-12)
    assert float(model.model.embed_tokens.weight.grad.abs().sum()) == pytest.approx(17.82736112247681, rel=1e-10)


def _small(tmp_path, *extra):
    return load_config(SFTConfig, None, [
        f"output_dir={tmp_path}", "steps=3", "batch_size=8", "hidden_size=32", "num_layers=1", "num_heads=2",
        "intermediate_size=64", "eval_size=8", "train_pool=32", "progress=false", *extra])


def test_sft_with_block_size_makes_a_block_model_and_evaluates_with_the_block_sampler(tmp_path):
    summary = train_sft(_small(tmp_path, "block_size=4", "eval_sampling.block_length=4"))
    assert summary["block_size"] == 4
    model, _ = load_model_and_tokenizer(summary["model_dir"])
    assert model.config.block_size == 4 and Policy(model).block_size == 4
    again = run_eval(load_config(EvalConfig, None, [f"model={summary['model_dir']}", "eval_size=8",
                                                    "sampling.block_length=4"]))
    assert again["accuracy"] == summary["accuracy"]
    # the sampler refuses any other block length for it
    with pytest.raises(AgrpoError, match="block_length=4"):
        run_eval(load_config(EvalConfig, None, [f"model={summary['model_dir']}", "eval_size=8"]))


def test_block_size_settings_are_checked(tmp_path):
    with pytest.raises(AgrpoError, match="eval_sampling.block_length=4"):
        _small(tmp_path, "block_size=4")
    with pytest.raises(AgrpoError, match="divide gen_length"):
        _small(tmp_path, "block_size=5", "eval_sampling.block_length=5")
    assert train_sft(_small(tmp_path, "name=bidir"))["block_size"] == 0


def test_the_shipped_block_base_is_a_block_model():
    model, _ = load_model_and_tokenizer("tiny:sudoku-blocks")
    assert Path(model.name_or_path) == TINY_DIR / "sudoku-blocks"
    assert model.config.block_size == 4 and Policy(model).block_size == 4
    assert model.config.is_causal is False


def test_the_block_preset_trains(tmp_path, capsys):
    from agrpo.cli import main

    preset = ROOT / "configs" / "tiny_sudoku_blocks.yaml"
    code = main(["train", "-c", str(preset), "max_steps=2", "time_budget_s=0", "eval_size=8", "prompts_per_step=4",
                 "group_size=4", "eval_every=0", "progress=false", f"output_dir={tmp_path}"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2
    saved = load_config(RLConfig, str(next(tmp_path.glob("*/config.yaml"))))
    assert saved.model == "tiny:sudoku-blocks" and saved.sampling.block_length == 4


def test_tiny_config_records_the_block_size(tmp_path):
    from transformers import AutoModelForCausalLM

    from agrpo.tiny import build_tiny_model, build_tokenizer, tiny_config

    assert tiny_config(25, block_size=4).block_size == 4
    assert getattr(tiny_config(25), "block_size", None) is None
    for bad in (0, -1, 2.0, True):
        with pytest.raises(AgrpoError, match="block_size"):
            tiny_config(25, block_size=bad)
    torch.manual_seed(0)
    build_tiny_model(build_tokenizer(), hidden_size=32, num_layers=1, num_heads=2, block_size=4).save_pretrained(tmp_path)
    assert Policy(AutoModelForCausalLM.from_pretrained(tmp_path)).block_size == 4


def test_a_loaded_block_model_continues_as_a_block_model(tmp_path):
    """A base whose config has block_size trains with the block loss; other block sizes or block lengths are refused
    before any training."""
    base = ["model=tiny:sudoku-blocks", f"output_dir={tmp_path}", "steps=1", "batch_size=4", "eval_size=4",
            "train_pool=16", "progress=false"]
    with pytest.raises(AgrpoError, match="eval_sampling.block_length=4"):
        train_sft(load_config(SFTConfig, None, base))
    with pytest.raises(AgrpoError, match="attends in blocks of 4"):
        train_sft(load_config(SFTConfig, None, [*base, "block_size=8", "eval_sampling.block_length=8"]))
    summary = train_sft(load_config(SFTConfig, None, [*base, "eval_sampling.block_length=4", "name=more"]))
    assert summary["block_size"] == 4
