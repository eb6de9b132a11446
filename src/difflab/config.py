"""Typed configs: dataclasses loaded from YAML and overridden with ``key=value`` strings.

Loading is strict: an unknown key, a value of the wrong type or an unparsable override raises a
one-line :class:`~difflab.errors.ConfigError` that names the key and what it accepts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

from difflab.errors import ConfigError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert where it is unambiguous."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of keys to values, got {value!r}")
        return _from_dict(tp, value, key)
    if origin in (tuple, list):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a {_type_name(tp)}, got {value!r}")
        args = typing.get_args(tp)
        item_type = args[0] if args else Any
        items = [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        number = value if isinstance(value, int) else _as_number(value)
        if number is None or (isinstance(number, float) and not number.is_integer()):
            raise ConfigError(f"{key} must be an integer, got {_short_repr(value)}")
        if not -(2**63) <= int(number) < 2**63:  # what torch (seeds, sizes) and safetensors metadata can hold
            raise ConfigError(f"{key} must be an integer within +-2^63, got {_short_repr(value)}")
        return int(number)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        number = _as_number(value)
        if number is None:
            raise ConfigError(f"{key} must be a number, got {value!r}")
        try:
            return float(number)
        except OverflowError:  # an integer beyond the float range
            raise ConfigError(f"{key} must be a number within the float range, got {_short_repr(value)}") from None
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {tp!r}")  # pragma: no cover - a developer error


def _short_repr(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _as_number(value: Any) -> float | int | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and value != value:  # NaN
            return None
        return value
    if isinstance(value, str):
        try:
            number = float(value)  # YAML 1.1 reads "1e-4" as a string
        except ValueError:
            return None
        return number if number == number and abs(number) != float("inf") else None
    return None


def _from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            where = f" under '{prefix}'" if prefix else ""
            raise ConfigError(f"unknown config key '{full}'; valid keys{where}: {', '.join(fields)}")
        kwargs[key] = _coerce(value, hints[key], full)
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if prefix and not str(exc).startswith(prefix):
            raise ConfigError(f"{prefix}: {exc}") from None
        raise


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build the dataclass ``cls`` from a nested dict, strictly (see the module docstring)."""
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping of keys to values, got {type(data).__name__}")
    return _from_dict(cls, data)


def to_dict(config: Any) -> dict[str, Any]:
    """A plain nested dict (tuples as lists) of a config dataclass, ready for YAML or JSON."""

    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        return value

    return convert(config)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=1e-3"`` -> ``(["train", "lr"], 0.001)``; the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. train.steps=1000)")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(p.strip() for p in parts):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return [p.strip() for p in parts], value


# A group with one of these fields takes ``group=value`` as ``group.<field>=value`` (``data=imagefolder``).
SELECTOR_FIELDS = ("source", "kind")


def selector_field(cls: type, parts: list[str]) -> str | None:
    """The selector field (see ``SELECTOR_FIELDS``) of the config group that the key ``parts`` names in the
    dataclass ``cls`` (``["data"]`` -> ``"source"``), or None when the key is not such a group."""
    group: Any = cls
    for part in parts:
        if not (isinstance(group, type) and dataclasses.is_dataclass(group)):
            return None
        group = typing.get_type_hints(group).get(part)
    if not (isinstance(group, type) and dataclasses.is_dataclass(group)):
        return None
    names = {f.name for f in dataclasses.fields(group)}
    chosen = [name for name in SELECTOR_FIELDS if name in names]
    return chosen[0] if len(chosen) == 1 else None


def merge_overrides(data: dict[str, Any], overrides: list[str], cls: type | None = None) -> dict[str, Any]:
    """Apply ``key=value`` strings to a nested dict (a new dict is returned). With the config class ``cls``, a
    scalar given to a group that has a selector field sets that field: ``data=imagefolder`` is
    ``data.source=imagefolder``, ``schedule=cosine`` is ``schedule.kind=cosine``."""
    import copy

    result = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        selector = selector_field(cls, parts) if cls is not None and not isinstance(value, dict) else None
        if selector is not None:
            parts = [*parts, selector]
        node = result
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {} if child is None else child
                if not isinstance(child, dict):
                    raise ConfigError(f"override {text!r}: '{part}' is not a group of keys")
                node[part] = child
            node = child
        node[parts[-1]] = value
    return result


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str | int | float | bool | None):
                continue  # an unhashable key: PyYAML's own construction refuses it below
            if key in seen:
                raise ConfigError(f"key {key!r} is given twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with one-line errors for a missing or malformed file or a key given twice."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # a SafeLoader
    except ConfigError as exc:
        raise ConfigError(f"config file {path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{where}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Defaults of ``cls``, updated by the YAML file at ``path`` and then by ``overrides``."""
    data = read_yaml(path) if path is not None else {}
    return from_dict(cls, merge_overrides(data, overrides or [], cls))


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``update``, recursing into nested mappings (new dicts; inputs unchanged)."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_from(default: T, path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """``default`` (a config instance) updated by the YAML file at ``path``, then by ``overrides``."""
    data = deep_merge(to_dict(default), read_yaml(path)) if path is not None else to_dict(default)
    return from_dict(type(default), merge_overrides(data, overrides or [], type(default)))


class _FlowListDumper(yaml.SafeDumper):
    """Block-style mappings with lists on one line (``hidden: [256, 256]``)."""


_FlowListDumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


def dump_yaml(config: Any, path: str | Path | None = None) -> str:
    """The config as YAML text; also written to ``path`` when given."""
    text = yaml.dump(to_dict(config), Dumper=_FlowListDumper, sort_keys=False)
    if path is not None:
        Path(path).write_text(text)
    return text
