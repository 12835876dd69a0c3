"""What an optimizer factory offers, read from its signature and docstring (for `loraredux optimizers`)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Description", "describe_factory"]


@dataclass(frozen=True)
class Description:
    """One optimizer's summary (its factory docstring's first paragraph), its own options with their defaults, and
    whether it passes other keyword options on to its base optimizer (AdamW's betas, eps, weight_decay, ...)."""

    summary: str
    options: dict[str, Any] = field(default_factory=dict)
    passes_on: bool = False


def describe_factory(factory: Callable[..., Any]) -> Description:
    """The Description of a factory `fn(model, lr, *, option=default, ..., **base_options)`."""
    doc = inspect.getdoc(factory) or ""
    summary = " ".join(doc.split("\n\n")[0].split())
    options: dict[str, Any] = {}
    passes_on = False
    for name, p in list(inspect.signature(factory).parameters.items())[2:]:  # after model, lr
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            passes_on = True
        elif p.kind is not inspect.Parameter.VAR_POSITIONAL:
            options[name] = None if p.default is inspect.Parameter.empty else p.default
    return Description(summary, options, passes_on)
