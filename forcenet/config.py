"""Settings files loaded into frozen dataclasses that reject unknown or missing keys.

:func:`parse` builds any (nested) dataclass from a plain mapping, naming the dotted key of
every problem and suggesting the nearest valid key for a typo. A dataclass states the
allowed values of its fields as a table of checks (:class:`Range`, :class:`OneOf`,
:class:`Flag`, :class:`Text`) run by :func:`check_fields` in its ``__post_init__``; a value
out of range raises :class:`FieldError`, which :func:`parse` prefixes with where the
settings came from (``train.forcenet.warmup_start: -3.0 is out of range: need 0 <=
warmup_start <= 1``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """params.yaml does not match the expected schema."""


class FieldError(ConfigError):
    """One setting out of its allowed values: ``key`` (the field, dotted with where the
    settings came from once :func:`parse` has seen it) and ``problem``."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key, self.problem = key, problem


@dataclass(frozen=True)
class Range:
    """A finite number (NaN and inf refused) between ``low`` and ``high`` (inclusive
    unless ``low_open`` / ``high_open``); ``integer``: an int; ``optional``: None allowed.
    A list or tuple has every entry checked, a mapping every value."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    optional: bool = False

    def rule(self, name: str) -> str:
        """``"lr > 0"``, ``"0 <= dev_fraction < 1"``, ``"finite values"``."""
        lo, hi = _number(self.low), _number(self.high)
        low = f"{lo} {'<' if self.low_open else '<='} " if self.low > -math.inf else ""
        high = f" {'<' if self.high_open else '<='} {hi}" if self.high < math.inf else ""
        if low and not high:
            return f"{name} {'>' if self.low_open else '>='} {lo}"
        return f"{low}{name}{high}" if low or high else "finite values"

    def problem(self, name: str, value: Any) -> str | None:
        if value is None:
            return None if self.optional else f"a value is needed ({self.rule(name)})"
        if isinstance(value, Mapping):
            return _first(self._one(name, v, f" (entry {k!r})") for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return _first(self._one(name, v, f" (entry {i})") for i, v in enumerate(value))
        return self._one(name, value, "")

    def _one(self, name: str, value: Any, entry: str) -> str | None:
        kinds = (int,) if self.integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            noun = "an integer" if self.integer else "a number"
            return f"expected {noun}{entry}, got {value!r}"
        if not math.isfinite(value):
            return f"{value!r}{entry} is not a finite number: need {self.rule(name)}"
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        if above and below:
            return None
        return f"{value!r}{entry} is out of range: need {self.rule(name)}"


@dataclass(frozen=True)
class OneOf:
    """One of ``choices`` (e.g. a ``Literal``'s arguments; None among them when optional)."""

    choices: tuple[Any, ...]

    def problem(self, name: str, value: Any) -> str | None:
        same = [c for c in self.choices if type(c) is type(value) and c == value]
        return None if same else f"{value!r} is not one of {list(self.choices)}"


@dataclass(frozen=True)
class Flag:
    """``true`` or ``false``."""

    def problem(self, name: str, value: Any) -> str | None:
        return None if isinstance(value, bool) else f"expected true/false, got {value!r}"


@dataclass(frozen=True)
class Text:
    """A non-empty string (a path, a name); ``optional``: None allowed."""

    optional: bool = False

    def problem(self, name: str, value: Any) -> str | None:
        if value is None and self.optional:
            return None
        return None if isinstance(value, str) and value else f"expected a name, got {value!r}"


Check = Range | OneOf | Flag | Text


def check_fields(settings: Any, checks: Mapping[str, Check]) -> None:
    """Raise :class:`FieldError` for the first field of ``settings`` outside its check."""
    for name, check in checks.items():
        problem = check.problem(name, getattr(settings, name))
        if problem is not None:
            raise FieldError(name, problem)


def _number(x: float) -> str:
    return str(int(x)) if math.isfinite(x) and x == int(x) else f"{x:g}"


def _first(problems: Iterable[str | None]) -> str | None:
    return next((p for p in problems if p is not None), None)


def parse(cls: type[T], data: Any, where: str) -> T:
    """Build dataclass ``cls`` from a mapping, recursively; unknown or missing keys raise."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(unknown_keys_message(where, unknown, fields))
    values = {}
    for name, field in fields.items():
        key = f"{where}.{name}" if where else name
        if name not in data:
            if (
                field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING
            ):
                raise ConfigError(f"{key}: missing")
            continue
        values[name] = _convert(hints[name], data[name], key)
    try:
        return cls(**values)
    except FieldError as exc:  # a value out of range: name its full key
        raise FieldError(f"{where}.{exc.key}" if where else exc.key, exc.problem) from None


def unknown_keys_message(where: str, unknown: Sequence[str], known: Iterable[str]) -> str:
    """``"where: unknown key 'cuttoff' (did you mean 'cutoff'?); expected [...]"``."""
    known = sorted(known)
    parts = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        parts.append(f"{key!r}{hint}")
    prefix = f"{where}: " if where else ""
    noun = "key" if len(parts) == 1 else "keys"
    return f"{prefix}unknown {noun} {', '.join(parts)}; expected one of {known}"


def _convert(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return parse(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (dict, Mapping) or tp in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping")
        vt = args[1] if args else Any
        return {k: _convert(vt, v, f"{where}.{k}") for k, v in value.items()}
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list")
        et = args[0] if args else Any
        return tuple(_convert(et, v, where) for v in value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps
    the last one silently, so a second ``graph:`` section would win unseen)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<': merged by the base class
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            seen[key] = line
            if first is not None:
                raise ConfigError(
                    f"{key_node.start_mark.name}, line {line}: key {key!r} is given twice "
                    f"(first on line {first}); keep one"
                )
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: Path) -> dict[str, Any]:
    """The raw params mapping (plain dict) of a YAML file; a key given twice in one
    mapping is a :class:`ConfigError` naming the file and both lines."""
    with open(path) as fh:
        data = yaml.load(fh, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data
