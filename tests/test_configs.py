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


# presets of the block-diffusion models: the hub name of each, and the family its checkpoint loads as
BLOCK_MODELS = {"JetLM/SDAR-8B-Chat": "sdar", "Gen-Verse/TraDo-8B-Instruct": "sdar", "inclusionAI/LLaDA2.0-mini": "llada2"}
BLOCK_PRESETS = sorted(p for folder in ("sdar8b", "trado8b", "llada2mini") for p in (CONFIGS / folder).glob("*.yaml"))


def test_there_are_block_model_presets():
    names = {p.relative_to(CONFIGS).as_posix() for p in BLOCK_PRESETS}
    assert names == {f"{m}/{t}.yaml" for m in ("sdar8b", "trado8b", "llada2mini") for t in ("gsm8k", "math")}
    assert set(BLOCK_PRESETS) <= set(PRESETS)  # loaded, validated and run as every other preset


@pytest.mark.parametrize("path", BLOCK_PRESETS, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_block_model_preset_validates_and_names_a_block_family(path):
    """A block-model preset loads and validates, names a block-diffusion checkpoint, samples and evaluates in
    that family's blocks (the sampler refuses any other block length), and says it cannot run without weights."""
    from agrpo.families import FAMILIES

    cfg = load_config(RLConfig, str(path))
    family = FAMILIES[BLOCK_MODELS[cfg.model]]
    assert family.default_block_size and family.native_class  # a block-diffusion family agrpo reads natively
    for sampling in (cfg.sampling, cfg.eval_sampling):
        assert sampling.block_length == family.default_block_size
        assert sampling.steps_per_block <= family.default_block_size and sampling.cache in ("auto", "prefix")
    assert cfg.sampling.remasking != "random" and cfg.sampling.temperature > 0 and cfg.sampling.threshold > 0
    assert cfg.eval_sampling.temperature == 0.0
    assert cfg.task == path.stem and cfg.name == f"{path.stem}-{path.parent.name}"
    assert cfg.objective == "agrpo" and cfg.lora.r > 0 and cfg.gradient_checkpointing
    header = path.read_text().split("\nname:")[0]
    assert "cannot run on a machine without them" in header and "GB of 80 GB" in header
    assert f"max_rows_per_forward {cfg.max_rows_per_forward} pack rows" in header


def test_dipo_composes_with_the_sdar_preset_it_names():
    """configs/objectives/dipo.yaml's first line runs it on top of configs/sdar8b/math.yaml: DiPO's settings over
    the SDAR preset's blocks."""
    dipo = CONFIGS / "objectives" / "dipo.yaml"
    first = dipo.read_text().splitlines()[0]
    task = CONFIGS / re.match(r"# agrpo train -c configs/(\S+) -c", first).group(1)
    cfg = load_config(RLConfig, [str(task), str(dipo)])
    assert cfg.objective == "dipo" and cfg.sampling.block_length == 4 and cfg.sampling.threshold == 0.9
