"""The model verbs: `adapt_`, `merge_`, `unadapt_`, `disabled` and `penalty` (the adapter state of a model is in
`state.py`, re-exported here).

Adapting a model is one generic function (`adapt_`): plan which layers, build every adapter (anything that can fail
fails here, before the model is touched), then swap them in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import init as inits
from .bases import view_of
from .core import Adapter, AdapterConfig, SavedModule, deferring_base_changes, skip_initialisation
from .quant.formats import is_quantized
from .state import (
    BANKS_ATTR,
    adapter_state_dict,
    adapters,
    banks,
    drop_unused_banks,
    load_adapter_state_dict,
    saved_modules,
    shared_modules_of,
    state_of,
    trainable_parameters,
)
from .targets import TargetSpec, check_pattern, pattern_value, select

__all__ = [
    "adapt_",
    "adapter_state_dict",
    "adapters",
    "banks",
    "disabled",
    "load_adapter_state_dict",
    "merge_",
    "penalty",
    "penalty_of",
    "saved_modules",
    "shared_modules_of",
    "state_of",
    "trainable_parameters",
    "unadapt_",
]

_FROZEN_ATTR = "_loraredux_frozen"  # on the model root: [(parameter, requires_grad before adapt_)]


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new)


def _normalise_saved(model: nn.Module, modules_to_save: Sequence[str] | None) -> list[str]:
    if not modules_to_save:
        return []
    if isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    paths = []
    for want in modules_to_save:
        found = [
            n
            for n, m in model.named_modules()
            if (n == want or n.endswith("." + want))
            and not isinstance(m, (Adapter, SavedModule))
            and not any(n.startswith(p + ".") for p in paths)
        ]
        found = [n for n in found if not any(n.startswith(f + ".") for f in found if f != n)]
        if not found:
            raise ValueError(f"modules_to_save: no module named {want!r} in {type(model).__name__}")
        paths += found
    return paths


def adapt_(
    model: nn.Module,
    config: AdapterConfig,
    targets: TargetSpec,
    *,
    exclude: TargetSpec | None = None,
    rank_pattern: Mapping[str, int] | None = None,
    alpha_pattern: Mapping[str, float] | None = None,
    modules_to_save: Sequence[str] | None = None,
    prepare: Callable[[dict[str, Adapter], dict[str, SavedModule]], None] | None = None,
    init: bool = True,
    calibration: Iterable[Any] | None = None,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
    calibration_options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Adapt `model` in place: wrap each target layer in the method's adapter and freeze everything else.

    Args:
        model: any `nn.Module` (a transformers model or not).
        config: a method config (`lx.config("lora", rank=8)`).
        targets: `"all-linear"`, a regex (full match) or a list of module names (suffix match, as PEFT).
        exclude: modules never to adapt, in the same forms.
        rank_pattern: `{key: rank}`, a layer's own rank where a key matches its path (PEFT's rule).
        alpha_pattern: `{key: alpha}`, likewise.
        modules_to_save: modules trained in full beside the adapters (e.g. `["classifier"]`).
        prepare: called with the built adapters and saved modules before they are swapped in (loading uses
            it to fill in weights), under `deferring_base_changes`: a base change it makes
            (`replace_base_weight_`, `load_base_tensors_`) is applied only when the adapters are swapped in,
            and an exception there leaves the model untouched.
        init: False builds the adapters without their initial values, which then hold arbitrary numbers until
            loaded (`lx.load_adapter_state_dict`, or `prepare`): for loading saved weights, so that methods with
            a costly initialisation (an SVD of W0: LoRA-XS, SVFT, ABBA) skip it.
        calibration: batches for a data-aware `config.init` (LoRA-GA, LoRA-One, EVA, CorDA): the model is run on
            them before any layer changes, one target layer's statistics at a time where memory needs it.
        loss_fn: `(model, batch) -> scalar loss` for gradient-based inits (as `lx.train.fit` takes it); default
            `model(**batch).loss`.
        calibration_options: keyword options of `lx.init.gather` (`max_grad_bytes`, `progress`).

    Returns:
        The same model, adapted.

    Raises:
        ValueError / TypeError: bad targets, patterns or config for a layer, or a data-aware init without
            calibration batches; the model is left unchanged.
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(
            f"config must be an AdapterConfig (lx.config(...)), got {type(config).__name__}"
        )
    check_pattern("rank_pattern", rank_pattern)
    check_pattern("alpha_pattern", alpha_pattern)
    saved_paths = _normalise_saved(model, modules_to_save)
    paths = select(model, targets, exclude, skip=saved_paths)
    data, ranks, alphas = _calibrate(
        model, config, paths, init, calibration, loss_fn, calibration_options
    )
    if ranks is not None and (rank_pattern or alpha_pattern):
        raise ValueError(
            f"init {config.init!r} allocates the ranks itself: rank_pattern / alpha_pattern cannot apply"
        )
    plan: dict[str, tuple[nn.Module, AdapterConfig]] = {}
    for path in paths:
        rank, alpha = pattern_value(path, rank_pattern), pattern_value(path, alpha_pattern)
        if ranks is not None:
            rank, alpha = ranks[path], alphas.get(path)
            if rank == 0:
                continue  # the init's rank allocation gave this layer nothing
        try:
            plan[path] = (model.get_submodule(path), config.for_layer(rank=rank, alpha=alpha))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    # Build on the side: the model is not touched until everything has succeeded.
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        with (
            contextlib.nullcontext() if init else skip_initialisation(),
            inits.calibration_data(data),
            deferring_base_changes(),
        ):
            built = config.build_layers(plan)
        saved = {p: SavedModule(model.get_submodule(p)) for p in saved_paths}
        shared = shared_modules_of(built.values())
        taken = sorted(set(shared) & set(banks(model)))
        if taken:
            raise ValueError(
                f"the model already has the shared module(s) {taken} of an earlier lx.adapt_: adapt all the "
                "layers that share them in one call (or lx.unadapt_ / lx.merge_ the model first)"
            )
        if prepare is not None:
            # A load that moves a base (PiSSA's saved A0, B0; PEFT's embedding table) only records the change
            # here; the commit below applies it once everything has loaded and been checked.
            with deferring_base_changes():
                prepare(built, saved)
    except BaseException:
        for p, flag in flags:  # building froze base layers: undo that
            p.requires_grad_(flag)
        raise

    record = getattr(model, _FROZEN_ATTR, None)
    if record is None:
        record = []
        object.__setattr__(model, _FROZEN_ATTR, record)
    known = {id(p) for p, _ in record}
    adapter_params = {id(p) for a in built.values() for p in a.parameters() if p.requires_grad}
    adapter_params |= {id(p) for s in saved.values() for p in s.module.parameters()}
    adapter_params |= {id(p) for b in shared.values() for p in b.parameters() if p.requires_grad}
    for p, flag in flags:
        if id(p) not in known and id(p) not in adapter_params:
            record.append((p, flag))
    replaced = False
    for path, adapter in built.items():
        adapter.train(
            adapter.base.training
        )  # a model in eval mode stays in eval mode (dropout off)
        old = dict(adapter.base.named_parameters())
        adapter.commit_base_()  # a moved base weight (PiSSA, ...) or a loaded base table applies now
        replaced |= _track_replaced(record, old, adapter.base)
        _replace(model, path, adapter)
    for path, module in saved.items():
        _replace(model, path, module)
    if shared:
        if not isinstance(getattr(model, BANKS_ATTR, None), nn.ModuleDict):
            setattr(model, BANKS_ATTR, nn.ModuleDict())
        getattr(model, BANKS_ATTR).update(shared)
    if replaced:  # forget replaced weights no module uses any more, so their memory is freed
        _forget_unused(model, record)
    for p in model.parameters():
        if id(p) not in adapter_params:
            p.requires_grad_(False)
    return model


def _calibrate(
    model: nn.Module,
    config: AdapterConfig,
    paths: list[str],
    init: bool,
    calibration: Iterable[Any] | None,
    loss_fn: Callable[[nn.Module, Any], Tensor] | None,
    options: Mapping[str, Any] | None,
) -> tuple[dict[nn.Module, inits.LayerData], dict[str, int] | None, dict[str, float]]:
    """The calibration statistics of the target layers, and the init's rank (and alpha) allocation, if the
    init needs them."""
    name = getattr(config, "init", None)
    spec = inits.get(name) if init and isinstance(name, str) and name in inits.available() else None
    if spec is None or not spec.needs:
        if calibration is not None or loss_fn is not None:
            raise ValueError(
                f"calibration / loss_fn were given, but {config.method}'s init {name!r} uses no data"
            )
        return {}, None, {}
    quantized = [p for p in paths if is_quantized(model.get_submodule(p))]
    if spec.needs & {"grad", "grads"} and quantized:
        raise ValueError(
            f"init {name!r} needs the gradient of the loss with respect to each W0, which a quantized base "
            f"layer ({quantized[:3]}) does not have (it stores codes); use an init without gradients (e.g. "
            "'pissa', 'corda', 'eva') or run the init on the dense model before quantizing"
        )
    if calibration is None:
        raise ValueError(
            f"init {name!r} estimates its subspace from data ({', '.join(sorted(spec.needs))}): pass "
            "lx.adapt_(..., calibration=batches, loss_fn=fn) with a few training batches"
        )
    if spec.allocate is not None and not hasattr(config, "rank"):
        raise ValueError(
            f"init {name!r} allocates ranks across layers, but {config.method} has no rank field to set"
        )
    modules = {path: model.get_submodule(path) for path in paths}
    stats = inits.gather(model, modules, spec.needs, calibration, loss_fn, **dict(options or {}))
    ranks, alphas = None, {}
    if spec.allocate is not None:
        weights = {p: _weight_of(m) for p, m in modules.items()}
        options = getattr(config, "init_options", {}) or {}
        ranks, alphas = spec.plan(
            weights, stats, config.rank, getattr(config, "alpha", None), options
        )
    return {modules[p]: d for p, d in stats.items()}, ranks, alphas


def _weight_of(module: nn.Module) -> Tensor:
    """W0 (out, in) of a base layer, detached."""
    return view_of(module).weight().detach()


def _track_replaced(
    record: list[tuple[nn.Parameter, bool]], old: dict[str, nn.Parameter], module: nn.Module
) -> bool:
    """Where a base layer got a new parameter object (a moved base weight), the new one inherits the old one's
    recorded requires_grad flag, so `unadapt_` restores it too. Returns whether any parameter was replaced."""
    swaps = [
        (old[name], new)
        for name, new in module.named_parameters()
        if name in old and old[name] is not new
    ]
    if swaps:  # the usual layer replaces nothing: only then is the record searched
        flags = {id(p): flag for p, flag in record}
        record += [(new, flags[id(before)]) for before, new in swaps if id(before) in flags]
    return bool(swaps)


def _forget_unused(model: nn.Module, record: list[tuple[nn.Parameter, bool]]) -> None:
    """Drop recorded flags of parameters the model no longer holds (a tied module keeps its own entry)."""
    live = {id(p) for p in model.parameters()}
    record[:] = [(p, flag) for p, flag in record if id(p) in live]


def _restore_flags(model: nn.Module) -> None:
    for p, flag in getattr(model, _FROZEN_ATTR, []):
        p.requires_grad_(flag)
    if hasattr(model, _FROZEN_ATTR):
        object.__delattr__(model, _FROZEN_ATTR)


def merge_(model: nn.Module, *, requantize: bool = False) -> nn.Module:
    """Replace every adapter by a plain layer carrying its W', and every saved module by its trained copy.

    The result is an ordinary model (no loraredux class left) that `save_pretrained` writes as usual. A quantized
    base (bitsandbytes 4-bit / 8-bit) merges into a dense `nn.Linear` in the layer's dtype, whose outputs are the
    adapted model's: re-quantizing W' would round away most of a small update. `requantize=True` does it anyway
    (for a smaller model file) and reports what it cost: see `lx.quant.merge_requantized`, which it calls.

    Args:
        model: an adapted model.
        requantize: quantize each merged layer back into its base's format (every adapted base must be
            quantized).

    Raises:
        ValueError: no adapter to merge, or `requantize` with an adapted layer whose base is dense (named); the
            model is then unchanged.
    """
    if requantize:
        from .quant import merge_requantized

        merge_requantized(model)
        return model
    _merge(model, lambda layers: {path: adapter.merged() for path, adapter in layers})
    return model


def _merge(
    model: nn.Module, build: Callable[[list[tuple[str, Adapter]]], dict[str, nn.Module]]
) -> None:
    """The merge: `build` makes the plain layer of every adapter (before anything changes, so an error in any
    leaves the model as it was), then they and the saved modules' trained copies are swapped in."""
    layers = list(adapters(model))
    saved = list(saved_modules(model))
    if not layers and not saved:
        raise ValueError(f"{type(model).__name__} has no adapter to merge")
    merged = build(layers)
    _restore_flags(model)
    for path, adapter in layers:
        # their flags are those before lx.adapt_ again (restored just now)
        before = dict(adapter.base.named_parameters())
        for name, p in merged[path].named_parameters():
            if name in before and p.is_floating_point():
                p.requires_grad_(before[name].requires_grad)
        _replace(model, path, merged[path])
    for path, module in saved:
        _replace(model, path, module.module)
    drop_unused_banks(model)


