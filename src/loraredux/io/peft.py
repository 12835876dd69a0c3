"""Hugging Face PEFT's adapter format, both ways.

`adapter_config.json` holds PEFT's config class fields (`peft_type`, `target_modules`, `rank_pattern`, ...) and
`adapter_model.safetensors` the tensors under `base_model.model.<module path>.<name>` (LoRA: `lora_A.weight`,
`lora_B.weight`, or `lora_embedding_A` / `lora_embedding_B` for an embedding); a module to save is written as its
own state dict under its path (`base_model.model.classifier.weight`), without PEFT's in-memory
`modules_to_save.default.` infix.

This file knows PEFT's generic conventions only. What a method's fields and tensors are called in PEFT lives in
the method's own file: `Config.peft_type`, `config.peft_fields()`, `Config.from_peft_fields(fields)`,
`adapter.peft_tensors()` and `adapter.load_peft_tensors(tensors)`, and optionally `Config.peft_base_kinds` (the
layer kinds PEFT's version of the method adapts, when fewer than the method's `base_kinds`). A method with state
shared by every layer (VeRA) gives its banks `peft_tensors()` / `load_peft_tensors()` too, for the tensors PEFT
keeps at the model level (`base_model.vera_A`).

A method whose PEFT config keeps per-layer entries of its own meaning (AdaLoRA's `rank_pattern` holds triplet masks,
not ranks) names those keys in `Config.peft_layer_keys`: io then leaves them out of the generic rank / alpha
patterns, writes each adapter's `adapter.peft_layer_fields()` (`{key: {name: value}}`) as `"<layer path>.<name>"`
entries (None when no layer has one), and on load hands each adapter its entries through
`adapter.load_peft_layer_fields({key: {name: value}})` before `adapter.load_peft_tensors(tensors)`.

A method whose PEFT config class lacks some of the generic fields (VeRA's has no `rank_pattern`) names them in
`Config.peft_absent_fields`: they are left out of the file, and a value that needs one is refused.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..core import (
    Adapter,
    AdapterConfig,
    SavedModule,
    available_methods,
    check_tensors,
)
from ..core import config_class as _config_class
from ..fieldtypes import short_repr
from ..verbs import adapt_, saved_modules, shared_modules_of
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

__all__ = ["load", "supports", "to_files"]

logger = logging.getLogger(__name__)

PREFIX = "base_model.model."
# Model-level tensors shared by every layer (VeRA's vera_A / vera_B) sit under base_model. directly.
_SHARED = "base_model."


def _is_shared(key: str) -> bool:
    return key.startswith(_SHARED) and not key.startswith(PREFIX)


# PEFT's name for the wrapped layer; it writes an adapted embedding's table under it.
_BASE_LAYER = "base_layer."
# PEFT task types from the model class name, and the heads PEFT then adds to modules_to_save itself.
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score")}
# PEFT's generic selection fields whose meaning loraredux does not read: refuse rather than drop them.
_UNSUPPORTED = (
    "layers_to_transform",
    "layers_pattern",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
)


# ----------------------------------------------------------------------------------------------- shared


def _original_names(model: nn.Module) -> list[str]:
    """Module paths as PEFT sees them in the bare model: adapters and saved modules count as the layer they wrap."""
    wrappers = [(n, m) for n, m in model.named_modules() if isinstance(m, (Adapter, SavedModule))]
    names = []
    for name, _ in model.named_modules():
        inside = next((w for w in wrappers if name.startswith(w[0] + ".")), None)
        if inside is None:
            names.append(name)
        elif isinstance(inside[1], SavedModule) and name.startswith(inside[0] + ".original."):
            names.append(inside[0] + name[len(inside[0]) + len(".original") :])
    return names


def _peft_saved_selection(names: Iterable[str], entries: Iterable[str]) -> list[str]:
    """The paths PEFT wraps as modules to save: its rule is a plain `path.endswith(entry)`; outermost only."""
    entries = [e for e in entries if e]
    hits = [n for n in names if n and any(n.endswith(e) for e in entries)]
    return [n for n in hits if not any(n.startswith(h + ".") for h in hits)]


def _supported(adapter: Adapter, convert: bool = True) -> bool:
    cls = type(adapter.config)
    native_only = getattr(adapter, "needs_native_format", None)
    if callable(native_only) and native_only(convert):
        return False
    return (
        getattr(cls, "peft_type", None) is not None
        and adapter.view.kind in getattr(cls, "peft_base_kinds", cls.base_kinds)
        and callable(getattr(adapter, "peft_tensors", None))
        and callable(getattr(adapter.config, "peft_fields", None))
    )


def supports(model: nn.Module, convert: bool = True) -> bool:
    """Whether every adapter of the model has a PEFT form (on the original base, with `convert`)."""
    return all(_supported(a, convert) for a in adapted_layers(model).values())


# ----------------------------------------------------------------------------------------------- saving


def _suffix_selection(names: list[str], entries: list[str]) -> set[str]:
    return {n for n in names if any(n == e or n.endswith("." + e) for e in entries)}


def _target_modules(names: list[str], paths: list[str]) -> list[str] | str:
    """What PEFT's `target_modules` should say to select exactly the adapted layers of the bare model: their
    leaf names where possible, else their full paths (suffix-matched), else an exact regex (full-matched)."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    for entries in (leaves, list(paths)):
        if _suffix_selection(names, entries) == set(paths):
            return entries
    return exact_regex(list(paths))


