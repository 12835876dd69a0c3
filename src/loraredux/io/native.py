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

from ..core import (
    Adapter,
    AdapterConfig,
    SavedModule,
    check_tensors,
    config_from_dict,
)
from ..fieldtypes import short_repr
from ..verbs import adapt_, adapter_state_dict, state_of
from .files import CONFIG_NAME, WEIGHTS_NAME, AdapterFileError
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
    """Load the file's tensors into the adapters before they are swapped in: every tensor is checked (names,
    shapes, dtypes) before any is copied, and a base that the loaded state moves (PiSSA's A0, B0) is only
    recorded here (`lx.adapt_` runs this under `deferring_base_changes` and commits it last)."""
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
        raise ValueError(f"{WEIGHTS_NAME} does not fit the model: {err}") from err
    with torch.no_grad():
        for key, value in values.items():
            own[key].copy_(value)
    # derived state, e.g. a base moved by the saved initial factors (recorded, committed by adapt_)
    for path, adapter in built.items():
        try:
            adapter.after_load_()
        except ValueError as err:
            raise ValueError(f"{WEIGHTS_NAME}: layer {path!r}: {err}") from err


def _field(fields: dict[str, Any], key: str, kind: type, words: str, optional: bool = False) -> Any:
    """`fields[key]`, refused unless it is a `kind` (or absent / null where `optional`)."""
    value = fields.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kind):
        got = "nothing" if key not in fields else short_repr(value)
        raise AdapterFileError(f"{CONFIG_NAME}: {key!r} must be {words}, got {got}")
    return value


def _check_version(fields: dict[str, Any]) -> None:
    version = fields.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise AdapterFileError(
            f"{CONFIG_NAME}: loraredux adapter format_version {version} is newer than this loraredux reads "
            f"({FORMAT_VERSION}); upgrade loraredux"
        )
    if version != FORMAT_VERSION or isinstance(version, bool):
        got = "nothing" if "format_version" not in fields else short_repr(version)
        raise AdapterFileError(
            f"{CONFIG_NAME}: 'format_version' must be the integer {FORMAT_VERSION} (this version's), got {got}"
        )


def _config(data: Any, where: str) -> AdapterConfig:
    if not isinstance(data, dict):
        raise AdapterFileError(
            f"{CONFIG_NAME}: {where} must be an object (a config), got {short_repr(data)}"
        )
    try:
        return config_from_dict(data)
    except (ValueError, TypeError) as err:
        raise AdapterFileError(f"{CONFIG_NAME}: {where}: {err}") from err


def _read_layers(fields: dict[str, Any]) -> tuple[AdapterConfig, dict[str, AdapterConfig]]:
    """The shared config and each layer's, every field checked (named with the expected type when wrong)."""
    _check_version(fields)
    method = _field(fields, "method", str, "a method name (a string)")
    shared = _config(_field(fields, "config", dict, "an object (the shared config)"), "'config'")
    entries = _field(fields, "layers", dict, "an object of {module path: config}")
    if not entries or not all(entries):
        raise AdapterFileError(
            f"{CONFIG_NAME}: 'layers' must name at least one layer, by a non-empty module path"
        )
    layers = {path: _config(d, f"layers[{path!r}]") for path, d in entries.items()}
    methods = {shared.method, method, *(c.method for c in layers.values())}
    if len(methods) != 1:
        raise AdapterFileError(
            f"{CONFIG_NAME}: the loraredux adapter file mixes methods {sorted(map(str, methods))}"
        )
    saved = _field(fields, "modules_to_save", list, "a list of module paths", optional=True)
    if saved is not None and not all(isinstance(p, str) and p for p in saved):
        raise AdapterFileError(
            f"{CONFIG_NAME}: 'modules_to_save' must be a list of module paths, got {short_repr(saved)}"
        )
    return shared, layers


def load(model: nn.Module, fields: dict[str, Any], tensors: dict[str, Tensor]) -> nn.Module:
    """Adapt a bare model as a loraredux `adapter_config.json` says and load the tensors into it.

    Raises:
        AdapterFileError: a format_version other than this one (a newer one says to upgrade), or a config
            field that is missing or of the wrong type (named, with the type expected).
        ValueError: an unknown method or field, or tensors whose keys, shapes or dtypes do not fit the model,
            or a base that the saved initial factors would move to NaN / Inf (named); the model is left as it
            was.
    """
    shared, layers = _read_layers(fields)
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
