"""Typed configs from YAML mappings, and back: the one loader behind `finevit_vl.train.config` and the data sources.

`from_mapping(kind, data)` builds a config dataclass (or a union of them) from what ``yaml.safe_load`` returned,
recursively: sections are dataclasses, lists and tuples are converted item by item, numbers written as strings (YAML
reads ``1e-5`` as a string) become numbers, and a union of dataclasses that carry a ``type`` class attribute (the data
sources) picks its member by the mapping's ``type`` key. Unknown or missing keys and wrong types raise `ValueError`
naming the dotted key (``data.train.sources[0].path``). `to_mapping` is the inverse. It lives in `finevit_vl.data`
because the data sources are the lowest layer that reads configs; `finevit_vl.train` imports it, never the reverse.
"""

import dataclasses
from types import NoneType, UnionType
from typing import Any, Union, get_args, get_origin, get_type_hints


def from_mapping(kind, data: Any, where: str = ""):
    """``data`` (parsed YAML) as ``kind``, a config dataclass or a type hint; ``where`` is its dotted key ("" for the root)."""
    return _convert(kind, data, where)


def to_mapping(config: Any) -> Any:
    """The YAML form of a config: mappings and lists; a tagged dataclass (a data source) leads with its ``type``."""
    if dataclasses.is_dataclass(config):
        tag = {"type": config.type} if hasattr(config, "type") else {}
        return {**tag, **{f.name: to_mapping(getattr(config, f.name)) for f in dataclasses.fields(config)}}
    if isinstance(config, (list, tuple)):
        return [to_mapping(item) for item in config]
    if isinstance(config, dict):
        return {key: to_mapping(value) for key, value in config.items()}
    return config


def _convert_one(kind, value: Any, where: str) -> Any:
    """``value`` as one (non-union) type; numbers written as strings (YAML reads ``1e-5`` as a string) become numbers."""
    origin, args = get_origin(kind), get_args(kind)
    if dataclasses.is_dataclass(kind):
        return _build(kind, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"config key {where}: expected a list, got {value!r}")
        return [_convert(args[0], item, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"config key {where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(arg, item, f"{where}[{i}]") for i, (arg, item) in enumerate(zip(args, value)))
    if kind is dict or origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key {where}: expected a mapping, got {value!r}")
        return value
    if kind is float and not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            return float(value)
        except ValueError:
            pass
    if kind is int and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    if kind in (str, bool) and isinstance(value, kind):
        return value
    expected = {float: "a number", int: "an integer", str: "a string", bool: "true or false"}.get(kind, kind)
    raise ValueError(f"config key {where}: expected {expected}, got {value!r}")


def _convert(kind, value: Any, where: str) -> Any:
    """``value`` read from YAML as the type hint ``kind`` of the config key ``where``; a wrong type raises `ValueError`."""
    if kind is Any:
        return value
    options = get_args(kind) if get_origin(kind) in (Union, UnionType) else (kind,)
    if value is None and (NoneType in options or dataclasses.is_dataclass(kind)):
        return None if NoneType in options else _build(kind, None, where)  # an empty section: its defaults
    # A union of dataclasses with a `type` class attribute (the data sources): `type` picks the class.
    tagged = {option.type: option for option in options if dataclasses.is_dataclass(option) and hasattr(option, "type")}
    if tagged:
        if not isinstance(value, dict):
            raise ValueError(f"config key {where}: expected a mapping with a type in {sorted(tagged)}, got {value!r}")
        if value.get("type") not in tagged:
            raise ValueError(f"config key {where}.type: expected one of {sorted(tagged)}, got {value.get('type')!r}")
        return _build(tagged[value["type"]], {k: v for k, v in value.items() if k != "type"}, where)
    errors = []
    for option in (option for option in options if option is not NoneType):
        try:
            return _convert_one(option, value, where)
        except ValueError as error:
            errors.append(error)
    if len(errors) == 1:
        raise errors[0]
    raise ValueError(f"config key {where}: expected {kind}, got {value!r}")


def _build(cls, data: Any, where: str):
    """A config dataclass from a mapping, recursively; unknown or missing keys and wrong types raise `ValueError`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"config section {where or 'root'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    allowed = sorted([*fields, "type"] if hasattr(cls, "type") else fields)

    def dotted(name: str) -> str:
        return f"{where}.{name}" if where else name

    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key(s) {[dotted(k) for k in unknown]}; allowed in {where or 'root'}: {allowed}")
    missing = [dotted(name) for name, f in fields.items()
               if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"missing config key(s) {missing}; allowed in {where or 'root'}: {allowed}")
    hints = get_type_hints(cls)
    return cls(**{name: _convert(hints[name], value, dotted(name)) for name, value in data.items()})


__all__ = ["from_mapping", "to_mapping"]