def _modules_to_save(model: nn.Module, names: list[str]) -> tuple[list[str], str | None]:
    """The modules-to-save entries and the task type, such that PEFT wraps exactly our saved modules."""
    saved = saved_paths(model)
    extra = sorted(set(_peft_saved_selection(names, saved)) - set(saved))
    if extra:
        raise ValueError(
            f"PEFT matches modules_to_save by name suffix, so {saved} would also select {extra}; "
            "save with format='native' instead"
        )
    task = task_type(model)
    heads = _TASK_HEADS.get(task or "", ())
    if heads and set(_peft_saved_selection(names, [*saved, *heads])) != set(saved):
        # PEFT would wrap the head and then require its weights in the file; the head is part of the base here.
        logger.info("task_type %s left out: the model's head is not a module to save", task)
        task = None
    return saved, task


def _export(adapter: Adapter, convert: bool) -> tuple[AdapterConfig, dict[str, Tensor]]:
    export = getattr(adapter, "peft_export", None)
    return export(convert) if callable(export) else (adapter.config, adapter.peft_tensors())


def to_files(model: nn.Module, convert: bool = True) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The contents of PEFT's `adapter_config.json` and `adapter_model.safetensors` for an adapted model.

    Args:
        model: an adapted model.
        convert: adapters whose initialisation moved the base weight are written as the equivalent plain LoRA
            on the original base (`LoRA.peft_export`); False writes their factors for the moved base.

    Raises:
        ValueError: no adapters, a method without a PEFT form, layers that differ in more than rank / alpha,
            or modules to save that PEFT could not select exactly.
    """
    layers = adapted_layers(model)
    # The specific reason first (a moved base that PEFT's format cannot hold), then the generic one.
    for adapter in layers.values():
        native_only = getattr(adapter, "needs_native_format", None)
        if callable(native_only) and native_only(convert):
            _export(adapter, convert)  # raises, naming the init
    missing = sorted(
        {
            f"{a.config.method} on {a.view.kind} layers"
            for a in layers.values()
            if not _supported(a, convert)
        }
    )
    if missing:
        raise ValueError(f"{missing} have no PEFT form; save with format='native'")
    exports = {path: _export(a, convert) for path, a in layers.items()}
    configs = {path: config for path, (config, _) in exports.items()}
    shared = shared_config(configs)
    rank_pattern, alpha_pattern = split_patterns(shared, configs)
    names = _original_names(model)
    saved, task = _modules_to_save(model, names)
    config = {
        **shared.peft_fields(),
        "peft_type": type(shared).peft_type,
        "task_type": task,
        "base_model_name_or_path": base_model_name(model),
        "inference_mode": True,
        "target_modules": _target_modules(names, list(layers)),
        "exclude_modules": None,
        "rank_pattern": rank_pattern,
        "modules_to_save": saved or None,
    }
    if hasattr(shared, "alpha"):
        # Only where it applies: PEFT configs without an alpha (HiRA's) have no such field and warn on it.
        config["alpha_pattern"] = alpha_pattern
    if any(a.view.kind == "conv1d" for a in layers.values()):
        # Only where it applies: some PEFT configs (LyCORIS ones) have no such field and warn on it.
        config["fan_in_fan_out"] = True
    config.update(_layer_fields(shared, layers, config))
    _drop_absent_fields(shared, config)
    tensors = {
        f"{PREFIX}{path}.{name}": tensor
        for path, (_, layer_tensors) in exports.items()
        for name, tensor in layer_tensors.items()
    }
    # model-level tensors (VeRA's vera_A / vera_B)
    for bank in shared_modules_of(layers.values()).values():
        tensors.update({f"{_SHARED}{k}": v for k, v in bank.peft_tensors().items()})
    for path, module in saved_modules(model):
        tensors.update({f"{PREFIX}{path}.{k}": v for k, v in module.module.state_dict().items()})
    return config, tensors


def _drop_absent_fields(shared: AdapterConfig, config: dict[str, Any]) -> None:
    """Leave out the generic fields that the method's PEFT config class lacks (`Config.peft_absent_fields`):
    PEFT reads a file with fields its class does not know as one from a newer PEFT, and warns."""
    for key in getattr(type(shared), "peft_absent_fields", ()):
        if config.get(key):
            raise ValueError(
                f"PEFT's {type(shared).peft_type} config has no {key}, so it cannot hold {config[key]!r}; "
                "save with format='native'"
            )
        config.pop(key, None)


def _layer_fields(
    shared: AdapterConfig, layers: dict[str, Adapter], generic: dict[str, Any]
) -> dict[str, Any]:
    """The config keys the method fills per layer (`Config.peft_layer_keys`), keyed `"<layer path>.<name>"`."""
    keys = tuple(getattr(type(shared), "peft_layer_keys", ()))
    entries: dict[str, dict[str, Any]] = {key: {} for key in keys}
    for key in keys:
        if generic.get(key):
            raise ValueError(
                f"{key} is {shared.method}'s own per-layer field, but layers also differ in it generically: "
                f"{generic[key]}"
            )
    for path, adapter in layers.items() if keys else ():
        for key, values in adapter.peft_layer_fields().items():
            if key not in entries:
                raise ValueError(f"{shared.method} layer {path!r} gives {key!r}, not in {keys}")
            entries[key].update({f"{path}.{name}": v for name, v in values.items()})
    return {key: value or None for key, value in entries.items()}


# ----------------------------------------------------------------------------------------------- loading


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _optional(test: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or test(value)


_INT = (_is_int, "an integer")
_NUMBER = (_is_number, "a number")
_DROPOUT = (_optional(_is_number), "a number")  # methods read null as 0, as PEFT's defaults are
_BOOL = (lambda v: isinstance(v, bool), "true or false")
_TEXT = (_optional(lambda v: isinstance(v, str)), "a string or null")
_PATTERN = (
    _optional(lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v)),
    "an object of {module key: value} or null",
)
# The types of PEFT config fields as PEFT's config classes declare them (a name means the same in each class
# that has it), checked before a method's `from_peft_fields` converts a value: int("8"), float("8") or
# bool("false") (True) would read a wrong or silently converted value, float([8]) a bare TypeError.
_FIELD_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "peft_type": (lambda v: isinstance(v, str), "a string"),
    "task_type": _TEXT,
    "base_model_name_or_path": _TEXT,
    "revision": _TEXT,
    "bias": _TEXT,
    "inference_mode": _BOOL,
    "fan_in_fan_out": _BOOL,
    "use_rslora": _BOOL,
    "use_dora": _BOOL,
    "decompose_both": _BOOL,
    "rank_dropout_scale": _BOOL,
    "save_projection": _BOOL,
    "r": _INT,
    "init_r": _INT,
    "target_r": _INT,
    "tinit": _INT,
    "tfinal": _INT,
    "deltaT": _INT,
    "decompose_factor": _INT,
    "projection_prng_key": _INT,
    "total_step": (_optional(_is_int), "an integer or null"),
    "lora_alpha": _NUMBER,
    "alpha": _NUMBER,
    "beta1": _NUMBER,
    "beta2": _NUMBER,
    "orth_reg_weight": _NUMBER,
    "d_initial": _NUMBER,
    "lora_dropout": _DROPOUT,
    "hira_dropout": _DROPOUT,
    "vera_dropout": _DROPOUT,
    "rank_dropout": _DROPOUT,
    "module_dropout": _DROPOUT,
    "init_lora_weights": (lambda v: isinstance(v, (bool, str)), "true, false or an init name"),
    "init_weights": (lambda v: isinstance(v, (bool, str)), "true, false or an init name"),
    "target_modules": (
        _optional(lambda v: isinstance(v, str) or _is_names(v)),
        "a regex string or a list of module names",
    ),
    "exclude_modules": (
        _optional(lambda v: isinstance(v, str) or _is_names(v)),
        "a regex string, a list of module names or null",
    ),
    "modules_to_save": (_optional(_is_names), "a list of module names or null"),
    "rank_pattern": _PATTERN,
    "alpha_pattern": _PATTERN,
}


def _check_field_types(fields: dict[str, Any]) -> None:
    """Refuse a PEFT config field whose value is not of the type PEFT declares for it.

    Raises:
        AdapterFileError: `"adapter_config.json: 'r' must be an integer, got str '8'"`.
    """
    for key, (fits, words) in _FIELD_TYPES.items():
        if key in fields and not fits(fields[key]):
            raise AdapterFileError(
                f"{CONFIG_NAME}: {key!r} must be {words}, got {short_repr(fields[key])}"
            )


def _method_config(fields: dict[str, Any]) -> AdapterConfig:
    """The one registered config whose `peft_type` matches and whose `from_peft_fields` accepts the fields."""
    peft_type = fields.get("peft_type")
    classes = [_config_class(n) for n in available_methods()]
    candidates = [c for c in classes if getattr(c, "peft_type", None) == peft_type]
    if not candidates:
        known = sorted({c.peft_type for c in classes if getattr(c, "peft_type", None)})
        raise ValueError(f"unknown peft_type {peft_type!r}: loraredux reads {known}")
    accepted, refusals = [], []
    for cls in candidates:
        try:
            accepted.append(cls.from_peft_fields(fields))
        except (ValueError, TypeError) as err:  # a method's own fields of an unexpected type, too
            refusals.append(f"{cls.method}: {err}")
    if len(accepted) != 1:
        why = (
            "; ".join(refusals) if not accepted else f"{[c.method for c in accepted]} all accept it"
        )
        raise ValueError(f"cannot read this {peft_type} adapter: {why}")
    return accepted[0]


def _check_generic_fields(fields: dict[str, Any]) -> None:
    for key in _UNSUPPORTED:
        if fields.get(key) not in (None, [], {}, ""):
            raise ValueError(
                f"PEFT adapter sets {key}={fields[key]!r}, which loraredux does not read"
            )
    if not fields.get("target_modules"):
        raise ValueError(
            "PEFT adapter has no target_modules (PEFT's per-architecture defaults are not read)"
        )


def _group(tensors: dict[str, Tensor], owners: list[str]) -> dict[str, dict[str, Tensor]]:
    """Split file keys by the exact module path they belong to (the longest adapted or saved path)."""
    by_length = sorted(owners, key=len, reverse=True)
    groups: dict[str, dict[str, Tensor]] = {p: {} for p in owners}
    strangers = []
    for key, value in tensors.items():
        rest = key.removeprefix(PREFIX)
        owner = next((p for p in by_length if rest.startswith(p + ".")), None)
        if not key.startswith(PREFIX) or owner is None:
            strangers.append(key)
        else:
            groups[owner][rest[len(owner) + 1 :]] = value
    if strangers:
        raise ValueError(
            "the adapter file has tensors for modules that the model lacks or the config does not adapt "
            "or save: "
            f"{sorted(strangers)[:10]}{' ...' if len(strangers) > 10 else ''}"
        )
    return groups


def _split_layer_fields(
    fields: dict[str, Any], keys: tuple[str, ...], paths: list[str]
) -> dict[str, dict[str, dict[str, Any]]]:
    """{layer path: {key: {name: value}}} from the `"<layer path>.<name>"` entries of the method's own keys."""
    by_length = sorted(paths, key=len, reverse=True)
    split: dict[str, dict[str, dict[str, Any]]] = {p: {key: {} for key in keys} for p in paths}
    for key in keys:
        entries = fields.get(key) or {}
        if not isinstance(entries, dict):
            raise ValueError(f"PEFT adapter's {key} must be a dict, got {entries!r}")
        for full, value in entries.items():
            owner = next((p for p in by_length if str(full).startswith(p + ".")), None)
            if owner is None:
                raise ValueError(f"PEFT adapter's {key} entry {full!r} names no adapted layer")
            split[owner][key][full[len(owner) + 1 :]] = value
    return split


