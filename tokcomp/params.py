"""Strategy parameters checked against their dataclass field annotations.

A strategy is a dataclass; its fields' annotations (``keep: int | None``, ``r: int | list[int] |
tuple[int, float]``, ``query: Literal["last", "mean"]``) say which values are legal. This module reads them
once for every strategy, so a wrong-typed parameter (``FastV(keep=16.0)``) is refused with the field's name
and the accepted forms, whatever the strategy, and a schedule file's JSON values (lists, string keys) are
turned back into the Python forms the annotations name.

Rules: a ``bool`` is not an ``int``; an ``int`` is a legal ``float``; in Python a ``tuple[...]`` field takes a
tuple and a ``list[...]`` field a list (the two can mean different things, as ToMe's ``r`` shows);
``Sequence[...]`` takes either. From a file, the first form of a union the value converts to wins.
"""

from __future__ import annotations

import collections.abc as cabc
import dataclasses
import difflib
import numbers
import types
import typing
from functools import cache
from typing import Any, Literal, Union

import numpy as np

from .errors import ScheduleError

__all__ = [
    "check_instance", "check_params", "describe", "field_hints", "from_file_value", "matches", "suggest",
    "to_file_value",
]


@cache
def _hints(cls: type) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an annotation that does not evaluate: check nothing rather than fail
        hints = {}
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}


def field_hints(cls: type) -> dict[str, Any]:
    """The parameters of a dataclass strategy class and their annotations (``{}`` for other classes)."""
    return dict(_hints(cls)) if dataclasses.is_dataclass(cls) else {}


def _args(hint: Any) -> tuple[Any, ...]:
    return typing.get_args(hint)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


def matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` is a legal Python value for a field annotated ``hint``."""
    if hint is Any or hint is object:
        return True
    if hint is None or hint is type(None):
        return value is None
    if _is_union(hint):
        return any(matches(value, h) for h in _args(hint))
    origin = typing.get_origin(hint)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in _args(hint))
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # numpy integers too; a bool never
        return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        args = _args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return all(matches(v, args[0]) for v in value)
        return len(args) == len(value) and all(matches(v, h) for v, h in zip(value, args))
    if origin is list:
        return isinstance(value, list) and all(matches(v, (_args(hint) or (Any,))[0]) for v in value)
    if origin in (cabc.Sequence, cabc.Iterable):
        return (isinstance(value, (list, tuple, range))
                and all(matches(v, (_args(hint) or (Any,))[0]) for v in value))
    if origin in (dict, cabc.Mapping):
        k, v = _args(hint) or (Any, Any)
        return isinstance(value, dict) and all(matches(a, k) and matches(b, v) for a, b in value.items())
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # an annotation this checker does not model


def describe(hint: Any) -> str:
    """The forms ``hint`` accepts, in words (``"an int or None"``)."""
    if hint is Any or hint is object:
        return "anything"
    if hint is None or hint is type(None):
        return "None"
    if _is_union(hint):
        return " or ".join(describe(h) for h in _args(hint))
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in _args(hint))
    if hint in (bool, int, float, str):
        return {bool: "a bool (True/False)", int: "an int", float: "a number", str: "a string"}[hint]
    if origin is tuple:
        args = _args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a tuple of {_bare(args[0])}"
        return "a tuple (" + ", ".join(_bare(a) for a in args) + ")"
    if origin is list:
        return f"a list of {_bare((_args(hint) or (Any,))[0])}"
    if origin in (cabc.Sequence, cabc.Iterable):
        return f"a list of {_bare((_args(hint) or (Any,))[0])}"
    if origin in (dict, cabc.Mapping):
        k, v = _args(hint) or (Any, Any)
        return f"a dict {_bare(k)} -> {_bare(v)}"
    return getattr(hint, "__name__", str(hint))


def _bare(hint: Any) -> str:
    text = describe(hint)
    for article in ("an ", "a "):
        if text.startswith(article):
            return text[len(article):]
    return text


_MISSING = object()


def from_file_value(value: Any, hint: Any) -> Any:
    """``value`` as read from JSON/YAML, converted to the Python form ``hint`` names, or ``_MISSING``.

    Lists become tuples where the annotation says tuple; string dict keys become ints where it says int.
    Union members are tried in order, so ``[8, 0]`` is ToMe's per-block list and ``[8, -0.5]`` its
    ``(r, inflect)`` form.
    """
    if _is_union(hint):
        for h in _args(hint):
            out = from_file_value(value, h)
            if out is not _MISSING:
                return out
        return _MISSING
    origin = typing.get_origin(hint)
    if origin is tuple and isinstance(value, (list, tuple)):
        args = _args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        if len(args) != len(value):
            return _MISSING
        out = tuple(from_file_value(v, h) for v, h in zip(value, args))
        return _MISSING if any(o is _MISSING for o in out) else out
    if origin in (list, cabc.Sequence, cabc.Iterable) and isinstance(value, (list, tuple)):
        inner = (_args(hint) or (Any,))[0]
        out_list = [from_file_value(v, inner) for v in value]
        return _MISSING if any(o is _MISSING for o in out_list) else out_list
    if origin in (dict, cabc.Mapping) and isinstance(value, dict):
        k, v = _args(hint) or (Any, Any)
        out_dict = {}
        for a, b in value.items():
            if k is int and isinstance(a, str) and a.lstrip("-").isdigit():
                a = int(a)
            a2, b2 = from_file_value(a, k), from_file_value(b, v)
            if a2 is _MISSING or b2 is _MISSING:
                return _MISSING
            out_dict[a2] = b2
        return out_dict
    return value if matches(value, hint) else _MISSING


def to_file_value(value: Any, hint: Any) -> Any:
    """``value`` in the form a schedule file stores and `from_file_value` reads back to an equal value.

    Numbers in ``float`` slots are written as floats (``-1.0``, not ``-1``), so a tuple ``(8, -1)`` stays
    distinguishable from the list ``[8, -1]`` once it is JSON.
    """
    if _is_union(hint):
        for h in _args(hint):
            if matches(value, h):
                return to_file_value(value, h)
        return _plain(value)
    origin = typing.get_origin(hint)
    if hint is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if origin is tuple and isinstance(value, tuple):
        args = _args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        return [to_file_value(v, h) for v, h in zip(value, args)]
    if origin in (list, cabc.Sequence, cabc.Iterable) and isinstance(value, (list, tuple, range)):
        inner = (_args(hint) or (Any,))[0]
        return [to_file_value(v, inner) for v in value]
    if origin in (dict, cabc.Mapping) and isinstance(value, dict):
        _, v = _args(hint) or (Any, Any)
        return {a: to_file_value(b, v) for a, b in value.items()}
    return _plain(value)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, range)):
        return [_plain(v) for v in value]
    return value


def check_params(
    cls: type, params: dict[str, Any], where: str, *, from_file: bool = False, types: bool = True
) -> dict[str, Any]:
    """Check parameters for strategy class ``cls`` by name and type; return them (converted from a file's forms).

    Args:
        cls: The strategy class (a dataclass).
        params: Parameter name -> value.
        where: Prefix of the error message (``"stage 1 (fastv)"``).
        from_file: The values come from JSON/YAML (lists for tuples, string keys).
        types: Check the values' types too (names only otherwise; `check_instance` checks them later).

    Raises:
        ScheduleError: An unknown parameter name (with the closest valid one) or a value of the wrong type
            (with the accepted forms).
    """
    hints = field_hints(cls)
    if not hints:
        return dict(params)
    out = {}
    for key, value in params.items():
        if key not in hints:
            raise ScheduleError(f"{where}: unknown parameter {key!r}{suggest(key, hints)}; "
                                f"{cls.name!r} takes {', '.join(hints) or 'no parameters'}")
        hint = hints[key]
        if not types and not from_file:
            out[key] = value
            continue
        new = from_file_value(value, hint) if from_file else (value if matches(value, hint) else _MISSING)
        if new is _MISSING:
            raise ScheduleError(f"{where}: parameter {key}={value!r} has the wrong type; write {describe(hint)}")
        out[key] = new
    return out


def check_instance(strategy: Any, where: str) -> None:
    """Check a strategy instance: every field against its annotation, then the strategy's own `check`.

    Where a field has the wrong type and the strategy's own ``check()`` refuses the value too, its message
    (the more specific one) is the one raised.

    Raises:
        ScheduleError: Naming ``where``, the parameter and the forms it accepts.
    """
    hints = field_hints(type(strategy))
    for key, hint in hints.items():
        value = getattr(strategy, key, None)
        if not matches(value, hint):
            try:
                strategy.check()
            except ScheduleError as exc:
                raise ScheduleError(f"{where}: {exc}") from None
            except Exception:  # noqa: BLE001, S110 - its check tripped over the wrong type: ours says more
                pass
            raise ScheduleError(
                f"{where}: {type(strategy).__name__}({key}={value!r}) has the wrong type; write {describe(hint)}"
            )
    try:
        strategy.check()
    except ScheduleError as exc:
        raise ScheduleError(f"{where}: {exc}") from None


def suggest(name: str, valid: typing.Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest valid name, or ``""``."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
