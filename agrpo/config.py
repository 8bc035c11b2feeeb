"""Typed configuration: dataclass defaults <- YAML preset <- `key=value` overrides.

Every field carries a one-line help text (`field(metadata={"help": ...})`); nested
dataclasses are sections addressed with dotted keys (`sampling.temperature=0.7`). Values
are checked against the annotations; an unknown key, a wrong type or a failed cross-field
check is one `AgrpoError` line that says how to fix it. After the values are set,
`validate()` runs on every section, innermost first.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path

import yaml

from agrpo.errors import AgrpoError


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    """How a value of `tp` is written on the command line: the choices of a Literal, a list's syntax."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return "|".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (list, tuple):
        inner = _type_name(args[0]) if args else "value"
        return f"list of {inner}: [a,b]"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str):
    """Check `value` against annotation `tp`; return it converted where that is lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except AgrpoError as err:
                errors.append(str(err))
        if len(errors) == 1:  # one type, maybe optional: its own message says what it takes
            raise AgrpoError(errors[0] + (" (or null: unset)" if type(None) in args else ""))
        raise AgrpoError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise AgrpoError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, args))}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise AgrpoError(f"{key}: expected a list, got {value!r} ({type(value).__name__})")
        inner = args[0] if args else typing.Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if tp is typing.Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise AgrpoError(f"{key}: expected true or false, got {value!r}")
    if tp in (int, float) and isinstance(value, str):
        # YAML 1.1 reads 1e-4 (no dot) as a string: accept any numeric spelling
        try:
            value = float(value)
        except ValueError:
            pass
    if tp is int:
        if isinstance(value, bool):
            raise AgrpoError(f"{key}: expected int, got {value!r} (bool)")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():  # 1e3 parses as a float
            return int(value)
        raise AgrpoError(f"{key}: expected int, got {value!r} ({type(value).__name__})")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AgrpoError(f"{key}: expected a number, got {value!r} ({type(value).__name__})")
        return float(value)
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # a name like 42 is still a fine string
        raise AgrpoError(f"{key}: expected a string, got {value!r} ({type(value).__name__})")
    if dataclasses.is_dataclass(tp):
        raise AgrpoError(f"{key}: is a section; set its fields, e.g. {key}.<field>=...")
    return value


def _fields(cls) -> dict:
    return {f.name: f for f in dataclasses.fields(cls)}


def _suggest(key: str, names: list[str]) -> list[str]:
    """Names the user probably meant: a name the key abbreviates (temp -> temperature) first,
    then names spelled alike (lerning_rate -> ... none here, lr_schedule -> lr_schedule)."""
    low = key.lower()
    starts = [n for n in names if n.startswith(low) or (len(low) >= 2 and low in n.split("_"))]
    alike = difflib.get_close_matches(low, names, n=3, cutoff=0.6)
    return list(dict.fromkeys(starts + alike))[:3]


def _apply(obj, mapping: dict, prefix: str = "") -> None:
    if not isinstance(mapping, dict):
        raise AgrpoError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys to values, got {mapping!r}")
    fields = _fields(type(obj))
    hints = _hints(type(obj))
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        if key not in fields:
            close = _suggest(str(key), list(fields))
            hint = f" (did you mean {', '.join(prefix + c for c in close)}?)" if close else ""
            raise AgrpoError(f"unknown key {full!r}{hint}; valid keys: {', '.join(fields)}")
        tp = hints[key]
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and not isinstance(current, type):
            _apply(current, value, f"{full}.")
        else:
            setattr(obj, key, _coerce(value, tp, full))


def _nested_dict(overrides) -> dict:
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise AgrpoError(f"override {item!r} has no '=': write key=value (e.g. lr=1e-4)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise AgrpoError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise AgrpoError(f"override {item!r} conflicts with another override of {part!r}")
        node[parts[-1]] = value
    return out


def _validate(obj) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            _validate(value)
    if hasattr(obj, "validate"):
        obj.validate()


def read_yaml(path: str | os.PathLike) -> dict:
    """A YAML mapping from a file, or one clear line saying why not."""
    p = Path(path)
    if not p.is_file():
        raise AgrpoError(f"config file {path} not found: pass an existing YAML file with -c")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise AgrpoError(f"config file {path} is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise AgrpoError(f"config file {path} holds no key: value mapping")
    return data


def preset_paths(path) -> list[str]:
    """The preset files of `-c A -c B` (a path, a list of paths or None), in the order given."""
    if not path:
        return []
    return [str(p) for p in path] if isinstance(path, (list, tuple)) else [str(path)]


def load_config(cls, path: str | list[str] | None = None, overrides=(), base: dict | None = None,
                validate: bool = True):
    """Defaults, then `base` (e.g. a run's saved configuration), then the YAML files in order (a later
    one overrides an earlier one), then `key=value` overrides; validated unless told (each value
    is checked for its type either way)."""
    cfg = cls()
    if base:
        _apply(cfg, base)
    for one in preset_paths(path):
        _apply(cfg, read_yaml(one))
    _apply(cfg, _nested_dict(overrides))
    if validate:
        _validate(cfg)
    return cfg


def given_keys(path: str | list[str] | None = None, overrides=()) -> set[str]:
    """The dotted keys YAML files and `key=value` overrides set, e.g. {"seed", "lora.r"}."""

    def walk(d: dict, prefix: str = ""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    keys = set(walk(_nested_dict(overrides)))
    for one in preset_paths(path):
        keys |= set(walk(read_yaml(one)))
    return keys


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _walk(cls, prefix: str = ""):
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _walk(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", tp, f


def check_documented(cls) -> None:
    """Raise if a field (at any depth) has no help text."""
    missing = [name for name, _, f in _walk(cls) if not f.metadata.get("help")]
    if missing:
        raise AssertionError(f"{cls.__name__} fields without help: {', '.join(missing)}")


def describe_config(cls) -> str:
    """Every field: dotted name, default, help, and [what it takes: a type, the choices, a list's syntax]."""
    default = cls()
    lines = []
    for name, tp, f in _walk(cls):
        value = default
        for part in name.split("."):
            value = getattr(value, part)
        lines.append(f"{name:<28} {value!r:<22} {f.metadata.get('help', '')}  [{_type_name(tp)}]")
    return "\n".join(lines)


def parse_cli_overrides(argv) -> tuple[str | list[str] | None, list[str]]:
    """Split `-c/--config path` (given more than once: a list, later files overriding earlier ones)
    from `key=value` items."""
    paths, overrides, i = [], [], 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if arg in ("-c", "--config"):
            if i + 1 >= len(argv):
                raise AgrpoError(f"{arg} needs a path to a YAML file")
            paths.append(argv[i + 1])
            i += 2
            continue
        if "=" not in arg:
            raise AgrpoError(f"unexpected argument {arg!r}: write key=value or -c preset.yaml")
        overrides.append(arg)
        i += 1
    return (paths[0] if len(paths) == 1 else paths or None), overrides
