"""The paper path as a user meets it: which settings a paper task starts from, real tokenizers,
intervals at 0 and n, resume of a missing run, preset sizing from measured prompt lengths,
export of the model code, and one-line messages."""

import json
import logging
import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agrpo import tasks
from agrpo.config import config_to_dict, load_config
from agrpo.errors import AgrpoError
from agrpo.evaluation import wilson_interval
from agrpo.presets import MAX_ROWS_PER_FORWARD, PAPER_RECIPES, train_config
from agrpo.recipes.rl import RLConfig
from agrpo.step_metrics import flat_config

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TOKENIZERS = SHARED / "tokenizers"
DATA = SHARED / "data"
PAPER_TASKS = ("gsm8k", "math", "countdown", "sudoku")
# what a preset names for its own run rather than for the recipe
RUN_KEYS = {"name", "model", "dtype", "chat_template"}


def flat(cfg) -> dict:
    return flat_config(config_to_dict(cfg))


def differences(a, b, ignore=()) -> dict:
    fa, fb = flat(a), flat(b)
    return {k: (fa[k], fb[k]) for k in fa if k not in ignore and fa[k] != fb[k]}


# -- 1. the settings a run starts from ---------------------------------------------------------

@pytest.mark.parametrize("task", PAPER_TASKS)
@pytest.mark.parametrize("objective", ["agrpo", "diffu_grpo"])
def test_a_paper_task_without_a_preset_gets_the_papers_recipe(task, objective):
    """No -c: the values of the shipped paper preset of that task and objective, not the tiny default."""
    cfg, line = train_config(None, [f"task={task}", f"objective={objective}", "model=some/model"])
    preset = ROOT / "configs" / "llada8b" / (f"{task}.yaml" if objective == "agrpo" else f"{task}_diffu_grpo.yaml")
    assert differences(cfg, load_config(RLConfig, str(preset)), RUN_KEYS) == {}
    assert cfg.time_budget_s == 0 and cfg.model == "some/model" and cfg.epochs == 1
    assert line.startswith(f"agrpo: task {task}'s defaults, ") and line.endswith("; no preset")
    assert ("AGRPO recipe" if objective == "agrpo" else "diffu-GRPO recipe") in line


def test_the_dream_preset_is_the_recipe_with_another_model():
    cfg, _ = train_config(None, ["task=countdown", "model=Dream-org/Dream-v0-Instruct-7B"])
    assert differences(cfg, load_config(RLConfig, str(ROOT / "configs/dream7b/countdown.yaml")), RUN_KEYS) == {}


def test_tiny_tasks_keep_their_presets_and_say_so():
    for args, preset in (([], "tiny_sudoku.yaml"), (["task=tiny-countdown"], "tiny_countdown.yaml")):
        cfg, line = train_config(None, args)
        assert differences(cfg, load_config(RLConfig, str(ROOT / "configs" / preset))) == {}
        assert line == f"agrpo: preset configs/{preset} (task {cfg.task}'s default; -c picks another)" or \
            line.startswith(f"agrpo: preset {ROOT / 'configs' / preset}")
    # a preset given for a paper task sits over the task's defaults, and the line says both
    cfg, line = train_config(str(ROOT / "configs/llada8b/math.yaml"), ["lr=1e-6"])
    assert cfg.lr == 1e-6 and cfg.num_samples == 24 and "over task math's defaults" in line


def _readme_train_commands() -> list[list[str]]:
    found = []
    for line in (ROOT / "README.md").read_text().splitlines():
        match = re.match(r"^(?:accelerate launch -m agrpo\.cli|agrpo) train (.*)$", line.strip())
        if match:
            args = shlex.split(match.group(1).split("#")[0])
            if any(a.startswith("task=") and a.split("=", 1)[1] in PAPER_TASKS for a in args):
                found.append(args)
    return found


def test_the_readmes_paper_commands_get_the_recipe_the_readme_states():
    """Each `train task=<paper task> ...` example of the README trains with the paper preset's values
    (configs/llada8b/<task>.yaml) apart from what the command itself sets."""
    commands = _readme_train_commands()
    assert len(commands) >= 2
    for args in commands:
        cfg, line = train_config(None, args)
        task = cfg.task
        given = {a.split("=", 1)[0] for a in args}
        diff = differences(cfg, load_config(RLConfig, str(ROOT / "configs/llada8b" / f"{task}.yaml")), RUN_KEYS | given)
        assert diff == {}, (args, diff)
        assert cfg.time_budget_s == 0 and cfg.sampling.gen_length == 384 and "paper's AGRPO recipe" in line


