"""Turning TOML values into typed config: durations, sizes, and a walk over msgspec structs
that reports every problem at once (each as "dotted.key = value: what was expected"),
where msgspec alone stops at the first."""

from __future__ import annotations

import math
import re
import types
import typing
from typing import Any

import msgspec


class Duration(float):
    """Seconds, written in the config as "500ms", "30s", "5m", "2h", "7d" or a plain number."""


class Period(Duration):
    """A duration that must be more than zero (a timeout, an interval)."""


class Size(int):
    """Bytes, written as "64KiB", "1MiB" or a plain integer."""


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# Far beyond any sensible setting, and small enough for every timer and date to hold it.
MAX_DURATION = 100 * 365 * 86400.0
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


def parse_duration(value: object) -> Duration:
    if isinstance(value, bool):
        raise ValueError('expected a duration like "30s"')
    if isinstance(value, int | float):
        seconds = float(value) if isinstance(value, float) or abs(value) < 2**63 else math.inf
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError('expected a duration like "500ms", "30s", "5m", "2h" or "7d"')
    if math.isnan(seconds) or seconds < 0:
        raise ValueError("expected a duration >= 0")
    if seconds > MAX_DURATION:
        raise ValueError("expected a duration of at most 36500d (100 years)")
    return Duration(seconds)


def parse_period(value: object) -> Period:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("expected a duration > 0")
    return Period(seconds)


def parse_size(value: object) -> Size:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return Size(value)
    if isinstance(value, str) and (m := _SIZE.match(value)):
        return Size(int(m.group(1)) * _SIZE_UNITS[m.group(2)])
    raise ValueError('expected a size like 65536, "64KiB" or "1MiB"')


def dec_hook(tp: type, value: object) -> object:
    if tp is Duration:
        return parse_duration(value)
    if tp is Period:
        return parse_period(value)
    if tp is Size:
        return parse_size(value)
    raise NotImplementedError


def problems(value: object, tp: Any, path: str) -> list[str]:
    """Every problem with `value` as a `tp`, walking tables key by key so none hides another."""
    origin = typing.get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        return _struct_problems(value, tp, path)
    if origin is list and isinstance(value, list):
        (item_type,) = typing.get_args(tp)
        found = []
        for i, item in enumerate(value):
            found += problems(item, item_type, f"{path}[{i}]")
        return found
    if origin is dict:
        key_type, item_type = typing.get_args(tp)
        if not isinstance(value, dict):
            return [f"{path or 'top level'}: expected a table, got {show(value)}"]
        found = []
        for key, item in value.items():
            found += _scalar_problems(key, key_type, f"{path}.{key}", what="name")
            found += problems(item, item_type, f"{path}.{key}")
        return found
    if origin in (types.UnionType, typing.Union) and all(
        isinstance(a, type) and issubclass(a, msgspec.Struct) for a in typing.get_args(tp)
    ):
        return _tagged_problems(value, typing.get_args(tp), path)
    if origin in (types.UnionType, typing.Union) and isinstance(value, dict):
        tables = [
            a for a in typing.get_args(tp) if isinstance(a, type) and issubclass(a, msgspec.Struct)
        ]
        if len(tables) == 1:  # a table or a plain value: a table is checked key by key
            return _struct_problems(value, tables[0], path)
    return _scalar_problems(value, tp, path)


def _struct_problems(value: object, tp: type[msgspec.Struct], path: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{path or 'top level'}: expected a table, got {show(value)}"]
    info = msgspec.structs.fields(tp)
    known = {f.encode_name: f for f in info}
    tag_field = tp.__struct_config__.tag_field
    found = []
    for key in value:
        if key not in known and key != tag_field:
            found.append(f"{_join(path, key)}: unknown key")
    for f in info:
        if f.encode_name in value:
            found += problems(value[f.encode_name], f.type, _join(path, f.encode_name))
        elif f.required:
            found.append(f"{_join(path, f.encode_name)}: missing, and it has no default")
    return found


def _tagged_problems(value: object, variants: tuple[Any, ...], path: str) -> list[str]:
    by_tag = {v.__struct_config__.tag: v for v in variants}
    tag_field = variants[0].__struct_config__.tag_field
    if not isinstance(value, dict):
        return [f"{path}: expected a table, got {show(value)}"]
    tag = value.get(tag_field)
    if tag not in by_tag:
        expected = ", ".join(repr(t) for t in by_tag)
        return [f"{_join(path, tag_field)} = {show(tag)}: expected one of {expected}"]
    return _struct_problems(value, by_tag[tag], path)


def _scalar_problems(value: object, tp: Any, path: str, *, what: str = "value") -> list[str]:
    try:
        msgspec.convert(value, tp, dec_hook=dec_hook)
    except msgspec.ValidationError as exc:
        if typing.get_origin(tp) is typing.Literal:
            allowed = ", ".join(repr(a) for a in typing.get_args(tp))
            return [f"{path} = {show(value)}: expected one of {allowed}"]
        reason = str(exc).split(" - at ")[0]
        cause = exc.__cause__
        if isinstance(cause, ValueError):
            reason = str(cause)
        return [f"{path} = {show(value)}: {reason[0].lower()}{reason[1:]}"]
    return []


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def show(value: object) -> str:
    if value is None:
        return "(nothing)"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
