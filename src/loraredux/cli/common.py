"""What the subcommands share: the usage error `main` reports, and argument types."""

from __future__ import annotations

import argparse
import json
import logging
import math
from typing import Any

__all__ = ["UsageError", "field_value", "log", "positive_float", "positive_int", "targets"]

log = logging.getLogger("loraredux")


class UsageError(Exception):
    """A mistake in what the user asked for; `main` prints it and exits with status 2."""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def field_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def targets(text: str) -> str | list[str]:
    return (
        text
        if text == "all-linear" or text.startswith("re:")
        else [t for t in text.split(",") if t]
    )
