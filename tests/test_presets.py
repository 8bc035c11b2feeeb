"""Every preset in configs/ runs: 2 RL steps and its evaluations on CPU (SFT presets: 2 steps), with the
paper presets' model swapped for the tiny LLaDA / Dream fixture and a byte-level tokenizer at its ids.

Only sizes change (lengths, batch, data files, dtype); objective, sampler kinds, LoRA, schedule and
the rest run as the preset says, so a preset that no longer loads or runs fails here.
"""

import json
import math
import shutil
import time
from pathlib import Path

import pytest
import torch
from test_configs import CONFIGS, PRESETS, RECIPES
from test_families import FIXTURES, ROLES, SPECIALS
from test_paper_rl import TEMPLATE, write_data

from agrpo import tasks
from agrpo.config import load_config
from agrpo.objectives import OBJECTIVES
from agrpo.recipes import rl
from agrpo.recipes.sft import train_sft

SHRINK = [
    "max_steps=2", "time_budget_s=0", "progress=false", "prompts_per_step=2", "group_size=2", "num_samples=2",
    "rollout_batch_size=0", "eval_size=4", "train_pool=4", "log_samples_every=1",
    # train at 24 tokens and evaluate at 16: the two lengths are independent
    "sampling.gen_length=24", "sampling.block_length=12", "sampling.steps=4",
    "eval_sampling.gen_length=16", "eval_sampling.block_length=8", "eval_sampling.steps=4",
]
PAPER_SHRINK = ["dtype=float32", "max_rows_per_forward=8"]
SFT_SHRINK = ["steps=2", "batch_size=4", "train_pool=8", "eval_size=4", "eval_sampling.steps=4", "progress=false"]


def nl_fixture_tokenizer(family: str):
    """A byte-level BPE learnt on the paper tasks' prompts, laid out on the fixture's 1024 ids with its
    special tokens where its config puts them; ids no text reaches fill the gap."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for name in ("gsm8k", "math", "countdown", "sudoku"):
        row = {"question": "Tom has 3 apples", "problem": "p", "nums": [1, 2, 3], "target": 6, "puzzle": "0310200404001043"}
        texts += [m["content"] for m in tasks.get(name).prompt(row)]
    specials = SPECIALS[family]
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    learner.train_from_iterator(texts, trainer)
    learnt = json.loads(learner.to_str())["model"]
    vocab = dict(learnt["vocab"])
    first_special = min(specials.values())
    vocab.update({f"<unused{i}>": i for i in range(len(vocab), first_special)})
    vocab.update(specials)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learnt["merges"]]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    roles = dict(ROLES[family])
    if "<unk>" not in specials:
        roles.pop("unk_token")
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **roles)
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def fixture_models(tmp_path_factory):
    if not FIXTURES.is_dir():
        pytest.skip("model fixtures not available")
    out = {}
    for family in ("llada", "dream", "sdar", "llada2"):
        path = tmp_path_factory.mktemp(family)
        shutil.copytree(FIXTURES / family, path, dirs_exist_ok=True)
        # the block fixtures share LLaDA's fixture ids (mask 1020, eos 1021)
        tok = nl_fixture_tokenizer(family if family in ("llada", "dream") else "llada")
        assert tok.mask_token_id == 1020 and tok.eos_token_id == 1021
        tok.save_pretrained(path)
        out[family] = path
    return out


def fixture_family(model: str) -> str:
    """The fixture standing in for a paper preset's model: block models run on a block fixture."""
    name = str(model).lower()
    if "dream" in name:
        return "dream"
    if "llada2" in name:
        return "llada2"
    if "sdar" in name or "trado" in name:
        return "sdar"
    return "llada"


def _tiny_block_size(model: str) -> int | None:
    if not str(model).startswith("tiny:"):
        return None
    from agrpo.models import _resolve_tiny

    return json.loads((_resolve_tiny(model) / "config.json").read_text()).get("block_size")


def recipe_of(path: Path) -> str:
    return path.read_text().split()[2]  # "# agrpo <recipe> -c ..."


