"""Shared cross-layer state (issue 7): the bank modules that many adapted layers compute with.

A bank lives once per model, registered by `lx.adapt_` at the root as `loraredux_banks.<key>` (an `nn.ModuleDict`),
and each adapter that uses it holds a plain reference (not a submodule) and its coordinates in the bank. So the
model's parameters, `.to()`, `model.state_dict()` and `lx.adapter_state_dict` see each shared tensor once, however
many layers use it; `lx.merge_` and `lx.unadapt_` remove the banks with the adapters.

Layers of different shapes cannot share one (out, in) factor: `shape_groups` splits a plan by shape (attention
against MLP, grouped-query attention's narrower K/V), and each group gets its own bank. VeRA instead keeps PEFT's
one bank of the largest shape, sliced per layer, so that its files are PEFT's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..bases import BaseView, view_of

__all__ = [
    "GROUPINGS",
    "Bank",
    "build_grouped",
    "check_one_config",
    "coordinates",
    "group_layers",
    "orthonormal_",
    "use_bank",
]

#: How layers are grouped into banks: by (out, in) shape, or by module name and shape (one bank per matrix kind,
#: e.g. every q_proj), which is how LoTR stacks its tensors.
GROUPINGS = ("shape", "kind")


class Bank(nn.Module):
    """A shared module with the key it is registered under (`loraredux_banks.<key>`)."""

    def __init__(self, key: str) -> None:
        super().__init__()
        if not key or "." in key:
            raise ValueError(f"a bank key is a non-empty name without dots, got {key!r}")
        self.key = key

    def extra_repr(self) -> str:
        return f"key={self.key!r}"


@torch.no_grad()
def orthonormal_(factor: Tensor) -> Tensor:
    """Fill an (n, r) factor with orthonormal columns, the QR of a float64 Gaussian draw from torch's RNG; where
    n < r (a mode smaller than its rank) with the draw itself scaled by 1 / sqrt(n)."""
    n, r = factor.shape
    draw = torch.randn(n, r, dtype=torch.float64)
    return factor.copy_(torch.linalg.qr(draw).Q if n >= r else draw / n**0.5)


def use_bank(adapter: nn.Module, bank: Bank) -> None:
    """Give `adapter` a reference to `bank` that is not a submodule (so its tensors are not the adapter's)."""
    object.__setattr__(adapter, "_bank", bank)


def group_layers(paths_and_views: Mapping[str, BaseView], by: str) -> dict[str, list[str]]:
    """Group layer paths into banks: `{group name: [paths]}`, groups in order of their first layer.

    `by="shape"`: one group per (out, in), named "<out>x<in>"; `by="kind"`: one per module name (the last path
    component: q_proj, value, ...) and shape, named "<kind>_<out>x<in>".
    """
    if by not in GROUPINGS:
        raise ValueError(f"group must be one of {GROUPINGS}, got {by!r}")
    groups: dict[str, list[str]] = {}
    for path, view in paths_and_views.items():
        shape = f"{view.out_features}x{view.in_features}"
        name = shape if by == "shape" else f"{path.rpartition('.')[2]}_{shape}"
        groups.setdefault(name.replace(".", "_"), []).append(path)
    return groups


def coordinates(paths: list[str]) -> tuple[list[str], list[str], dict[str, tuple[int, int]]]:
    """Each layer's place in a stacked (out, in, layer, kind) tensor: the layer is the module's parent path (one
    transformer block's attention or MLP, "model.layers.3.self_attn"), the kind its own name ("q_proj").

    Returns:
        (the distinct parents, the distinct kinds, {path: (layer index, kind index)}), in order of appearance.
    """
    parents: list[str] = []
    kinds: list[str] = []
    place: dict[str, tuple[int, int]] = {}
    for path in paths:
        parent, _, kind = path.rpartition(".")
        if parent not in parents:
            parents.append(parent)
        if kind not in kinds:
            kinds.append(kind)
        place[path] = (parents.index(parent), kinds.index(kind))
    return parents, kinds, place


def check_one_config(
    config: Any, layers: Mapping[str, tuple[nn.Module, Any]], what: str = "rank or alpha"
) -> None:
    """Refuse per-layer configs (rank_pattern / alpha_pattern) for a method whose layers share factors."""
    different = sorted(path for path, (_, c) in layers.items() if c != config)
    if different:
        raise ValueError(
            f"{config.method}: layers share their factors, so a per-layer {what} cannot apply "
            f"(layers {different[:5]})"
        )


def build_grouped(
    config: Any,
    layers: Mapping[str, tuple[nn.Module, Any]],
    by: str,
    make_bank: Callable[[str, list[BaseView], list[str]], Bank],
    make_adapter: Callable[[nn.Module, Bank, str], nn.Module],
) -> dict[str, Any]:
    """Adapters for a method with one bank per group of layers (`group_layers`): check that the layers share one
    config and are of supported kinds, make each group's bank (`make_bank(key, views, paths)`, key
    "<method>_<group>"), then each layer's adapter on its bank (`make_adapter(module, bank, path)`). Errors name
    the layer."""
    check_one_config(config, layers)
    views: dict[str, BaseView] = {}
    for path, (module, _) in layers.items():
        try:
            views[path] = view_of(module)
        except TypeError as err:
            raise TypeError(f"{path}: {err}") from err
        if views[path].kind not in config.base_kinds:
            raise TypeError(
                f"{path}: {config.method} does not support a {type(module).__name__} base (it supports "
                f"{', '.join(config.base_kinds)} layers)"
            )
    built: dict[str, Any] = {}
    for group, paths in group_layers(views, by).items():
        bank = make_bank(f"{config.method}_{group}", [views[p] for p in paths], paths)
        for path in paths:
            try:
                built[path] = make_adapter(layers[path][0], bank, path)
            except (ValueError, TypeError) as err:
                raise type(err)(f"{path}: {err}") from err
    return {path: built[path] for path in layers}  # in plan order