def _fill(
    tensors: dict[str, Tensor],
    built: dict[str, Adapter],
    saved: dict[str, SavedModule],
    layer_fields: dict[str, dict[str, dict[str, Any]]] | None = None,
) -> None:
    """Load the file's tensors into the adapters before they are swapped in; every check comes first."""
    shared = {k[len(_SHARED) :]: v for k, v in tensors.items() if _is_shared(k)}
    tensors = {k: v for k, v in tensors.items() if not _is_shared(k)}
    banks = list(shared_modules_of(built.values()).values())
    if shared and not banks:
        raise ValueError(
            f"the adapter file has model-level tensors {sorted(shared)} but the method has no shared state"
        )
    for bank in banks:
        try:
            _check_floating(shared)  # a bank copies them in its own way
            bank.load_peft_tensors(shared)
        except ValueError as err:
            raise ValueError(f"{WEIGHTS_NAME}: shared tensors (base_model.*): {err}") from err
    try:
        groups = _group(tensors, [*built, *saved])
    except ValueError as err:
        raise ValueError(f"{WEIGHTS_NAME}: {err}") from err
    base_tables: list[tuple[str, Adapter, dict[str, Tensor]]] = []
    for path, adapter in built.items():
        own = {k: v for k, v in groups[path].items() if not k.startswith(_BASE_LAYER)}
        base = {
            k[len(_BASE_LAYER) :]: v for k, v in groups[path].items() if k.startswith(_BASE_LAYER)
        }
        try:
            if layer_fields is not None:  # the method's own per-layer config entries come first
                adapter.load_peft_layer_fields(layer_fields[path])
            adapter.load_peft_tensors(own)
            state = adapter.base.state_dict()
            check_tensors(base, {k: state[k] for k in base if k in state})
        except ValueError as err:
            raise ValueError(f"{WEIGHTS_NAME}: layer {path!r} ({PREFIX}{path}.*): {err}") from err
        if base:
            base_tables.append((path, adapter, base))
    for path, module in saved.items():
        own = module.module.state_dict()
        try:
            values = check_tensors(groups[path], own)
        except ValueError as err:
            raise ValueError(
                f"{WEIGHTS_NAME}: module to save {path!r} ({PREFIX}{path}.*): {err}"
            ) from err
        with torch.no_grad():
            for key, value in values.items():
                own[key].copy_(value)
    _load_base_tables(base_tables)


