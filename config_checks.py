"""``ConfigError`` and the one mechanism that checks config values.

A config dataclass declares each field with its type annotation and, where the value has limits,
``option(default, min=..., max=..., choices=...)``; its ``__post_init__`` starts with
``check_fields(self, "section")``, which checks every field against its annotation and limits
(an int is never a bool; an int given for a float becomes a float) and raises a one-line
``ConfigError`` naming the key. Cross-field checks follow in ``__post_init__``. Values checked
outside a dataclass (a function argument that comes from the user) use ``check_value``.

This module imports nothing of longtrain, so every package's config can use it without cycles.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any

__all__ = ["ConfigError", "Limits", "check_fields", "check_value", "option"]


class ConfigError(ValueError):
    """A user error (config value, file, path, checkpoint): one line naming the key or file to fix.

    The CLI prints it without a traceback; any other exception is a bug and keeps its traceback."""


@dataclass(frozen=True)
class Limits:
    """What a field's value may be beyond its type. Bounds apply to numbers (the elements of a
    ``list[float]``), choices to strings (a ``float | str`` field takes a bounded number or one of
    the choices)."""

    min: float | None = None
    max: float | None = None
    min_open: bool = False  # min itself excluded
    max_open: bool = False  # max itself excluded
    choices: tuple[str, ...] = ()
    nonempty: bool = False  # strings: "" rejected


_LIMITS = "longtrain.limits"


def option(
    default: Any = dataclasses.MISSING,
    *,
    factory: typing.Callable[[], Any] | None = None,
    min: float | None = None,
    max: float | None = None,
    min_open: bool = False,
    max_open: bool = False,
    choices: tuple[str, ...] = (),
    nonempty: bool = False,
) -> Any:
    """A dataclass field with ``Limits`` (``factory`` for a mutable default)."""
    limits = Limits(min, max, min_open, max_open, tuple(choices), nonempty)
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={_LIMITS: limits})
    return dataclasses.field(default=default, metadata={_LIMITS: limits})


_HINTS: dict[type, dict[str, Any]] = {}


def check_fields(obj: Any, section: str = "") -> None:
    """Check (and normalise) every field of the dataclass ``obj``; keys are ``section.field``."""
    cls = type(obj)
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    hints = _HINTS[cls]
    for f in dataclasses.fields(obj):
        key = f"{section}.{f.name}" if section else f.name
        hint, value = hints[f.name], getattr(obj, f.name)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            if not isinstance(value, hint):
                raise ConfigError(f"{key} must be a {hint.__name__} section, got {value!r}")
            continue
        setattr(obj, f.name, check_value(key, value, hint, f.metadata.get(_LIMITS, Limits())))


def _allowed(hint: Any) -> tuple[Any, ...]:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def _matching_type(value: Any, allowed: tuple[Any, ...]) -> type | None:
    """The allowed type ``value`` is taken as: bool only for bools, int never for a bool,
    float for any real number."""
    origins = [typing.get_origin(t) or t for t in allowed]
    if isinstance(value, bool):
        return bool if bool in origins else None
    if isinstance(value, int) and int in origins:
        return int
    if isinstance(value, int | float) and float in origins:
        return float
    for origin in (str, list, dict, tuple):
        if isinstance(value, origin) and origin in origins:
            return origin
    return None


def _number(kind: type, v: float) -> str:
    return str(int(v)) if kind is int or float(v).is_integer() else f"{v:g}"


def _describe_number(kind: type, limits: Limits, noun: bool) -> str:
    """'a positive int', 'an int >= 0', 'a number > 0', 'in [0, 1)' ('a number in [0, 1)' with noun)."""
    lo, hi = limits.min, limits.max
    article = "an int" if kind is int else "a number"
    if lo is not None and hi is not None:
        interval = (
            f"{'(' if limits.min_open else '['}{_number(kind, lo)}, "
            f"{_number(kind, hi)}{')' if limits.max_open else ']'}"
        )
        return f"{article} in {interval}" if noun else f"in {interval}"
    if lo is not None:
        if kind is int and lo == 1 and not limits.min_open:
            return "a positive int"
        return f"{article} {'>' if limits.min_open else '>='} {_number(kind, lo)}"
    if hi is not None:
        return f"{article} {'<' if limits.max_open else '<='} {_number(kind, hi)}"
    return article


def _in_range(value: float, limits: Limits) -> bool:
    lo, hi = limits.min, limits.max
    if lo is not None and (value <= lo if limits.min_open else value < lo):
        return False
    return not (hi is not None and (value >= hi if limits.max_open else value > hi))


def _one_of(allowed: tuple[Any, ...], limits: Limits) -> str:
    """What a field with string choices accepts: 'one of a, b' or 'a number in [0, 1] or 'auto''."""
    others = [t for t in allowed if t not in (str, type(None))]
    if not others:
        return f"one of {', '.join(limits.choices)}"
    alternatives = ["true, false" if t is bool else _describe_number(t, limits, noun=True) for t in others]
    alternatives += [repr(c) for c in limits.choices]
    return ", ".join(alternatives[:-1]) + " or " + alternatives[-1]


def check_value(key: str, value: Any, hint: Any, limits: Limits | None = None) -> Any:
    """``value`` checked against the type ``hint`` (a type or a union, ``None`` for null) and
    ``limits``; returns it normalised (an int for a float becomes a float). Raises ConfigError."""
    limits = limits or Limits()
    allowed = _allowed(hint)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{key} must not be null")
    kind = _matching_type(value, allowed)
    if kind is None or (kind is str and limits.choices and value not in limits.choices):
        if limits.choices:
            expected = _one_of(allowed, limits)
        else:
            names = [getattr(t, "__name__", str(t)) for t in allowed if t is not type(None)]
            expected = " or ".join("true or false" if n == "bool" else n for n in names)
        raise ConfigError(f"{key} must be {expected}, got {value!r}")
    if kind is list:  # list[T]: every element is a T within the limits
        (item_hint,) = next((typing.get_args(t) for t in allowed if typing.get_origin(t) is list), (Any,))
        if item_hint is not Any:
            value = [check_value(f"{key}[{i}]", v, item_hint, limits) for i, v in enumerate(value)]
    elif kind in (int, float):
        value = float(value) if kind is float else value
        if not _in_range(value, limits):
            raise ConfigError(f"{key} must be {_describe_number(kind, limits, noun=False)}, got {value!r}")
    elif kind is str and limits.nonempty and not value:
        raise ConfigError(f"{key} must be a non-empty string, got {value!r}")
    return value