# -- 2. real tokenizers --------------------------------------------------------------------------

needs_tokenizers = pytest.mark.skipif(not TOKENIZERS.is_dir(), reason="real tokenizers not available")


@needs_tokenizers
@pytest.mark.parametrize("name", ["dream", "sdar"])
def test_real_tokenizers_load_render_a_chat_and_name_their_end_of_turn(name):
    from agrpo.models import load_tokenizer

    tok = load_tokenizer(str(TOKENIZERS / name))
    assert type(tok).__name__ == "Qwen2Tokenizer" and tok.padding_side == "left"
    messages = [{"role": "system", "content": "Think first."}, {"role": "user", "content": "2+2?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    text = tok.decode(ids)
    assert text == ("<|im_start|>system\nThink first.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    vocab = tok.get_vocab()
    assert vocab["<|im_end|>"] == 151645 and tok.eos_token_id == tok.pad_token_id == 151643
    assert tok.mask_token_id == {"dream": 151666, "sdar": 151669}[name]
    assert ids.count(151645) == 2  # the two closed turns; the assistant's is open


@needs_tokenizers
def test_dreams_tokenizer_never_runs_hub_code(tmp_path):
    """DreamTokenizer is read as Qwen2Tokenizer, with or without trust_remote_code: its own module
    (here one that fails on import) is never imported."""
    from agrpo.models import load_tokenizer

    folder = tmp_path / "dream_tok"
    shutil.copytree(TOKENIZERS / "dream", folder)
    for f in folder.iterdir():
        f.chmod(0o644)
    (folder / "tokenization_dream.py").write_text("raise ImportError('the hub tokenizer code ran')\n")
    for trust in (False, True):
        assert type(load_tokenizer(str(folder), trust_remote_code=trust)).__name__ == "Qwen2Tokenizer"


@needs_tokenizers
def test_a_tiny_dream_model_with_the_real_tokenizer_loads_with_its_end_of_turn(tmp_path):
    from agrpo.models import load_model_and_tokenizer

    fixtures = SHARED / "fixtures" / "models" / "dream"
    if not fixtures.is_dir():
        pytest.skip("model fixtures not available")
    folder = tmp_path / "dream"
    shutil.copytree(fixtures, folder)
    for f in TOKENIZERS.joinpath("dream").iterdir():
        shutil.copyfile(f, folder / f.name)
    model, tok = load_model_and_tokenizer(str(folder), dtype="float32")
    # config EOS first, then the tokenizer's EOS, then the family's end-of-turn token
    assert model.config.eos_token_id == [1021, 151643, 151645] and model.config.mask_token_id == 1020
    assert model.config.shift_logits is True


def test_a_tokenizer_of_unknown_hub_code_is_refused_in_one_line(tmp_path):
    from agrpo.models import load_tokenizer

    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "WeirdTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_weird.WeirdTokenizer", None]}}))
    with pytest.raises(AgrpoError, match="WeirdTokenizer, a class of the model's own code.*trust_remote_code=true") as err:
        load_tokenizer(str(tmp_path))
    assert "\n" not in str(err.value)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    with pytest.raises(AgrpoError, match="cannot load a tokenizer from") as err:
        load_tokenizer(str(tmp_path))  # no vocabulary at all: the whole reason, on one line
    assert "\n" not in str(err.value) and len(str(err.value)) > 80


def test_model_code_that_cannot_import_is_one_line(tmp_path, modules_cache):
    """trust_remote_code on a Dream checkpoint whose hub code imports what is missing (flash_attn)."""
    from agrpo.models import load_model_and_tokenizer

    fixtures = SHARED / "fixtures" / "models" / "dream"
    if not fixtures.is_dir():
        pytest.skip("model fixtures not available")
    # a folder name of its own: transformers caches hub code per folder name (transformers_modules.<name>)
    folder = tmp_path / "dream_whose_code_cannot_import"
    shutil.copytree(fixtures, folder)
    (folder / "configuration_dream.py").write_text(
        "from transformers import PretrainedConfig\n\n\nclass DreamConfig(PretrainedConfig):\n    model_type = 'Dream'\n")
    (folder / "modeling_dream.py").write_text(
        "import flash_attn_not_installed\nfrom .configuration_dream import DreamConfig\n")
    with pytest.raises(AgrpoError, match="cannot be imported .*leave trust_remote_code unset") as err:
        load_model_and_tokenizer(str(folder), trust_remote_code=True)
    assert "\n" not in str(err.value)


