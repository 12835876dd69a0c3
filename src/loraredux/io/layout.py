"""What an adapted model looks like to an adapter file, whatever the format: the adapted layers, one shared
config with per-layer rank / alpha patterns, the modules to save and the base model's name.

Nothing here knows a method: configs are compared as dataclasses, and only the generic `rank` / `alpha` fields
(the ones `adapt_` can vary per layer) may differ between layers.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from collections.abc import Mapping

import torch
from torch import nn

from ..core import Adapter, AdapterConfig
from ..targets import pattern_value
from ..verbs import adapters, saved_modules

__all__ = [
    "DENSE_FORMATS",
    "adapted_layers",
    "base_format",
    "base_model_name",
    "exact_regex",
    "saved_paths",
    "shared_config",
    "split_patterns",
]


def adapted_layers(model: nn.Module) -> dict[str, Adapter]:
    """`{path: adapter}` of the model, in module order.

    Raises:
        ValueError: the model has no adapter (there is nothing to save).
    """
    layers = dict(adapters(model))
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no adapters to save; adapt it first with lx.adapt_(model, ...)"
        )
    return layers


#: the name of each dense dtype as a base format; a quantized base is named by its format ("nf4", "fp4", "int8")
DENSE_FORMATS = {
    torch.float64: "fp64",
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
}


def base_format(adapter: Adapter) -> str:
    """The format of an adapted layer's base: "nf4", "fp4" or "int8" when quantized, else its weight's dtype as
    "fp64", "fp32", "bf16" or "fp16" (another dtype by its torch name)."""
    if adapter.view.quantized and adapter.view.format:
        return adapter.view.format
    dtype = adapter.base_weight().dtype
    return DENSE_FORMATS.get(dtype, str(dtype).removeprefix("torch."))


def saved_paths(model: nn.Module) -> list[str]:
    """Paths of the modules to save (`lx.SavedModule`), in module order."""
    return [path for path, _ in saved_modules(model)]


_TASKS = (
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
)


def task_type(model: nn.Module) -> str | None:
    """PEFT's task type for a transformers model class (SEQ_CLS, CAUSAL_LM), or None for other models."""
    name = type(model).__name__
    return next((task for suffix, task in _TASKS if name.endswith(suffix)), None)


def base_model_name(model: nn.Module) -> str | None:
    """The model's hub name or local path as transformers records it, or None."""
    name = getattr(model, "name_or_path", None) or getattr(
        getattr(model, "config", None), "_name_or_path", None
    )
    return str(name) if name else None


def _config_key(config: AdapterConfig) -> str:
    return json.dumps(config.to_dict(), sort_keys=True, default=str)


def _differences(a: AdapterConfig, b: AdapterConfig) -> list[str]:
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    return [f"{k}={db[k]!r} (shared: {da[k]!r})" for k in da if da[k] != db.get(k)]


def shared_config(configs: Mapping[str, AdapterConfig]) -> AdapterConfig:
    """The most common per-layer config (ties: the first in module order).

    Raises:
        ValueError: the layers use more than one method (a file holds one).
    """
    methods = sorted({c.method for c in configs.values()})
    if len(methods) > 1:
        raise ValueError(f"the model mixes methods {methods}; an adapter file holds one method")
    counts = Counter(_config_key(c) for c in configs.values())
    best = counts.most_common(1)[0][0]
    return next(c for c in configs.values() if _config_key(c) == best)


def exact_regex(paths: list[str]) -> str:
    """A regex (for full matching) selecting exactly these module paths."""
    return "|".join(re.escape(p) for p in paths)


def split_patterns(
    shared: AdapterConfig, configs: Mapping[str, AdapterConfig]
) -> tuple[dict[str, int], dict[str, float]]:
    """`rank_pattern` and `alpha_pattern` that turn `shared` into each layer's config.

    Keys are full module paths. Where a plain path would also match another layer under PEFT's rule
    `re.match(rf"(.*\\.)?({key})$", path)` (say `a.b` also matches `x.a.b`), every key becomes `^` + the escaped
    path, which matches that one path only (the anchor fails after a non-empty prefix).

    Raises:
        ValueError: a layer differs from the shared config in a field other than rank and alpha (named).
    """
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for path, config in configs.items():
        if _config_key(config) == _config_key(shared):
            continue
        rank, alpha = getattr(config, "rank", None), getattr(config, "alpha", None)
        if _config_key(shared.for_layer(rank=rank, alpha=alpha)) != _config_key(config):
            raise ValueError(
                f"layer {path!r} differs from the shared {shared.method} config in more than rank and alpha: "
                f"{', '.join(_differences(shared, config))}; a file (like adapt_) varies only rank and alpha "
                "per layer"
            )
        if rank != getattr(shared, "rank", None):
            ranks[path] = rank
        if alpha != getattr(shared, "alpha", None):
            alphas[path] = alpha
    if not _patterns_exact(ranks, alphas, shared, configs):
        ranks = {_exact_key(k): v for k, v in ranks.items()}
        alphas = {_exact_key(k): v for k, v in alphas.items()}
    return ranks, alphas


def _exact_key(path: str) -> str:
    return "^" + re.escape(path)


def _patterns_exact(
    ranks: dict[str, int],
    alphas: dict[str, float],
    shared: AdapterConfig,
    configs: Mapping[str, AdapterConfig],
) -> bool:
    """Whether PEFT's pattern rule gives every layer its own rank and alpha with these (unescaped) keys."""
    for path, config in configs.items():
        rank = pattern_value(path, ranks)
        alpha = pattern_value(path, alphas)
        if _config_key(shared.for_layer(rank=rank, alpha=alpha)) != _config_key(config):
            return False
    return True
