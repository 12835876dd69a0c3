"""The adapter state of a model: its adapters, modules to save and shared banks, found by `isinstance` (never by
parameter-name prefixes), and their tensors as one state dict (`adapter_state_dict`, `load_adapter_state_dict`).

A shared module (`Adapter.shared_modules()`, a bank) is not a submodule of any adapter: `lx.adapt_` registers it
once at the model's root, as `loraredux_banks.<key>`, so the state dict holds it once however many layers use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from .core import Adapter, SavedModule, check_tensors, deferring_base_changes

__all__ = [
    "BANKS_ATTR",
    "adapter_state_dict",
    "adapters",
    "banks",
    "drop_unused_banks",
    "load_adapter_state_dict",
    "saved_modules",
    "shared_modules_of",
    "state_of",
    "trainable_parameters",
]

# On the model root: an nn.ModuleDict of the adapters' shared modules (banks), by key.
BANKS_ATTR = "loraredux_banks"


def adapters(model: nn.Module) -> Iterator[tuple[str, Adapter]]:
    """(path, adapter) for every adapted layer of the model."""
    for name, module in model.named_modules():
        if isinstance(module, Adapter):
            yield name, module


def banks(model: nn.Module) -> dict[str, nn.Module]:
    """The shared cross-layer modules registered at the model's root (`Adapter.shared_modules`), by key."""
    found = getattr(model, BANKS_ATTR, None)
    return dict(found.items()) if isinstance(found, nn.ModuleDict) else {}


def shared_modules_of(layers: Iterable[Adapter]) -> dict[str, nn.Module]:
    """The shared modules these adapters use, by key; one key must mean one module."""
    shared: dict[str, nn.Module] = {}
    for adapter in layers:
        for key, module in adapter.shared_modules().items():
            if shared.setdefault(key, module) is not module:
                raise ValueError(f"two different shared modules use the key {key!r}")
    return shared


def drop_unused_banks(model: nn.Module) -> None:
    """Remove the banks no adapter of the model uses any more (all of them after merge_ / unadapt_)."""
    registered = getattr(model, BANKS_ATTR, None)
    if not isinstance(registered, nn.ModuleDict):
        return
    used = shared_modules_of(a for _, a in adapters(model))
    for key in [k for k in registered if k not in used]:
        del registered[key]
    if not len(registered):
        delattr(model, BANKS_ATTR)


def saved_modules(model: nn.Module) -> Iterator[tuple[str, SavedModule]]:
    for name, module in model.named_modules():
        if isinstance(module, SavedModule):
            yield name, module


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """`{name: parameter}` of every parameter that requires a gradient (after `adapt_`: the adapters')."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter state of the model, keyed as in `model.state_dict()`: adapter parameters and buffers (not
    the frozen base), the shared banks once each (`loraredux_banks.<key>.<name>`), and the trained copies of the
    modules to save."""
    return state_of(dict(adapters(model)), dict(saved_modules(model)))


def state_of(layers: Mapping[str, Adapter], saved: Mapping[str, SavedModule]) -> dict[str, Tensor]:
    """`adapter_state_dict` of a model holding these adapters and saved modules at these paths (also before they
    are swapped in, as the loaders need)."""
    state: dict[str, Tensor] = {}
    for path, adapter in layers.items():
        for key, value in adapter.state_dict().items():
            if not key.startswith("base."):
                state[f"{path}.{key}"] = value
    for key, bank in sorted(shared_modules_of(layers.values()).items()):
        for name, value in bank.state_dict().items():
            state[f"{BANKS_ATTR}.{key}.{name}"] = value
    for path, module in saved.items():
        for key, value in module.module.state_dict().items():
            state[f"{path}.module.{key}"] = value
    return state


def load_adapter_state_dict(
    model: nn.Module, state: Mapping[str, Tensor], *, allow_nonfinite: bool = False
) -> None:
    """Load adapter state (as `adapter_state_dict` gives it); keys and shapes must match exactly.

    Everything is checked before anything is written: keys, shapes, dtypes (a floating-point tensor takes only
    floating-point values) and, unless `allow_nonfinite`, NaN / Inf values. A base weight that the loaded state
    moves (PiSSA's A0, B0) is applied only once every layer has loaded; if a layer refuses its state (a base
    that would not be finite), every adapter is put back as it was.

    Args:
        model: an adapted model.
        state: the adapter state, keyed as `adapter_state_dict(model)`.
        allow_nonfinite: load NaN / Inf values too (a moved base that would not be finite is still refused).

    Raises:
        ValueError: missing or unexpected keys, a shape or dtype mismatch, NaN / Inf values, or a layer whose
            loaded state does not fit its base (all are named); nothing is loaded then.
    """
    own = adapter_state_dict(model)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            "adapter state does not fit the model: "
            f"missing {missing[:10]}{' ...' if len(missing) > 10 else ''}, "
            f"unexpected {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}, "
            f"shape mismatches {wrong[:10]}"
        )
    try:
        values = check_tensors(state, own, finite=not allow_nonfinite)
    except ValueError as err:
        raise ValueError(f"adapter state does not fit the model: {err}") from err
    layers = dict(adapters(model))
    undo = _undo_record(layers.values(), own)
    try:
        with deferring_base_changes():
            for adapter in layers.values():
                adapter.before_load_()
            with torch.no_grad():
                for key, value in values.items():
                    own[key].copy_(value)
            for path, adapter in layers.items():
                try:
                    adapter.after_load_()
                except ValueError as err:
                    raise ValueError(f"layer {path!r}: {err}") from err
    except BaseException:
        undo()
        raise
    for adapter in layers.values():
        adapter.commit_base_()


def _undo_record(layers: Iterable[Adapter], own: Mapping[str, Tensor]) -> Callable[[], None]:
    """A function that puts the adapters back as they are now: their tensors' values and their plain attributes
    (a pending base, `_moved`, ...), so that a load failing half-way changes nothing."""
    values = {key: value.detach().clone() for key, value in own.items()}
    attributes = [(adapter, dict(vars(adapter))) for adapter in layers]

    @torch.no_grad()
    def undo() -> None:
        for key, value in values.items():
            own[key].copy_(value)
        for adapter, before in attributes:
            for name in [n for n in vars(adapter) if n not in before]:
                del vars(adapter)[name]
            vars(adapter).update(before)

    return undo