def overrides(path: Path, fixture_models, tmp_path) -> list[str]:
    raw = load_config(RECIPES["train"], str(path))
    over = [f"output_dir={tmp_path}", *SHRINK]
    block = _tiny_block_size(raw.model)
    if block:  # a block model's sampler runs its blocks
        over += [f"sampling.block_length={block}", f"sampling.steps={24 // block}", f"eval_sampling.block_length={block}"]
    if raw.task in tasks.TASKS and not tasks.get(raw.task).character_level:
        family = fixture_family(raw.model)
        train, test = write_data(tmp_path, raw.task)
        over += [f"model={fixture_models[family]}", f"train_data={train}", f"eval_data={test}", *PAPER_SHRINK]
        if family in ("sdar", "llada2"):  # the block fixtures' blocks of 4 (LLaDA2's config records none)
            over += ["block_size=4", "sampling.block_length=4", "sampling.steps=6", "eval_sampling.block_length=4"]
    return over


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_preset_runs(path, fixture_models, tmp_path):
    t0 = time.perf_counter()
    if recipe_of(path) == "sft":
        cfg = load_config(RECIPES["sft"], str(path), [f"output_dir={tmp_path}", *SFT_SHRINK])
        result = train_sft(cfg)
        assert result["steps"] == 2 and 0 <= result["accuracy"] <= 1
        return
    cfg = load_config(RECIPES["train"], str(path), overrides(path, fixture_models, tmp_path))
    torch.manual_seed(0)
    summary = rl.train(cfg)
    assert summary["steps"] == 2 and summary["planned_steps"] == 2 and summary["skipped_steps"] == 0
    run = Path(summary["run_dir"])
    assert run.parent == tmp_path
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1, 2]
    # the evaluation ran at the start and at the end, on the test file when the preset names one
    assert "eval_accuracy" in lines[0] and "eval_accuracy" in lines[-1]
    assert summary["eval_problems"] == (2 if cfg.eval_data else 4)
    for key in ("completion_length", "zero_spread_frac", "entropy", "clip_frac", "kl"):
        assert key in lines[1]
    assert 0 <= lines[1]["completion_length"] <= 24
    assert len((run / "samples.jsonl").read_text().splitlines()) == 2 * min(4, 2 * cfg.group_size)
    assert time.perf_counter() - t0 < 60


# objectives that replay block by block run on block-diffusion models only (their own tests run them there)
OBJECTIVE_PRESETS = sorted(p for p in (CONFIGS / "objectives").glob("*.yaml") if not OBJECTIVES[p.stem].block_models_only)
PAPER_TASK_PRESETS = [CONFIGS / "llada8b" / f"{t}.yaml" for t in ("gsm8k", "math", "countdown", "sudoku")]
# an objective's copies and inner updates shrink like the rest: the run's structure is what is checked
OBJECTIVE_SHRINK = {"bgpo": ["bgpo.copies=2"], "dmpo": ["inner_steps=2"], "espo": ["inner_steps=2"],
                    "wd1": ["inner_steps=2"], "spg": ["inner_steps=2", "spg.block_length=0"],
                    "stabledrl": ["stabledrl.block_length=0"]}


@pytest.mark.parametrize("objective", OBJECTIVE_PRESETS, ids=lambda p: p.stem)
@pytest.mark.parametrize("task", PAPER_TASK_PRESETS, ids=lambda p: p.stem)
def test_every_objective_runs_every_paper_task_preset(task, objective, fixture_models, tmp_path):
    """`-c configs/llada8b/<task>.yaml -c configs/objectives/<objective>.yaml`: 2 RL steps and the
    evaluations on the tiny LLaDA fixture, only sizes shrunk; no step is skipped."""
    over = overrides(task, fixture_models, tmp_path) + ["rollout_batch_size=0", "gradient_checkpointing=false"]
    over += OBJECTIVE_SHRINK.get(objective.stem, [])
    cfg = load_config(RECIPES["train"], [str(task), str(objective)], over)
    assert cfg.objective == objective.stem
    torch.manual_seed(0)
    summary = rl.train(cfg)
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0 and summary["objective"] == objective.stem
    lines = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(line["loss"]) for line in lines[1:])
