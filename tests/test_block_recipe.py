"""The RL recipe on block-diffusion checkpoints in their hub formats: AGRPO with the block sampler and the
block-diffusion layout, on the LLaDA2 fixture (whose config does not record its block size)."""

import json
import math
import shutil
from pathlib import Path

import pytest

from agrpo.config import load_config
from agrpo.errors import AgrpoError
from agrpo.recipes import rl
from agrpo.recipes.rl import RLConfig

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "models"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
needs_fixtures = pytest.mark.skipif(not (FIXTURES / "llada2").is_dir(), reason="model fixtures not available")


def _settings(tmp_path, family):
    from test_paper_rl import write_data
    from test_presets import nl_fixture_tokenizer

    model = tmp_path / family
    shutil.copytree(FIXTURES / family, model)
    nl_fixture_tokenizer("llada").save_pretrained(model)  # the fixtures' ids: mask 1020, eos 1021
    train, test = write_data(tmp_path, "gsm8k")
    return [
        f"model={model}", f"train_data={train}", f"eval_data={test}", f"output_dir={tmp_path / 'runs'}", "dtype=float32",
        "max_steps=2", "time_budget_s=0", "progress=false", "prompts_per_step=2", "group_size=2", "eval_size=4",
        "train_pool=4", "lora.r=0", "max_rows_per_forward=3", "num_samples=2", "sampling.gen_length=12",
        "sampling.block_length=4", "sampling.steps=12", "eval_sampling.gen_length=8", "eval_sampling.block_length=4",
        "eval_sampling.steps=8",
    ]


@needs_fixtures
def test_agrpo_runs_on_the_llada2_fixture_with_its_block_size_given(tmp_path):
    cfg = load_config(RLConfig, str(CONFIGS / "llada8b" / "gsm8k.yaml"), [*_settings(tmp_path, "llada2"), "block_size=4"])
    summary = rl.train(cfg)
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    lines = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    # the first update's ratio is exactly 1: the sampler's record is the trainer's policy
    assert lines[1]["clip_frac"] == 0.0 and all(math.isfinite(line["loss"]) for line in lines[1:])


@needs_fixtures
def test_a_sampler_block_length_other_than_the_models_is_refused_in_one_line(tmp_path):
    over = [*_settings(tmp_path, "llada2"), "block_size=4", "sampling.block_length=6", "sampling.gen_length=12",
            "sampling.steps=12"]
    cfg = load_config(RLConfig, str(CONFIGS / "llada8b" / "gsm8k.yaml"), over)
    with pytest.raises(AgrpoError, match=r"blocks of 4 tokens \(its block_size\): set sampling.block_length=4"):
        rl.train(cfg)
    assert not (tmp_path / "runs").exists()  # refused before any work: no run folder, no evaluation
