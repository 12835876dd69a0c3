"""loraredux's own adapter format, for every registered method (PEFT's format covers only some).

The same two files as PEFT: `adapter_config.json` is

    {"format": "loraredux", "format_version": 1, "method": ..., "config": <shared config.to_dict()>,
     "layers": {path: <that layer's config.to_dict()>}, "modules_to_save": [path, ...],
     "base_model_name_or_path": ...}

and `adapter_model.safetensors` holds the tensors keyed exactly as `lx.adapter_state_dict(model)` gives them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..core import Adapter, AdapterConfig, SavedModule, check_tensors, config_from_dict
from ..verbs import adapt_, adapter_state_dict, state_of
from .layout import (
    adapted_layers,
    base_model_name,
    exact_regex,
    saved_paths,
    shared_config,
    split_patterns,
    task_type,
)

__all__ = ["FORMAT", "FORMAT_VERSION", "load", "to_files"]

FORMAT = "loraredux"
FORMAT_VERSION = 1


def to_files(model: nn.Module) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The contents of `adapter_config.json` and `adapter_model.safetensors` in loraredux's format.

    Raises:
        ValueError: no adapters, several methods, or layers that differ in more than rank / alpha.
    """
    configs = {path: a.config for path, a in adapted_layers(model).items()}
    shared = shared_config(configs)
    split_patterns(shared, configs)  # refuses layers that adapt_ could not rebuild
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": shared.method,
        "config": shared.to_dict(),
        "layers": {path: c.to_dict() for path, c in configs.items()},
        "modules_to_save": saved_paths(model),
        "base_model_name_or_path": base_model_name(model),
        "task_type": task_type(model),
    }
    return config, adapter_state_dict(model)


def _fill(
    tensors: dict[str, Tensor],
    layers: dict[str, AdapterConfig],
    built: dict[str, Adapter],
    saved: dict[str, SavedModule],
) -> None:
    absent = sorted(set(layers) - set(built))
    if absent:
        raise ValueError(f"the adapter file has layers that the model does not have: {absent[:10]}")
    for path, adapter in built.items():
        if adapter.config != layers[path]:
            raise ValueError(
                f"layer {path!r} was built as {adapter.config} but the file says {layers[path]}"
            )
    own = state_of(built, saved)
    try:
        values = check_tensors(tensors, own)
    except ValueError as err:
        raise ValueError(f"the adapter file does not fit the model: {err}") from err
    with torch.no_grad():
        for key, value in values.items():
            own[key].copy_(value)
    for adapter in built.values():  # derived state, e.g. a base moved by the saved initial factors
        adapter.after_load_()


def _read_layers(fields: dict[str, Any]) -> tuple[AdapterConfig, dict[str, AdapterConfig]]:
    version = fields.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"loraredux adapter format_version {version!r} is not readable here (this version reads "
            f"{FORMAT_VERSION}); upgrade loraredux"
        )
    shared = config_from_dict(fields["config"])
    layers = {path: config_from_dict(d) for path, d in fields["layers"].items()}
    if not layers:
        raise ValueError("the loraredux adapter file lists no layers")
    methods = {shared.method, fields.get("method"), *(c.method for c in layers.values())}
    if len(methods) != 1:
        raise ValueError(f"the loraredux adapter file mixes methods {sorted(map(str, methods))}")
    return shared, layers


def load(model: nn.Module, fields: dict[str, Any], tensors: dict[str, Tensor]) -> nn.Module:
    """Adapt a bare model as a loraredux `adapter_config.json` says and load the tensors into it.

    Raises:
        ValueError: an unreadable format version, an unknown method or field, or tensors whose keys or shapes
            do not fit the model (named); the model is left as it was.
    """
    try:
        shared, layers = _read_layers(fields)
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(
            f"malformed loraredux adapter config ({type(err).__name__}: {err})"
        ) from err
    rank_pattern, alpha_pattern = split_patterns(shared, layers)
    return adapt_(
        model,
        shared,
        exact_regex(list(layers)),
        rank_pattern=rank_pattern or None,
        alpha_pattern=alpha_pattern or None,
        modules_to_save=list(fields.get("modules_to_save") or []),
        prepare=lambda built, saved: _fill(tensors, layers, built, saved),
        init=False,  # the file holds every adapter tensor: no initial values (no SVD of W0) needed
    )