def unadapt_(model: nn.Module) -> nn.Module:
    """Give back the original layers (and the original modules to save); adapter weights are dropped."""
    layers = list(adapters(model))
    saved = list(saved_modules(model))
    if not layers and not saved:
        raise ValueError(f"{type(model).__name__} has no adapter to remove")
    record = getattr(model, _FROZEN_ATTR, [])
    for path, adapter in layers:
        old = dict(adapter.base.named_parameters())
        _replace(model, path, adapter.released())
        _track_replaced(record, old, adapter.base)
    for path, module in saved:
        _replace(model, path, module.original)
    drop_unused_banks(model)
    _restore_flags(model)
    return model


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes as its base: adapters and saved modules are switched off."""
    switched = [m for _, m in adapters(model)] + [m for _, m in saved_modules(model)]
    before = [m.enabled for m in switched]
    try:
        for m in switched:
            m.enabled = False
        yield model
    finally:
        for m, flag in zip(switched, before, strict=True):
            m.enabled = flag


def penalty(model: nn.Module) -> Tensor | None:
    """The sum of the adapters' regularisers (e.g. AdaLoRA's orthogonality), to add to the training loss.

    `lx.train.fit` adds it by itself; a hand-written loop adds it to its loss. None when no adapter has one.
    """
    return penalty_of([a for _, a in adapters(model)])


def penalty_of(layers: Sequence[Adapter]) -> Tensor | None:
    """The sum of these adapters' regularisers, or None (for a loop that found its adapters once)."""
    terms = [t for a in layers if (t := a.penalty()) is not None]
    return torch.stack(terms).sum() if terms else None
