"""Every preset in configs/ loads, validates and documents every field (none can rot)."""

import re
from pathlib import Path

import pytest

from agrpo.config import check_documented, load_config
from agrpo.recipes.evaluate import EvalConfig
from agrpo.recipes.rl import RLConfig
from agrpo.recipes.sft import SFTConfig

RECIPES = {"train": RLConfig, "sft": SFTConfig, "eval": EvalConfig}
PRESETS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_there_are_presets():
    assert len(PRESETS) >= 3


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_preset_loads(path):
    first = path.read_text().splitlines()[0]
    match = re.match(r"# agrpo (\w+) -c configs/(\S+)$", first)
    assert match, f"{path.name} must start with the command that runs it"
    assert match.group(2) == path.name
    cfg = load_config(RECIPES[match.group(1)], str(path))
    assert cfg.name


@pytest.mark.parametrize("cls", list(RECIPES.values()))
def test_every_field_documented(cls):
    check_documented(cls)
