"""YAML / dict -> typed dataclasses, with errors that name the offending field.

Every config in embshard is a (nested) dataclass. `from_dict` walks the type hints, so a typo,
a wrong type or an unknown key is reported as `train.batch_size: expected int, got 'abc'`.
`__post_init__` hooks on the dataclasses do range checks and raise `ConfigError` themselves.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import types
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, TypeVar

import yaml

from embshard.errors import ConfigError, no_file

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def from_dict(cls: type[T], data: Mapping[str, Any] | None, where: str = "") -> T:
    """Build dataclass `cls` from a mapping, checking every field against its type hint."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or '<root>'}: expected a mapping, got {type(data).__name__}")
    _check_keys(data, where)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    moved = getattr(cls, "__moved_fields__", {})
    for name in unknown:
        if name in moved:
            section, _, key = moved[name].rpartition(".")
            raise ConfigError(
                f"{_join(where, name)}: moved to {_join(where, moved[name])}; rewrite "
                f"`{name}: ...` as `{section}: {{{key}: ...}}` under {where or 'the top level'}"
            )
    if unknown:
        raise ConfigError(
            f"{_join(where, unknown[0])}: unknown field (valid: {', '.join(sorted(fields))})"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, _join(where, name))
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{_join(where, missing[0])}: required field is missing")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # __post_init__ checks name the field relative to their own dataclass.
        if where and not str(e).startswith(f"{where}."):
            raise ConfigError(f"{where}.{e}") from None
        raise


def to_dict(obj: Any) -> Any:
    """Inverse of `from_dict`: plain dicts/lists/scalars, suitable for YAML or JSON."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def json_schema(hint: Any) -> dict[str, Any]:
    """The JSON Schema of what `from_dict` / `_coerce` accept for `hint`: types, enums, unknown
    keys. Range checks (`__post_init__`) stay in Python. The Helm chart's values schema embeds it
    for `config`, so `helm install` refuses a key the trainer would refuse when it starts."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [json_schema(a) for a in args]}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if origin in (list, tuple):
        return {"type": "array", **({"items": json_schema(args[0])} if args else {})}
    if origin is dict:
        return {"type": "object", **({"additionalProperties": json_schema(args[1])} if args else {})}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        fields = [f for f in dataclasses.fields(hint) if f.init]
        required = [f.name for f in fields
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        return {"type": "object", "additionalProperties": False,
                "properties": {f.name: json_schema(hints[f.name]) for f in fields},
                **({"required": required} if required else {})}
    scalar = {type(None): "null", float: "number", int: "integer", bool: "boolean", str: "string", Path: "string"}
    return {"type": scalar[hint]} if hint in scalar else {}


# More values than any config holds, far fewer than aliases of aliases can make of a few lines.
MAX_YAML_VALUES = 1_000_000


class ConfigLoader(yaml.SafeLoader):
    """SafeLoader that resolves plain scalars by YAML 1.2's core schema and refuses a key given
    twice. PyYAML resolves YAML 1.1, where `1e-3` is a string (floats need a dot), `010` is 8,
    `1:30` is 90, `off` is false and `2026-01-01` a date; and it keeps the last of two `train:` sections, dropping
    every setting of the first without a word."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._open_anchors: list[str | None] = []
        self._values: dict[int, int] = {}  # id(node) -> the values it holds once its aliases are expanded

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        # Aliases are shared, not copied: `&a {x: *a}` built a mapping that holds itself (a
        # RecursionError traceback), and nine lines of lists of aliases a billion values (a hang).
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open_anchors:
                raise yaml.composer.ComposerError(None, None, f"alias *{event.anchor} inside the value it names",
                                                  event.start_mark)
            return super().compose_node(parent, index)
        anchor = getattr(event, "anchor", None)
        self._open_anchors.append(anchor)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._open_anchors.pop()
        children = (node.value if isinstance(node, yaml.SequenceNode) else
                    [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
        values = 1 + sum(self._values.get(id(child), 1) for child in children)
        if values > MAX_YAML_VALUES:
            raise yaml.composer.ComposerError(None, None, f"over {MAX_YAML_VALUES:,} values once its aliases are "
                                              "expanded", node.start_mark)
        self._values[id(node)] = values
        return node

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        # Checked as written, before `<<` merges are flattened into the nodes (which may
        # override a key, and rewrite an anchored mapping in place).
        node = super().compose_mapping_node(anchor)
        first_line: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue  # a complex key fails in SafeLoader's own check
            key = (key_node.tag, key_node.value)
            if key in first_line:
                raise yaml.composer.ComposerError(
                    None, None, f"key {key_node.value!r} given twice (first on line {first_line[key]})",
                    key_node.start_mark)
            first_line[key] = key_node.start_mark.line + 1
        return node

    def construct_core_int(self, node: yaml.ScalarNode) -> int:
        text = str(self.construct_scalar(node))
        return int(text, 0) if text[:2] in ("0x", "0o") else int(text, 10)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # A scalar its tag cannot read (`!!int abc`, `!!bool maybe`, 5,000 digits) raised the
        # constructor's own error, a traceback where YAML's own errors are one line.
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except Exception:  # whatever a constructor raises (`!!timestamp foo`: an AttributeError)
            if not isinstance(node, yaml.ScalarNode):
                raise
            text = str(node.value)
            shown = repr(text) if len(text) <= 40 else f"{text[:20]!r}... ({len(text):,} characters)"
            raise yaml.constructor.ConstructorError(
                None, None, f"{shown} is no {node.tag.rsplit(':', 1)[-1]}", node.start_mark) from None


_YAML_1_1_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("bool", "int", "float", "timestamp")}
ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _YAML_1_1_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
# Tried in this order: "10" is an int before it is a float.
for _tag, _pattern, _first in (
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
    ("float", r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
              r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", "-+.0123456789"),
):
    ConfigLoader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(_pattern), list(_first))
ConfigLoader.add_constructor("tag:yaml.org,2002:int", ConfigLoader.construct_core_int)


# Past any setting's range, and a float's (whose own limit, near 2**1024, raised OverflowError).
_BIGGEST = 2**128


def _yaml_1_1_hint(value: Any, kind: type) -> str:
    """What a YAML 1.1 reader made of `value` that this one does not: a config that worked under
    PyYAML's defaults is told how to write it."""
    if kind is int and isinstance(value, float) and value.is_integer():
        return " (past 2**53 a number written with an exponent may not be the whole number meant: write its digits)"
    if not isinstance(value, str):
        return ""
    if kind is int and re.fullmatch(r"[-+]?[0-9][0-9_]*", value):
        return f" (configs are YAML 1.2: write {value.replace('_', '')})"
    if kind in (int, float) and re.fullmatch(r"[-+]?[0-9]+(:[0-5]?[0-9])+", value):
        # YAML 1.1's base 60: 1:30 was 90
        sign, parts = (-1 if value.startswith("-") else 1), value.lstrip("+-").split(":")
        number = sign * functools.reduce(lambda total, part: total * 60 + int(part), parts, 0)
        return f" (configs are YAML 1.2, where {value} is text; YAML 1.1 read it in base 60: write {number})"
    if kind is bool and value.lower() in ("yes", "no", "on", "off", "y", "n"):
        return f" (configs are YAML 1.2: write {str(value.lower() in ('yes', 'on', 'y')).lower()})"
    return ""


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=ConfigLoader)


