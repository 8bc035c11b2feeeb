from dataclasses import dataclass, field
from typing import Literal

import pytest

from agrpo.config import check_documented, describe_config, load_config, parse_cli_overrides, save_config
from agrpo.errors import AgrpoError


@dataclass
class Inner:
    gen_length: int = field(default=16, metadata={"help": "length"})
    block_length: int = field(default=8, metadata={"help": "block"})
    temperature: float = field(default=1.0, metadata={"help": "temp"})

    def validate(self):
        if self.gen_length % self.block_length:
            raise AgrpoError("block_length must divide gen_length")


@dataclass
class Outer:
    name: str = field(default="run", metadata={"help": "name"})
    mode: Literal["a", "b"] = field(default="a", metadata={"help": "mode"})
    limit: int | None = field(default=None, metadata={"help": "optional"})
    flag: bool = field(default=False, metadata={"help": "flag"})
    layers: list[str] = field(default_factory=lambda: ["q"], metadata={"help": "names"})
    inner: Inner = field(default_factory=Inner, metadata={"help": "section"})


def test_defaults_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("mode: b\ninner:\n  gen_length: 32\n  temperature: 2\n")
    cfg = load_config(Outer, str(p), ["inner.block_length=4", "limit=1e3", "flag=true", "layers=[a, b]"])
    assert (cfg.mode, cfg.inner.gen_length, cfg.inner.block_length) == ("b", 32, 4)
    assert cfg.inner.temperature == 2.0 and isinstance(cfg.inner.temperature, float)
    assert cfg.limit == 1000 and isinstance(cfg.limit, int)
    assert cfg.flag is True and cfg.layers == ["a", "b"]
    assert load_config(Outer, None, ["limit=null"]).limit is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("inner.gen_lenght=3", "did you mean inner.gen_length"),
        ("mode=c", "choose one of a, b"),
        ("inner.gen_length=abc", "expected int"),
        ("inner.gen_length=1.5", "expected int"),
        ("flag=yes_please", "expected true or false"),
        ("inner.block_length=5", "must divide"),
        ("inner=3", "expected a mapping"),
        ("nokey", "has no '='"),
    ],
)
def test_errors_are_one_line(override, message):
    with pytest.raises(AgrpoError, match=message) as err:
        load_config(Outer, None, [override])
    assert "\n" not in str(err.value)


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(AgrpoError, match="not found"):
        load_config(Outer, str(tmp_path / "none.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(AgrpoError, match="mapping"):
        load_config(Outer, str(bad))


def test_round_trip_and_describe(tmp_path):
    cfg = load_config(Outer, None, ["name=x", "inner.gen_length=64", "limit=3"])
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(Outer, str(tmp_path / "out.yaml")) == cfg
    text = describe_config(Outer)
    for key in ("name", "mode", "limit", "flag", "layers", "inner.gen_length", "inner.block_length", "inner.temperature"):
        assert key in text
    check_documented(Outer)


def test_cli_split():
    assert parse_cli_overrides(["-c", "a.yaml", "lr=1"]) == ("a.yaml", ["lr=1"])
    with pytest.raises(AgrpoError, match="unexpected argument"):
        parse_cli_overrides(["oops"])


def test_describe_shows_choices_and_list_syntax():
    lines = {line.split()[0]: line for line in describe_config(Outer).splitlines()}
    assert lines["mode"].endswith("[a|b]")
    assert lines["layers"].endswith("[list of str: [a,b]]")
    assert lines["limit"].endswith("[int or null]")
    assert lines["inner.temperature"].endswith("[float]")


def test_unknown_key_suggests_the_field_it_abbreviates():
    with pytest.raises(AgrpoError, match=r"did you mean inner\.temperature"):
        load_config(Outer, None, ["inner.temp=0.5"])
    with pytest.raises(AgrpoError, match=r"did you mean layers"):
        load_config(Outer, None, ["layer=[a]"])
