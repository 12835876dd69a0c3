"""Config fields checked against their annotations, so a value read from JSON ("8", "false", [8]) is refused by
name, with the type expected, in every method's config without a check of its own.

`AdapterConfig` wraps each config class's `__post_init__` with `checking_types`: the class's own checks run first
(for their more specific messages), then `check_field_types`.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["check_field_types", "checking_types", "short_repr"]


def checking_types(post_init: Callable[[Any], None]) -> Callable[[Any], None]:
    """`post_init` followed by `check_field_types`: every field is checked against its annotation, so a value read
    from JSON ("8", "false", [8]) is refused by name even where the class checks nothing. The class's own checks
    come first, for their more specific messages; where one of them trips over a wrongly typed value (comparing
    a string with a number), the named type error is raised instead."""

    @functools.wraps(post_init)
    def checked(self: Any) -> None:
        try:
            post_init(self)
        except (TypeError, AttributeError, KeyError, IndexError):
            check_field_types(self)
            raise
        # only in the outermost __post_init__: a subclass's super() call is checked by the subclass's wrapper
        if type(self).__post_init__ is checked:
            check_field_types(self)

    checked.checks_types = True  # type: ignore[attr-defined]
    return checked


def short_repr(value: Any, limit: int = 60) -> str:
    """`type value` for an error message, the value's repr cut to `limit` characters (a file may hold a huge
    list where a number belongs)."""
    text = repr(value)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(value).__name__} {text}"


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config class's fields; {} where they cannot be resolved (then only the
    class's own checks apply)."""
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):
        return {}


_NAMES: dict[Any, str] = {
    int: "an integer",
    float: "a number",
    bool: "true or false",
    str: "a string",
    type(None): "null (None)",
}


def _expected(value: Any, annotation: Any) -> str | None:
    """None if `value` fits `annotation`, else what the annotation asks for, in words.

    int is an int but not a bool, float is an int or a float, bool only True / False; a tuple or list
    annotation takes either (JSON has only lists); Any, unknown generics and annotations that are no class
    take anything (the class's own checks decide).
    """
    if annotation is Any or annotation is object:
        return None
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or origin is types.UnionType:
        wants = [_expected(value, arm) for arm in args]
        return None if any(w is None for w in wants) else ", or ".join(dict.fromkeys(wants))
    if origin is typing.Literal:
        return None if value in args else f"one of {list(args)}"
    if annotation is type(None) or annotation is None:
        return None if value is None else _NAMES[type(None)]
    if annotation is bool:
        return None if isinstance(value, bool) else _NAMES[bool]
    if annotation is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else _NAMES[int]
    if annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else _NAMES[float]
    if annotation is str:
        return None if isinstance(value, str) else _NAMES[str]
    if origin in (dict, Mapping) or annotation in (dict, Mapping):
        return _expected_mapping(value, args)
    if origin in (list, tuple) or annotation in (list, tuple):
        return _expected_sequence(value, args)
    if isinstance(annotation, type) and origin is None:
        return None if isinstance(value, annotation) else f"a {annotation.__name__}"
    return None


def _expected_mapping(value: Any, args: tuple[Any, ...]) -> str | None:
    key_type, value_type = args if len(args) == 2 else (Any, Any)
    if not isinstance(value, Mapping):
        return "a dict"
    for key, item in value.items():
        if _expected(key, key_type) is not None:
            return f"a dict whose keys are each {_NAMES.get(key_type, key_type)}"
        wanted = _expected(item, value_type)
        if wanted is not None:
            return f"a dict whose values are each {wanted}"
    return None


def _expected_sequence(value: Any, args: tuple[Any, ...]) -> str | None:
    items = [a for a in args if a is not Ellipsis]
    if not isinstance(value, (list, tuple)):
        return "a list"
    for item in value if len(items) == 1 else ():
        wanted = _expected(item, items[0])
        if wanted is not None:
            return f"a list whose items are each {wanted}"
    return None


def check_field_types(config: Any) -> None:
    """Refuse a dataclass config field whose value is not of its annotated type.

    Raises:
        ValueError: `"<method>: <field> must be <expected>, got <type> <value>"`.
    """
    hints = _field_types(type(config))
    for field in dataclasses.fields(config):
        if field.name not in hints:
            continue
        value = getattr(config, field.name)
        wanted = _expected(value, hints[field.name])
        if wanted is not None:
            method = getattr(config, "method", "") or type(config).__name__
            raise ValueError(f"{method}: {field.name} must be {wanted}, got {short_repr(value)}")
