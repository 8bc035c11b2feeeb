"""Every preset in configs/ loads, validates and documents every field (none can rot)."""

import re
from pathlib import Path

import pytest

from agrpo.config import check_documented, load_config
from agrpo.recipes.evaluate import EvalConfig
from agrpo.recipes.rl import RLConfig
from agrpo.recipes.sft import SFTConfig
from agrpo.recipes.study import StudyConfig

RECIPES = {"train": RLConfig, "sft": SFTConfig, "eval": EvalConfig, "study": StudyConfig}
CONFIGS = Path(__file__).parent.parent / "configs"
# configs/accelerate holds accelerate's own launch files, not presets of a recipe
PRESETS = sorted(p for p in CONFIGS.rglob("*.yaml") if "accelerate" not in p.relative_to(CONFIGS).parts)


def test_there_are_presets():
    names = {p.relative_to(CONFIGS).as_posix() for p in PRESETS}
    paper = {f"llada8b/{t}{s}.yaml" for t in ("gsm8k", "math", "countdown", "sudoku") for s in ("", "_diffu_grpo")}
    assert paper | {"dream7b/countdown.yaml", "tiny_sudoku.yaml"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_preset_loads(path):
    first = path.read_text().splitlines()[0]
    match = re.match(r"# agrpo (\w+) -c configs/(\S+)$", first)
    assert match, f"{path.name} must start with the command that runs it"
    assert match.group(2) == path.relative_to(CONFIGS).as_posix()
    cfg = load_config(RECIPES[match.group(1)], str(path))
    # paper presets name their run after model and task; the tiny ones leave it to the derived name
    assert bool(cfg.name) == ("/" in match.group(2) or match.group(1) == "sft")


@pytest.mark.parametrize("cls", list(RECIPES.values()))
def test_every_field_documented(cls):
    check_documented(cls)
