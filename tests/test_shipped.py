"""The checkpoints shipped in agrpo/tiny/checkpoints: loadable, small, and as accurate as documented."""

import dataclasses
from pathlib import Path

import pytest

from agrpo.evaluation import evaluate
from agrpo.models import TINY_DIR, load_model_and_tokenizer
from agrpo.policy import Policy
from agrpo.sampling import paper_eval_sampling
from agrpo.tasks import get_task
from agrpo.tiny import EOS_ID, MASK_ID, PAD_ID

# Held-out accuracy (greedy, low-confidence remasking, the 256 generated held-out problems)
# as written in the README and in configs/sft_tiny_<task>.yaml.
DOCUMENTED = {"sudoku": 0.647, "countdown": 0.207, "sudoku-rows-boxes": 0.640, "sudoku-blocks": 0.673}
# the share of held-out problems solved whole, where it is documented
SOLVED = {"sudoku-rows-boxes": 0.207, "sudoku-blocks": 0.207}
# block-diffusion bases: their block size, which is the block length they are sampled with
BLOCK_SIZE = {"sudoku-blocks": 4}


def test_shipped_checkpoints_fit_the_size_budget():
    files = [p for p in TINY_DIR.rglob("*") if p.is_file()]
    assert sorted({p.parent.name for p in files}) == sorted(DOCUMENTED)
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20
    for task in DOCUMENTED:
        assert (TINY_DIR / task / "model.safetensors").is_file()
        assert not list((TINY_DIR / task).glob("*.bin"))


@pytest.mark.parametrize("task_name", sorted(DOCUMENTED))
def test_shipped_base_accuracy_is_as_documented(task_name):
    model, tokenizer = load_model_and_tokenizer(f"tiny:{task_name}")
    assert Path(model.name_or_path) == TINY_DIR / task_name
    assert model.config.is_causal is False
    assert (model.config.mask_token_id, model.config.eos_token_id, model.config.pad_token_id) == (MASK_ID, EOS_ID, PAD_ID)
    assert getattr(model.config, "block_size", None) == BLOCK_SIZE.get(task_name)
    task = get_task(f"tiny-{task_name.split('-')[0]}")
    sampling = paper_eval_sampling()
    if task_name in BLOCK_SIZE:
        sampling = dataclasses.replace(sampling, block_length=BLOCK_SIZE[task_name])
    result = evaluate(Policy(model), tokenizer, task, task.eval_examples(256), sampling)
    # Room to grow (the shipped base is meant to sit between 20% and 60-65%), and the
    # documented figure still describes the file.
    assert 0.15 <= result["accuracy"] <= 0.7
    assert abs(result["accuracy"] - DOCUMENTED[task_name]) <= 0.02
    if task_name in SOLVED:
        assert abs(sum(x == 1.0 for x in result["scores"]) / 256 - SOLVED[task_name]) <= 0.02