# -- 3. intervals and their plot -----------------------------------------------------------------

def test_wilson_interval_contains_its_estimate_for_every_count():
    for n in range(0, 2001):
        for k in range(n + 1):
            low, high = wilson_interval(k, n)
            p = k / n if n else 0.0
            assert 0.0 <= low <= p <= high <= 1.0, (k, n, low, high)
        if n:
            assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0


def test_the_sweep_plot_is_drawn_at_zero_and_full_scores(tmp_path):
    from agrpo.evaluation import summarize
    from agrpo.runlog import plot_sweep

    settings = []
    for steps, (k, n) in zip((16, 32, 64, 128), ((0, 6), (7, 7), (0, 500), (1319, 1319))):
        s = summarize([1.0] * k + [0.0] * (n - k), [{}] * n)
        settings.append({"model": "m", "gen_length": 256, "block_length": 32, "steps": steps, **s})
    # an interval recorded before, whose bound misses its estimate by rounding, is drawn too
    settings.append({"model": "m", "gen_length": 256, "block_length": 32, "steps": 256, "accuracy": 0.0,
                     "ci95": [5.55e-17, 0.4]})
    out = plot_sweep(settings, tmp_path / "plot.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- 4. resume of a run that is not there ----------------------------------------------------------

def test_resuming_a_name_that_does_not_exist_is_refused(tmp_path, capsys):
    from agrpo.cli import main

    (tmp_path / "sudoku-run" ).mkdir()
    (tmp_path / "sudoku-run" / "config.yaml").write_text("task: tiny-sudoku\n")
    (tmp_path / "sudoku-run" / "metrics.jsonl").write_text('{"step": 0}\n')
    assert main(["train", "name=sudoku-rnu", "resume=true", f"output_dir={tmp_path}", "max_steps=1",
                 "time_budget_s=0", "progress=false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"no run in {tmp_path / 'sudoku-rnu'} to resume (runs there: sudoku-run)" in err[0]
    assert "resume=auto" in err[0] and not (tmp_path / "sudoku-rnu").exists()
    with pytest.raises(AgrpoError, match="resume"):
        load_config(RLConfig, None, ["resume=maybe"])


# -- 6. preset sizing from measured prompt lengths --------------------------------------------------

def _longest_prompts(tok) -> dict[str, int]:
    d1 = json.loads((DATA / "d1_llada_128.json").read_text())["tasks"]
    rows = {
        "countdown": tasks.get("countdown").load("test", DATA / "countdown_cd3_test.jsonl"),
        "sudoku": tasks.get("sudoku").load("test", DATA / "sudoku4x4_test.csv"),
        "gsm8k": [{"question": r["question"], "answer": "#### 1"} for r in d1["gsm8k"]],
        "math": [{"problem": r["question"], "answer": "1"} for r in d1["math500"]],
    }
    return {name: max(len(tok.apply_chat_template(tasks.get(name).prompt(r), add_generation_prompt=True,
                                                  tokenize=True)["input_ids"]) for r in rs)
            for name, rs in rows.items()}


@needs_tokenizers
@pytest.mark.skipif(not (DATA / "d1_llada_128.json").is_file(), reason="test data not available")
def test_preset_headers_size_memory_for_the_measured_prompts():
    """Each paper preset's header states its task's longest prompt as the Dream tokenizer renders
    it, sizes its sequences as that prompt plus the completion, and the loss chunking of the preset
    and of the task's defaults is the one its arithmetic assumes."""
    from agrpo.models import load_tokenizer

    longest = _longest_prompts(load_tokenizer(str(TOKENIZERS / "dream")))
    assert longest == {"countdown": 178, "sudoku": 1234, "gsm8k": 274, "math": 877}
    presets = [(ROOT / "configs/llada8b" / f"{t}{s}.yaml", t) for t in PAPER_TASKS for s in ("", "_diffu_grpo")]
    for path, task in presets + [(ROOT / "configs/dream7b/countdown.yaml", "countdown")]:
        text = path.read_text()
        header = " ".join(line[1:].strip() for line in text.splitlines() if line.startswith("#"))
        cfg = load_config(RLConfig, str(path))
        prompt, seq = longest[task], longest[task] + cfg.sampling.gen_length
        assert f"sequences of at most {seq:,} tokens (prompt {prompt:,} + {cfg.sampling.gen_length})" in header, path
        if cfg.objective == "agrpo":
            rows = re.search(r"max_rows_per_forward (\d+) rows a chunk", header)
            assert rows and int(rows.group(1)) == cfg.max_rows_per_forward == MAX_ROWS_PER_FORWARD[task], path
            total = re.search(r"total\s+~(\d+) GB of 80 GB", header)
            assert total and int(total.group(1)) < 80
            defaults, _ = train_config(None, [f"task={task}"])
            assert defaults.max_rows_per_forward == cfg.max_rows_per_forward


# -- 7. export copies the model code and what it imports --------------------------------------------

def test_export_copies_every_module_the_model_code_imports(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_families import FIXTURES, fixture_copy

    from agrpo.families import save_in_family_format
    from agrpo.models import load_model_and_tokenizer

    if not FIXTURES.is_dir():
        pytest.skip("model fixtures not available")
    source = fixture_copy("dream", tmp_path / "dream")
    (source / "configuration_dream.py").write_text("X = 1\n")
    (source / "modeling_dream.py").write_text("from .generation_utils import Y\nfrom .configuration_dream import X\n")
    (source / "generation_utils.py").write_text("from .sampling_helpers import Z\nY = 2\n")
    (source / "sampling_helpers.py").write_text("Z = 3\n")
    model, tok = load_model_and_tokenizer(str(source), dtype="float32")
    out = save_in_family_format(model, tok, tmp_path / "out")
    for module in ("configuration_dream", "modeling_dream", "generation_utils", "sampling_helpers"):
        assert (out / f"{module}.py").read_text() == (source / f"{module}.py").read_text()


# -- 8. messages ------------------------------------------------------------------------------------

def test_missing_files_name_the_key_to_pass(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(AgrpoError, match=r"eval_data=<file> \(agrpo train\) or data=<file> \(agrpo eval\)"):
        tasks.get("countdown").load("test", missing)
    with pytest.raises(AgrpoError, match="train_data=<file>"):
        tasks.get("countdown").load("train", missing)
    with pytest.raises(AgrpoError, match="eval_data=<file> or exclude_file=<file>"):
        tasks.get("countdown", held_out=missing)
    with pytest.raises(AgrpoError, match="train_data=<file>"):
        tasks.get("tiny-countdown").load("train", missing)
    with pytest.raises(AgrpoError, match=r"eval_data=<file> \(agrpo train\)"):
        tasks.get("countdown").load("test")  # not on the hub


def test_the_intended_family_mapping_prints_no_transformers_warning(capsys):
    """Reading LLaDA's hub config.json through LlamaConfig is what agrpo does on purpose (peft does it
    when it saves an adapter): no "can yield errors" warning; other mismatches are still reported."""
    import agrpo.models  # noqa: F401  (installs the filter)
    from transformers import BertConfig, LlamaConfig

    fixtures = SHARED / "fixtures" / "models" / "llada"
    if not fixtures.is_dir():
        pytest.skip("model fixtures not available")
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger = logging.getLogger("transformers.configuration_utils")
    handler = Keep()
    logger.addHandler(handler)
    try:
        LlamaConfig.from_pretrained(str(fixtures))
        assert not [m for m in seen if "can yield errors" in m]
        BertConfig.from_pretrained(str(fixtures))  # an unintended mismatch
        assert [m for m in seen if "can yield errors" in m]
    finally:
        logger.removeHandler(handler)


@pytest.mark.slow
def test_a_users_mistake_under_torchrun_is_said_once(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed")
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "agrpo.cli", "train", "lr=-1",
         f"output_dir={tmp_path}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    lines = [line for line in proc.stderr.splitlines() if line.startswith("agrpo:")]
    assert lines == ["agrpo: error: lr must be a positive number, got -1.0"], proc.stderr
    # the process that met it first left with the user-error code (the launcher then ends the other)
    assert "exitcode  : 2" in proc.stderr and proc.returncode != 0