def parse_yaml_value(raw: str, where: str) -> Any:
    """A command line's value read as YAML; ConfigError `where:LINE:COLUMN: not valid YAML (...)`."""
    try:
        return parse_yaml(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}{_yaml_problem(e)}") from None


def load_yaml(cls: type[T], path: str | Path, overrides: list[str] | None = None) -> T:
    """Read a YAML file into `cls`, after applying `key.sub=value` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {no_file(path, 'config file')}")
    try:
        data = parse_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}{_yaml_problem(e)}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if data is None:
        if not overrides:
            # Read as every default, it planned and trained the default job's data without a word.
            raise ConfigError(f"{path}: empty; a config is a mapping of sections (`embshard config --reference` "
                              "lists them), or give them with --set")
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: <root>: expected a mapping of sections, got {type(data).__name__} {data!r:.40}")
    given: dict[str, tuple[str, Any]] = {}  # key -> (the item, its value)
    for item in overrides or []:
        key, value = apply_override(data, item)
        # The last one won, silently: two values for a key are two intentions, one of them lost;
        # so is a section set after a key inside it, which it replaces.
        # As JSON: true and 1 are two values (== said one), a NaN given twice is one.
        if key in given and json.dumps(given[key][1], sort_keys=True) != json.dumps(value, sort_keys=True):
            raise ConfigError(f"--set {key} given twice ({given[key][0]!r}, then {item!r}); give it once")
        inner = next((given[k][0] for k in given if k.startswith(f"{key}.")), None)
        if inner is not None:
            raise ConfigError(f"--set {key} given after {inner!r}, a key inside it, which it replaces; give that "
                              "key in it, or after it")
        given[key] = (item, value)
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        # A value from --set is blamed on its flag, not on a file that may not hold the key at all.
        keys = list(given)
        # `--set nosuch.a=1` is refused at `nosuch`, the first part no field has, and `--set
        # train.epochs.x=1` at `train.epochs`, which it made a mapping: at a part above the key.
        above = [f"{'.'.join(key.split('.')[:n])}:" for key in keys for n in range(1, key.count(".") + 1)]
        if any(str(e).startswith((f"{key}:", f"{key}.", f"{key}[", *above)) for key in keys):
            raise ConfigError(f"{e} (from --set)") from None
        raise ConfigError(f"{path}: {e}") from None


def override_key(item: str) -> str:
    """The key of a `key=value` override, as it is applied."""
    return item.split("=", 1)[0].strip()


def apply_override(data: dict, item: str) -> tuple[str, Any]:
    """Apply `a.b.c=value` to a nested dict; the value is parsed as YAML (so `3`, `true`, `[1,2]`).
    -> (key, value) as applied."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    key, raw = override_key(item), item.split("=", 1)[1]
    if not all(part.strip() for part in key.split(".")):
        # `--set =1` and `--set .train.epochs=1` were ": unknown field", a field with no name.
        raise ConfigError(f"--set {item!r}: expected key=value with a key such as train.epochs")
    value = parse_yaml_value(raw, f"--set {item!r}")
    set_dotted(data, key, value, "--set")
    return key, value


