"""Which modules to adapt: suffix names (as PEFT does), a regex, `"all-linear"`, exclusions, per-module patterns.

Matching rules, chosen to read PEFT's `adapter_config.json` with the same meaning:
- a list of names matches a module whose dotted path equals a name or ends with `"." + name`;
- a string other than `"all-linear"` is a regex that must match the whole path;
- `"all-linear"` is every `nn.Linear` / `Conv1D` except the output head (the output embeddings, or a top-level
  `classifier` / `score` head);
- pattern keys (`rank_pattern`, `alpha_pattern`) match as in PEFT: `re.match(rf"(.*\\.)?({key})$", path)`, the
  first key in order wins.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from typing import TypeVar

from torch import nn

from .bases import is_adaptable, is_linear
from .core import Adapter

__all__ = ["TargetSpec", "check_pattern", "pattern_value", "select"]

TargetSpec = str | Sequence[str]
V = TypeVar("V")

ALL_LINEAR = "all-linear"
_HEAD_NAMES = ("classifier", "score")


def _matcher(spec: TargetSpec, what: str):
    if isinstance(spec, str):
        try:
            rx = re.compile(spec)
        except re.error as err:
            raise ValueError(f"{what} {spec!r} is not a valid regular expression: {err}") from err
        return lambda name: rx.fullmatch(name) is not None
    names = list(spec)
    bad = [n for n in names if not isinstance(n, str) or not n]
    if bad:
        raise TypeError(f"{what} must be a string or a list of non-empty module names, got {bad!r}")
    return lambda name: any(name == n or name.endswith("." + n) for n in names)


def output_head_names(model: nn.Module) -> set[str]:
    """Paths of the output head(s) that `"all-linear"` leaves alone."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    for name, module in model.named_modules():
        if out is not None and module is out:
            heads.add(name)
    for attr in _HEAD_NAMES:
        head = getattr(model, attr, None)
        if isinstance(head, nn.Module):
            heads.update(
                n for n, m in model.named_modules() if m is head or n.startswith(attr + ".")
            )
    return heads


def _inside_adapter(name: str, adapter_paths: Sequence[str]) -> bool:
    return any(name.startswith(p + ".") for p in adapter_paths)


def select(
    model: nn.Module,
    targets: TargetSpec,
    exclude: TargetSpec | None = None,
    *,
    skip: Sequence[str] = (),
) -> list[str]:
    """Paths of the modules to adapt, in the model's module order.

    Args:
        model: the model to search.
        targets: `"all-linear"`, a regex (full match) or a list of module names (suffix match).
        exclude: modules never to adapt, in the same forms as `targets`.
        skip: paths that are not candidates (for example the modules to save).

    Raises:
        ValueError: nothing matches (the message lists the closest module names), or a target is already adapted.
        TypeError: a matched module has no adapter view.
    """
    adapter_paths = [n for n, m in model.named_modules() if isinstance(m, Adapter)]
    excluded = _matcher(exclude, "exclude") if exclude else (lambda name: False)
    skipped = set(skip)

    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        heads = output_head_names(model)
        chosen = [
            n
            for n, m in model.named_modules()
            if is_linear(m)
            and n not in heads
            and n not in skipped
            and not excluded(n)
            and not _inside_adapter(n, adapter_paths)
        ]
        if not chosen:
            raise ValueError(
                f'"all-linear" found no nn.Linear or Conv1D layer in {type(model).__name__}'
            )
        return chosen

    matches = _matcher(targets, "targets")
    chosen = []
    for name, module in model.named_modules():
        if not name or not matches(name) or excluded(name) or name in skipped:
            continue
        if _inside_adapter(name, adapter_paths):
            continue
        if isinstance(module, Adapter):
            raise ValueError(
                f"module {name!r} is already adapted ({type(module).__name__}); "
                "call lx.unadapt_(model) or lx.merge_(model) first"
            )
        if not is_adaptable(module):
            raise TypeError(
                f"module {name!r} matches the targets but is a {type(module).__name__}; "
                "targets must name nn.Linear, nn.Embedding or Conv1D layers"
            )
        chosen.append(name)
    if not chosen:
        raise ValueError(no_match_message(model, targets))
    return chosen


def no_match_message(model: nn.Module, targets: TargetSpec) -> str:
    """Explain an empty selection, naming the closest adaptable module names."""
    names = [n for n, m in model.named_modules() if n and is_adaptable(m)]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    wanted = [targets] if isinstance(targets, str) else list(targets)
    close: list[str] = []
    for w in wanted:
        close += difflib.get_close_matches(w.rsplit(".", 1)[-1], leaves, n=3, cutoff=0.3)
    close = list(dict.fromkeys(close)) or leaves[:8]
    return (
        f"targets {targets!r} match no module of {type(model).__name__}; "
        f"closest adaptable module names: {close} (all adaptable names: {leaves[:20]})"
    )


def check_pattern(name: str, pattern: Mapping[str, object] | None) -> None:
    """Refuse a pattern whose keys are not strings or not valid regular expressions (named in the message)."""
    if pattern is None:
        return
    if not isinstance(pattern, Mapping):
        raise TypeError(
            f"{name} must be a dict of {{module key: value}}, got {type(pattern).__name__}"
        )
    for key in pattern:
        if not isinstance(key, str) or not key:
            raise TypeError(f"{name} keys must be non-empty strings, got {key!r}")
        try:
            re.compile(key)
        except re.error as err:
            raise ValueError(
                f"{name} key {key!r} is not a valid regular expression: {err}"
            ) from err


def pattern_value(name: str, pattern: Mapping[str, V] | None) -> V | None:
    """The value of the first pattern key matching `name`, PEFT's rule; None if no key matches."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return None
