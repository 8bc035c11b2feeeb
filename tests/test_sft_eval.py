"""The SFT and evaluation recipes: a saved model evaluates the same through every path."""

import json
from pathlib import Path

import pytest
import torch

from agrpo.cli import main
from agrpo.config import load_config
from agrpo.recipes.evaluate import EvalConfig, run_eval
from agrpo.recipes.sft import SFTConfig, masked_diffusion_loss, train_sft
from agrpo.policy import Policy
from agrpo.tiny.model import build_tiny_model
from agrpo.tiny.tokenizer import MASK_ID, build_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_masked_diffusion_loss_matches_a_loop():
    torch.manual_seed(0)
    model = build_tiny_model(build_tokenizer(), hidden_size=32, num_layers=1, num_heads=2).double()
    policy = Policy(model)
    prompt = torch.randint(4, 20, (3, 5))
    targets = torch.randint(4, 20, (3, 6))

    def draws(seed):
        gen = torch.Generator().manual_seed(seed)
        t = 1e-3 + (1 - 1e-3) * torch.rand(3, 1, generator=gen)
        return t, torch.rand(3, 6, generator=gen) < t

    # a seed whose draws mask something in every row, so no forced mask and the replay is exact
    seed = next(s for s in range(100) if draws(s)[1].any(1).all())
    t, masked = draws(seed)
    loss = masked_diffusion_loss(policy, prompt, torch.ones_like(prompt), targets, torch.Generator().manual_seed(seed))
    # score every masked token with a full forward, one row at a time
    total = 0.0
    for b in range(3):
        x = torch.cat([prompt[b], targets[b].masked_fill(masked[b], MASK_ID)])[None]
        logp = torch.log_softmax(model(x).logits[0, 5:].detach(), -1)
        for i in range(6):
            if masked[b, i]:
                total += -float(logp[i, targets[b, i]]) / float(t[b])
    assert abs(float(loss.detach()) - total / 18) < 1e-6


def test_sft_then_eval_agree(tmp_path):
    cfg = load_config(
        SFTConfig, None,
        [f"output_dir={tmp_path}", "steps=5", "batch_size=8", "hidden_size=32", "num_layers=1", "num_heads=2",
         "intermediate_size=64", "eval_size=16", "train_pool=64", "progress=false"],
    )
    summary = train_sft(cfg)
    model_dir = summary["model_dir"]
    assert (Path(model_dir) / "model.safetensors").is_file()
    again = run_eval(load_config(EvalConfig, None, [f"model={model_dir}", "eval_size=16"]))
    assert again["accuracy"] == summary["accuracy"] and 0 <= summary["accuracy"] <= 1


@pytest.mark.skipif(not (SHARED / "sudoku4x4_test.csv").is_file(), reason="shared test split not present")
def test_eval_on_the_paper_split_through_the_cli(tmp_path, capsys):
    out = tmp_path / "res.json"
    code = main(["eval", f"data={SHARED / 'sudoku4x4_test.csv'}", "eval_size=32", f"output={out}", f"out={tmp_path / 'eval'}"])
    assert code == 0
    res = json.loads(out.read_text())
    assert res["n"] == 32 and len(res["results"]) == 32
    assert res["accuracy"] == pytest.approx(sum(r["score"] for r in res["results"]) / 32)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"] == res["accuracy"]


def test_eval_without_a_model_evaluates_the_base_the_default_run_starts_from():
    # `agrpo eval` then `agrpo eval model=runs/NAME` is the default run's before and after
    from agrpo.recipes.rl import RLConfig, default_preset

    assert EvalConfig().model == load_config(RLConfig, default_preset(), []).model == "tiny:sudoku-rows-boxes"


def test_exclude_file_keeps_its_problems_out_of_training(tmp_path, monkeypatch, capsys):
    import agrpo.recipes.sft as sft
    from agrpo.tasks import get_task

    pool = get_task("tiny-sudoku").train_examples(64, seed=0)
    csv = tmp_path / "test.csv"
    csv.write_text("Puzzle,Solution\n" + "".join(f"{r['puzzle']},{r['solution']}\n" for r in pool[:3]))
    made = []
    monkeypatch.setattr(sft, "get_task", lambda *a, **k: made.append(get_task(*a, **k)) or made[-1])
    args = ["sft", f"output_dir={tmp_path}", "steps=1", "batch_size=4", "hidden_size=32", "num_layers=1",
            "num_heads=2", "intermediate_size=64", "eval_size=4", "train_pool=64", "progress=false"]
    assert main(args + [f"exclude_file={csv}"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["excluded_problems"] == 3
    kept = {r["puzzle"] for r in made[-1].train_examples(64, seed=0)}
    assert kept.isdisjoint(r["puzzle"] for r in pool[:3]) and len(kept) == 64
    # a missing file: one line on stderr, exit code 2
    assert main(args + [f"exclude_file={tmp_path / 'nope.csv'}", "name=missing"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.csv" in err[0]