def _check_floating(tensors: dict[str, Tensor]) -> None:
    wrong = {k: str(v.dtype) for k, v in tensors.items() if not v.is_floating_point()}
    if wrong:
        raise ValueError(f"expected floating-point tensors, got {wrong}")


def _load_base_tables(tables: list[tuple[str, Adapter, dict[str, Tensor]]]) -> None:
    """PEFT saves an adapted embedding's table too (`save_embedding_layers`) and loads it into the base.

    The adapter applies it when `lx.adapt_` commits (nothing changes if the load fails before) and keeps the
    original, so `lx.unadapt_` restores it (`Adapter.load_base_tensors_`).
    """
    for path, adapter, values in tables:
        state = adapter.base.state_dict()
        changed = [k for k, v in values.items() if not torch.equal(state[k], v.to(state[k].dtype))]
        if changed:
            warnings.warn(
                f"the adapter file replaces the base weights {', '.join(f'{path}.{k}' for k in changed)} "
                "(PEFT's save_embedding_layers); lx.unadapt_ restores the original ones",
                stacklevel=5,
            )
        adapter.load_base_tensors_(values)


def load(model: nn.Module, fields: dict[str, Any], tensors: dict[str, Tensor]) -> nn.Module:
    """Adapt a bare model as a PEFT `adapter_config.json` says and load the PEFT tensors into it.

    Raises:
        AdapterFileError: a known PEFT field of the wrong type (named, with the type expected).
        ValueError: unknown `peft_type`, fields loraredux does not read, or tensors whose keys, shapes or dtypes
            do not fit the model (named); the model is left as it was.
    """
    _check_field_types(fields)
    method_config = _method_config(fields)
    _check_generic_fields(fields)
    own_keys = tuple(getattr(type(method_config), "peft_layer_keys", ()))
    saved = _peft_saved_selection(_original_names(model), fields.get("modules_to_save") or [])
    return adapt_(
        model,
        method_config,
        fields["target_modules"],
        exclude=fields.get("exclude_modules") or None,
        rank_pattern=None if "rank_pattern" in own_keys else fields.get("rank_pattern") or None,
        alpha_pattern=None if "alpha_pattern" in own_keys else fields.get("alpha_pattern") or None,
        modules_to_save=saved,
        prepare=lambda built, saved_modules: _fill(
            tensors,
            built,
            saved_modules,
            _split_layer_fields(fields, own_keys, list(built)) if own_keys else None,
        ),
    )