def _yaml_problem(e: yaml.YAMLError) -> str:
    """`:LINE:COLUMN: not valid YAML (what)`, one line, where PyYAML's message takes five."""
    mark = getattr(e, "problem_mark", None)
    where = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{where}: not valid YAML ({problem})"


def set_dotted(data: dict, key: str, value: Any, where: str) -> None:
    """Set dotted `key` in a nested dict. A section left out or null (`pep: null`, as `to_dict` writes
    an unset optional section) is created; `where` names the option in an error."""
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        if node.get(p) is None:
            node[p] = {}
        if not isinstance(node[p], dict):
            raise ConfigError(f"{where} {key}: {p} is not a section")
        node = node[p]
    node[parts[-1]] = value


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config dict as dotted keys (`train.epochs`); an empty section stays one key."""
    if not isinstance(data, dict) or not data:
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else key))
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten`."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def under(key: str, prefixes: typing.Iterable[str]) -> bool:
    """Whether the dotted `key` is one of `prefixes` or lies inside one."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _check_keys(data: Mapping[Any, Any], where: str) -> None:
    """A YAML key that is no text (`1: a`, `null: 1`) names no field; sorting it with the others
    was a TypeError."""
    odd = [k for k in data if not isinstance(k, str)]
    if odd:
        raise ConfigError(f"{where or '<root>'}: key {odd[0]!r} ({type(odd[0]).__name__}): keys are names, written "
                          "as text")


def _check_plain(value: Any, where: str) -> None:
    """A free-form value (a model's options, kept in plan.json and checkpoints as JSON) must be
    JSON: a YAML set, timestamp or binary was taken, then failed as the plan was saved, and a
    NaN wrote a plan.json no JSON reader takes."""
    if isinstance(value, Mapping):
        _check_keys(value, where)
        for k, v in value.items():
            _check_plain(v, _join(where, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    elif value is not None and not isinstance(value, (str, int, float, bool)):
        raise ConfigError(f"{where}: {type(value).__name__} values are not kept (text, numbers, true/false, null, "
                          "lists and mappings are)")


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _coerce(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {hint}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        item = args[0] if args else Any
        out = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _check_keys(value, where)
        kt, vt = args if args else (Any, Any)
        return {_coerce(kt, k, where): _coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if hint is Any:
        _check_plain(value, where)
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, int) and abs(value) >= _BIGGEST:
            raise ConfigError(f"{where}: expected a finite number, got an integer of {value.bit_length()} bits")
        # YAML's .nan and .inf pass every range check written as a comparison (nan <= 0 is False).
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
            value = int(value)  # `1e12`: a whole number, which YAML reads as a float (past 2**53, maybe not it)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}{_yaml_1_1_hint(value, int)}")
        if abs(value) >= _BIGGEST:
            # Not shown: past 4,300 digits Python refuses to print it, and a range check's own
            # message ("must be below 2**64, got ...") was that ValueError, a traceback.
            raise ConfigError(f"{where}: expected an integer, got one of {value.bit_length()} bits")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}{_yaml_1_1_hint(value, bool)}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        return Path(value)
    return value
