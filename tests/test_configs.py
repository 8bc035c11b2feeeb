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
# configs/accelerate holds accelerate's own launch files, not presets of a recipe; configs/objectives
# holds an objective's settings, composed with a task preset (-c TASK.yaml -c OBJECTIVE.yaml)
PRESETS = sorted(p for p in CONFIGS.rglob("*.yaml")
                 if not {"accelerate", "objectives"} & set(p.relative_to(CONFIGS).parts))
OBJECTIVE_PRESETS = sorted((CONFIGS / "objectives").glob("*.yaml"))
# the task presets an objective preset goes on top of (the diffu-GRPO ones are complete recipes of their own)
TASK_PRESETS = [CONFIGS / "llada8b" / f"{t}.yaml" for t in ("gsm8k", "math", "countdown", "sudoku")] + [
    CONFIGS / "dream7b" / "countdown.yaml"]


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


def test_presets_compose_later_over_earlier(tmp_path):
    """`-c A -c B`: B's keys override A's, keys of A that B leaves alone stay, key=value wins over both."""
    from agrpo.config import parse_cli_overrides

    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("lr: 1.0e-5\nseed: 3\nsampling:\n  temperature: 0.5\n  steps: 8\n")
    b.write_text("lr: 2.0e-5\nsampling:\n  temperature: 0.9\n")
    path, over = parse_cli_overrides(["-c", str(a), "-c", str(b), "seed=4"])
    assert path == [str(a), str(b)] and over == ["seed=4"]
    cfg = load_config(RLConfig, path, over, validate=False)
    assert (cfg.lr, cfg.seed, cfg.sampling.temperature, cfg.sampling.steps) == (2e-5, 4, 0.9, 8)
    assert parse_cli_overrides(["-c", str(a)])[0] == str(a)


@pytest.mark.parametrize("objective", OBJECTIVE_PRESETS, ids=lambda p: p.stem)
def test_every_task_preset_composes_with_every_objective_preset(objective):
    """An objective preset names its objective, starts with the command that composes it with a task
    preset, and every (task preset, objective preset) pair loads and validates with the objective's values."""
    import yaml

    first = objective.read_text().splitlines()[0]
    assert re.match(rf"# agrpo train -c configs/\S+\.yaml -c configs/objectives/{objective.name}$", first), first
    own = yaml.safe_load(objective.read_text())
    assert own["objective"] == objective.stem
    for task in TASK_PRESETS:
        cfg = load_config(RLConfig, [str(task), str(objective)])
        assert cfg.objective == objective.stem
        section = own.get(objective.stem) or {}
        assert all(getattr(getattr(cfg, objective.stem), k) == v for k, v in section.items())
