"""Every setting of every command takes only what its type allows, from the command line and from
a preset alike: a misspelt boolean or a word where a number belongs is one line naming the key,
never a value read as something else. And settings that make a run meaningless are refused."""

import dataclasses
import types
import typing

import pytest

from agrpo.config import _hints, load_config
from agrpo.errors import AgrpoError
from agrpo.recipes.evaluate import EvalConfig
from agrpo.recipes.export import ExportConfig
from agrpo.recipes.rl import RLConfig
from agrpo.recipes.sft import SFTConfig
from agrpo.recipes.study import StudyConfig

CONFIGS = (RLConfig, SFTConfig, EvalConfig, StudyConfig, ExportConfig)


def leaves(cls, prefix=""):
    """(dotted key, annotation) of every field, sections walked into."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from leaves(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp


def members(tp) -> tuple:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return typing.get_args(tp)
    return (tp,)


def literal_choices(tp) -> set:
    return {c for m in members(tp) if typing.get_origin(m) is typing.Literal for c in typing.get_args(m)}


def bad_values(tp) -> list[str]:
    """Command-line spellings that no member of `tp` may accept."""
    kinds = set(members(tp))
    choices = literal_choices(tp)
    bad = []
    if str not in kinds and not (choices and all(isinstance(c, str) for c in choices) and "ture" in choices):
        bad.append("ture")  # a misspelt true is a string: only a str field may take it
    if str not in kinds and not choices:
        bad.append("abc")
    if int in kinds and float not in kinds and str not in kinds:
        bad.append("1.5")
    if kinds & {int, float} and bool not in kinds and str not in kinds:
        bad.append("true")
    if bool in kinds and str not in kinds:
        bad.append("2")
    return bad


CASES = [(cls, key, tp) for cls in CONFIGS for key, tp in leaves(cls)]


@pytest.mark.parametrize("cls,key,tp", CASES, ids=[f"{c.__name__}.{k}" for c, k, _ in CASES])
def test_every_setting_refuses_what_its_type_does_not_allow(cls, key, tp, tmp_path):
    for raw in bad_values(tp):
        with pytest.raises(AgrpoError, match=f"^{key.replace('.', '[.]')}: ") as err:
            load_config(cls, None, [f"{key}={raw}"], validate=False)
        assert "\n" not in str(err.value)
        # the same value in a preset file
        preset = tmp_path / "p.yaml"
        node, parts = {}, key.split(".")
        cursor = node
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = raw
        import yaml

        preset.write_text(yaml.safe_dump(node))
        with pytest.raises(AgrpoError, match=f"^{key.replace('.', '[.]')}: "):
            load_config(cls, str(preset), [], validate=False)
    if type(None) in members(tp):
        assert _get(load_config(cls, None, [f"{key}=null"], validate=False), key) is None
    if bool in members(tp):
        assert _get(load_config(cls, None, [f"{key}=false"], validate=False), key) is False
        assert _get(load_config(cls, None, [f"{key}=true"], validate=False), key) is True
    for choice in literal_choices(tp):
        assert _get(load_config(cls, None, [f"{key}={choice}"], validate=False), key) == choice


def _get(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def test_the_optional_settings_are_covered():
    """The property above reaches the optional fields whose misreading would change a run."""
    keys = {f"{c.__name__}.{k}" for c, k, tp in CASES if type(None) in members(tp)}
    assert {"RLConfig.shift_logits", "RLConfig.mask_token_id", "RLConfig.chat_template",
            "EvalConfig.shift_logits", "EvalConfig.mask_token_id", "EvalConfig.chat_template"} <= keys


# a run the refusal would have prevented stays short if the refusal is missing
QUICK = ["max_steps=1", "time_budget_s=0", "eval_every=0", "eval_size=4", "progress=false", "save_every=0"]


def test_a_misspelt_value_on_the_command_line_is_one_line(capsys, tmp_path):
    from agrpo.cli import main

    for args, said in (
        (["shift_logits=ture"], "shift_logits: expected true or false, got 'ture' (or null: unset)"),
        (["mask_token_id=abc"], "mask_token_id: expected int, got 'abc' (str) (or null: unset)"),
        (["resume=maybe"], "resume: expected bool or auto, got 'maybe'"),
    ):
        assert main(["train", *args, *QUICK, f"output_dir={tmp_path}"]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"agrpo: error: {said}"]


@pytest.mark.parametrize("objective", ["agrpo", "diffu_grpo"])
@pytest.mark.parametrize("group_size", [0, 1])
def test_a_group_of_fewer_than_two_is_refused(objective, group_size, capsys, tmp_path):
    """One completion a prompt has no group-relative signal (every advantage is 0): refused before
    anything loads, whatever the objective and wherever the value comes from."""
    with pytest.raises(AgrpoError, match="group_size"):
        load_config(RLConfig, None, [f"group_size={group_size}", f"objective={objective}", "max_steps=1"])
    from agrpo.cli import main

    assert main(["train", f"group_size={group_size}", f"objective={objective}", *QUICK, f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("agrpo: error: group_size")
    with pytest.raises(AgrpoError, match="group_size"):
        load_config(RLConfig, None, ["group_size=2", "rollout_batch_size=1", "max_steps=1"]).validate()
    load_config(RLConfig, None, ["group_size=2", f"objective={objective}", "max_steps=1", "num_samples=2"])
