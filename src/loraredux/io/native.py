"""loraredux's own adapter format, for every registered method (PEFT's format covers only some).

The same two files as PEFT: `adapter_config.json` is

    {"format": "loraredux", "format_version": 1, "method": ..., "config": <shared config.to_dict()>,
     "layers": {path: <that layer's config.to_dict()>}, "modules_to_save": [path, ...],
     "base_model_name_or_path": ..., "base_formats": {path: "fp32" | "bf16" | "fp16" | "fp64" | "nf4" | ...}}

and `adapter_model.safetensors` holds the tensors keyed exactly as `lx.adapter_state_dict(model)` gives them.

Base formats. `base_formats` records each adapted layer's base as it was saved: its dtype, or its quantized format
(`layout.base_format`). Loading onto a base of another format is allowed where the adapter's tensors mean the
same on it: every adapter whose load leaves the base as it is (LoRA and every method from a non-moving init: W' is
computed from whatever W0 the layer holds, so the model differs from the saved one by the two bases' difference
only, as a QLoRA adapter served on the dense model). It is refused where the load moves the base (an init that
moved it at training, PiSSA, MiLoRA, OLoRA, LoRA-GA, CorDA, LoftQ: A0, B0 in the file): the adapter was trained on
W_res = W0 - s B0 A0 stored in the saved format, and the load would rebuild W_res in the present one, e.g. a QPiSSA
adapter (nf4) onto a dense base (the unquantized residual) or a PiSSA adapter (fp32) onto an nf4 one (a quantized
residual it never saw). Dense formats count as one there: W_res then differs by the dtypes' rounding only. A file
without `base_formats` (written before it existed) is not checked.
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
    DENSE_FORMATS,
    adapted_layers,
    base_format,
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
    layers = adapted_layers(model)
    configs = {path: a.config for path, a in layers.items()}
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
        "base_formats": {path: base_format(a) for path, a in layers.items()},
    }
    return config, adapter_state_dict(model)


def _check_format(path: str, adapter: Adapter, saved: str) -> None:
    """Refuse a load that moves this layer's base onto a base of another format than the saved one (module
    docstring); dense formats count as one.

    Raises:
        ValueError: naming the layer, the saved and the present format, and what to do.
    """
    present = base_format(adapter)
    dense = set(DENSE_FORMATS.values())
    if present == saved or (present in dense and saved in dense):
        return
    init = getattr(adapter.config, "init", None)
    moved = f"its init {init!r} moved" if isinstance(init, str) else "its initialisation moved"
    onto = (
        f"the model quantized to {saved} (lx.quantize_(model, {saved!r}) or transformers' BitsAndBytesConfig)"
        if saved not in dense
        else "the dense model (not quantized)"
    )
    raise ValueError(
        f"layer {path!r}: the adapter was saved on a {saved} base, which {moved} (W_res = W0 - s B0 A0, stored "
        f"as {saved}); loading it onto this {present} base would rebuild W_res as {present}, a base the adapter "
        f"was not trained with. Load it onto {onto}; for a dense model from it, merge it there (lx.merge_ gives "
        "dense layers computing the trained model)"
    )


def _fill(
    tensors: dict[str, Tensor],
    layers: dict[str, AdapterConfig],
    built: dict[str, Adapter],
    saved: dict[str, SavedModule],
    formats: dict[str, str] | None = None,
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
        saved_format = (formats or {}).get(path)
        try:
            adapter.after_load_()
        except ValueError as err:
            if saved_format is not None:  # a move that failed on another format: say that first
                _check_format(path, adapter, saved_format)
            raise ValueError(f"{WEIGHTS_NAME}: layer {path!r}: {err}") from err
        if saved_format is not None and adapter.base_change_pending():
            _check_format(path, adapter, saved_format)


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


def _read_formats(
    fields: dict[str, Any], layers: dict[str, AdapterConfig]
) -> dict[str, str] | None:
    """`base_formats`, checked: absent (None) or `{layer path: format name}` for layers of the file."""
    formats = _field(
        fields, "base_formats", dict, "an object of {module path: base format}", optional=True
    )
    if formats is None:
        return None
    bad = {p: f for p, f in formats.items() if p not in layers or not isinstance(f, str)}
    if bad:
        raise AdapterFileError(
            f"{CONFIG_NAME}: 'base_formats' must map layers of 'layers' to format names (strings), got "
            f"{short_repr(bad)}"
        )
    return formats


def load(model: nn.Module, fields: dict[str, Any], tensors: dict[str, Tensor]) -> nn.Module:
    """Adapt a bare model as a loraredux `adapter_config.json` says and load the tensors into it.

    Raises:
        AdapterFileError: a format_version other than this one (a newer one says to upgrade), or a config
            field that is missing or of the wrong type (named, with the type expected).
        ValueError: an unknown method or field, or tensors whose keys, shapes or dtypes do not fit the model,
            a base that the saved initial factors would move to NaN / Inf, or would move on a base of another
            format than the saved one (named, with both formats); the model is left as it was.
    """
    shared, layers = _read_layers(fields)
    formats = _read_formats(fields, layers)
    rank_pattern, alpha_pattern = split_patterns(shared, layers)
    return adapt_(
        model,
        shared,
        exact_regex(list(layers)),
        rank_pattern=rank_pattern or None,
        alpha_pattern=alpha_pattern or None,
        modules_to_save=list(fields.get("modules_to_save") or []),
        prepare=lambda built, saved: _fill(tensors, layers, built, saved, formats),
        init=False,  # the file holds every adapter tensor: no initial values (no SVD of W0) needed
    )
